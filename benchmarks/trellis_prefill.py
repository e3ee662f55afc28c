"""A trellis layer's batch paths (issue 14): the fused float32 slabs (``qs_trellis_matmul``: each 16x16 tile
decoded once into L1 for the whole batch) against decoding the weight (``qs_trellis_decode``) for torch's
GEMM, per batch size and shape, samples interleaved. The crossover sets ``TRELLIS_SLAB_MAX_BATCH``. The
weight is decoded two ways: as the GEMM path did before (the portable decode into ``W``) and as it does
now (the level's tile decoder straight into ``Wᵀ``); the decode alone is timed too.

Usage::

    python benchmarks/trellis_prefill.py [--shapes 576x1536 4096x4096] [--batches 16 64 128 256 512 2048]
        [--bits 2] [--threads 2] [--repeats 5] [--json]

Random codes (speed does not depend on them), the default kernel level. Prints ms per call and the
ratio decode+GEMM (now) / slabs (above 1: the slabs are faster).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from _common import machine_info, today
from kernels import _interleaved_medians
from quipsharp import kernels
from quipsharp.kernels.native import TRELLIS_SLAB_MAX_BATCH


def _decode_gemm(kernel, x: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor, bits: int,
                 threads: int) -> torch.Tensor:
    """The GEMM path as it was: the portable decode into ``W`` ``[m, n]``, then ``x Wᵀ``."""
    m, n = weight.shape
    return x @ kernel.trellis_decode(codes, m, n, bits, threads, weight).T


def _decode_t_gemm(kernel, x: torch.Tensor, codes: torch.Tensor, weight_t: torch.Tensor, bits: int,
                   threads: int) -> torch.Tensor:
    """The GEMM path now: this level's decode straight into ``Wᵀ`` ``[n, m]``, then ``x Wᵀ``."""
    n, m = weight_t.shape
    return x @ kernel.trellis_decode(codes, m, n, bits, threads, weight_t, transposed=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["576x1536", "4096x4096"], help="MxN")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128, 256, 512, 2048])
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = kernels.select(None)
    portable = kernels.select("scalar")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        codes = torch.randint(-(1 << 15), 1 << 15, (m // 16, n // 16 * 16 * args.bits), generator=gen,
                              dtype=torch.int32).to(torch.int16)
        weight, weight_t = torch.empty(m, n), torch.empty(n, m)
        decodes = [partial(portable.trellis_decode, codes, m, n, args.bits, args.threads, weight),
                   partial(kernel.trellis_decode, codes, m, n, args.bits, args.threads, weight_t, transposed=True)]
        t_portable, t_level = _interleaved_medians(decodes, args.repeats)
        print(f"{m}x{n} decode alone: portable into W {t_portable * 1e3:.2f} ms, {kernel.name} into Wᵀ "
              f"{t_level * 1e3:.2f} ms ({t_portable / t_level:.1f}x)")
        rows.append({"shape": [m, n], "bits": args.bits, "threads": args.threads, "level": kernel.name,
                     "decode_portable_ms": t_portable * 1e3, "decode_level_transposed_ms": t_level * 1e3})
        for B in args.batches:
            x = torch.randn(B, n, generator=gen)
            old = partial(_decode_gemm, portable, x, codes, weight, args.bits, args.threads)
            new = partial(_decode_t_gemm, kernel, x, codes, weight_t, args.bits, args.threads)
            slabs = partial(kernel.trellis_matmul, x, codes, m, args.bits, threads=args.threads, int8=False)
            t_old, t_new, t_slabs = _interleaved_medians([old, new, slabs], args.repeats)
            row = {"shape": [m, n], "batch": B, "bits": args.bits, "threads": args.threads, "level": kernel.name,
                   "portable_decode_gemm_ms": t_old * 1e3, "decode_gemm_ms": t_new * 1e3, "slabs_ms": t_slabs * 1e3,
                   "ratio": t_new / t_slabs}
            rows.append(row)
            print(f"{m}x{n} B={B}: portable decode+GEMM {t_old * 1e3:.2f} ms, {kernel.name} decode into Wᵀ + GEMM "
                  f"{t_new * 1e3:.2f} ms, slabs {t_slabs * 1e3:.2f} ms, ratio {t_new / t_slabs:.2f}")
    if args.json:
        print(json.dumps({"date": today(), "machine": machine_info(), "args": vars(args),
                          "slab_max_batch": TRELLIS_SLAB_MAX_BATCH, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
