"""Quantize one weight matrix with QuIP#: RHT → scale → BlockLDLQ (paper §3–4, DESIGN.md §1).

``quantize_weight(W, H, config)`` returns a :class:`QuantizedWeight` of plain tensors (no modules,
no I/O); ``dequantize`` inverts it. This module also holds the single recovery policy for numerical
trouble: when the Hessian cannot be factored, damping grows by ``DAMPING_GROWTH`` (logged) up to
``MAX_DAMPING_RETRIES`` times before :class:`HessianNotPositiveDefiniteError` reaches the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from quipsharp.codebooks import Codebook, get_codebook, trellis
from quipsharp.config import DAMPING_GROWTH, MAX_DAMPING_RETRIES, QuIPSharpConfig
from quipsharp.errors import HessianNotPositiveDefiniteError
from quipsharp.hadamard import hadamard_transform, random_signs
from quipsharp.hessian import hessian_scale
from quipsharp.ldlq import block_ldl, block_ldlq, coordinate_descent, mirror_blocks, proxy_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized ``[m, n]`` weight: ``W ≈ S_V Vᵀ (scale · decode(codes)) U S_U``.

    Attributes:
        codes: the codes of the transformed, scaled weight as BlockLDLQ returns them: ``[m, n // 8]``
            int64 for a vector codebook, ``[m/16, n/16, 16·bits]`` int16 bitstream words for a trellis.
        su: ``[n]`` float32 input sign vector S_U (all ones when the RHT is off).
        sv: ``[m]`` float32 output sign vector S_V.
        scale: ``Wscale`` (float).
        codebook: registry name of the codebook.
        use_hadamard: whether U, V are Hadamard transforms (else identity).
        proxy_loss: relative proxy loss ``tr(E H Eᵀ) / tr(W H Wᵀ)`` with the normalised, undamped H.
        damping: the relative damping σ that was finally used.
        lut: the per-matrix table of a codebook with ``lut_shape`` (the trellis HYB code), else None.
    """

    codes: torch.Tensor
    su: torch.Tensor
    sv: torch.Tensor
    scale: float
    codebook: str
    use_hadamard: bool
    proxy_loss: float
    damping: float
    lut: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the original weight."""
        return (self.sv.shape[0], self.su.shape[0])


def rht_weight(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """``V S_V W S_U Uᵀ`` for ``W`` ``[m, n]``, ``su`` ``[n]``, ``sv`` ``[m]`` (paper §3)."""
    rows = hadamard_transform(W * su)  # each row w -> U S_U w, i.e. W S_U Uᵀ
    return hadamard_transform((rows * sv[:, None]).T).T


def inverse_rht_weight(Wt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """``S_V Vᵀ W̃ U S_U``: the inverse of :func:`rht_weight`."""
    cols = hadamard_transform(Wt.T, transpose=True).T * sv[:, None]
    return hadamard_transform(cols, transpose=True) * su


#: Rows (or columns) of an ``[n, n]`` Hessian transformed at a time: the transform's temporaries stay
#: small next to the matrix, whose float64 copies are what limits memory at large ``n`` (70B: 6.6 GB each).
HESSIAN_CHUNK = 512


def rht_hessian(H: torch.Tensor, su: torch.Tensor, divisor: torch.Tensor | float | None = None) -> torch.Tensor:
    """``U S_U (H / divisor) S_U Uᵀ`` for a symmetric ``H`` ``[n, n]`` (no division when ``divisor`` is
    None), as one new matrix: first the rows, then the columns, ``HESSIAN_CHUNK`` at a time. Every
    row (column) is transformed on its own, so the result does not depend on the chunking."""
    n = H.shape[0]
    signs = su.to(H.dtype)
    out = torch.empty_like(H)
    for r in range(0, n, HESSIAN_CHUNK):
        rows = H[r : r + HESSIAN_CHUNK]
        if divisor is not None:
            rows = rows / divisor
        half = hadamard_transform(rows * signs)
        half.mul_(signs[r : r + HESSIAN_CHUNK, None])
        out[r : r + HESSIAN_CHUNK] = half
    for c in range(0, n, HESSIAN_CHUNK):
        out[:, c : c + HESSIAN_CHUNK] = hadamard_transform(out[:, c : c + HESSIAN_CHUNK].T).T
    return out


def symmetrize_(H: torch.Tensor) -> torch.Tensor:
    """``H ← (H + Hᵀ) / 2`` in place, ``HESSIAN_CHUNK``-square blocks at a time (no ``[n, n]`` temporary);
    the same values as the out-of-place expression (``a + b == b + a`` exactly). Returns ``H``."""
    for rows, cols in mirror_blocks(H.shape[0], HESSIAN_CHUNK):
        upper, lower = H[rows, cols], H[cols, rows]
        mean = upper + lower.T
        mean.div_(2)
        upper.copy_(mean)
        lower.copy_(mean.T)
    return H


def _check_weight(W: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix [out_features, in_features], got {getattr(W, 'shape', W)}")
    m, n = W.shape
    problem = codebook.shape_problem(m, n)
    if problem:
        raise ValueError(f"weight of shape {m}x{n}: {problem}")
    if not torch.isfinite(W).all():
        raise ValueError(f"weight of shape {m}x{n} contains NaN or Inf; refusing to quantize it")
    return W.detach().to(torch.float32)


def _factor_with_damping(H: torch.Tensor, sigma: float, g: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Block-LDL of ``H + σI``; on failure raise σ (the one damping policy). The damping is added to
    ``H``'s diagonal in place (no ``[n, n]`` copy); the undamped diagonal is returned to restore it.
    Returns ``(L, undamped diagonal [n], σ)``; ``H`` then holds ``H + σI``."""
    diagonal = H.diagonal()
    undamped = diagonal.clone()
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        diagonal.copy_(undamped)
        diagonal.add_(sigma)  # the same values as H + σI
        try:
            L, _ = block_ldl(H, g)
            return L, undamped, sigma
        except HessianNotPositiveDefiniteError as err:
            if attempt == MAX_DAMPING_RETRIES:
                diagonal.copy_(undamped)
                raise HessianNotPositiveDefiniteError(
                    f"{err}; still failing after raising damping to {sigma:g}", damping=sigma
                ) from err
            logger.warning("%s; raising damping from %g to %g", err, sigma, sigma * DAMPING_GROWTH)
            sigma *= DAMPING_GROWTH
    raise AssertionError("unreachable")


