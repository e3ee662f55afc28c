"""A/B of the trellis int8 decode-matvec (``qs_trellis_matmul_int8``, batch 1) across builds of the native
library, samples interleaved (a, b, ..., a, b, ...) so that a slow spell of the machine hits every build alike.

Build the libraries to compare first, e.g. the current tree's and an older commit's::

    git worktree add /tmp/old <commit> && (cd /tmp/old && python setup.py build_ext --inplace)
    python benchmarks/ab_trellis.py --libs /tmp/old/src/quipsharp/_qskernels.abi3.so \\
        src/quipsharp/_qskernels.abi3.so --level avx512vnni --bits 2 --threads 1 2 --json

Each build must give the same output bits (checked). Prints G weights/s (m·n / time) per build, medians.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

from _common import machine_info, today
from quipsharp.kernels.native import LEVELS  # the C library's enum order

GIGA = 1e9


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", nargs="+", required=True, help="paths of _qskernels builds to compare")
    parser.add_argument("--level", default="avx512vnni", choices=LEVELS)
    parser.add_argument("--bits", type=int, nargs="+", default=[2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--shape", default="4096x4096", help="MxN")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    libs = [ctypes.CDLL(path) for path in args.libs]
    for lib in libs:
        lib.qs_trellis_matmul_int8.argtypes = [p, i64, i64, i32, p, i64, p, i32, i32]
        lib.qs_trellis_matmul_int8.restype = i32
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in args.bits:
        codes = torch.randint(-(1 << 15), 1 << 15, (m // 16, n // 16 * 16 * k), generator=gen,
                              dtype=torch.int32).to(torch.int16)
        x = torch.randn(1, n, generator=gen)
        for threads in args.threads:
            outs = [torch.empty(1, m) for _ in libs]
            samples: list[list[float]] = [[] for _ in libs]
            for _ in range(args.repeats):
                for lib, out, times in zip(libs, outs, samples, strict=True):
                    start = time.perf_counter()
                    rc = lib.qs_trellis_matmul_int8(codes.data_ptr(), m, n, k, x.data_ptr(), 1, out.data_ptr(),
                                                    threads, LEVELS.index(args.level))
                    times.append(time.perf_counter() - start)
                    if rc != 0:
                        raise SystemExit(f"{lib._name}: qs_trellis_matmul_int8 returned {rc}")
            if not all(torch.equal(outs[0], out) for out in outs):
                raise SystemExit("the builds disagree on the output bits")
            for path, times in zip(args.libs, samples, strict=True):
                seconds = statistics.median(times)
                rows.append({"lib": path, "level": args.level, "bits": k, "threads": threads, "shape": [m, n],
                             "median_ms": seconds * 1e3, "gw_s": m * n / seconds / GIGA})
                print(f"{args.level} k={k} t={threads} {path}: {seconds * 1e3:.3f} ms, "
                      f"{m * n / seconds / GIGA:.2f} G w/s")
    if args.json:
        print(json.dumps({"date": today(), "machine": machine_info(), "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
