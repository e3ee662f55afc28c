"""Per-block costs at real model shapes (issue 16, the plan in docs/scaling.md): the time of
``quantize_weight`` per linear shape, of the exact Hessian accumulation per 1,000 tokens, and of a
block's float forward per 1,000 tokens, with random weights and inputs.

    .venv/bin/python benchmarks/scaling.py --json --results benchmarks/results/scaling_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from quipsharp.config import QuIPSharpConfig
from quipsharp.hessian import HessianAccumulator
from quipsharp.quantize import quantize_weight

#: (out, in) shapes of the linears of Llama-2-7B (hidden 4096, MLP 11008) and a 70B-width square.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]
TOKENS = 2048


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[f"{m}x{n}" for m, n in SHAPES])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--codebook", default="e8p")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes:
        m, n = (int(v) for v in shape.split("x"))
        x = torch.randn(TOKENS, n, generator=gen)
        acc = HessianAccumulator(n)
        accumulate = timed(lambda acc=acc, x=x: acc.add_batch(x))
        H = acc.mean() + 0.1 * torch.eye(n, dtype=torch.float64)
        W = torch.randn(m, n, generator=gen) / n**0.5
        cfg = QuIPSharpConfig(bits=args.bits, codebook=args.codebook)
        quant = timed(lambda W=W, H=H, cfg=cfg: quantize_weight(W, H, cfg, seed=1))
        dense = torch.nn.Linear(n, m, bias=False)
        forward = min(timed(lambda dense=dense, x=x: dense(x)) for _ in range(3))
        row = {"shape": [m, n], "weights": m * n, "quantize_s": quant, "quantize_us_per_weight": quant / (m * n) * 1e6,
               "hessian_s_per_1k_tokens": accumulate / TOKENS * 1000,
               "forward_s_per_1k_tokens": forward / TOKENS * 1000, "hessian_bytes_float64": n * n * 8}
        rows.append(row)
        print(json.dumps(row) if args.json else row, flush=True)
    result = {"bits": args.bits, "codebook": args.codebook, "threads": torch.get_num_threads(), "rows": rows,
              "measured": datetime.date.today().isoformat()}
    if args.results:
        with open(args.results, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)


if __name__ == "__main__":
    main()
