"""Scalar Lloyd–Max codebooks: the no-lattice ablation (``use_e8_lattice=False``).

``ScalarCodebook(bits)`` quantizes each of 8 coordinates independently to the ``2**bits``-level
Lloyd–Max quantizer of a unit Gaussian, at the same storage rate as the lattice codebooks
(``bits`` bits/weight, ``bits`` bytes per 8 weights). Levels are computed at construction by Lloyd
iterations with exact Gaussian integrals (cell centroid ``(φ(a) − φ(b)) / (Φ(b) − Φ(a))``), which is
deterministic. Values: MSE 0.36338 (1 bit), 0.11748 (2), 0.034548 (3), 0.0095010 (4) (the last checked by
quadrature; tables often quote 0.009497).

Code: ``Σ_i level_index_i << (bits · i)`` (coordinate 0 in the lowest bits).
"""

from __future__ import annotations

import functools
import math

import torch

from quipsharp.codebooks.base import BITS_PER_BYTE
from quipsharp.codebooks.packing import MAX_CODE_BYTES, PackedCodebook, search_in_chunks

SCALAR_DIM = 8
#: Lloyd iterations stop when no level moves by more than this ...
LLOYD_TOL = 1e-13
#: ... or after this many iterations.
LLOYD_MAX_ITERS = 100_000
#: Initial levels are spread uniformly over ±this many standard deviations.
LLOYD_INIT_SPAN = 3.0
#: Lloyd–Max levels are for unit variance, so the MSE-optimal input RMS is 1 (a fixed point of
#: Lloyd's conditions is stationary under rescaling).
SCALAR_OPT_SCALE = 1.0
#: Temporary bytes per row of the search (a few ``[8]`` int64 / float copies).
_BYTES_PER_ROW = SCALAR_DIM * 8 * 4


def _phi(t: float) -> float:
    """Standard normal density (0 at ±inf)."""
    return 0.0 if math.isinf(t) else math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def _cdf(t: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


@functools.cache
def lloyd_max_gaussian(bits: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """Lloyd–Max quantizer of a unit Gaussian with ``2**bits`` levels.

    Returns:
        ``(levels, thresholds, mse)``: ``2**bits`` increasing levels, the ``2**bits − 1`` midpoints
        between them, and the per-sample MSE ``1 − Σ_i P(cell_i)·level_i²`` (valid at the
        centroid condition).
    """
    n = 1 << bits
    levels = [LLOYD_INIT_SPAN * (2 * i + 1 - n) / n for i in range(n)]
    for _ in range(LLOYD_MAX_ITERS):
        edges = [-math.inf, *((levels[i] + levels[i + 1]) / 2 for i in range(n - 1)), math.inf]
        new = [
            (_phi(edges[i]) - _phi(edges[i + 1])) / (_cdf(edges[i + 1]) - _cdf(edges[i])) for i in range(n)
        ]
        new = [(new[i] - new[n - 1 - i]) / 2 for i in range(n)]  # keep exact symmetry about 0
        moved = max(abs(a - b) for a, b in zip(new, levels, strict=True))
        levels = new
        if moved < LLOYD_TOL:
            break
    edges = [-math.inf, *((levels[i] + levels[i + 1]) / 2 for i in range(n - 1)), math.inf]
    probs = [_cdf(edges[i + 1]) - _cdf(edges[i]) for i in range(n)]
    mse = 1.0 - sum(p * lv * lv for p, lv in zip(probs, levels, strict=True))
    return tuple(levels), tuple(edges[1:-1]), mse


class ScalarCodebook(PackedCodebook):
    """8 independent ``bits``-bit Lloyd–Max scalar quantizers (names ``scalar2/3/4``)."""

    dim = SCALAR_DIM
    opt_scale = SCALAR_OPT_SCALE

    def __init__(self, bits: int) -> None:
        """Args: bits: bits per weight, 1 ≤ bits ≤ 7 (codes must fit in int64)."""
        if not isinstance(bits, int) or not 1 <= bits <= MAX_CODE_BYTES:
            raise ValueError(f"ScalarCodebook bits must be an int in [1, {MAX_CODE_BYTES}], got {bits!r}")
        self.bits = bits
        self.name = f"scalar{bits}"
        self.code_bytes = SCALAR_DIM * bits // BITS_PER_BYTE
        levels, thresholds, mse = lloyd_max_gaussian(bits)
        self.levels = torch.tensor(levels, dtype=torch.float32)  # [2**bits]
        self.thresholds = torch.tensor(thresholds, dtype=torch.float32)  # [2**bits − 1]
        self.expected_mse = mse
        self._shifts = torch.arange(SCALAR_DIM, dtype=torch.int64) * bits  # [8]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest level per coordinate.

        Args:
            x: ``[..., 8]`` finite float tensor.
        Returns:
            ``(xhat [..., 8] dtype of x, codes [...] int64)``; a value exactly on a threshold goes
            to the lower level.
        """
        self._check_input(x)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xhat, codes = search_in_chunks(x.to(work), self._search_rows, _BYTES_PER_ROW)
        return xhat.to(x.dtype), codes

    def _search_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[b, 8]`` -> ``(xhat [b, 8], codes [b])``."""
        idx = torch.bucketize(x, self.thresholds.to(x.dtype))  # [b, 8] in [0, 2**bits)
        return self.levels.to(x.dtype)[idx], (idx << self._shifts).sum(dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[...]`` int64 -> ``[..., 8]`` float32."""
        codes = self._check_codes(codes)
        idx = (codes.unsqueeze(-1) >> self._shifts.to(codes.device)) & ((1 << self.bits) - 1)
        return self.levels.to(codes.device)[idx]
