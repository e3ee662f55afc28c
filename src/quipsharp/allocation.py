"""Bits per layer for a chosen model size (``quipsharp quantize --target-bpw``).

Each quantized layer ``l`` with ``n_l`` weights gets a width ``b_l ∈ {2, 3, 4}``; its damage is its
proxy loss ``p_l(b)`` measured at each width with the calibration Hessians. The model's
log-perplexity gap follows the layers' proxy loss, about equally per layer whatever its size
(BENCHMARKS.md: 36–48 nats per unit of mean relative proxy loss at every width; v_proj, 3% of the
weights, carries 21% of the 4-bit gap). So the allocation solves

    minimise  Σ_l p_l(b_l)   subject to   Σ_l b_l n_l ≤ B · Σ_l n_l

for a target of ``B`` bits per quantized weight: a multiple-choice knapsack, solved exactly by
dynamic programming over the budget in units of the layers' common weight count (for transformer
shapes a few thousand states), or by Lagrangian relaxation plus a greedy fill when the units are too
fine. Pure maths: no I/O, no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from quipsharp.config import SUPPORTED_BITS

#: Above this many budget states the exact DP gives way to the Lagrangian method.
MAX_DP_STATES = 2_000_000
LAGRANGE_ITERATIONS = 100


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer: its name, weight count and proxy loss at each width it may take."""

    name: str
    weights: int
    losses: dict[int, float]

    def __post_init__(self) -> None:
        if self.weights <= 0:
            raise ValueError(f"{self.name}: weight count must be positive, got {self.weights}")
        if not self.losses or any(b not in SUPPORTED_BITS for b in self.losses):
            raise ValueError(f"{self.name}: losses must be given for widths in {SUPPORTED_BITS}, "
                             f"got {sorted(self.losses)}")
        if any(not math.isfinite(v) or v < 0 for v in self.losses.values()):
            raise ValueError(f"{self.name}: proxy losses must be finite and ≥ 0, got {self.losses}")


def bits_per_weight(layers: Sequence[LayerSensitivity], bits: dict[str, int]) -> float:
    """Mean code bits per quantized weight of an allocation."""
    total = sum(layer.weights for layer in layers)
    return sum(bits[layer.name] * layer.weights for layer in layers) / total


def total_loss(layers: Sequence[LayerSensitivity], bits: dict[str, int]) -> float:
    """``Σ_l p_l(b_l)`` of an allocation."""
    return sum(layer.losses[bits[layer.name]] for layer in layers)


def allocate_bits(layers: Sequence[LayerSensitivity], target_bpw: float) -> dict[str, int]:
    """The widths ``{name: bits}`` that minimise the summed proxy loss within ``target_bpw`` mean code
    bits per weight (exact unless the budget units are too fine; see the module docstring).

    Raises:
        ValueError: the target is below what the narrowest widths need, or no layers are given.
    """
    if not layers:
        raise ValueError("no layers to allocate bits to")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    total = sum(layer.weights for layer in layers)
    floor = sum(min(layer.losses) * layer.weights for layer in layers) / total
    if target_bpw < floor - 1e-12:
        raise ValueError(f"a target of {target_bpw:g} bits per weight is below the narrowest widths' {floor:g}")
    unit = reduce(math.gcd, (layer.weights for layer in layers))
    budget = math.floor(target_bpw * total / unit + 1e-9)  # in bit·unit
    states = budget - sum(min(layer.losses) * layer.weights // unit for layer in layers)
    if states * len(layers) <= MAX_DP_STATES:
        return _dynamic_programme(layers, unit, budget)
    return _lagrangian(layers, target_bpw * total)


def _dynamic_programme(layers: Sequence[LayerSensitivity], unit: int, budget: int) -> dict[str, int]:
    """Exact: ``best[c]`` = least loss of the layers so far using ``c`` bit·units above their narrowest widths."""
    base = [min(layer.losses) for layer in layers]
    spare = budget - sum(b * layer.weights // unit for b, layer in zip(base, layers, strict=True))
    inf = math.inf
    best = [0.0] + [inf] * spare
    choices: list[list[int]] = []  # per layer, per budget: the width chosen
    for layer, low in zip(layers, base, strict=True):
        size = layer.weights // unit
        new = [inf] * (spare + 1)
        pick = [low] * (spare + 1)
        for bits, loss in sorted(layer.losses.items()):
            cost = (bits - low) * size
            for c in range(cost, spare + 1):
                value = best[c - cost] + loss
                if value < new[c]:
                    new[c], pick[c] = value, bits
        best = new
        choices.append(pick)
    c = min(range(spare + 1), key=lambda k: (best[k], k))
    out: dict[str, int] = {}
    for layer, low, pick in zip(reversed(layers), reversed(base), reversed(choices), strict=True):
        bits = pick[c]
        out[layer.name] = bits
        c -= (bits - low) * (layer.weights // unit)
    return {layer.name: out[layer.name] for layer in layers}


def _lagrangian(layers: Sequence[LayerSensitivity], budget_bits: float) -> dict[str, int]:
    """Near-optimal: the allocation minimising ``Σ p_l(b_l) + λ Σ b_l n_l`` for the smallest ``λ``
    within budget (a point on the lower convex hull), then upgrades by loss saved per bit while they fit."""

    def choose(lam: float) -> dict[str, int]:
        return {layer.name: min(layer.losses, key=lambda b, la=layer: (la.losses[b] + lam * b * la.weights, b))
                for layer in layers}

    def used(bits: dict[str, int]) -> float:
        return sum(bits[layer.name] * layer.weights for layer in layers)

    lo, hi = 0.0, 1.0
    while used(choose(hi)) > budget_bits and hi < 1e30:
        hi *= 2
    if used(choose(lo)) <= budget_bits:
        return choose(lo)
    for _ in range(LAGRANGE_ITERATIONS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(choose(mid)) <= budget_bits else (mid, hi)
    bits = choose(hi)
    spent = used(bits)
    while True:  # greedy fill of what the hull point leaves over
        best, gain = None, 0.0
        for layer in layers:
            for wider in (b for b in layer.losses if b > bits[layer.name]):
                extra = (wider - bits[layer.name]) * layer.weights
                saved = layer.losses[bits[layer.name]] - layer.losses[wider]
                if spent + extra <= budget_bits and saved / extra > gain:
                    best, gain = (layer.name, wider, extra), saved / extra
        if best is None:
            return bits
        bits[best[0]] = best[1]
        spent += best[2]
