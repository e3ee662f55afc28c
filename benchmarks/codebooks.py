"""Benchmark of the codebooks on a unit Gaussian: MSE at the MSE-optimal scale and search speed.

For every quantizer the MSE-optimal input RMS ρ is found by golden-section search on a subsample
(common random numbers), then the per-coordinate MSE ``mean((g − Q(ρg)/ρ)²)`` is measured on all
samples and the nearest-search throughput is timed (median of 3 runs over all samples).

Usage::

    python benchmarks/codebooks.py [--json] [--samples N] [--seed S]

``halfint2`` is the 1-D grid {±½, ±3/2} (2 bits/weight, no vector quantization), the scalar
baseline the E8P12 grid generalises.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from _common import machine_info, median_time, today
from quipsharp.codebooks import get_codebook
from quipsharp.codebooks.calibration import gaussian_samples, optimal_scale, scaled_mse

logger = logging.getLogger("benchmarks.codebooks")

DIM = 8
DEFAULT_SAMPLES = 1 << 20  # 8-dim vectors, i.e. 8.4M scalar samples
DEFAULT_SCALE_SAMPLES = 1 << 17  # vectors used by the scale search
DEFAULT_SEED = 0
TIMED_RUNS = 3
#: The golden-section search brackets ρ ∈ [lo·ρ₀, hi·ρ₀] around the codebook's constant ρ₀.
BRACKET = (0.75, 1.3)
SCALE_RTOL = 1e-4
HALFINT_MAX = 1.5  # the grid {±½, ±3/2}
HALFINT_INITIAL_SCALE = 1.0
NAMES = ("scalar2", "scalar3", "scalar4", "halfint2", "E8P12", "E8P12RVQ3B", "E8P12RVQ4B")


def halfint_quantize(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of {±½, ±3/2} per coordinate: ``[..., d] -> [..., d]``."""
    return (torch.floor(x) + 0.5).clamp(-HALFINT_MAX, HALFINT_MAX)


@dataclass(frozen=True)
class Quantizer:
    name: str
    bits_per_weight: float
    initial_scale: float
    quantize: Callable[[torch.Tensor], torch.Tensor]


def quantizers() -> list[Quantizer]:
    out = []
    for name in NAMES:
        if name == "halfint2":
            out.append(Quantizer(name, 2.0, HALFINT_INITIAL_SCALE, halfint_quantize))
            continue
        cb = get_codebook(name)
        out.append(Quantizer(name, cb.bits_per_weight, cb.opt_scale, lambda v, cb=cb: cb.quantize(v)[0]))
    return out


def run(samples: int, seed: int, scale_samples: int) -> dict[str, object]:
    g = gaussian_samples(samples, DIM, seed)
    sub = g[: min(scale_samples, samples)]
    result: dict[str, dict[str, float]] = {
        "mse": {},
        "bits_per_weight": {},
        "opt_scale": {},
        "search_vectors_per_s": {},
    }
    for q in quantizers():
        lo, hi = BRACKET[0] * q.initial_scale, BRACKET[1] * q.initial_scale
        rho, _ = optimal_scale(q.quantize, sub, lo, hi, SCALE_RTOL)
        mse = scaled_mse(q.quantize, g, rho)
        x = g * rho
        q.quantize(x[:1024])  # warm-up
        vps = samples / median_time(lambda q=q, x=x: q.quantize(x), TIMED_RUNS)
        logger.info("%-11s rho=%.4f mse=%.6f %.0f vectors/s", q.name, rho, mse, vps)
        result["mse"][q.name] = mse
        result["bits_per_weight"][q.name] = q.bits_per_weight
        result["opt_scale"][q.name] = rho
        result["search_vectors_per_s"][q.name] = vps
    return {
        **result,
        "machine": machine_info(),
        "date": today(),
        "config": {
            "samples": samples,
            "dim": DIM,
            "scale_samples": min(scale_samples, samples),
            "seed": seed,
        },
    }


def table(res: dict) -> str:
    rows = [f"{'codebook':<12}{'bits/w':>8}{'opt ρ':>9}{'MSE':>11}{'vectors/s':>13}"]
    for name in res["mse"]:
        rows.append(
            f"{name:<12}{res['bits_per_weight'][name]:>8g}{res['opt_scale'][name]:>9.4f}"
            f"{res['mse'][name]:>11.6f}{res['search_vectors_per_s'][name]:>13,.0f}"
        )
    cfg = res["config"]
    rows.append(f"({cfg['samples']:,} Gaussian {DIM}-dim vectors, seed {cfg['seed']}, {res['date']})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help=f"number of {DIM}-dim Gaussian vectors"
    )
    parser.add_argument(
        "--scale-samples", type=int, default=DEFAULT_SCALE_SAMPLES, help="vectors used by the scale search"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="torch.Generator seed")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run(args.samples, args.seed, args.scale_samples)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
