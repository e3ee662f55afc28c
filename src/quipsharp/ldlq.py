"""Block LDL decomposition and BlockLDLQ rounding (QuIP# §4.1, Algorithm 1; DESIGN.md §4).

Notation: ``W`` is ``[m, n]`` (m outputs, n inputs), ``H`` the ``[n, n]`` proxy Hessian, ``g`` the
codebook dimension (8). With ``H = L D Lᵀ`` (``L`` unit block-lower-triangular, ``D`` block
diagonal), the proxy loss ``tr(E H Eᵀ)`` of the error ``E = W − Ŵ`` equals
``Σ_k ‖E_k + Σ_{j>k} E_j L_{jk}‖²_{D_k}``. BlockLDLQ walks the column blocks from last to first and
rounds ``W_k + Σ_{j>k} E_j L_{jk}`` with the codebook, which zeroes each term up to the codebook's
own error. Feedback is buffered per chunk of ``blocksize`` columns (GPTQ's lazy batch updates) so
that most of the work is matrix–matrix.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from quipsharp.codebooks.base import Codebook, VectorCodebook
from quipsharp.errors import HessianNotPositiveDefiniteError

# A Cholesky factor whose diagonal spans more than this ratio means cond(H) > ratio², beyond what
# float32 feedback can use: treat it as a failure so the caller adds damping.
MAX_CHOLESKY_DIAG_RATIO = 1e6
#: Rows of the Cholesky factor turned into L at a time (block_ldl works in place on the factor).
LDL_CHUNK_ROWS = 512


def mirror_blocks(n: int, chunk: int) -> Iterator[tuple[slice, slice]]:
    """The ``chunk``-square blocks ``(rows, cols)`` on and above the diagonal of an ``[n, n]`` matrix, row by
    row: with ``A[cols, rows]`` each is paired with its mirror image (in-place symmetric operations)."""
    for r in range(0, n, chunk):
        for c in range(r, n, chunk):
            yield slice(r, r + chunk), slice(c, c + chunk)


def _transpose_(A: torch.Tensor) -> torch.Tensor:
    """A square contiguous ``A`` transposed in place, ``LDL_CHUNK_ROWS``-square blocks at a time; returns ``A``."""
    for rows, cols in mirror_blocks(A.shape[0], LDL_CHUNK_ROWS):
        if rows == cols:
            A[rows, rows] = A[rows, rows].T.clone()
            continue
        upper = A[rows, cols].clone()
        A[rows, cols] = A[cols, rows].T
        A[cols, rows] = upper.T
    return A


def block_ldl(H: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL decomposition ``H = L D Lᵀ`` from the Cholesky factor.

    Args:
        H: ``[n, n]`` symmetric positive-definite matrix (float64 recommended), ``n % g == 0``.
        g: block size.
    Returns:
        ``L`` ``[n, n]`` unit block-lower-triangular (identity ``g × g`` diagonal blocks; formed in place
        of the Cholesky factor; row-major) and ``D`` ``[n // g, g, g]`` the diagonal blocks.
    Raises:
        HessianNotPositiveDefiniteError: the factorisation fails or ``H`` is too ill-conditioned.
    """
    n = H.shape[0]
    if H.shape != (n, n) or n % g:
        raise ValueError(f"block_ldl needs a square matrix with size divisible by {g}, got {tuple(H.shape)}")
    C, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise HessianNotPositiveDefiniteError(f"Cholesky failed at column {int(info)}: H is not positive definite")
    diag = torch.diagonal(C)
    ratio = float(diag.max() / diag.min())
    if not ratio < MAX_CHOLESKY_DIAG_RATIO:
        raise HessianNotPositiveDefiniteError(
            f"H is too ill-conditioned (Cholesky diagonal ratio {ratio:.3g} ≥ {MAX_CHOLESKY_DIAG_RATIO:g})"
        )
    nb = n // g
    blocks = C.reshape(nb, g, nb, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, g, g] C_kk
    D = blocks @ blocks.transpose(-1, -2)  # [nb, g, g]
    inv_blocks = torch.linalg.solve_triangular(
        blocks, torch.eye(g, dtype=H.dtype, device=H.device).expand(nb, g, g), upper=False
    )  # [nb, g, g] C_kk⁻¹
    # L = C · blockdiag(C_kk)⁻¹: scale each column block of C by its diagonal block's inverse, in place,
    # LDL_CHUNK_ROWS rows at a time (at large n the [n, n] copies are what limits memory). BLAS rounds a
    # transposed operand differently, so the layouts are kept as they were when L was a new matrix: the
    # products read LAPACK's column-major C, and L is returned row-major (transposed in place).
    for r in range(0, n, LDL_CHUNK_ROWS):
        rows = C[r : r + LDL_CHUNK_ROWS]
        rows.copy_(torch.einsum("ikj,kjl->ikl", rows.reshape(-1, nb, g), inv_blocks).reshape(rows.shape))
    if not C.is_contiguous() and C.mT.is_contiguous():
        C = _transpose_(C.mT)
    return C.contiguous(), D


