"""A/B of the trellis kernels across builds of the native library, samples interleaved (a, b, ..., a, b,
...) so that a slow spell of the machine hits every build alike.

``--kernel matmul``: the int8 decode-matvec (``qs_trellis_matmul_int8``, batch 1); every build must give
the same output bits (checked); prints G weights/s (m·n / time) per build. ``--kernel viterbi``: the
tail-biting Viterbi (``qs_viterbi``, 1MAD code, L = 16) over seeded N(0, 1) sequences of 256 weights;
prints ms per sequence, the MSE of the paths found and the share of states equal to the first build's
(builds of different search algorithms may differ in a few ties), for each build and each ``--metrics``
path metric (``float32``, ``int16``: the 16-bit costs; builds older than them ignore the choice and run
float32). Medians of the samples.

Build the libraries to compare first, e.g. the current tree's and an older commit's::

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/ab_trellis.py --libs /tmp/old/src/quipsharp/_qskernels.abi3.so \\
        src/quipsharp/_qskernels.abi3.so --level avx512vnni --bits 2 --threads 1 2 --json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from _common import machine_info, today
from quipsharp.codebooks import trellis as tr
from quipsharp.kernels.native import LEVELS  # the C library's enum order
from quipsharp.kernels.native import VITERBI_METRICS as METRICS  # qs_viterbi's metric argument

GIGA = 1e9
VITERBI_SEQUENCES = 64


def _interleave(libs: list, repeats: int, run: Callable) -> list[list[float]]:
    """``run(lib)`` ``repeats`` times per build, interleaved -> seconds per sample, per build."""
    samples: list[list[float]] = [[] for _ in libs]
    for _ in range(repeats):
        for index, (lib, times) in enumerate(zip(libs, samples, strict=True)):
            start = time.perf_counter()
            rc = run(index, lib)
            times.append(time.perf_counter() - start)
            if rc != 0:
                raise SystemExit(f"{lib._name}: returned {rc}")
    return samples


def _run_matmul(codes, m: int, n: int, k: int, x, outs: list, threads: int, level: int, i: int, lib) -> int:
    return lib.qs_trellis_matmul_int8(codes.data_ptr(), m, n, k, x.data_ptr(), 1, outs[i].data_ptr(), threads, level)


def _run_viterbi(x, code, k: int, states: list, costs, threads: int, level: int, metrics: list, i: int, lib) -> int:
    return lib.qs_viterbi(x.data_ptr(), VITERBI_SEQUENCES, tr.SEQUENCE, code.data_ptr(), tr.STATE_BITS, k, 1, 1,
                          states[i].data_ptr(), costs.data_ptr(), threads, level, metrics[i])


def matmul_rows(args: argparse.Namespace, libs: list) -> list[dict]:
    import torch

    m, n = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in args.bits:
        codes = torch.randint(-(1 << 15), 1 << 15, (m // 16, n // 16 * 16 * k), generator=gen,
                              dtype=torch.int32).to(torch.int16)
        x = torch.randn(1, n, generator=gen)
        for threads in args.threads:
            outs = [torch.empty(1, m) for _ in libs]
            samples = _interleave(libs, args.repeats, partial(_run_matmul, codes, m, n, k, x, outs, threads,
                                                              LEVELS.index(args.level)))
            if not all(torch.equal(outs[0], out) for out in outs):
                raise SystemExit("the builds disagree on the output bits")
            for path, times in zip(args.libs, samples, strict=True):
                seconds = statistics.median(times)
                rows.append({"kernel": "matmul", "lib": path, "level": args.level, "bits": k, "threads": threads,
                             "shape": [m, n], "median_ms": seconds * 1e3, "gw_s": m * n / seconds / GIGA})
                print(f"{args.level} k={k} t={threads} {path}: {seconds * 1e3:.3f} ms, "
                      f"{m * n / seconds / GIGA:.2f} G w/s")
    return rows


def viterbi_rows(args: argparse.Namespace, libs: list) -> list[dict]:
    import torch

    code = tr.code_table("1mad").to(torch.float32).contiguous()
    x = torch.randn(VITERBI_SEQUENCES, tr.SEQUENCE, generator=torch.Generator().manual_seed(1))
    variants = [(path, lib, metric) for path, lib in zip(args.libs, libs, strict=True) for metric in args.metrics]
    metrics = [METRICS.index(metric) for _, _, metric in variants]
    rows = []
    for k in args.bits:
        for threads in args.threads:
            states = [torch.empty(VITERBI_SEQUENCES, tr.SEQUENCE, dtype=torch.int32) for _ in variants]
            costs = torch.empty(VITERBI_SEQUENCES)
            samples = _interleave([lib for _, lib, _ in variants], args.repeats,
                                  partial(_run_viterbi, x, code, k, states, costs, threads, LEVELS.index(args.level),
                                          metrics))
            for (path, _, metric), times, got in zip(variants, samples, states, strict=True):
                ms = statistics.median(times) / VITERBI_SEQUENCES * 1e3
                mse = ((tr.decode(got.to(torch.int64), code) - x) ** 2).mean().item()
                same = (got == states[0]).double().mean().item()
                rows.append({"kernel": "viterbi", "lib": path, "metric": metric, "level": args.level, "bits": k,
                             "threads": threads, "ms_per_sequence": ms, "mse": mse, "states_equal_to_first": same})
                print(f"viterbi {args.level} k={k} t={threads} {path} {metric}: {ms:.3f} ms/sequence, "
                      f"mse {mse:.5f}, {same:.4%} states as the first run's")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", nargs="+", required=True, help="paths of _qskernels builds to compare")
    parser.add_argument("--kernel", choices=("matmul", "viterbi"), default="matmul")
    parser.add_argument("--level", default="avx512vnni", choices=LEVELS)
    parser.add_argument("--bits", type=int, nargs="+", default=[2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--shape", default="4096x4096", help="MxN (matmul)")
    parser.add_argument("--metrics", nargs="+", default=["float32"], choices=METRICS,
                        help="path metrics (viterbi; each build runs each)")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    libs = [ctypes.CDLL(path) for path in args.libs]
    for lib in libs:
        lib.qs_trellis_matmul_int8.argtypes = [p, i64, i64, i32, p, i64, p, i32, i32]
        lib.qs_trellis_matmul_int8.restype = i32
        lib.qs_viterbi.argtypes = [p, i64, i64, p, i32, i32, i32, i32, p, p, i32, i32, i32]
        lib.qs_viterbi.restype = i32
    rows = (matmul_rows if args.kernel == "matmul" else viterbi_rows)(args, libs)
    if args.json:
        print(json.dumps({"date": today(), "machine": machine_info(), "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
