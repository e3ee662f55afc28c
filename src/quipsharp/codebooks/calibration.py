"""Numerical calibration of codebook scales on a unit Gaussian.

A codebook is used on inputs of RMS ``ρ`` (``opt_scale``); its per-coordinate MSE on a unit
Gaussian ``g`` at scale ``ρ`` is ``E[(g − Q(ρ·g)/ρ)²]``. These helpers measure that and find the
minimising ``ρ`` by golden-section search with common random numbers (the same samples for every
``ρ``, so the noise of the minimiser is far below the noise of the MSE itself). They are used by the
tests (which re-derive the hard-coded constants) and by ``benchmarks/codebooks.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from quipsharp.codebooks.base import VectorCodebook

logger = logging.getLogger(__name__)

#: 1/φ for golden-section search.
INV_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: Default relative tolerance of the scale search.
DEFAULT_SCALE_RTOL = 1e-4


def gaussian_samples(n_vectors: int, dim: int, seed: int) -> torch.Tensor:
    """``[n_vectors, dim]`` float32 unit-Gaussian samples from an explicitly seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_vectors, dim, generator=gen, dtype=torch.float32)


def scaled_mse(
    quantize: Callable[[torch.Tensor], torch.Tensor], samples: torch.Tensor, scale: float
) -> float:
    """Per-coordinate MSE ``mean((g − Q(scale·g)/scale)²)``.

    Args:
        quantize: maps ``[n, d]`` inputs to their reconstructions ``[n, d]``.
        samples: ``[n, d]`` unit-Gaussian samples ``g``.
        scale: input RMS ``ρ``.
    """
    xhat = quantize(samples * scale)
    err = samples.to(torch.float64) - xhat.to(torch.float64) / scale
    return float(err.square().mean())


def codebook_mse(codebook: VectorCodebook, samples: torch.Tensor, scale: float | None = None) -> float:
    """Per-coordinate Gaussian MSE of ``codebook`` at ``scale`` (default: its ``opt_scale``)."""
    rho = codebook.opt_scale if scale is None else scale
    return scaled_mse(lambda v: codebook.quantize(v)[0], samples, rho)


def golden_section_minimize(
    f: Callable[[float], float], lo: float, hi: float, rtol: float = DEFAULT_SCALE_RTOL
) -> tuple[float, float]:
    """Minimise a unimodal ``f`` on ``[lo, hi]`` by golden-section search.

    Returns:
        ``(argmin, min)`` with the bracket shrunk below ``rtol · argmin``.
    """
    a, b = lo, hi
    c = b - INV_GOLDEN * (b - a)
    d = a + INV_GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > rtol * (a + b) / 2:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - INV_GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + INV_GOLDEN * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def optimal_scale(
    quantize: Callable[[torch.Tensor], torch.Tensor],
    samples: torch.Tensor,
    lo: float,
    hi: float,
    rtol: float = DEFAULT_SCALE_RTOL,
) -> tuple[float, float]:
    """MSE-optimal input RMS for a unit Gaussian.

    Args:
        quantize: maps ``[n, d]`` inputs to reconstructions ``[n, d]``.
        samples: ``[n, d]`` unit-Gaussian samples (reused for every candidate scale).
        lo, hi: bracket of the search.
        rtol: relative tolerance on the scale.
    Returns:
        ``(scale, mse)``.
    """
    scale, mse = golden_section_minimize(lambda s: scaled_mse(quantize, samples, s), lo, hi, rtol)
    logger.debug("optimal scale %.5f (MSE %.6f) in [%g, %g]", scale, mse, lo, hi)
    return scale, mse


def parabola_vertex(xs: tuple[float, float, float], ys: tuple[float, float, float]) -> float:
    """Abscissa of the vertex of the parabola through three points (for quick optimum checks)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if den == 0:
        raise ZeroDivisionError("parabola_vertex: collinear points")
    return x1 - 0.5 * num / den