def block_ldlq(
    W: torch.Tensor, L: torch.Tensor, codebook: Codebook, blocksize: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``W`` with Hessian feedback (BlockLDLQ).

    Args:
        W: ``[m, n]`` weights in codebook units (float32).
        L: ``[n, n]`` unit block-lower-triangular factor from :func:`block_ldl`.
        codebook: the quantizer of one ``[m, g]`` column block (``quantize_block``); its ``dim`` is
            the block size ``g`` (8 for the vector codebooks; 16 for the trellis codes, which round
            each ``16 × 16`` tile of the block as one sequence, with no feedback inside a tile: QTIP §4).
        blocksize: columns per lazy-feedback chunk (multiple of ``g``).
    Returns:
        ``Ŵ`` ``[m, n]`` (dtype of ``W``) and the blocks' codes stacked on dim 1: ``[m, n // g]``
        int64 for a vector codebook, ``[m/16, n/16, 16·bits]`` int16 words for a trellis.
    """
    m, n = W.shape
    g = codebook.dim
    if n % g or blocksize % g or L.shape != (n, n):
        raise ValueError(f"block_ldlq: W {tuple(W.shape)}, L {tuple(L.shape)}, g={g}, blocksize={blocksize}")
    L = L.to(W.dtype, memory_format=torch.contiguous_format)  # row-major: BLAS rounds transposed operands differently
    work = W.clone()  # W plus the feedback of the chunks already rounded
    What = torch.empty_like(W)
    codes: list[torch.Tensor | None] = [None] * (n // g)
    for chunk_end in range(n, 0, -blocksize):
        chunk_start = max(0, chunk_end - blocksize)
        err = torch.zeros(m, chunk_end - chunk_start, dtype=W.dtype, device=W.device)  # E of this chunk
        for k1 in range(chunk_end, chunk_start, -g):
            k0 = k1 - g
            target = work[:, k0:k1] + err[:, k1 - chunk_start :] @ L[k1:chunk_end, k0:k1]
            q, c = codebook.quantize_block(target)
            What[:, k0:k1] = q
            codes[k0 // g] = c
            err[:, k0 - chunk_start : k1 - chunk_start] = W[:, k0:k1] - q
        if chunk_start > 0:
            work[:, :chunk_start] += err @ L[chunk_start:chunk_end, :chunk_start]
    return What, torch.stack(codes, dim=1)  # type: ignore[arg-type]


def coordinate_descent(
    W: torch.Tensor,
    What: torch.Tensor,
    codes: torch.Tensor,
    H: torch.Tensor,
    codebook: VectorCodebook,
    passes: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block coordinate descent on the proxy loss after BlockLDLQ (DESIGN.md §4, optional passes).

    For each column block ``k`` with the others fixed, the loss of row ``r`` is
    ``f(e) = e H_kk eᵀ + 2 e·c_r`` with ``c = Σ_{j≠k} E_j H_jk``; its continuous minimiser is
    ``Ŵ_k = W_k + c H_kk⁻¹``, which is rounded with the codebook. A row keeps the new value only if its
    ``f`` decreases, so the proxy loss never increases.

    Args:
        W: ``[m, n]`` target weights (codebook units); ``What``/``codes``: current solution
            ``[m, n]`` / ``[m, n // g]``; ``H``: ``[n, n]`` the Hessian BlockLDLQ used.
    Returns:
        Updated ``(Ŵ, codes)`` (new tensors).
    """
    if passes <= 0:
        return What, codes
    g = codebook.dim
    n = W.shape[1]
    Hw = H.to(W.dtype)
    What, codes = What.clone(), codes.clone()
    E = W - What  # [m, n]
    G = E @ Hw  # [m, n], kept equal to E H as E changes
    Hkk = torch.stack([Hw[k : k + g, k : k + g] for k in range(0, n, g)])  # [nb, g, g]
    Hkk_inv = torch.linalg.inv(Hkk.to(torch.float64)).to(W.dtype)
    for _ in range(passes):
        for k0 in range(n - g, -1, -g):
            sl = slice(k0, k0 + g)
            b = k0 // g
            e_old = E[:, sl]
            c = G[:, sl] - e_old @ Hkk[b]  # [m, g]
            q, c_new = codebook.quantize(W[:, sl] + c @ Hkk_inv[b])
            e_new = W[:, sl] - q
            f_old = ((e_old @ Hkk[b]) * e_old).sum(1) + 2 * (e_old * c).sum(1)
            f_new = ((e_new @ Hkk[b]) * e_new).sum(1) + 2 * (e_new * c).sum(1)
            accept = f_new < f_old  # [m]
            e_upd = torch.where(accept[:, None], e_new, e_old)
            G += (e_upd - e_old) @ Hw[sl, :]
            E[:, sl] = e_upd
            What[:, sl] = torch.where(accept[:, None], q, What[:, sl])
            codes[:, b] = torch.where(accept, c_new, codes[:, b])
    return What, codes


def proxy_loss(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` in float64 (QuIP §2). ``W``, ``What``: ``[m, n]``; ``H``: ``[n, n]``."""
    E = (W - What).to(torch.float64)
    return float(((E @ H.to(torch.float64)) * E).sum())
