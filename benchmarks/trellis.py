"""Bitshift-trellis codes on a unit Gaussian (issue 14): MSE per code and bit width, open and
tail-biting, next to the rate–distortion bound 2^-2k; and the native Viterbi's speed.

Usage::

    python benchmarks/trellis.py [--sequences 512] [--threads 2 1] [--levels avx2 avx512vnni]
        [--metrics int16 float32] [--json]

MSE: ``--sequences`` seeded N(0, 1) sequences of 256 weights (L = 16; 1MAD and 3INST: V = 1, the
unit-variance code; HYB: V = 2, its initial k-means table of RMS 0.968; inputs at unit scale),
quantized by Viterbi; *open* paths also spend the first state's
L − k extra bits, *tail-biting* ones exactly k bits per weight (QTIP's two passes). Speed: milliseconds
per 256-weight tail-biting sequence (two passes), median of 3 runs over 64 sequences, per kernel
level and thread count; every level returns the same paths. Both for each ``--metrics`` path metric
(``int16``, the default search, and ``float32``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from _common import machine_info, today
from quipsharp.codebooks import trellis as tr
from quipsharp.kernels.native import viterbi as native_viterbi

BITS = (2, 3, 4)
TIMED_SEQUENCES = 64
TIMED_RUNS = 3


def mse_rows(sequences: int, threads: int, metrics: list[str]) -> list[dict]:
    x = torch.randn(sequences, tr.SEQUENCE, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in (*tr.CODES, tr.HYB):
        code = _code(name)
        for k in BITS:
            for metric in metrics:
                row = {"code": name, "bits": k, "metric": metric, "bound": 2.0 ** (-2 * k)}
                for tail in (False, True):
                    states, _ = tr.viterbi(x, code, k, tail_biting=tail, threads=threads, metric=metric)
                    mse = ((tr.decode(states, code) - x) ** 2).mean().item()
                    row["tail_biting_mse" if tail else "open_mse"] = mse
                rows.append(row)
    return rows


def _code(name: str) -> torch.Tensor:
    """``[2^16, V]``: a computed code's unit-variance table, or HYB's from its initial (k-means) table."""
    return tr.hyb_table(tr.hyb_initial_lut()) if name == tr.HYB else tr.code_table(name)


def speed_rows(levels: list[str], threads: list[int], metrics: list[str]) -> list[dict]:
    x = torch.randn(TIMED_SEQUENCES, tr.SEQUENCE, generator=torch.Generator().manual_seed(1))
    rows = []
    for name in ("1mad", tr.HYB):
        code = _code(name)
        for level in levels:
            for t in threads:
                for k in BITS:
                    for metric in metrics:
                        times = []
                        for _ in range(TIMED_RUNS):
                            start = time.perf_counter()
                            native_viterbi(x, code, tr.STATE_BITS, k * code.shape[1], True, threads=t, level=level,
                                           metric=metric)
                            times.append((time.perf_counter() - start) / TIMED_SEQUENCES * 1e3)
                        rows.append({"code": name, "level": level, "threads": t, "bits": k, "metric": metric,
                                     "ms_per_sequence": statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--levels", nargs="+", default=None, help="kernel levels to time (default: the selected)")
    parser.add_argument("--metrics", nargs="+", default=list(tr.METRICS), choices=tr.METRICS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from quipsharp import kernels

    levels = args.levels or [kernels.select(None).name]
    report = {"date": today(), "machine": machine_info(), "args": vars(args),
              "mse": mse_rows(args.sequences, max(args.threads), args.metrics),
              "speed": speed_rows(levels, args.threads, args.metrics)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for r in report["mse"]:
        print(f"{r['code']:6s} k={r['bits']} {r['metric']:7s} open {r['open_mse']:.5f} "
              f"tail-biting {r['tail_biting_mse']:.5f} bound {r['bound']:.5f}")
    for r in report["speed"]:
        print(f"{r['code']:5s} {r['level']:11s} {r['threads']} thr k={r['bits']} {r['metric']:7s} "
              f"{r['ms_per_sequence']:.2f} ms/sequence")


if __name__ == "__main__":
    main()
