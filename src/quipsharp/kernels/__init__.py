"""CPU kernels for ``QuantizedLinear`` (E8P12 family): implementations behind one signature, and a selector.

Every implementation (a :class:`Kernel`) offers

* ``decode(codes, m, n, codebook_name, threads=None, out=None, *, lut=None)`` — ``codes -> W`` exactly as the
  reference decode,
* ``matmul(x, codes, m, codebook_name, threads=None, *, allow_int8=True, lut=None)`` — ``x @ decode(codes)ᵀ``,
* ``hadamard(x, M, pre=None, post=None, alpha=1.0, threads=None)`` — the transform of
  :func:`quipsharp.hadamard.hadamard_transform` with a pre-multiplied vector, a scalar and a
  post-multiplied vector,
* ``linear(x, codes, su, sv, wscale, bias, m_in, m_out_t, codebook_name, use_hadamard, lut=None)`` — a whole
  quantized linear (RHT on the input, decode–matmul, inverse RHT on the output, bias).

``lut`` is the per-matrix table ``[512, 2]`` float32 of a trellis HYB codebook (required there, unused
by the others).

Implementations: :class:`~quipsharp.kernels.reference.ReferenceKernel` (pure torch, always there)
and :class:`~quipsharp.kernels.native.NativeKernel` at one ISA level of the C library
(:data:`LEVELS`). :func:`select` returns one: ``select("avx2")`` that level (refused with
:class:`UnsupportedLevelError` if the CPU lacks it), ``select()`` the default — the best level the
CPU has, or ``QUIPSHARP_KERNEL`` (a user override: ``reference`` or a level name; a level the CPU
lacks falls back to the best one it has, with a warning). The choice is logged once. Nothing is
process-global: each ``QuantizedLinear`` holds the kernel chosen for it (``layer.use_kernel(level)``,
:func:`use` for a whole model), and the module functions below take ``level=``.

Without the compiled library (no compiler at install time) a warning is logged at first use and
everything runs on the reference kernel.

The custom op ``torch.ops.quipsharp.e8p_linear`` (a fake implementation included) runs a layer's
kernel under ``torch.compile``.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Protocol

import torch

from quipsharp.kernels.native import (
    FUSED_MAX_BATCH,
    INT8_LEVELS,
    KINDS,
    LEVELS,
    TRELLIS_KINDS,
    TRELLIS_TILE_KINDS,
    UNFILLED_MESSAGE,
    BoundLinear,
    KernelError,
    NativeKernel,
    Tables,
    UnsupportedLevelError,
    cpu_levels,
    int8_reference_matmul,
    tables,
)
from quipsharp.kernels.reference import REFERENCE, ReferenceKernel

#: Codebooks a native kernel serves: the E8P family and every trellis code (1MAD; HYB and 3INST tile by tile).
NATIVE_CODEBOOKS = frozenset(KINDS) | frozenset(TRELLIS_KINDS) | frozenset(TRELLIS_TILE_KINDS)

__all__ = [
    "ENV_CPU_CAP",
    "ENV_KERNEL",
    "FUSED_MAX_BATCH",
    "INT8_LEVELS",
    "KINDS",
    "LEVELS",
    "NATIVE_CODEBOOKS",
    "REFERENCE",
    "TRELLIS_KINDS",
    "TRELLIS_TILE_KINDS",
    "UNFILLED_MESSAGE",
    "BoundLinear",
    "Kernel",
    "KernelError",
    "NativeKernel",
    "ReferenceKernel",
    "Tables",
    "UnsupportedLevelError",
    "available",
    "decode",
    "default_level",
    "e8p_linear",
    "hadamard",
    "linear",
    "matmul",
    "select",
    "selected",
    "supported_levels",
    "tables",
    "use",
]

logger = logging.getLogger(__name__)

#: User override of the default kernel: ``reference`` or a level of :data:`LEVELS`.
ENV_KERNEL = "QUIPSHARP_KERNEL"
#: Caps the levels the CPU is taken to have (e.g. ``avx2`` to run as on an AVX2-only machine).
ENV_CPU_CAP = "QUIPSHARP_CPU_CAP"
#: Default preference, best first (x86 and ARM levels never coexist on one CPU).
PREFERENCE = ("avx512vnni", "avx512", "avx2", "neon_dotprod", "neon", "scalar")
#: Rank of each level within its family, for :data:`ENV_CPU_CAP`.
_RANK = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3, "neon": 1, "neon_dotprod": 2}


class Kernel(Protocol):
    """One implementation of the kernel signature (see the module docstring for the methods).

    Attributes:
        name: ``"reference"`` or a native level.
        native: whether it runs the C library.
        int8_activations: whether ``matmul(allow_int8=True)`` and a Hadamard ``linear`` quantize the
            activations to int8 (one scale per row) — results then differ from float by ~1%.
    """

    name: str
    native: bool
    int8_activations: bool

    def decode(self, codes: torch.Tensor, m: int, n: int, codebook_name: str, threads: int | None = None,
               out: torch.Tensor | None = None, *, lut: torch.Tensor | None = None) -> torch.Tensor: ...

    def matmul(self, x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None,
               *, allow_int8: bool = True, lut: torch.Tensor | None = None) -> torch.Tensor: ...

    def hadamard(self, x: torch.Tensor, M: torch.Tensor, pre: torch.Tensor | None = None,
                 post: torch.Tensor | None = None, alpha: float = 1.0, threads: int | None = None) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
               bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
               use_hadamard: bool, lut: torch.Tensor | None = None) -> torch.Tensor: ...


def supported_levels() -> list[str]:
    """Native levels this CPU (and build) can run, in :data:`LEVELS` order; empty without the library.

    ``QUIPSHARP_CPU_CAP=<level>`` drops the levels above that one (to test as on an older CPU).
    """
    return list(_supported_levels())


@functools.cache
def _supported_levels() -> tuple[str, ...]:
    have = cpu_levels()
    cap = os.environ.get(ENV_CPU_CAP, "").strip().lower()
    if cap:
        if cap not in _RANK:
            raise ValueError(f"{ENV_CPU_CAP}={cap!r}: expected one of {', '.join(LEVELS)}")
        have = [lvl for lvl in have if _RANK[lvl] <= _RANK[cap]]
        logger.info("%s=%s: using CPU levels %s", ENV_CPU_CAP, cap, ", ".join(have) or "none")
    return tuple(have)


@functools.cache
def _kernel(name: str) -> Kernel:
    return ReferenceKernel() if name == REFERENCE else NativeKernel(name)


def select(level: str | None = None) -> Kernel:
    """The kernel for ``level``: ``"reference"``, a level of :data:`LEVELS`, or None for the default.

    An explicit native level the CPU lacks raises :class:`UnsupportedLevelError` (never an illegal
    instruction); so does one when the library is not built.
    """
    if level is None:
        return _kernel(default_level())
    if level == REFERENCE:
        return _kernel(REFERENCE)
    if level not in LEVELS:
        raise ValueError(f"unknown kernel {level!r}: expected {REFERENCE} or one of {', '.join(LEVELS)}")
    if level not in _supported_levels():
        if not _supported_levels():
            raise UnsupportedLevelError(f"kernel level {level!r}: the native kernels are not built")
        raise UnsupportedLevelError(f"kernel level {level!r}: this CPU supports {', '.join(_supported_levels())}")
    return _kernel(level)


@functools.cache
def default_level() -> str:
    """The default kernel's name: the best level this CPU has, unless ``QUIPSHARP_KERNEL`` overrides
    it; ``"reference"`` without the library. Chosen once per process and logged."""
    have = _supported_levels()
    best = next((lvl for lvl in PREFERENCE if lvl in have), REFERENCE)
    want = os.environ.get(ENV_KERNEL, "").strip().lower() or "auto"
    if want not in ("auto", REFERENCE, *LEVELS):
        raise ValueError(f"{ENV_KERNEL}={want!r}: expected one of auto, {REFERENCE}, {', '.join(LEVELS)}")
    if want == "auto":
        choice = best
    elif want == REFERENCE or want in have:
        choice = want
    else:
        logger.warning("%s=%s: this CPU lacks it (it has %s); using %s", ENV_KERNEL, want,
                       ", ".join(have) or "no native level", best)
        choice = best
    from quipsharp.kernels.native import openmp

    logger.info("quipsharp CPU kernel: %s%s", choice, " (OpenMP)" if choice != REFERENCE and openmp() else "")
    return choice


def selected() -> str:
    """Name of the default kernel (see :func:`default_level`)."""
    return default_level()


def available() -> bool:
    """Whether the default kernel is native."""
    return default_level() != REFERENCE


def use(model: torch.nn.Module, level: str | None) -> torch.nn.Module:
    """Serve every ``QuantizedLinear`` of ``model`` with :func:`select` ``(level)``; returns ``model``."""
    kernel = select(level)
    for module in model.modules():
        if hasattr(module, "use_kernel"):
            module.use_kernel(kernel.name)
    return model


# ------------------------------------------------------------------------ module-level functions
def decode(codes: torch.Tensor, m: int, n: int, codebook_name: str, threads: int | None = None,
           out: torch.Tensor | None = None, *, level: str | None = None, lut: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``codes`` ``[m, n/8·code_bytes]`` uint8 -> ``W`` ``[m, n]`` float32 with :func:`select` ``(level)``."""
    return select(level).decode(codes, m, n, codebook_name, threads, out, lut=lut)


