"""Native CPU kernels for ``QuantizedLinear`` (E8P12 family) behind one signature, with a selector.

The C library ``quipsharp._qskernels`` (``src/quipsharp/csrc/qs_kernels.c``) works on raw buffers;
this module loads it with ctypes, checks every argument before a pointer crosses over, and exposes

* :func:`decode` — ``codes -> W`` exactly as the reference decode,
* :func:`matmul` — fused decode–matmul ``x @ decode(codes)ᵀ`` (batch ≤ :data:`FUSED_MAX_BATCH`),
* :func:`hadamard` — the transform of :func:`quipsharp.hadamard.hadamard_transform` with a
  pre-multiplied vector, a scalar and a post-multiplied vector,
* the custom op ``torch.ops.quipsharp.e8p_linear`` (a whole quantized linear: RHT on the input,
  decode–matmul, inverse RHT on the output, bias) with a fake implementation, so models stay
  ordinary modules that ``torch.compile`` can trace.

Selection: the best path the CPU supports (``avx512vnni``: int8 activations with VNNI dot
products for batches ≤ :data:`FUSED_MAX_BATCH` behind the Hadamard transform; ``avx512``,
``avx2``: float32; ``scalar``: portable C), logged once. ``QUIPSHARP_KERNEL=reference`` forces the
pure-torch path; ``scalar``/``avx2``/``avx512``/``avx512vnni`` force a native path (refused if the
CPU lacks it). Without the compiled library everything falls back to
the torch reference, with a log line saying so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from quipsharp.codebooks import get_codebook
from quipsharp.config import CODEBOOK_DIM

logger = logging.getLogger(__name__)

ENV_KERNEL = "QUIPSHARP_KERNEL"
REFERENCE = "reference"
#: Native paths, in the C library's order: float32 scalar / AVX2 / AVX-512, then int8 activations
#: with AVX-512 VNNI dot products.
LEVELS = ("scalar", "avx2", "avx512", "avx512vnni")
#: Batch sizes up to this use the fused kernel (it keeps this many activation rows in registers and
#: decodes every weight once per group of rows); larger batches decode the weights once, exactly,
#: and call torch's float32 GEMM. Equal to the C kernels' MAX_FUSED_BATCH.
FUSED_MAX_BATCH = 8
#: Decoded weight elements per chunk on the decode + GEMM path (16 MB of float32 per thread).
DECODE_CHUNK_ELEMENTS = 4 * 2**20
#: Codebook name -> kernel kind (the C enum).
KINDS = {"E8P12": 0, "E8P12RVQ3B": 1, "E8P12RVQ4B": 2}

UNFILLED_MESSAGE = "QuantizedLinear used before its weight was quantized or loaded"
_ERRORS = {-1: "bad argument", -2: "unknown codebook kind", -3: "out of memory", -4: "ISA level not supported"}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float


class KernelError(RuntimeError):
    """A native kernel refused its arguments or failed."""


def _library_path() -> Path | None:
    here = Path(__file__).parent
    found = sorted(here.glob("_qskernels*.so")) + sorted(here.glob("_qskernels*.pyd"))
    return found[0] if found else None


@functools.cache
def _lib() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        logger.info("quipsharp native kernels not built; QuantizedLinear uses the torch reference path")
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        logger.warning("could not load %s (%s); using the torch reference path", path, err)
        return None
    lib.qs_codebook_new.argtypes = [_INT, _P, _P, _F]
    lib.qs_codebook_new.restype = _P
    lib.qs_decode.argtypes = [_P, _I64, _I64, _P, _P, _INT]
    lib.qs_matmul.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT]
    lib.qs_matmul_int8_ref.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT]
    lib.qs_hadamard.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _F, _INT]
    lib.qs_linear.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _F, _P, _INT, _I64, _P, _I64, _P, _P, _INT]
    lib.qs_select_level.argtypes = [_INT]
    for fn in (lib.qs_decode, lib.qs_matmul, lib.qs_matmul_int8_ref, lib.qs_hadamard, lib.qs_linear,
               lib.qs_select_level, lib.qs_level, lib.qs_max_level, lib.qs_openmp):
        fn.restype = _INT
    return lib


def selected() -> str:
    """The path ``QuantizedLinear`` uses on CPU: ``"avx512vnni"``, ``"avx512"``, ``"avx2"``, ``"scalar"``
    or ``"reference"`` (chosen once per process from the CPU and ``QUIPSHARP_KERNEL``, logged)."""
    lib = _lib()
    choice = _selected_level()
    return choice if choice == REFERENCE or lib is None else LEVELS[lib.qs_level()]



@functools.cache
def _selected_level() -> str:
    lib = _lib()
    want = os.environ.get(ENV_KERNEL, "").strip().lower() or "auto"
    if want not in ("auto", REFERENCE, *LEVELS):
        raise ValueError(f"{ENV_KERNEL}={want!r}: expected one of auto, {REFERENCE}, {', '.join(LEVELS)}")
    if want == REFERENCE or lib is None:
        choice = REFERENCE
    else:
        level = lib.qs_select_level(-1 if want == "auto" else LEVELS.index(want))
        if level < 0:
            best = LEVELS[lib.qs_max_level()]
            raise ValueError(f"{ENV_KERNEL}={want}: this CPU supports at most {best}")
        choice = LEVELS[level]
    omp = bool(lib and lib.qs_openmp())
    logger.info("quipsharp CPU kernel path: %s%s", choice, " (OpenMP)" if omp and choice != REFERENCE else "")
    return choice


def available() -> bool:
    """Whether a native path is selected."""
    return selected() != REFERENCE


def set_level(level: str) -> None:
    """Switch the native ISA path (``"scalar"``, ``"avx2"``, ``"avx512"``) — for tests and benchmarks."""
    lib = _lib()
    if lib is None:
        raise KernelError("native kernels are not built")
    rc = lib.qs_select_level(LEVELS.index(level))
    if rc < 0:
        _check(rc, f"select {level}")


def supported_levels() -> list[str]:
    """Native paths this CPU can run (empty without the library)."""
    lib = _lib()
    return [] if lib is None else list(LEVELS[: lib.qs_max_level() + 1])


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelError(f"native kernel {what} failed: {_ERRORS.get(rc, rc)}")


def _need(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class Tables:
    """A codebook as the kernels see it.

    Attributes:
        kind: C kind (0 E8P12, 1 E8P12RVQ3B, 2 E8P12RVQ4B).
        code_bytes: bytes per codeword (2, 3, 4).
        handle: the C ``qs_codebook`` built once from the codebook's tables (kept for the process).
    """

    kind: int
    code_bytes: int
    handle: int


@functools.cache
def tables(codebook_name: str) -> Tables:
    """The kernel handle of a codebook; raises ``ValueError`` for codebooks without a native kernel."""
    if codebook_name not in KINDS:
        raise ValueError(f"no native kernel for codebook {codebook_name!r} (have {sorted(KINDS)})")
    lib = _require()
    cb = get_codebook(codebook_name)
    kind = KINDS[codebook_name]
    src1 = getattr(cb, "stage1", cb).sources.to(torch.float32).contiguous()  # [256, 8]
    if kind == 0:
        tab2, resid = src1, 1.0
    else:
        stage2 = cb.stage2
        tab2 = (stage2.sources if kind == KINDS["E8P12RVQ4B"] else stage2.codewords()).to(torch.float32).contiguous()
        resid = float(cb.residual_scale)
    expected_bytes = (2, 3, 4)[kind]  # the C kinds' code sizes
    if src1.shape != (256, 8) or tab2.shape != (256, 8) or cb.code_bytes != expected_bytes:
        raise KernelError(f"{codebook_name}: tables {tuple(src1.shape)}/{tuple(tab2.shape)} or code size "
                          f"{cb.code_bytes} do not match the native kernel's layout")
    handle = lib.qs_codebook_new(kind, src1.data_ptr(), tab2.data_ptr(), resid)
    if not handle:
        raise KernelError(f"could not build the native tables of {codebook_name}")
    return Tables(kind, cb.code_bytes, handle)


def _threads(threads: int | None) -> int:
    return max(1, threads if threads is not None else torch.get_num_threads())


def decode(
    codes: torch.Tensor, m: int, n: int, codebook_name: str, threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``codes`` ``[m, n/8·code_bytes]`` uint8 -> ``W`` ``[m, n]`` float32, bitwise equal to the reference decode.

    ``out``: an optional contiguous float32 ``[m, n]`` tensor to write into.
    """
    lib, tb = _require(), tables(codebook_name)
    _check_mn(m, n)
    _need(codes, "codes", torch.uint8, (m, n // CODEBOOK_DIM * tb.code_bytes))
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    else:
        _need(out, "out", torch.float32, (m, n))
    if m == 0:
        return out
    _check(lib.qs_decode(codes.data_ptr(), m, n, tb.handle, out.data_ptr(), _threads(threads)), "decode")
    return out


def matmul(
    x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None,
    *, int8_reference: bool = False, allow_int8: bool = True,
) -> torch.Tensor:
    """Fused ``x`` ``[B, n]`` float32 @ ``decode(codes)ᵀ`` -> ``[B, m]`` float32 (no decoded weight stored).

    On the ``avx512vnni`` path each row of ``x`` is first quantized to int8 (scale ``max|x| / 127``).
    ``int8_reference=True`` runs the portable C reference of that int8 arithmetic instead (tests);
    ``allow_int8=False`` keeps float32 activations (the AVX-512 float kernel) on that path.
    """
    lib, tb = _require(), tables(codebook_name)
    fn = lib.qs_matmul_int8_ref if int8_reference else lib.qs_matmul
    if x.dim() != 2:
        raise ValueError(f"x must be [B, n], got shape {tuple(x.shape)}")
    B, n = x.shape
    _check_mn(m, n)
    _need(x, "x", torch.float32, (B, n))
    _need(codes, "codes", torch.uint8, (m, n // CODEBOOK_DIM * tb.code_bytes))
    out = torch.empty(B, m, dtype=torch.float32)
    if B == 0 or m == 0:
        return out.zero_()
    extra = () if int8_reference else (int(allow_int8),)
    _check(fn(codes.data_ptr(), m, n, tb.handle, x.data_ptr(), B, out.data_ptr(), _threads(threads), *extra), "matmul")
    return out


def hadamard(
    x: torch.Tensor,
    M: torch.Tensor,
    pre: torch.Tensor | None = None,
    post: torch.Tensor | None = None,
    alpha: float = 1.0,
    threads: int | None = None,
) -> torch.Tensor:
    """In place on ``x`` ``[B, n]`` float32: ``x <- post ⊙ (alpha · U (pre ⊙ x))`` with ``U = M ⊗ H_P / √P``.

    ``M`` ``[K, K]`` float32 is the orthonormal factor of :func:`quipsharp.hadamard.factor_dim`
    (its transpose for ``Uᵀ``); ``pre``/``post`` are ``[n]`` float32 or None. Returns ``x``.
    """
    lib = _require()
    if x.dim() != 2:
        raise ValueError(f"x must be [B, n], got shape {tuple(x.shape)}")
    B, n = x.shape
    K = M.shape[0] if M.dim() == 2 else -1
    if K < 1 or n % K or (n // K) & (n // K - 1):
        raise ValueError(f"factor of shape {tuple(M.shape)} does not split n={n} into K x 2^k")
    _need(x, "x", torch.float32, (B, n))
    _need(M, "M", torch.float32, (K, K))
    for name, v in (("pre", pre), ("post", post)):
        if v is not None:
            _need(v, name, torch.float32, (n,))
    if B == 0:
        return x
    _check(lib.qs_hadamard(x.data_ptr(), B, K, n // K, M.data_ptr(), _ptr(pre), _ptr(post), alpha,
                           _threads(threads)), "hadamard")
    return x


_SCRATCH = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 work buffer of at least ``numel`` elements, reused by this thread's later calls.

    Decoded weight chunks of the prefill path live here: allocating a fresh multi-MB tensor per
    layer call makes the kernel spend more time in page faults than in decoding.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _SCRATCH.buf = buf
    return buf


def _check_mn(m: int, n: int) -> None:
    if m < 0 or n < 0 or n % CODEBOOK_DIM:
        raise ValueError(f"bad weight shape ({m}, {n}): in_features must be a multiple of {CODEBOOK_DIM}")


def _require() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise KernelError("quipsharp native kernels are not built (reinstall with a C compiler)")
    _selected_level()  # QUIPSHARP_KERNEL applies to direct calls too
    return lib


def _check_linear_args(x, codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard) -> None:
    """Validate everything :func:`e8p_linear` hands to C (a wrong shape must not read out of bounds).

    The common case is one combined comparison (this runs once per layer per token); the detailed
    per-argument checks run only to name the problem.
    """
    n, m = su.shape[0], sv.shape[0]
    k_in, k_out = m_in.shape[0], m_out_t.shape[0]
    cpu = "cpu"
    fast_ok = (
        x.shape[-1] == n and x.device.type == cpu and codes.device.type == cpu and su.device.type == cpu
        and sv.device.type == cpu
        and codes.shape == (m, n // CODEBOOK_DIM * tables(codebook_name).code_bytes)
        and codes.dtype == torch.uint8 and su.dtype == torch.float32 and sv.dtype == torch.float32
        and su.dim() == 1 and sv.dim() == 1 and codes.is_contiguous() and su.is_contiguous() and sv.is_contiguous()
        and (bias is None or (bias.shape == (m,) and bias.dtype == torch.float32 and bias.is_contiguous()
                              and bias.device.type == cpu))
        and (not use_hadamard or (_factor_ok(m_in, n) and _factor_ok(m_out_t, m)))
    )
    if fast_ok:
        return
    if x.shape[-1] != n:
        raise ValueError(f"e8p_linear: x has last dim {x.shape[-1]}, expected {n}")
    _need(codes, "codes", torch.uint8, (m, n // CODEBOOK_DIM * tables(codebook_name).code_bytes))
    _need(su, "su", torch.float32, (n,))
    _need(sv, "sv", torch.float32, (m,))
    if bias is not None:
        _need(bias, "bias", torch.float32, (m,))
    if use_hadamard:
        for name, M, dim, k in (("m_in", m_in, n, k_in), ("m_out_t", m_out_t, m, k_out)):
            _need(M, name, torch.float32, (k, k))
            if not _factor_ok(M, dim):
                raise ValueError(f"e8p_linear: factor {name} of order {k} does not split {dim} into K x 2^k")
    raise ValueError(f"e8p_linear: x must be a CPU tensor, got {x.device}")


def _factor_ok(M: torch.Tensor, dim: int) -> bool:
    """``M`` is a contiguous float32 ``[K, K]`` with ``dim = K · 2^k``."""
    k = M.shape[0]
    p = dim // k if k else 0
    return (M.dim() == 2 and M.shape[1] == k and M.dtype == torch.float32 and M.is_contiguous() and k > 0
            and M.device.type == "cpu"
            and dim % k == 0 and p & (p - 1) == 0)


# ------------------------------------------------------------------------------------ custom op
def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    su: torch.Tensor,
    sv: torch.Tensor,
    wscale: torch.Tensor,
    bias: torch.Tensor | None,
    m_in: torch.Tensor,
    m_out_t: torch.Tensor,
    codebook_name: str,
    use_hadamard: bool,
) -> torch.Tensor:
    """A whole QuantizedLinear on CPU: ``x`` ``[..., n]`` -> ``[..., m]`` in ``x``'s dtype.

    Eager callers use this function directly (the dispatcher of a Python custom op costs ~20 µs a
    call, as much as a small layer's matmul); under ``torch.compile`` use the registered op
    ``torch.ops.quipsharp.e8p_linear``, which runs the same code.

    ``codes`` ``[m, n/8·cb]`` uint8; ``su`` ``[n]``, ``sv`` ``[m]``, ``bias`` ``[m]`` float32;
    ``wscale`` ``[]``; ``m_in`` ``[K_n, K_n]`` and ``m_out_t`` ``[K_m, K_m]`` the Hadamard factors
    (the latter transposed, for ``Vᵀ``).
    """
    n, m = su.shape[0], sv.shape[0]
    _check_linear_args(x, codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard)
    scale = float(wscale)
    if scale != scale:  # NaN: the layer was never filled
        raise RuntimeError(UNFILLED_MESSAGE)
    h = x.reshape(-1, n).to(torch.float32).contiguous()
    B = h.shape[0]
    if B == 0:
        return x.new_empty(*x.shape[:-1], m)
    if B <= FUSED_MAX_BATCH:  # the decoding case: one native call for the whole layer
        y = torch.empty(B, m, dtype=torch.float32)
        _check(_require().qs_linear(
            h.data_ptr(), B, n, m, codes.data_ptr(), tables(codebook_name).handle, su.data_ptr(), sv.data_ptr(),
            scale, _ptr(bias), use_hadamard, m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0],
            m_out_t.data_ptr(), y.data_ptr(), _threads(None)), "linear")
        return y.reshape(*x.shape[:-1], m).to(x.dtype)
    if h.data_ptr() == x.data_ptr():  # the transform below works in place
        h = h.clone()
    if use_hadamard:
        hadamard(h, m_in, pre=su)
    else:
        h.mul_(su)  # decode + float32 GEMM below: int8 activations never reach this path
    y = torch.empty(B, m, dtype=torch.float32)
    rows = max(1, min(m, DECODE_CHUNK_ELEMENTS // max(1, n)))
    buffer = _scratch(rows * n)  # reused across calls: a fresh multi-MB tensor costs page faults each time
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        W = decode(codes[r0:r1], r1 - r0, n, codebook_name, out=buffer[: (r1 - r0) * n].view(r1 - r0, n))
        torch.mm(h, W.T, out=y[:, r0:r1]) if r1 - r0 == m else y[:, r0:r1].copy_(h @ W.T)
    if use_hadamard:
        hadamard(y, m_out_t, alpha=scale, post=sv)
    else:
        y.mul_(sv * scale)
    if bias is not None:
        y.add_(bias)
    return y.reshape(*x.shape[:-1], m).to(x.dtype)


class BoundLinear:
    """One quantized linear's fused native call with everything but the activations checked once.

    For decoding loops that call the same layer once per token: :func:`linear` validates and
    converts ten arguments on every call, this checks them at construction and keeps the converted
    pointers. The tensors are held, so the pointers stay valid. The scale ``wscale`` and the thread
    count are read at construction: bind again after loading new state into the layer.

    ``__call__(x, out, residual=None)``:
        x:        ``[B, n]`` float32 contiguous CPU, ``B ≤ FUSED_MAX_BATCH``
        out:      ``[B, m]`` float32 contiguous CPU (written; may be a contiguous slice of a larger buffer)
        residual: ``[m]`` float32 contiguous, added to the output in place of the layer's bias; only
                  for layers without a bias and ``B == 1`` (a residual connection fused into the layer)
    """

    def __init__(self, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
                 bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
                 use_hadamard: bool, threads: int | None = None) -> None:
        self.n, self.m = su.shape[0], sv.shape[0]
        _check_linear_args(torch.empty(1, self.n), codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard)
        scale = float(wscale)
        if scale != scale:
            raise RuntimeError(UNFILLED_MESSAGE)
        self._keep = (codes, su, sv, bias, m_in, m_out_t)
        self.has_bias = bias is not None
        self._fn = _require().qs_linear
        self._head = (codes.data_ptr(), tables(codebook_name).handle, su.data_ptr(), sv.data_ptr(), scale)
        self._bias = _ptr(bias)
        self._tail = (bool(use_hadamard), m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0], m_out_t.data_ptr())
        self._threads = _threads(threads)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        if (x.dtype != torch.float32 or out.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.n
                or out.shape != (B, self.m) or not x.is_contiguous() or not out.is_contiguous()
                or not 0 < B <= FUSED_MAX_BATCH):
            raise ValueError(f"BoundLinear: need x [B<={FUSED_MAX_BATCH}, {self.n}] and out [B, {self.m}] float32 "
                             f"contiguous, got {tuple(x.shape)} {x.dtype} and {tuple(out.shape)} {out.dtype}")
        if x.device.type != "cpu" or out.device.type != "cpu":
            raise ValueError(f"BoundLinear: x and out must be CPU tensors, got {x.device} and {out.device}")
        bias = self._bias
        if residual is not None:
            if self.has_bias or B != 1 or residual.shape[-1] != self.m or residual.numel() != self.m \
                    or residual.dtype != torch.float32 or not residual.is_contiguous() \
                    or residual.device.type != "cpu":
                raise ValueError(f"BoundLinear: a residual needs a layer without bias, B == 1 and [{self.m}] "
                                 f"float32 contiguous on CPU, got {tuple(residual.shape)}")
            r0, o0, size = residual.data_ptr(), out.data_ptr(), self.m * residual.element_size()
            if r0 < o0 + size and o0 < r0 + size:  # the kernel writes out before it adds the bias
                raise ValueError("BoundLinear: residual and out overlap")
            bias = r0
        _check(self._fn(x.data_ptr(), B, self.n, self.m, *self._head, bias, *self._tail, out.data_ptr(),
                        self._threads), "linear")
        return out


e8p_linear = torch.library.custom_op("quipsharp::e8p_linear", linear, mutates_args=())


@e8p_linear.register_fake
def _(x, codes, su, sv, wscale, bias, m_in, m_out_t, codebook_name, use_hadamard):
    return x.new_empty(*x.shape[:-1], sv.shape[0])
