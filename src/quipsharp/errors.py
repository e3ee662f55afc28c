"""Typed errors raised by quipsharp's numerical code.

The maths modules raise these instead of returning ``None`` or silently producing NaNs; the one
policy that recovers from them (more damping) lives in :mod:`quipsharp.quantize`.
"""

from __future__ import annotations


class QuipSharpError(Exception):
    """Base class of every error quipsharp raises on purpose."""


class NumericalError(QuipSharpError, ArithmeticError):
    """A numerical computation failed (non-finite values, a factorisation broke down)."""


class HessianNotPositiveDefiniteError(NumericalError):
    """The (regularised) Hessian is not positive definite or is too ill-conditioned to factor.

    Attributes:
        damping: the relative damping σ that was in force when the factorisation failed.
    """

    def __init__(self, message: str, damping: float | None = None) -> None:
        super().__init__(message)
        self.damping = damping


class ExportError(QuipSharpError, RuntimeError):
    """A model cannot be exported the way it was asked (e.g. quipsharp layers traced into ONNX)."""
