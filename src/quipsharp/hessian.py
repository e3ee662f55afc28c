"""Proxy Hessians ``H = E[x xᵀ]`` of a linear layer's inputs (QuIP# §2, DESIGN.md §4).

Statistics gathering is kept apart from solving (as in GPTQ's ``add_batch``): a
:class:`HessianAccumulator` streams over batches of any shape and keeps ``Σ x xᵀ`` and ``Σ x`` in
float64; :func:`regularize` turns the mean into the damped, normalised matrix BlockLDLQ uses.
Saving and loading lives in :mod:`quipsharp.io` (this module does no I/O).
"""

from __future__ import annotations

import torch

from quipsharp.errors import NumericalError

# Rows multiplied at once in float32 before being added to the sums: bounds both the float32 rounding
# error of one product and the temporary memory. One such product is one term of the exact sums below.
ACCUMULATE_CHUNK_ROWS = 4096

# Exact, order-free sums. Each float32 product term t is split into parts on fixed power-of-two grids
# (t = h0 + h1 + h2 + dropped, h_k a multiple of BIN_GRIDS[k]) and each part is added to its own float64
# bin. A bin only ever holds multiples of its grid smaller than 2^53 grids, so its additions are exact
# and the sums do not depend on the order of the terms: statistics merged from shards, workers or
# resumed runs equal, bit for bit, those computed in one stream. The grids are 32 bits apart; a term
# is captured exactly when it is at least 2^-21 (smaller parts below 2^-45 are dropped: an absolute
# error under 3e-14 per term), and at most MAX_TERMS terms of magnitude below MAX_TERM fit.
BIN_GRIDS = (2.0**20, 2.0**-12, 2.0**-44)
MAX_TERM = 2.0**50
MAX_TERMS = 2**22
SPLIT_ROWS = 256  # rows of a term split at once
# |(xᵀx)_ij| <= sqrt((xᵀx)_ii (xᵀx)_jj) exactly; the float32 products of ACCUMULATE_CHUNK_ROWS rows are
# off by a relative 2.5e-4 at most, so twice the largest diagonal entry bounds every entry.
GRAM_ROUNDING_MARGIN = 2.0


def _round_to_grid(x: torch.Tensor, grid: float) -> torch.Tensor:
    """``x`` rounded to the nearest multiple of ``grid`` (a power of two; ties to even): exact for
    ``|x| < 2^52 · grid`` (the division and multiplication by a power of two are exact)."""
    return torch.round(x / grid) * grid


def split_exact(term: torch.Tensor) -> torch.Tensor:
    """Float64 ``[len(BIN_GRIDS), *term.shape]``: the parts of ``term`` on the bin grids (see above)."""
    bins = torch.zeros((len(BIN_GRIDS), *term.shape), dtype=torch.float64, device=term.device)
    add_exact(bins, term)
    return bins


def add_exact(bins: torch.Tensor, term: torch.Tensor) -> None:
    """``bins += split_exact(term)`` in place, ``SPLIT_ROWS`` rows at a time (``bins``
    ``[len(BIN_GRIDS), *term.shape]`` float64): the temporaries stay small next to an ``[n, n]`` sum."""
    flat = bins.reshape(len(BIN_GRIDS), term.shape[0] if term.ndim else 1, -1)
    rows = term.reshape(flat.shape[1], -1)
    for start in range(0, rows.shape[0], SPLIT_ROWS):
        rest = rows[start : start + SPLIT_ROWS].to(torch.float64)
        for k, grid in enumerate(BIN_GRIDS):
            part = _round_to_grid(rest, grid)
            flat[k, start : start + SPLIT_ROWS] += part
            rest -= part


def collapse(bins: torch.Tensor) -> torch.Tensor:
    """The float64 value of binned sums ``[len(BIN_GRIDS), ...]``: the bins added smallest first."""
    total = bins[-1].clone()
    for k in range(bins.shape[0] - 2, -1, -1):
        total = total + bins[k]
    return total


