"""The E8 lattice: exact nearest-point search and exact enumeration of short vectors.

``E8 = D8 ∪ (D8 + ½·1)`` with ``D8 = {z ∈ ℤ⁸ : Σ z even}``. Equivalently, in doubled coordinates
``u = 2v``: all ``u_i`` of the same parity and ``Σ u ≡ 0 (mod 4)``. The nearest point is found as in
Conway & Sloane, *Sphere Packings, Lattices and Groups*, ch. 20: round to ``D8`` (round every
coordinate; if the sum is odd, re-round the coordinate with the largest rounding error the other
way), do the same for the coset ``D8 + ½`` and keep the closer of the two.
"""

from __future__ import annotations

import math

import torch

from quipsharp.codebooks.packing import check_vectors, row_chunks

E8_DIM = 8
#: Doubled coordinates of E8 points are integers (the half-integer coset becomes odd integers).
DOUBLING = 2
#: In doubled coordinates the coordinate sum of an E8 point is a multiple of 4.
DOUBLED_SUM_MODULUS = 4
#: Rough bytes of per-row temporaries of the elementwise nearest-point search (float64, ~12 temps).
_E8_BYTES_PER_ROW = E8_DIM * 8 * 12


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is searched in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_d8(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of ``D8`` (integer vectors of even coordinate sum).

    Round every coordinate; if the sum of the rounded vector is odd, move the coordinate with the
    largest rounding error one step the other way (towards ``x``'s side), which is the cheapest way
    to fix the parity. Ties (e.g. ``x_i`` exactly half-integer) are resolved deterministically.

    Args:
        x: ``[..., 8]`` float tensor.
    Returns:
        ``[..., 8]`` same dtype as ``x``: the nearest point of ``D8``.
    """
    r = torch.round(x)
    err = x - r  # [..., 8] in [-½, ½]
    odd = torch.remainder(r.sum(dim=-1), 2) != 0  # [...]
    j = err.abs().argmax(dim=-1, keepdim=True)  # [..., 1]
    err_j = err.gather(-1, j)
    step = torch.where(err_j >= 0, torch.ones_like(err_j), -torch.ones_like(err_j))  # towards x
    fixed = r.scatter_add(-1, j, step)
    return torch.where(odd.unsqueeze(-1), fixed, r)


def _nearest_e8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[b, 8]`` (float32/float64) -> nearest E8 points ``[b, 8]`` same dtype."""
    half = 0.5
    p_int = nearest_d8(x)
    p_half = nearest_d8(x - half) + half
    d_int = (x - p_int).square().sum(dim=-1, keepdim=True)
    d_half = (x - p_half).square().sum(dim=-1, keepdim=True)
    return torch.where(d_half < d_int, p_half, p_int)


def nearest_e8(x: torch.Tensor) -> torch.Tensor:
    """Exact nearest point of the (infinite) E8 lattice.

    Args:
        x: ``[..., 8]`` finite float tensor.
    Returns:
        ``[..., 8]`` same dtype as ``x``. Ties between the two cosets go to ``D8``.
    """
    check_vectors(x, E8_DIM, "E8Lattice")
    work = _work_dtype(x.dtype)
    rows = x.reshape(-1, E8_DIM).to(work)
    out = torch.empty_like(rows)
    for sl in row_chunks(rows.shape[0], _E8_BYTES_PER_ROW):
        out[sl] = _nearest_e8_rows(rows[sl])
    return out.reshape(x.shape).to(x.dtype)


def is_e8_doubled(indices: torch.Tensor) -> torch.Tensor:
    """Whether doubled integer vectors ``u = 2v`` encode E8 points.

    Args:
        indices: ``[..., 8]`` integer tensor.
    Returns:
        ``[...]`` bool: all coordinates of one parity and ``Σ u ≡ 0 (mod 4)``.
    """
    parity = torch.remainder(indices, DOUBLING)
    same = (parity == parity[..., :1]).all(dim=-1)
    return same & (torch.remainder(indices.sum(dim=-1), DOUBLED_SUM_MODULUS) == 0)


class E8Lattice:
    """The infinite E8 lattice with an exact integer encoding of its points.

    A point ``v`` is encoded by ``indices = 2·v`` (int64, all even or all odd, sum ≡ 0 mod 4).
    """

    dim: int = E8_DIM

    @staticmethod
    def nearest_d8(x: torch.Tensor) -> torch.Tensor:
        """Nearest point of ``D8``; see :func:`nearest_d8`. ``[..., 8] -> [..., 8]``."""
        return nearest_d8(x)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest lattice point.

        Args:
            x: ``[..., 8]`` finite float tensor.
        Returns:
            ``(points, indices)``: ``points`` ``[..., 8]`` dtype of ``x``; ``indices`` ``[..., 8]``
            int64 equal to ``2·points``.
        """
        points = nearest_e8(x)
        indices = torch.round(points.to(_work_dtype(x.dtype)) * DOUBLING).to(torch.int64)
        return points, indices

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` ``[..., 8]`` int64 (``2·point``) -> points ``[..., 8]`` float32.

        Raises:
            ValueError: wrong shape/dtype or a vector that does not encode an E8 point.
        """
        if indices.dtype.is_floating_point or indices.dim() == 0 or indices.shape[-1] != E8_DIM:
            raise ValueError(f"E8 indices must be an integer tensor [..., {E8_DIM}]")
        if indices.numel() > 0 and not bool(is_e8_doubled(indices).all()):
            raise ValueError("E8 indices must be all even or all odd with a sum divisible by 4")
        return indices.to(torch.float32) / DOUBLING

    def __repr__(self) -> str:
        return "E8Lattice()"


def _lex_sort_rows(rows: torch.Tensor, first_key: torch.Tensor) -> torch.Tensor:
    """Sort integer rows ``[n, d]`` by ``first_key`` ``[n]`` then lexicographically (stable sorts)."""
    order = torch.arange(rows.shape[0])
    for col in range(rows.shape[1] - 1, -1, -1):
        perm = torch.sort(rows[order, col], stable=True).indices
        order = order[perm]
    perm = torch.sort(first_key[order], stable=True).indices
    return order[perm]


def e8_doubled_points_with_norm_at_most(max_sq_norm: float) -> torch.Tensor:
    """All E8 points ``v`` with ``‖v‖² ≤ max_sq_norm``, in doubled coordinates ``u = 2v``.

    Exact enumeration in integer arithmetic: coordinates are added one at a time and a partial
    vector is pruned as soon as its norm plus the smallest possible norm of the remaining
    coordinates exceeds the bound.

    Args:
        max_sq_norm: bound on ``‖v‖²`` (not doubled).
    Returns:
        ``[N, 8]`` int64, sorted by ``‖v‖²`` and then lexicographically.
    """
    if max_sq_norm < 0:
        return torch.zeros((0, E8_DIM), dtype=torch.int64)
    bound = math.floor(max_sq_norm * DOUBLING**2 + 1e-9)  # on ‖u‖² = 4‖v‖², integer
    umax = math.isqrt(bound)
    found = []
    for parity in (0, 1):
        values = torch.tensor([u for u in range(-umax, umax + 1) if u % 2 == parity], dtype=torch.int64)
        if values.numel() == 0:
            continue
        min_sq = parity  # smallest u² of this parity (0 or 1)
        partial = torch.zeros((1, 0), dtype=torch.int64)
        norms = torch.zeros(1, dtype=torch.int64)
        for coord in range(E8_DIM):
            remaining = E8_DIM - coord - 1
            new_norms = norms.unsqueeze(1) + values.square().unsqueeze(0)  # [n, |values|]
            keep = new_norms + remaining * min_sq <= bound
            row_idx, val_idx = keep.nonzero(as_tuple=True)
            partial = torch.cat([partial[row_idx], values[val_idx].unsqueeze(1)], dim=1)
            norms = new_norms[row_idx, val_idx]
        ok = torch.remainder(partial.sum(dim=1), DOUBLED_SUM_MODULUS) == 0
        found.append(partial[ok])
    pts = torch.cat(found)
    order = _lex_sort_rows(pts, pts.square().sum(dim=1))
    return pts[order]


def e8_points_with_norm_at_most(max_sq_norm: float) -> torch.Tensor:
    """All E8 points with ``‖v‖² ≤ max_sq_norm`` (exact enumeration).

    Shell sizes for reference: ``‖v‖² = 0, 2, 4, 6, 8`` hold ``1, 240, 2160, 6720, 17520`` points.

    Args:
        max_sq_norm: bound on the squared norm.
    Returns:
        ``[N, 8]`` float32, sorted by squared norm and then lexicographically.
    """
    return e8_doubled_points_with_norm_at_most(max_sq_norm).to(torch.float32) / DOUBLING
