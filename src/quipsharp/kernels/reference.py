"""The pure-torch kernel: the :class:`quipsharp.kernels.Kernel` signature without native code.

Always available (no compiler, unknown CPU, any device); the definition the native levels are
tested against. Float32 throughout: no int8 activations.
"""

from __future__ import annotations

import torch

from quipsharp.codebooks import get_codebook
from quipsharp.hadamard import fwht

#: Name of this kernel in :func:`quipsharp.kernels.select` and ``QUIPSHARP_KERNEL``.
REFERENCE = "reference"
UNFILLED_MESSAGE = "QuantizedLinear used before its weight was quantized or loaded"


def _decode(codes: torch.Tensor, m: int, n: int, codebook_name: str, lut: torch.Tensor | None = None
            ) -> torch.Tensor:
    cb = get_codebook(codebook_name)
    problem = cb.shape_problem(m, n)
    dtype, expected = cb.packed_spec(m, n)
    if problem or tuple(codes.shape) != expected or codes.dtype != dtype:
        raise ValueError(f"codes must be {dtype} {expected} for a ({m}, {n}) weight, got {codes.dtype} "
                         f"{tuple(codes.shape)}" + (f" ({problem})" if problem else ""))
    if cb.lut_shape and lut is None:  # never the initial table in place of the layer's own
        raise ValueError(f"{codebook_name} decodes through its per-matrix table: pass lut {list(cb.lut_shape)}")
    return cb.decode_matrix(cb.unpack_matrix(codes, m, n), m, n, lut).to(torch.float32)


def _transform(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``U x`` per row with ``U = M ⊗ H_P / √P``: ``x`` ``[B, n]``, ``M`` ``[K, K]``."""
    B, n = x.shape
    K = M.shape[0]
    z = fwht(x.reshape(B, K, n // K))  # normalised by 1/√P
    return torch.einsum("ac,bcp->bap", M.to(z.dtype), z).reshape(B, n)


class ReferenceKernel:
    """The torch path behind the kernel signature (see :class:`quipsharp.kernels.Kernel`)."""

    name = REFERENCE
    native = False
    int8_activations = False

    def __repr__(self) -> str:
        return "ReferenceKernel()"

    def __reduce__(self):
        return (ReferenceKernel, ())

    def decode(
        self, codes: torch.Tensor, m: int, n: int, codebook_name: str, threads: int | None = None,
        out: torch.Tensor | None = None, *, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stored ``codes`` (the codebook's ``packed_spec``) -> ``W`` ``[m, n]`` float32 (the codebook's decode;
        ``lut``: a HYB trellis's table)."""
        W = _decode(codes, m, n, codebook_name, lut)
        return W if out is None else out.copy_(W)

    def matmul(
        self, x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None,
        *, allow_int8: bool = True, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, n]`` float32 @ ``decode(codes)ᵀ`` -> ``[B, m]`` float32 (``allow_int8`` is ignored)."""
        if x.dim() != 2:
            raise ValueError(f"x must be [B, n], got shape {tuple(x.shape)}")
        return x.to(torch.float32) @ _decode(codes, m, x.shape[1], codebook_name, lut).T

    def hadamard(
        self, x: torch.Tensor, M: torch.Tensor, pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
        alpha: float = 1.0, threads: int | None = None,
    ) -> torch.Tensor:
        """In place on ``x`` ``[B, n]``: ``x <- post ⊙ (alpha · U (pre ⊙ x))``, ``U = M ⊗ H_P / √P``. Returns ``x``."""
        h = x if pre is None else x * pre
        h = _transform(h, M) * alpha
        if post is not None:
            h = h * post
        return x.copy_(h)

    def linear(
        self, x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
        bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
        use_hadamard: bool, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole QuantizedLinear in torch: ``x`` ``[..., n]`` -> ``[..., m]`` in ``x``'s dtype
        (differentiable in ``x``, ``su``, ``sv``, ``wscale``, ``bias`` and a HYB table ``lut``; any device)."""
        n, m = su.shape[0], sv.shape[0]
        W = _decode(codes, m, n, codebook_name, lut).to(su.device)
        h = x.reshape(-1, n).to(torch.float32) * su
        if use_hadamard:
            h = _transform(h, m_in)
        y = (h @ W.T) * wscale
        if use_hadamard:
            y = _transform(y, m_out_t)
        y = y * sv
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], m).to(x.dtype)
