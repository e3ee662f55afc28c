"""Proxy loss of BlockLDLQ vs nearest rounding, with and without the RHT (QuIP# §3–4).

Random ``m × n`` weights (Student-t rows with varying scales) and realistic Hessians built from
synthetic activations: a power-law spectrum, log-normal channel scales and one outlier channel.
Figures are relative proxy losses ``tr(E H Eᵀ) / tr(W H Wᵀ)`` with ``H`` normalised and undamped.

    python benchmarks/ldlq.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from _common import machine_info, today
from quipsharp.config import QuIPSharpConfig
from quipsharp.hessian import HessianAccumulator, normalize
from quipsharp.ldlq import proxy_loss
from quipsharp.quantize import dequantize, quantize_weight

STUDENT_T_DOF = 5.0
SPECTRUM_POWER = 1.5  # singular values of the activation mixing matrix fall off as k^-power
CHANNEL_LOG_STD = 0.5
OUTLIER_FACTOR = 30.0
TOKENS = 8192


def make_problem(m: int, n: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[m, n]`` and a Hessian ``[n, n]`` (float64) of the given kind."""
    gen = torch.Generator().manual_seed(seed)
    W = _student_t(m, n, gen)
    W = W * torch.exp(0.3 * torch.randn(m, 1, generator=gen))
    if kind == "identity":
        return W, torch.eye(n, dtype=torch.float64)
    k = torch.arange(1, n + 1, dtype=torch.float32)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    mix = (U * k.pow(-SPECTRUM_POWER)) @ torch.linalg.qr(torch.randn(n, n, generator=gen))[0]
    X = torch.randn(TOKENS, n, generator=gen) @ mix
    X = X / X.std(0) * torch.exp(CHANNEL_LOG_STD * torch.randn(n, generator=gen))
    if kind == "outlier":
        X[:, int(torch.randint(n, (1,), generator=gen))] *= OUTLIER_FACTOR
    acc = HessianAccumulator(n)
    acc.add_batch(X)
    return W, acc.mean()


def _student_t(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t samples from an explicit generator: z / sqrt(chi2 / dof)."""
    z = torch.randn(m, n, generator=gen)
    chi2 = torch.randn(m, n, int(STUDENT_T_DOF), generator=gen).square().sum(-1)
    return z / torch.sqrt(chi2 / STUDENT_T_DOF)


METHODS: dict[str, dict[str, Any]] = {
    "nearest": {"use_hessian": False, "use_hadamard": False},
    "nearest+rht": {"use_hessian": False, "use_hadamard": True},
    "ldlq": {"use_hessian": True, "use_hadamard": False},
    "ldlq+rht": {"use_hessian": True, "use_hadamard": True},
    "ldlq+rht+cd2": {"use_hessian": True, "use_hadamard": True, "cd_passes": 2},
}


def run(m: int, n: int, bits_list: list[int], kinds: list[str], seeds: list[int]) -> dict[str, Any]:
    rows = []
    for kind in kinds:
        for bits in bits_list:
            for method, opts in METHODS.items():
                losses, times = [], []
                for seed in seeds:
                    W, H = make_problem(m, n, kind, seed)
                    cfg = QuIPSharpConfig(
                        bits=bits, use_hadamard=opts["use_hadamard"], cd_passes=opts.get("cd_passes", 0)
                    )
                    start = time.perf_counter()
                    qw = quantize_weight(W, H if opts["use_hessian"] else None, cfg, seed=seed)
                    times.append(time.perf_counter() - start)
                    Hn = normalize(H)
                    losses.append(proxy_loss(W, dequantize(qw), Hn) / proxy_loss(W, torch.zeros_like(W), Hn))
                rows.append(
                    {
                        "hessian": kind,
                        "bits": bits,
                        "method": method,
                        "rel_proxy_loss": statistics.median(losses),
                        "seconds": statistics.median(times),
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    return {"shape": [m, n], "seeds": seeds, "rows": rows, "machine": machine_info(), "date": today()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1536)
    parser.add_argument("--n", type=int, default=576)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--hessians", nargs="+", default=["powerlaw", "outlier"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.m, args.n, args.bits, args.hessians, args.seeds)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'hessian':10} {'bits':>4} {'method':14} {'rel proxy loss':>15} {'s':>7}")
    for r in result["rows"]:
        print(f"{r['hessian']:10} {r['bits']:4d} {r['method']:14} {r['rel_proxy_loss']:15.5f} {r['seconds']:7.2f}")


if __name__ == "__main__":
    main()