def quantize_weight(
    W: torch.Tensor,
    H: torch.Tensor | None = None,
    config: QuIPSharpConfig | None = None,
    *,
    seed: int | None = None,
) -> QuantizedWeight:
    """Quantize ``W`` ``[m, n]`` with proxy Hessian ``H`` ``[n, n]`` (``None`` = identity, data-free).

    Args:
        W: weight, any float dtype, every entry finite; ``n`` a multiple of 8 (vector codebooks) or
            both ``m`` and ``n`` multiples of 16 (trellis codebooks: 16 × 16 tiles).
        H: ``E[x xᵀ]`` of the layer's inputs (any positive scale); None means data-free rounding.
        config: settings (default :class:`QuIPSharpConfig`).
        seed: seed of the sign vectors; default ``config.hadamard_seed``.
    Raises:
        ValueError: bad shapes or non-finite weights.
        HessianNotPositiveDefiniteError: H stays unfactorable after the damping retries.
    """
    config = config or QuIPSharpConfig()
    codebook: Codebook = get_codebook(config.codebook_name)
    W = _check_weight(W, codebook)
    m, n = W.shape
    # Float64 [n, n] copies are what limits memory at large n: besides the caller's H, this keeps one
    # (the rotated, normalised Hessian, damped in place while it is factored) and the factor.
    if H is None:
        H, divisor = torch.eye(n, dtype=torch.float64, device=W.device), None
    else:
        if H.shape != (n, n):
            raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight in_features {n}")
        H = H.detach().to(device=W.device, dtype=torch.float64)
        divisor = hessian_scale(H)
    if config.use_hadamard:
        gen = torch.Generator().manual_seed(config.hadamard_seed if seed is None else seed)
        su = random_signs(n, gen).to(W.device)
        sv = random_signs(m, gen).to(W.device)
        Wt = rht_weight(W, su, sv)
        Ht = symmetrize_(rht_hessian(H, su, divisor))
    else:
        su = torch.ones(n, device=W.device)
        sv = torch.ones(m, device=W.device)
        Wt, Ht = W, (H / divisor if divisor is not None else H)
    del H
    rho = config.scale_rho if config.scale_rho is not None else codebook.opt_scale
    rms = Wt.square().mean().sqrt()
    if not rms > 0:
        scale = 1.0  # an all-zero weight: every scale gives the zero codeword's error; keep it finite
    else:
        scale = float(rms / rho)
    Wn = Wt / scale
    L, undamped, sigma = _factor_with_damping(Ht, config.sigma, codebook.dim)  # Ht is damped until restored
    What, codes = block_ldlq(Wn, L, codebook, config.blocksize)
    if isinstance(codebook, trellis.TrellisCodebook):
        trellis.release_workspace()  # the search kept its scratch between the matrix's column blocks
    del L
    What, codes = coordinate_descent(Wn, What, codes, Ht, codebook, config.cd_passes)
    Ht.diagonal().copy_(undamped)
    total = proxy_loss(Wn, torch.zeros_like(Wn), Ht)
    rel = proxy_loss(Wn, What, Ht) / total if total > 0 else 0.0
    return QuantizedWeight(
        codes=codes,
        su=su.to(torch.float32),
        sv=sv.to(torch.float32),
        scale=scale,
        codebook=codebook.name,
        use_hadamard=config.use_hadamard,
        proxy_loss=rel,
        damping=sigma,
        lut=codebook.initial_lut() if codebook.lut_shape else None,
    )


def decode_transformed(qw: QuantizedWeight) -> torch.Tensor:
    """``scale · decode(codes)``: the quantized weight in the transformed domain, ``[m, n]`` float32."""
    m, n = qw.shape
    return get_codebook(qw.codebook).decode_matrix(qw.codes, m, n, qw.lut) * qw.scale


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """Reconstruct ``Ŵ`` ``[m, n]`` float32 in the original domain."""
    Wt = decode_transformed(qw)
    if not qw.use_hadamard:
        return Wt
    return inverse_rht_weight(Wt, qw.su, qw.sv)