def matmul(x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None, *,
           level: str | None = None, int8_reference: bool = False, allow_int8: bool = True,
           lut: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[B, n]`` float32 @ ``decode(codes)ᵀ`` -> ``[B, m]`` float32 with :func:`select` ``(level)``.

    ``int8_reference=True`` runs the portable C reference of the int8 arithmetic instead (tests).
    """
    if int8_reference:
        return int8_reference_matmul(x, codes, m, codebook_name, threads)
    return select(level).matmul(x, codes, m, codebook_name, threads, allow_int8=allow_int8, lut=lut)


def hadamard(x: torch.Tensor, M: torch.Tensor, pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
             alpha: float = 1.0, threads: int | None = None, *, level: str | None = None) -> torch.Tensor:
    """In place on ``x`` ``[B, n]`` float32: ``x <- post ⊙ (alpha · U (pre ⊙ x))`` with :func:`select` ``(level)``."""
    return select(level).hadamard(x, M, pre, post, alpha, threads)


def linear(x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
           bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
           use_hadamard: bool, level: str | None = None, lut: torch.Tensor | None = None) -> torch.Tensor:
    """A whole QuantizedLinear ``x`` ``[..., n]`` -> ``[..., m]`` with :func:`select` ``(level)``.

    Eager callers use this (or the layer's kernel) directly: the dispatcher of a Python custom op
    costs ~20 µs a call, as much as a small layer's matmul; under ``torch.compile`` the registered
    op ``torch.ops.quipsharp.e8p_linear`` runs the same code.
    """
    return select(level).linear(x, codes, su, sv, wscale, bias, m_in, m_out_t, codebook_name, use_hadamard, lut)


e8p_linear = torch.library.custom_op("quipsharp::e8p_linear", linear, mutates_args=())


@e8p_linear.register_fake
def _(x, codes, su, sv, wscale, bias, m_in, m_out_t, codebook_name, use_hadamard, level=None, lut=None):
    if torch.onnx.is_in_onnx_export():  # every capture strategy of the ONNX exporter traces through here
        from quipsharp.errors import ExportError
        from quipsharp.nn import ONNX_EXPORT_MESSAGE

        raise ExportError(ONNX_EXPORT_MESSAGE)
    return x.new_empty(*x.shape[:-1], sv.shape[0])