class HessianAccumulator:
    """Running ``Σ x xᵀ``, ``Σ x`` and token count of a layer's inputs, summed exactly (see
    ``BIN_GRIDS``): any split of the inputs into batches of the same float32 products, in any order or
    merged from any shards, gives the same bits.

    Args:
        n: input features of the layer.
        device: where the float64 sums live (default CPU).
    """

    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        if n <= 0:
            raise ValueError(f"Hessian size must be positive, got {n}")
        self.n = n
        self.xtx_bins = torch.zeros(len(BIN_GRIDS), n, n, dtype=torch.float64, device=device)  # [bins, n, n]
        self.xsum_bins = torch.zeros(len(BIN_GRIDS), n, dtype=torch.float64, device=device)  # [bins, n]
        self.count = 0  # tokens
        self.terms = 0  # float32 products added

    @property
    def xtx(self) -> torch.Tensor:
        """``Σ x xᵀ`` as float64 ``[n, n]``."""
        return collapse(self.xtx_bins)

    @property
    def xsum(self) -> torch.Tensor:
        """``Σ x`` as float64 ``[n]``."""
        return collapse(self.xsum_bins)

    def _add_terms(self, xtx: torch.Tensor, xsum: torch.Tensor, terms: int, big: float | None = None) -> None:
        """Add ``terms`` products' sums exactly; ``big``: a bound on their magnitudes when the caller
        knows one (else the largest entry)."""
        if self.terms + terms > MAX_TERMS:
            raise NumericalError(f"more than {MAX_TERMS} products in one Hessian: the exact sums would overflow")
        if big is None:
            big = max(float(xtx.abs().max()), float(xsum.abs().max())) if xtx.numel() else 0.0
        if big >= MAX_TERM:
            raise NumericalError(f"an input product of magnitude {big:.3g} is beyond the exact sums' range "
                                 f"({MAX_TERM:.3g}): the activations are too large")
        add_exact(self.xtx_bins, xtx)
        add_exact(self.xsum_bins, xsum)
        self.terms += terms

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``[..., n]`` (every leading index is one token); the rows are
        multiplied in float32 chunks of ``ACCUMULATE_CHUNK_ROWS``, one exact term each.

        The checks read only the product's diagonal and the sum (O(n), not O(n²) or O(rows·n)): an
        infinite or NaN input makes its ``x_i²`` so, and no entry of ``xᵀx`` exceeds the largest
        diagonal one by more than ``GRAM_ROUNDING_MARGIN`` (Cauchy–Schwarz, up to float32 rounding)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"expected inputs with last dim {self.n}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.n)
        for start in range(0, rows.shape[0], ACCUMULATE_CHUNK_ROWS):
            chunk = rows[start : start + ACCUMULATE_CHUNK_ROWS].to(self.xtx_bins.device, torch.float32)
            xtx, xsum = chunk.T @ chunk, chunk.sum(0)
            diag = xtx.diagonal()
            if not (torch.isfinite(diag).all() and torch.isfinite(xsum).all()):
                if not torch.isfinite(chunk).all():
                    raise NumericalError("non-finite values in the inputs given to the Hessian accumulator")
                big = float("inf")  # finite inputs whose float32 products overflow
            else:
                big = max(float(diag.max()) * GRAM_ROUNDING_MARGIN, float(xsum.abs().max())) if xtx.numel() else 0.0
            self._add_terms(xtx, xsum, 1, big)
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's statistics (another shard, worker or process): exact, so the
        result does not depend on how the inputs were split or in which order the parts are merged."""
        if other.n != self.n:
            raise ValueError(f"cannot merge Hessians of sizes {self.n} and {other.n}")
        if self.terms + other.terms > MAX_TERMS:
            raise NumericalError(f"more than {MAX_TERMS} products in one Hessian: the exact sums would overflow")
        self.xtx_bins += other.xtx_bins.to(self.xtx_bins.device)
        self.xsum_bins += other.xsum_bins.to(self.xsum_bins.device)
        self.count += other.count
        self.terms += other.terms

    def mean(self) -> torch.Tensor:
        """``E[x xᵀ]`` as float64 ``[n, n]``; raises if no token was seen."""
        if self.count == 0:
            raise NumericalError("the Hessian accumulator has seen no inputs")
        return self.xtx / self.count

    def mean_input(self) -> torch.Tensor:
        """``E[x]`` as float64 ``[n]``."""
        if self.count == 0:
            raise NumericalError("the Hessian accumulator has seen no inputs")
        return self.xsum / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the accumulator (for :func:`quipsharp.io.save_hessian`)."""
        return {
            "xtx_bins": self.xtx_bins,
            "xsum_bins": self.xsum_bins,
            "count": torch.tensor([self.count, self.terms], dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> HessianAccumulator:
        """Inverse of :meth:`state_dict`, with shape and range checks (a bin must hold multiples of its grid)."""
        for key in ("xtx_bins", "xsum_bins", "count"):
            if key not in state:
                raise ValueError(f"Hessian state is missing tensor {key!r}")
        xtx, xsum, count = state["xtx_bins"], state["xsum_bins"], state["count"].reshape(-1)
        k = len(BIN_GRIDS)
        n = xtx.shape[-1]
        if xtx.shape != (k, n, n) or xsum.shape != (k, n) or count.numel() != 2 or n == 0:
            raise ValueError(f"inconsistent Hessian state: xtx_bins {tuple(xtx.shape)}, xsum_bins "
                             f"{tuple(xsum.shape)}, count {tuple(count.shape)}")
        if xtx.dtype != torch.float64 or xsum.dtype != torch.float64:
            raise ValueError(f"Hessian sums must be float64, got {xtx.dtype} and {xsum.dtype}")
        for i, grid in enumerate(BIN_GRIDS):
            for t in (xtx[i], xsum[i]):
                if not torch.isfinite(t).all() or not torch.equal(_round_to_grid(t, grid), t):
                    raise ValueError("damaged Hessian state: a bin holds values off its grid")
        acc = cls(n, device=xtx.device)
        acc.xtx_bins.copy_(xtx)
        acc.xsum_bins.copy_(xsum)
        acc.count, acc.terms = int(count[0]), int(count[1])
        if acc.count < 0 or not 0 <= acc.terms <= MAX_TERMS:
            raise ValueError(f"damaged Hessian state: {acc.count} tokens in {acc.terms} products")
        return acc


def hessian_scale(H: torch.Tensor) -> torch.Tensor:
    """``mean(diag(H))`` (a 0-d tensor of ``H``'s dtype) of a square ``H`` ``[n, n]``; raises on a
    non-finite or zero Hessian."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"a Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise NumericalError("the Hessian has non-finite entries")
    scale = torch.diagonal(H).mean()
    if not scale > 0:
        raise NumericalError(
            f"the Hessian's mean diagonal is {float(scale):g}, not positive (all-zero inputs, or not a Hessian)"
        )
    return scale


def normalize(H: torch.Tensor) -> torch.Tensor:
    """``H / mean(diag(H))`` in float64 ``[n, n]``; raises on a non-finite or zero Hessian."""
    H = H.to(torch.float64)
    return H / hessian_scale(H)


def regularize(H: torch.Tensor, sigma: float) -> torch.Tensor:
    """``H / mean(diag(H)) + σ I`` (float64 ``[n, n]``), symmetrised (DESIGN.md §4)."""
    Hn = normalize(H)
    Hn = (Hn + Hn.T) / 2
    return Hn + sigma * torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device)
