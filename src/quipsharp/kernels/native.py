"""The native C kernels (``quipsharp._qskernels``, ``src/quipsharp/csrc/qs_kernels.c``) behind the
:class:`quipsharp.kernels.Kernel` signature.

The C library works on raw buffers and keeps no selected ISA level: every call names the level it
runs (:class:`NativeKernel` holds it), and the library refuses a level the CPU cannot run
(``QS_EBADLEVEL``) rather than executing an illegal instruction. This module loads the library with
ctypes and checks every argument before a pointer crosses over.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from quipsharp.codebooks import get_codebook
from quipsharp.config import CODEBOOK_DIM
from quipsharp.config import TRELLIS_BLOCK as TRELLIS_TILE

logger = logging.getLogger("quipsharp.kernels")

#: Native paths, in the C library's enum order (QS_LEVEL_*). Each has float32 kernels (layers
#: without the Hadamard transform) and int8 ones (activations behind it; see :data:`INT8_LEVELS`):
#: ``scalar`` portable C; ``avx2`` AVX2+FMA (vpmaddubsw); ``avx512`` AVX-512 F/VL/BW/DQ float
#: kernels, the AVX2 int8 kernel; ``avx512vnni`` + VNNI/VBMI/BITALG int8 kernels; ``neon``,
#: ``neon_dotprod`` AArch64 (sdot).
LEVELS = ("scalar", "avx2", "avx512", "avx512vnni", "neon", "neon_dotprod")
#: Levels whose kernels quantize the activations to int8 behind the Hadamard transform
#: (``allow_int8``): all of them; their integer sums equal the portable reference's bit for bit.
INT8_LEVELS = frozenset(LEVELS)
#: Batch sizes up to this use the fused kernel (it keeps this many activation rows in registers and
#: decodes every weight once per group of rows). Larger batches behind the Hadamard transform run
#: int8 GEMM tiles (each tile of codewords decoded to int8 once for the whole batch); without the
#: transform they decode float32 weight chunks for torch's GEMM. Equal to the C kernels' MAX_FUSED_BATCH.
FUSED_MAX_BATCH = 8
#: Decoded weight elements per chunk on the decode + GEMM path (16 MB of float32 per thread).
DECODE_CHUNK_ELEMENTS = 4 * 2**20
#: Codebook name -> kernel kind (the C enum).
KINDS = {"E8P12": 0, "E8P12RVQ3B": 1, "E8P12RVQ4B": 2}
#: Trellis codebooks with a native decode-matvec (``qs_trellis_matmul``: the integer 1MAD code) -> bits.
TRELLIS_KINDS = {"QTIP1MAD2": 2, "QTIP1MAD3": 3, "QTIP1MAD4": 4}
#: Codes of the trellis path that decodes a tile at a time (``qs_trellis_tile_*``, the C QS_TRELLIS_*).
TRELLIS_HYB, TRELLIS_3INST = 1, 2
#: Trellis codebooks on that path -> (bits, code): HYB (its per-matrix table ``lut``) and 3INST (the raw
#: sum of two float16 halves, scaled by :func:`tile_code_scale`). Float32 activations.
TRELLIS_TILE_KINDS = {**{f"QTIPHYB{k}": (k, TRELLIS_HYB) for k in (2, 3, 4)},
                      **{f"QTIP3INST{k}": (k, TRELLIS_3INST) for k in (2, 3, 4)}}
#: ``[entries, V]`` of a HYB layer's table (quipsharp.codebooks.trellis: 2^HYB_LUT_BITS two-vectors).
HYB_LUT_SHAPE = (512, 2)
#: Levels whose trellis decode-matvec quantizes a decoding step's activations to int8 (exact integer
#: sums, the same bits at every level): all of them.
TRELLIS_INT8_LEVELS = frozenset(LEVELS)
#: Widest input of the int8 trellis kernel (its int32 sums are exact up to here).
TRELLIS_INT8_MAX_N = 16384
#: Largest batch a trellis layer runs through its fused float32 slabs (each tile decoded once into L1 for
#: the whole batch); larger batches decode the weight (the level's tile decoder, into Wᵀ) for torch's GEMM.
#: Measured (benchmarks/trellis_prefill.py, BENCHMARKS.md): with the portable decode the slabs won up to
#: 128 rows on a Zen 4; with the level's decode, on a Xeon (AVX-512 VNNI) they win up to 32-48 rows at
#: 4096 x 4096 and up to 16-32 at 576 x 1536, and lose 15-30% at 64. 64 splits the difference between
#: the two machines.
TRELLIS_SLAB_MAX_BATCH = 64

UNFILLED_MESSAGE = "QuantizedLinear used before its weight was quantized or loaded"
NOT_BUILT_MESSAGE = ("quipsharp native kernels are not built (no C compiler at install time, or the build "
                     "failed); QuantizedLinear uses the slower pure-torch reference path")
QS_EBADLEVEL = -4
_ERRORS = {-1: "bad argument", -2: "unknown codebook kind", -3: "out of memory",
           QS_EBADLEVEL: "ISA level not supported"}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F = ctypes.c_float


class KernelError(RuntimeError):
    """A native kernel refused its arguments or failed, or the native library is missing."""


class UnsupportedLevelError(KernelError, ValueError):
    """A kernel level this CPU (or this build) cannot run was asked for explicitly."""


def library_path() -> Path | None:
    """The built ``_qskernels`` shared library next to the package, or None."""
    here = Path(__file__).resolve().parent.parent
    found = sorted(here.glob("_qskernels*.so")) + sorted(here.glob("_qskernels*.pyd"))
    return found[0] if found else None


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded library with its signatures declared, or None (logged once as a warning)."""
    path = library_path()
    if path is None:
        logger.warning(NOT_BUILT_MESSAGE)
        return None
    try:
        cdll = ctypes.CDLL(str(path))
    except OSError as err:
        logger.warning("could not load %s (%s); QuantizedLinear uses the pure-torch reference path", path, err)
        return None
    cdll.qs_codebook_new.argtypes = [_INT, _P, _P, _F]
    cdll.qs_codebook_new.restype = _P
    cdll.qs_decode.argtypes = [_P, _I64, _I64, _P, _P, _INT, _INT]
    cdll.qs_matmul.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT, _INT]
    cdll.qs_matmul_int8_ref.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT]
    cdll.qs_hadamard.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _F, _INT, _INT]
    cdll.qs_linear.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _F, _P, _INT, _I64, _P, _I64, _P, _P, _INT,
                               _INT]
    cdll.qs_supported_levels.argtypes = []
    cdll.qs_step_check.argtypes = [_P]
    cdll.qs_step.argtypes = [_P, _P, _I64, _P, _INT]
    cdll.qs_dot_rows_int8.argtypes = [_P, _I64, _I64, _P, _P, _INT, _INT]
    cdll.qs_viterbi.argtypes = [_P, _I64, _I64, _P, _INT, _INT, _INT, _INT, _P, _P, _INT, _INT, _INT]
    cdll.qs_trellis_matmul.argtypes = [_P, _I64, _I64, _INT, _P, _I64, _P, _INT, _INT]
    cdll.qs_trellis_matmul_int8.argtypes = [_P, _I64, _I64, _INT, _P, _I64, _P, _INT, _INT]
    cdll.qs_trellis_decode.argtypes = [_P, _I64, _I64, _INT, _P, _INT, _INT, _INT]
    cdll.qs_trellis_linear.argtypes = [_P, _I64, _I64, _I64, _P, _INT, _P, _P, _F, _P, _INT, _I64, _P, _I64, _P,
                                       _INT, _P, _INT, _INT]
    cdll.qs_trellis_tile_matmul.argtypes = [_P, _I64, _I64, _INT, _INT, _P, _P, _I64, _P, _INT, _INT]
    cdll.qs_trellis_tile_decode.argtypes = [_P, _I64, _I64, _INT, _INT, _P, _P, _INT, _INT, _INT]
    cdll.qs_trellis_tile_linear.argtypes = [_P, _I64, _I64, _I64, _P, _INT, _INT, _P, _P, _P, _F, _P, _INT, _I64, _P,
                                            _I64, _P, _P, _INT, _INT]
    cdll.qs_release_workspace.argtypes = []
    cdll.qs_release_workspace.restype = None
    for fn in (cdll.qs_decode, cdll.qs_matmul, cdll.qs_matmul_int8_ref, cdll.qs_hadamard, cdll.qs_linear,
               cdll.qs_supported_levels, cdll.qs_openmp, cdll.qs_step_check, cdll.qs_step,
               cdll.qs_dot_rows_int8, cdll.qs_viterbi, cdll.qs_trellis_matmul, cdll.qs_trellis_matmul_int8,
               cdll.qs_trellis_decode, cdll.qs_trellis_linear, cdll.qs_trellis_tile_matmul,
               cdll.qs_trellis_tile_decode, cdll.qs_trellis_tile_linear):
        fn.restype = _INT
    return cdll


def cpu_levels() -> list[str]:
    """Native levels this CPU and build can run, in :data:`LEVELS` order (empty without the library)."""
    cdll = lib()
    if cdll is None:
        return []
    mask = cdll.qs_supported_levels()
    return [name for i, name in enumerate(LEVELS) if mask >> i & 1]


def openmp() -> bool:
    """Whether the library was built with OpenMP (otherwise every kernel runs on one thread)."""
    cdll = lib()
    return bool(cdll is not None and cdll.qs_openmp())


def _check(rc: int, what: str) -> None:
    if rc == QS_EBADLEVEL:
        raise UnsupportedLevelError(f"native kernel {what}: this CPU cannot run the requested ISA level")
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


def _require() -> ctypes.CDLL:
    cdll = lib()
    if cdll is None:
        raise KernelError(NOT_BUILT_MESSAGE)
    return cdll


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
    cdll = _require()
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
    handle = cdll.qs_codebook_new(kind, src1.data_ptr(), tab2.data_ptr(), resid)
    if not handle:
        raise KernelError(f"could not build the native tables of {codebook_name}")
    return Tables(kind, cb.code_bytes, handle)


def _threads(threads: int | None) -> int:
    return max(1, threads if threads is not None else torch.get_num_threads())


def _check_mn(m: int, n: int) -> None:
    if m < 0 or n < 0 or n % CODEBOOK_DIM:
        raise ValueError(f"bad weight shape ({m}, {n}): in_features must be a multiple of {CODEBOOK_DIM}")


_SCRATCH = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 work buffer of at least ``numel`` elements, reused by this thread's later calls.

    Decoded weight chunks of the float prefill path live here: allocating a fresh multi-MB tensor
    per layer call makes the kernel spend more time in page faults than in decoding.
    """
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _SCRATCH.buf = buf
    return buf


def check_linear_args(x, codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard) -> None:
    """Validate everything a native linear hands to C (a wrong shape must not read out of bounds).

    The common case is one combined comparison (this runs once per layer per token); the detailed
    per-argument checks run only to name the problem.
    """
    n, m = su.shape[0], sv.shape[0]
    k_in, k_out = m_in.shape[0], m_out_t.shape[0]
    cpu = "cpu"
    codes_dtype, codes_shape = _codes_spec(codebook_name, m, n)
    fast_ok = (
        x.shape[-1] == n and x.device.type == cpu and codes.device.type == cpu and su.device.type == cpu
        and sv.device.type == cpu
        and codes.shape == codes_shape
        and codes.dtype == codes_dtype and su.dtype == torch.float32 and sv.dtype == torch.float32
        and su.dim() == 1 and sv.dim() == 1 and codes.is_contiguous() and su.is_contiguous() and sv.is_contiguous()
        and (bias is None or (bias.shape == (m,) and bias.dtype == torch.float32 and bias.is_contiguous()
                              and bias.device.type == cpu))
        and (not use_hadamard or (_factor_ok(m_in, n) and _factor_ok(m_out_t, m)))
    )
    if fast_ok:
        return
    if x.shape[-1] != n:
        raise ValueError(f"e8p_linear: x has last dim {x.shape[-1]}, expected {n}")
    _need(codes, "codes", codes_dtype, codes_shape)
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


def _codes_spec(codebook_name: str, m: int, n: int) -> tuple[torch.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` of the stored codes a native kernel reads (ValueError: no native kernel)."""
    k = TRELLIS_KINDS.get(codebook_name) or TRELLIS_TILE_KINDS.get(codebook_name, (0,))[0]
    if k:
        if m % TRELLIS_TILE or n % TRELLIS_TILE:
            raise ValueError(f"bad weight shape ({m}, {n}) for {codebook_name}: not whole {TRELLIS_TILE}x"
                             f"{TRELLIS_TILE} tiles")
        return torch.int16, (m // TRELLIS_TILE, n // TRELLIS_TILE * TRELLIS_TILE * k)
    return torch.uint8, (m, n // CODEBOOK_DIM * tables(codebook_name).code_bytes)


def _check_lut(lut: torch.Tensor | None, codebook_name: str) -> torch.Tensor | None:
    """A HYB layer's table as the C kernels read it: float32 ``[512, 2]``, contiguous, on the CPU (the other
    tile-decoded codes have none: None)."""
    if TRELLIS_TILE_KINDS[codebook_name][1] != TRELLIS_HYB:
        return None
    if lut is None:
        raise ValueError(f"{codebook_name} decodes through its per-matrix table: pass lut (float32 "
                         f"{list(HYB_LUT_SHAPE)})")
    _need(lut, "lut", torch.float32, HYB_LUT_SHAPE)
    return lut


def tile_code_scale(codebook_name: str) -> float:
    """The factor from a tile-decoded code's native values to the codebook's (HYB: 1, its table's values;
    3INST: its raw float16 sums to unit variance)."""
    if TRELLIS_TILE_KINDS[codebook_name][1] == TRELLIS_HYB:
        return 1.0
    from quipsharp.codebooks.trellis import raw_code_scale

    return raw_code_scale("3inst")


def trellis_scale() -> float:
    """The factor from the native kernels' raw 1MAD codes to the codebook's unit-variance values."""
    from quipsharp.codebooks.trellis import integer_code

    return integer_code("1mad")[1]


def _factor_ok(M: torch.Tensor, dim: int) -> bool:
    """``M`` is a contiguous float32 ``[K, K]`` with ``dim = K · 2^k``."""
    k = M.shape[0]
    p = dim // k if k else 0
    return (M.dim() == 2 and M.shape[1] == k and M.dtype == torch.float32 and M.is_contiguous() and k > 0
            and M.device.type == "cpu"
            and dim % k == 0 and p & (p - 1) == 0)


class NativeKernel:
    """The C kernels at one ISA level (``"scalar"``, ``"avx2"``, ``"avx512"``, ``"avx512vnni"``,
    ``"neon"``, ``"neon_dotprod"``). Build it with :func:`quipsharp.kernels.select`, which checks the
    CPU first; the C side re-checks on every call.

    Attributes:
        name: the level.
        native: True.
        int8_activations: whether :meth:`matmul` with ``allow_int8`` (and :meth:`linear` with the
            Hadamard transform) quantizes activations to int8 (one scale per row).
    """

    native = True

    def __init__(self, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown native level {level!r} (have {', '.join(LEVELS)})")
        self.name = level
        self.level = LEVELS.index(level)
        self.int8_activations = level in INT8_LEVELS

    def __repr__(self) -> str:
        return f"NativeKernel({self.name!r})"

    def __reduce__(self):  # pickles by level name (models are deep-copied and saved whole)
        return (NativeKernel, (self.name,))

    def decode(
        self, codes: torch.Tensor, m: int, n: int, codebook_name: str, threads: int | None = None,
        out: torch.Tensor | None = None, *, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``codes`` ``[m, n/8·code_bytes]`` uint8 -> ``W`` ``[m, n]`` float32, bitwise equal to the
        reference decode. ``out``: an optional contiguous float32 ``[m, n]`` tensor to write into.
        A trellis codebook (:data:`TRELLIS_KINDS`): int16 codes, the raw integer code times its scale
        (equal to the reference decode to float32 rounding). A HYB trellis (:data:`TRELLIS_TILE_KINDS`):
        the values of its table ``lut`` ``[512, 2]`` (bitwise the reference decode); 3INST: its raw values
        times their scale (to float32 rounding)."""
        if codebook_name in TRELLIS_TILE_KINDS:
            W = self.tile_decode(codes, m, n, codebook_name, lut, threads, out)
            scale = tile_code_scale(codebook_name)
            return W if scale == 1.0 else W.mul_(scale)
        if codebook_name in TRELLIS_KINDS:
            W = self.trellis_decode(codes, m, n, TRELLIS_KINDS[codebook_name], threads, out)
            return W.mul_(trellis_scale())
        cdll, tb = _require(), tables(codebook_name)
        _check_mn(m, n)
        _need(codes, "codes", torch.uint8, (m, n // CODEBOOK_DIM * tb.code_bytes))
        if out is None:
            out = torch.empty(m, n, dtype=torch.float32)
        else:
            _need(out, "out", torch.float32, (m, n))
        if m == 0:
            return out
        _check(cdll.qs_decode(codes.data_ptr(), m, n, tb.handle, out.data_ptr(), _threads(threads), self.level),
               "decode")
        return out

    def matmul(
        self, x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None,
        *, allow_int8: bool = True, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused ``x`` ``[B, n]`` float32 @ ``decode(codes)ᵀ`` -> ``[B, m]`` float32 (no decoded weight stored).

        With :attr:`int8_activations` and ``allow_int8`` each row of ``x`` is first quantized to
        int8 (scale ``max|x| / 127``); ``allow_int8=False`` keeps float32 activations. A row with a
        NaN or ±Inf gives a row of NaN. A trellis codebook quantizes to int8 at
        :data:`TRELLIS_INT8_LEVELS` (same rule); HYB (its table ``lut``) and 3INST keep float32 activations.
        """
        if codebook_name in TRELLIS_TILE_KINDS:
            y = self.tile_matmul(x, codes, m, codebook_name, lut, threads)
            scale = tile_code_scale(codebook_name)
            return y if scale == 1.0 else y.mul_(scale)
        if codebook_name in TRELLIS_KINDS:
            return self.trellis_matmul(x, codes, m, TRELLIS_KINDS[codebook_name], threads,
                                       int8=allow_int8 and self._trellis_int8(x.shape[-1])).mul_(trellis_scale())
        return _matmul(x, codes, m, codebook_name, threads, "matmul",
                       lambda *a: _require().qs_matmul(*a, self.level, int(allow_int8)))

    def hadamard(
        self, x: torch.Tensor, M: torch.Tensor, pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
        alpha: float = 1.0, threads: int | None = None,
    ) -> torch.Tensor:
        """In place on ``x`` ``[B, n]`` float32: ``x <- post ⊙ (alpha · U (pre ⊙ x))`` with ``U = M ⊗ H_P / √P``.

        ``M`` ``[K, K]`` float32 is the orthonormal factor of :func:`quipsharp.hadamard.factor_dim`
        (its transpose for ``Uᵀ``); ``pre``/``post`` are ``[n]`` float32 or None. Returns ``x``.
        """
        cdll = _require()
        B, n, K = _hadamard_shapes(x, M, pre, post)
        if B == 0:
            return x
        _check(cdll.qs_hadamard(x.data_ptr(), B, K, n // K, M.data_ptr(), _ptr(pre), _ptr(post), alpha,
                                _threads(threads), self.level), "hadamard")
        return x

    def linear(
        self, x: torch.Tensor, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
        bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
        use_hadamard: bool, lut: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole QuantizedLinear: ``x`` ``[..., n]`` -> ``[..., m]`` in ``x``'s dtype.

        ``codes`` ``[m, n/8·cb]`` uint8; ``su`` ``[n]``, ``sv`` ``[m]``, ``bias`` ``[m]`` float32;
        ``wscale`` ``[]``; ``m_in`` ``[K_n, K_n]`` and ``m_out_t`` ``[K_m, K_m]`` the Hadamard
        factors (the latter transposed, for ``Vᵀ``); ``lut`` ``[512, 2]`` float32: a HYB trellis's table.
        """
        n, m = su.shape[0], sv.shape[0]
        check_linear_args(x, codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard)
        scale = float(wscale)
        if scale != scale:  # NaN: the layer was never filled
            raise RuntimeError(UNFILLED_MESSAGE)
        h = x.reshape(-1, n).to(torch.float32).contiguous()
        B = h.shape[0]
        if B == 0:
            return x.new_empty(*x.shape[:-1], m)
        if codebook_name in TRELLIS_TILE_KINDS:
            return self._tile_linear(x, h, codes, su, sv, scale, bias, m_in, m_out_t, codebook_name, use_hadamard,
                                     _check_lut(lut, codebook_name))
        if codebook_name in TRELLIS_KINDS:
            return self._trellis_linear(x, h, codes, su, sv, scale, bias, m_in, m_out_t, codebook_name, use_hadamard)
        if B <= FUSED_MAX_BATCH or (use_hadamard and self.int8_activations):
            # one native call for the whole layer: the fused kernel for a decoding step, int8 GEMM
            # tiles (no float32 weight) for a prefill batch behind the Hadamard transform
            y = torch.empty(B, m, dtype=torch.float32)
            _check(_require().qs_linear(
                h.data_ptr(), B, n, m, codes.data_ptr(), tables(codebook_name).handle, su.data_ptr(), sv.data_ptr(),
                scale, _ptr(bias), use_hadamard, m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0],
                m_out_t.data_ptr(), y.data_ptr(), _threads(None), self.level), "linear")
            return y.reshape(*x.shape[:-1], m).to(x.dtype)
        # a prefill batch of a layer without the transform (float32 activations: outlier channels
        # would crush one int8 scale): decode chunks of the weight once and use torch's GEMM
        if h.data_ptr() == x.data_ptr():  # the transform below works in place
            h = h.clone()
        if use_hadamard:
            self.hadamard(h, m_in, pre=su)
        else:
            h.mul_(su)  # decode + float32 GEMM below: int8 activations never reach this path
        y = torch.empty(B, m, dtype=torch.float32)
        rows = max(1, min(m, DECODE_CHUNK_ELEMENTS // max(1, n)))
        buffer = _scratch(rows * n)  # reused across calls: a fresh multi-MB tensor costs page faults each time
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            W = self.decode(codes[r0:r1], r1 - r0, n, codebook_name, out=buffer[: (r1 - r0) * n].view(r1 - r0, n))
            torch.mm(h, W.T, out=y[:, r0:r1]) if r1 - r0 == m else y[:, r0:r1].copy_(h @ W.T)
        return self._output(x, y, m_out_t, scale, sv, bias, use_hadamard)

    def _output(self, x, y, m_out_t, alpha, sv, bias, use_hadamard) -> torch.Tensor:
        """A linear's output from ``y`` ``[B, m]`` (in place): inverse RHT scaled by ``alpha``, ``S_V``,
        bias; shaped and typed as the input ``x``."""
        if use_hadamard:
            self.hadamard(y, m_out_t, alpha=alpha, post=sv)
        else:
            y.mul_(sv * alpha)
        if bias is not None:
            y.add_(bias)
        return y.reshape(*x.shape[:-1], y.shape[1]).to(x.dtype)


    def trellis_matmul(self, x: torch.Tensor, codes: torch.Tensor, m: int, k: int,
                       threads: int | None = None, *, int8: bool = False) -> torch.Tensor:
        """``x`` ``[B, n]`` float32 @ ``Cᵀ`` -> ``[B, m]`` float32, ``C`` the raw 1MAD codes of a trellis
        matrix (int16 ``codes`` ``[m/16, (n/16)·16k]``), decoded in registers (``qs_trellis_matmul``);
        every level gives the same bits. ``int8``: each row of ``x`` quantized to int8 (scale
        ``max|x| / 127``) and exact integer sums (``qs_trellis_matmul_int8``; ``n`` at most
        :data:`TRELLIS_INT8_MAX_N`); a row with a NaN or ±Inf gives a row of NaN."""
        if x.dim() != 2:
            raise ValueError(f"trellis matmul: x must be [B, n], got {tuple(x.shape)}")
        B, n = x.shape
        dtype, shape = _codes_spec(f"QTIP1MAD{k}", m, n)
        _need(codes, "codes", dtype, shape)
        _need(x, "x", torch.float32, (B, n))
        if int8 and n > TRELLIS_INT8_MAX_N:
            raise ValueError(f"trellis matmul: int8 activations need n <= {TRELLIS_INT8_MAX_N}, got {n}")
        y = torch.empty(B, m, dtype=torch.float32)
        if B:
            call = _require().qs_trellis_matmul_int8 if int8 else _require().qs_trellis_matmul
            _check(call(codes.data_ptr(), m, n, k, x.data_ptr(), B, y.data_ptr(), _threads(threads), self.level),
                   "trellis matmul")
        return y

    def _trellis_int8(self, n: int) -> bool:
        """Whether this level's trellis kernel takes int8 activations for inputs of width ``n``."""
        return self.name in TRELLIS_INT8_LEVELS and n <= TRELLIS_INT8_MAX_N

    def _trellis_step_int8(self, n: int, use_hadamard: bool) -> bool:
        """Whether a trellis layer's decoding step (``qs_trellis_linear``, batch <= FUSED_MAX_BATCH; also
        :class:`BoundLinear` and the fused step) quantizes its activations to int8: only behind the transform."""
        return use_hadamard and self._trellis_int8(n)

    def trellis_decode(self, codes: torch.Tensor, m: int, n: int, k: int, threads: int | None = None,
                       out: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
        """The raw 1MAD codes ``C`` ``[m, n]`` float32 of a trellis matrix (``qs_trellis_decode``, this
        level's tile decoder; integers, so the same values on every level), or ``Cᵀ`` ``[n, m]`` with
        ``transposed`` (one vector store per tile column: the weights of a prefill GEMM)."""
        dtype, shape = _codes_spec(f"QTIP1MAD{k}", m, n)
        _need(codes, "codes", dtype, shape)
        dims = (n, m) if transposed else (m, n)
        if out is None:
            out = torch.empty(dims, dtype=torch.float32)
        else:
            _need(out, "out", torch.float32, dims)
        _check(_require().qs_trellis_decode(codes.data_ptr(), m, n, k, out.data_ptr(), _threads(threads), self.level,
                                            int(transposed)), "trellis decode")
        return out

    def _trellis_linear(self, x, h, codes, su, sv, scale, bias, m_in, m_out_t, codebook_name, use_hadamard):
        """:meth:`linear` of a trellis layer: RHT of the input, raw-code matmul, inverse RHT scaled by
        ``wscale`` times the code's scale, bias. Up to TRELLIS_SLAB_MAX_BATCH rows it is one native call with
        the decode-matmul inside (``qs_trellis_linear``: int8 activations for a decoding step, batch <=
        FUSED_MAX_BATCH, where the level has them; float32 slabs beyond); a larger batch decodes the weight
        for torch's GEMM."""
        n, m = su.shape[0], sv.shape[0]
        B = h.shape[0]
        k = TRELLIS_KINDS[codebook_name]
        if B <= TRELLIS_SLAB_MAX_BATCH:  # one native call: transforms and decode-matmul (qs_trellis_linear)
            int8 = B <= FUSED_MAX_BATCH and self._trellis_step_int8(n, use_hadamard)
            y = torch.empty(B, m, dtype=torch.float32)
            _check(_require().qs_trellis_linear(
                h.data_ptr(), B, n, m, codes.data_ptr(), k, su.data_ptr(), sv.data_ptr(), scale * trellis_scale(),
                _ptr(bias), use_hadamard, m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0], m_out_t.data_ptr(),
                int(int8), y.data_ptr(), _threads(None), self.level), "trellis linear")
            return y.reshape(*x.shape[:-1], m).to(x.dtype)
        h = self._gemm_input(x, h, su, m_in, use_hadamard)
        Wt = self.trellis_decode(codes, m, n, k, out=_scratch(m * n)[: m * n].view(n, m), transposed=True)
        return self._output(x, h @ Wt, m_out_t, scale * trellis_scale(), sv, bias, use_hadamard)

    def _gemm_input(self, x, h, su, m_in, use_hadamard) -> torch.Tensor:
        """A trellis prefill's GEMM input: ``U (su ⊙ h)`` (or ``su ⊙ h``) in place, on a copy when ``h`` is ``x``."""
        h = h.clone() if h.data_ptr() == x.data_ptr() else h
        if use_hadamard:
            self.hadamard(h, m_in, pre=su)
        else:
            h.mul_(su)
        return h

    # ---------------------------------------------------------------- trellis codes decoded tile by tile
    def tile_matmul(self, x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str,
                    lut: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
        """``x`` ``[B, n]`` float32 @ ``Cᵀ`` -> ``[B, m]`` float32, ``C`` the native values of a HYB or 3INST
        trellis matrix (:data:`TRELLIS_TILE_KINDS`; int16 ``codes`` ``[m/16, (n/16)·16k]``; HYB: its table
        ``lut`` ``[512, 2]``; 3INST: raw values, :func:`tile_code_scale` away from the codebook's), each tile
        decoded once into L1 (``qs_trellis_tile_matmul``); every level gives the same bits."""
        if x.dim() != 2:
            raise ValueError(f"trellis matmul: x must be [B, n], got {tuple(x.shape)}")
        B, n = x.shape
        k, code = TRELLIS_TILE_KINDS[codebook_name]
        _need(codes, "codes", *_codes_spec(codebook_name, m, n))
        _need(x, "x", torch.float32, (B, n))
        lut = _check_lut(lut, codebook_name)
        y = torch.empty(B, m, dtype=torch.float32)
        if B:
            _check(_require().qs_trellis_tile_matmul(codes.data_ptr(), m, n, k, code, _ptr(lut), x.data_ptr(), B,
                                                     y.data_ptr(), _threads(threads), self.level), "trellis matmul")
        return y

    def tile_decode(self, codes: torch.Tensor, m: int, n: int, codebook_name: str, lut: torch.Tensor | None = None,
                    threads: int | None = None, out: torch.Tensor | None = None, transposed: bool = False
                    ) -> torch.Tensor:
        """The native values ``C`` ``[m, n]`` float32 of a HYB or 3INST trellis matrix (``qs_trellis_tile_decode``:
        this level's tile decoder, the same values on every level), or ``Cᵀ`` ``[n, m]`` with ``transposed``."""
        k, code = TRELLIS_TILE_KINDS[codebook_name]
        _need(codes, "codes", *_codes_spec(codebook_name, m, n))
        lut = _check_lut(lut, codebook_name)
        dims = (n, m) if transposed else (m, n)
        if out is None:
            out = torch.empty(dims, dtype=torch.float32)
        else:
            _need(out, "out", torch.float32, dims)
        _check(_require().qs_trellis_tile_decode(codes.data_ptr(), m, n, k, code, _ptr(lut), out.data_ptr(),
                                                 _threads(threads), self.level, int(transposed)), "trellis decode")
        return out

    def _tile_linear(self, x, h, codes, su, sv, scale, bias, m_in, m_out_t, codebook_name, use_hadamard, lut):
        """:meth:`linear` of a HYB or 3INST trellis layer: as :meth:`_trellis_linear` with float32 activations
        (one native call up to TRELLIS_SLAB_MAX_BATCH rows: ``qs_trellis_tile_linear``; a larger batch decodes
        the weight for torch's GEMM)."""
        n, m = su.shape[0], sv.shape[0]
        B = h.shape[0]
        k, code = TRELLIS_TILE_KINDS[codebook_name]
        scale *= tile_code_scale(codebook_name)
        if B <= TRELLIS_SLAB_MAX_BATCH:
            y = torch.empty(B, m, dtype=torch.float32)
            _check(_require().qs_trellis_tile_linear(
                h.data_ptr(), B, n, m, codes.data_ptr(), k, code, _ptr(lut), su.data_ptr(), sv.data_ptr(), scale,
                _ptr(bias), use_hadamard, m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0], m_out_t.data_ptr(),
                y.data_ptr(), _threads(None), self.level), "trellis linear")
            return y.reshape(*x.shape[:-1], m).to(x.dtype)
        h = self._gemm_input(x, h, su, m_in, use_hadamard)
        Wt = self.tile_decode(codes, m, n, codebook_name, lut, out=_scratch(m * n)[: m * n].view(n, m), transposed=True)
        return self._output(x, h @ Wt, m_out_t, scale, sv, bias, use_hadamard)

def int8_reference_matmul(
    x: torch.Tensor, codes: torch.Tensor, m: int, codebook_name: str, threads: int | None = None,
) -> torch.Tensor:
    """The portable C reference of the int8 arithmetic (``qs_matmul_int8_ref``): ``x`` ``[B, n]`` float32
    -> ``[B, m]`` float32. Every int8 kernel's integer sums, hence outputs, are bitwise equal to it."""
    return _matmul(x, codes, m, codebook_name, threads, "int8 reference matmul", _require().qs_matmul_int8_ref)


def _matmul(x, codes, m, codebook_name, threads, what, call) -> torch.Tensor:
    tb = tables(codebook_name)
    if x.dim() != 2:
        raise ValueError(f"x must be [B, n], got shape {tuple(x.shape)}")
    B, n = x.shape
    _check_mn(m, n)
    _need(x, "x", torch.float32, (B, n))
    _need(codes, "codes", torch.uint8, (m, n // CODEBOOK_DIM * tb.code_bytes))
    out = torch.empty(B, m, dtype=torch.float32)
    if B == 0 or m == 0:
        return out.zero_()
    _check(call(codes.data_ptr(), m, n, tb.handle, x.data_ptr(), B, out.data_ptr(), _threads(threads)), what)
    return out


def _hadamard_shapes(x, M, pre, post) -> tuple[int, int, int]:
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
    return B, n, K


class BoundLinear:
    """One quantized linear's fused native call with everything but the activations checked once.

    For decoding loops that call the same layer once per token: :meth:`NativeKernel.linear`
    validates and converts ten arguments on every call, this checks them at construction and keeps
    the converted pointers. The tensors are held, so the pointers stay valid. The scale ``wscale``,
    the thread count and the level are read at construction: bind again after loading new state into
    the layer.

    ``level``: a native level name (None: :func:`quipsharp.kernels.select`'s default).

    ``__call__(x, out, residual=None)``:
        x:        ``[B, n]`` float32 contiguous CPU, ``B ≤ FUSED_MAX_BATCH``
        out:      ``[B, m]`` float32 contiguous CPU (written; may be a contiguous slice of a larger buffer)
        residual: ``[m]`` float32 contiguous, added to the output in place of the layer's bias; only
                  for layers without a bias and ``B == 1`` (a residual connection fused into the layer)
    """

    def __init__(self, codes: torch.Tensor, su: torch.Tensor, sv: torch.Tensor, wscale: torch.Tensor,
                 bias: torch.Tensor | None, m_in: torch.Tensor, m_out_t: torch.Tensor, codebook_name: str,
                 use_hadamard: bool, threads: int | None = None, level: str | None = None,
                 lut: torch.Tensor | None = None) -> None:
        from quipsharp.kernels import select

        kernel = select(level)
        if not kernel.native:
            raise KernelError(f"BoundLinear needs a native kernel, the selection gave {kernel.name!r}")
        self.level = kernel.name
        self.n, self.m = su.shape[0], sv.shape[0]
        check_linear_args(torch.empty(1, self.n), codes, su, sv, bias, m_in, m_out_t, codebook_name, use_hadamard)
        scale = float(wscale)
        if scale != scale:
            raise RuntimeError(UNFILLED_MESSAGE)
        tile_k, tile_code = TRELLIS_TILE_KINDS.get(codebook_name, (0, 0))
        lut = _check_lut(lut, codebook_name) if tile_k else None  # HYB's table is read at every call: held
        self._keep = (codes, su, sv, bias, m_in, m_out_t, lut)
        self.has_bias = bias is not None
        self._bias = _ptr(bias)
        self._tail = (bool(use_hadamard), m_in.shape[0], m_in.data_ptr(), m_out_t.shape[0], m_out_t.data_ptr())
        #: a trellis layer's bits per weight (``qs_trellis_linear``, ``qs_trellis_tile_linear``), or 0 (``qs_linear``)
        self.trellis_k = TRELLIS_KINDS.get(codebook_name, 0) or tile_k
        #: a tile-decoded trellis layer's code (TRELLIS_HYB, TRELLIS_3INST), or 0
        self.trellis_code = tile_code
        #: a HYB layer's table pointer (float32 [512, 2]), or None
        self.trellis_lut = _ptr(lut)
        #: a trellis layer's int8 activations (as :meth:`NativeKernel._trellis_linear` chooses them; HYB and
        #: 3INST: never)
        self.trellis_int8 = bool(self.trellis_k) and not tile_k and kernel._trellis_step_int8(self.n,
                                                                                              bool(use_hadamard))
        if tile_k:  # qs_trellis_tile_linear: the code and table after k, the code's scale folded in, no int8 flag
            self._fn = _require().qs_trellis_tile_linear
            self._head = (codes.data_ptr(), tile_k, tile_code, self.trellis_lut, su.data_ptr(), sv.data_ptr(),
                          scale * tile_code_scale(codebook_name))
        elif self.trellis_k:  # the same argument order; the code's scale folded into wscale, the int8 flag last
            self._fn = _require().qs_trellis_linear
            self._head = (codes.data_ptr(), self.trellis_k, su.data_ptr(), sv.data_ptr(), scale * trellis_scale())
            self._tail = (*self._tail, int(self.trellis_int8))
        else:
            self._fn = _require().qs_linear
            self._head = (codes.data_ptr(), tables(codebook_name).handle, su.data_ptr(), sv.data_ptr(), scale)
        self._threads = _threads(threads)
        self._level = LEVELS.index(kernel.name)

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
                        self._threads, self._level), "linear")
        return out


# ------------------------------------------------------------------------------ whole-token step
#: Activation names (transformers' ``hidden_act``) -> the C step's codes (QS_ACT_*).
STEP_ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}


class _StepLinear(ctypes.Structure):
    _fields_ = [("n", _I64), ("m", _I64), ("codes", _P), ("t", _P), ("su", _P), ("sv", _P), ("wscale", _F),
                ("use_hadamard", _I64), ("k_in", _I64), ("k_out", _I64), ("m_in", _P), ("m_out_t", _P),
                ("weight", _P), ("bias", _P), ("level", _I64), ("trellis_k", _I64), ("trellis_int8", _I64),
                ("trellis_code", _I64), ("trellis_lut", _P)]


class _StepBlock(ctypes.Structure):
    _fields_ = [("qkv", _StepLinear * 3), ("n_qkv", _I64), ("o", _StepLinear), ("gate_up", _StepLinear * 2),
                ("n_gate_up", _I64), ("down", _StepLinear), ("attn_norm", _P), ("mlp_norm", _P),
                ("attn_out_norm", _P), ("mlp_out_norm", _P), ("q_norm", _P), ("k_norm", _P), ("window", _I64),
                ("rope", _I64), ("k_cache", _P), ("v_cache", _P)]


class _StepModel(ctypes.Structure):
    _fields_ = [("n_blocks", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("inter", _I64), ("max_len", _I64), ("act", _I64), ("level", _I64), ("eps", _F), ("scale", _F),
                ("attn_softcap", _F), ("blocks", _P), ("n_ropes", _I64), ("cos", _P), ("ssin", _P),
                ("long_cos", _P), ("long_ssin", _P), ("rope_switch", _P), ("perm", _P), ("final_norm", _P),
                ("head", _P), ("head_scale", _P), ("vocab", _I64), ("head_k", _I64), ("head_m", _P)]


class StepLinear:
    """One linear of a :class:`DecodeStep`: a :class:`BoundLinear` (quantized, fused native call) or a
    dense float32 ``weight`` ``[m, n]`` with an optional ``bias`` ``[m]``. Holds its tensors."""

    def __init__(self, spec: _StepLinear, keep: tuple) -> None:
        self.spec, self._keep = spec, keep

    @classmethod
    def quantized(cls, bound: BoundLinear) -> StepLinear:
        codes_ptr, table, su_ptr, sv_ptr, scale = bound._head[:2] + bound._head[-3:]
        use_h, k_in, m_in_ptr, k_out, m_out_ptr = bound._tail[:5]
        if bound.trellis_k:
            table = None  # the second argument of qs_trellis_linear is k
        spec = _StepLinear(bound.n, bound.m, codes_ptr, table, su_ptr, sv_ptr, scale, int(use_h), k_in, k_out,
                           m_in_ptr, m_out_ptr, None, bound._bias, bound._level, bound.trellis_k,
                           int(bound.trellis_int8), bound.trellis_code, bound.trellis_lut)
        return cls(spec, (bound,))

    @classmethod
    def dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, level: str) -> StepLinear:
        """``weight`` float32 ``[m, n]`` (made contiguous), ``bias`` float32 ``[m]`` or None."""
        weight = weight.detach().float().contiguous()
        bias = None if bias is None else bias.detach().float().contiguous()
        m, n = weight.shape
        if bias is not None and bias.shape != (m,):
            raise ValueError(f"dense step linear: bias {tuple(bias.shape)} does not match weight {(m, n)}")
        spec = _StepLinear(n, m, None, None, None, None, 1.0, 0, 1, 1, None, None, weight.data_ptr(), _ptr(bias),
                           LEVELS.index(level))
        return cls(spec, (weight, bias))


@dataclass(frozen=True)
class BlockParams:
    """A decoder block's float32 norm weights (Gemma's ``1 + w`` already added), its sliding window
    (keys in ``(p - window, p]``, None: all) and the index of its RoPE table."""

    attn_norm: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    attn_out_norm: torch.Tensor | None  # [hidden]
    mlp_out_norm: torch.Tensor | None  # [hidden]
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None  # [head_dim]
    window: int | None
    rope: int


@dataclass(frozen=True)
class StepBlock:
    """One decoder block of a :class:`DecodeStep` (float32 contiguous tensors; see ``qs_step_block``)."""

    qkv: tuple[StepLinear, ...]  # one fused [q | k | v] linear or three
    o: StepLinear
    gate_up: tuple[StepLinear, ...]  # one fused [gate | up] linear or two
    down: StepLinear
    params: BlockParams
    k_cache: torch.Tensor  # [kv_heads, max_len, head_dim]
    v_cache: torch.Tensor  # [kv_heads, max_len, head_dim]


@dataclass(frozen=True)
class StepRope:
    """RoPE tables ``rot(v) = v · cos[p] + v[perm] · ssin[p]`` (``[max_len, head_dim]`` each, ``perm``
    ``[head_dim]``); LongRoPE: ``long`` tables used by tokens at positions ``≥ switch``."""

    cos: torch.Tensor
    ssin: torch.Tensor
    perm: torch.Tensor
    long: tuple[torch.Tensor, torch.Tensor] | None = None
    switch: int = 0


@dataclass(frozen=True)
class StepHead:
    """The int8 LM head of a :class:`DecodeStep`: ``logits = scales ⊙ (weight · q8(U · rms(x, final_norm)))``.

    ``weight`` int8 ``[vocab, hidden]`` holds the rows of ``W Uᵀ`` (the head's float weight rotated by
    the Hadamard transform ``U = factor ⊗ H_P / sqrt(P)`` of the hidden size, so one int8 scale fits
    the rotated activation vector), ``scales`` float32 ``[vocab]`` their per-row scales, ``factor``
    the ``[K, K]`` float32 factor of ``U`` (``[1, 1]`` for a power of two), ``final_norm`` ``[hidden]``."""

    final_norm: torch.Tensor
    weight: torch.Tensor
    scales: torch.Tensor
    factor: torch.Tensor


def _f32(t: torch.Tensor | None, shape: tuple[int, ...], what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"decode step: {what} must be float32 contiguous CPU {shape}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t


class DecodeStep:
    """A whole model's single-token decoding step as one native call (``qs_step``).

    The blocks of a Llama-style decoder (:class:`StepBlock`: RMS norms, q/k/v, RoPE, a KV cache
    written at the token's position, grouped-query attention with an optional sliding window and
    soft cap, ``o``, a gated MLP, Gemma-2/3's post-norms and q/k norms) run in one OpenMP region: the
    threads meet at a barrier between phases, the q/k/v (gate/up) rows of a block are one list split
    over them. Everything is checked here once (``qs_step_check``); a call passes two pointers.

    With a :class:`StepHead` the call also computes the next-token logits (the final norm and the
    int8 head in the same region).

    ``__call__(x, pos, logits=None)``: ``x`` float32 contiguous ``[hidden]`` (or ``[1, hidden]``), the
    token's embedding, is overwritten with the last block's output; keys and values are written at
    ``pos``; ``logits`` (float32 contiguous ``[vocab]``, needs a head) receives the logits.
    """

    def __init__(self, blocks: list[StepBlock], ropes: list[StepRope], *, hidden: int, heads: int, kv_heads: int,
                 head_dim: int, inter: int, max_len: int, act: str, eps: float, scale: float,
                 attn_softcap: float | None, head: StepHead | None = None, threads: int | None = None,
                 level: str | None = None) -> None:
        from quipsharp.kernels import select

        if act not in STEP_ACTIVATIONS:
            raise ValueError(f"decode step: activation {act!r} is not one of {sorted(STEP_ACTIVATIONS)}")
        kernel = select(level)
        if not kernel.native:
            raise KernelError(f"DecodeStep needs a native kernel, the selection gave {kernel.name!r}")
        cdll = _require()
        cache_shape = (kv_heads, max_len, head_dim)
        keep: list = [blocks, ropes]
        specs = (_StepBlock * len(blocks))()
        for spec, b in zip(specs, blocks, strict=True):
            if len(b.qkv) not in (1, 3) or len(b.gate_up) not in (1, 2):
                raise ValueError(f"decode step: {len(b.qkv)} q/k/v and {len(b.gate_up)} gate/up linears")
            for i, lin in enumerate(b.qkv):
                spec.qkv[i] = lin.spec
            for i, lin in enumerate(b.gate_up):
                spec.gate_up[i] = lin.spec
            spec.n_qkv, spec.n_gate_up, spec.o, spec.down = len(b.qkv), len(b.gate_up), b.o.spec, b.down.spec
            for name, size in (("attn_norm", hidden), ("mlp_norm", hidden), ("attn_out_norm", hidden),
                               ("mlp_out_norm", hidden), ("q_norm", head_dim), ("k_norm", head_dim)):
                setattr(spec, name, _ptr(_f32(getattr(b.params, name), (size,), name)))
            spec.k_cache = _f32(b.k_cache, cache_shape, "k_cache").data_ptr()
            spec.v_cache = _f32(b.v_cache, cache_shape, "v_cache").data_ptr()
            spec.window, spec.rope = b.params.window or 0, b.params.rope
        table = (max_len, head_dim)
        n = len(ropes)
        ptrs = {name: (_P * n)() for name in ("cos", "ssin", "long_cos", "long_ssin", "perm")}
        switch = (_I64 * n)()
        for r, rope in enumerate(ropes):
            perm = rope.perm.to(torch.int64).contiguous()
            keep.append(perm)
            if perm.shape != (head_dim,):
                raise ValueError(f"decode step: RoPE permutation {tuple(perm.shape)}, expected ({head_dim},)")
            ptrs["cos"][r] = _f32(rope.cos, table, "RoPE cos").data_ptr()
            ptrs["ssin"][r] = _f32(rope.ssin, table, "RoPE sin").data_ptr()
            ptrs["perm"][r] = perm.data_ptr()
            if rope.long is not None:
                ptrs["long_cos"][r] = _f32(rope.long[0], table, "RoPE long cos").data_ptr()
                ptrs["long_ssin"][r] = _f32(rope.long[1], table, "RoPE long sin").data_ptr()
                switch[r] = rope.switch
        self._model = _StepModel(len(blocks), hidden, heads, kv_heads, head_dim, inter, max_len,
                                 STEP_ACTIVATIONS[act], LEVELS.index(kernel.name), eps, scale, attn_softcap or 0.0,
                                 ctypes.addressof(specs), n, *(ctypes.addressof(ptrs[k]) for k in
                                                              ("cos", "ssin", "long_cos", "long_ssin")),
                                 ctypes.addressof(switch), ctypes.addressof(ptrs["perm"]))
        self.vocab = 0
        if head is not None:
            vocab = head.weight.shape[0]
            K = head.factor.shape[0]
            if head.weight.dtype != torch.int8 or head.weight.shape != (vocab, hidden) \
                    or not head.weight.is_contiguous():
                raise ValueError(f"decode step: head weight must be int8 contiguous [vocab, {hidden}], got "
                                 f"{head.weight.dtype} {tuple(head.weight.shape)}")
            self._model.final_norm = _f32(head.final_norm, (hidden,), "final_norm").data_ptr()
            self._model.head = head.weight.data_ptr()
            self._model.head_scale = _f32(head.scales, (vocab,), "head scales").data_ptr()
            self._model.vocab, self._model.head_k = vocab, K
            self._model.head_m = _f32(head.factor, (K, K), "head factor").data_ptr() if K > 1 else None
            self.vocab = vocab
            keep.append(head)
        self._keep = (keep, specs, ptrs, switch)
        _check(cdll.qs_step_check(ctypes.byref(self._model)), "decode step description")
        self._fn, self._ref = cdll.qs_step, ctypes.byref(self._model)
        self.hidden, self.max_len, self.threads = hidden, max_len, _threads(threads)
        self.level = kernel.name

    def __call__(self, x: torch.Tensor, pos: int, logits: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or x.numel() != self.hidden or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"decode step: x must be float32 contiguous CPU with {self.hidden} elements, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if not 0 <= pos < self.max_len:
            raise ValueError(f"decode step: position {pos} outside the cache of {self.max_len}")
        if logits is not None and (not self.vocab or logits.dtype != torch.float32 or logits.numel() != self.vocab
                                   or not logits.is_contiguous() or logits.device.type != "cpu"):
            raise ValueError(f"decode step: logits need a head and a float32 contiguous CPU [{self.vocab}] "
                             f"tensor, got {logits.dtype} {tuple(logits.shape)}")
        _check(self._fn(self._ref, x.data_ptr(), pos, _ptr(logits), self.threads), "decode step")
        return x


def dot_rows_int8(weight: torch.Tensor, xq: torch.Tensor, level: str, threads: int | None = None) -> torch.Tensor:
    """``weight`` int8 ``[V, n]`` · ``xq`` int8 ``[n]`` -> int32 ``[V]``, exact (the int8 head's kernel
    at ``level``; every level equals the scalar one bit for bit)."""
    cdll = _require()
    if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"dot_rows_int8: weight must be int8 contiguous [V, n], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    _need(xq, "xq", torch.int8, (weight.shape[1],))
    out = torch.empty(weight.shape[0], dtype=torch.int32)
    _check(cdll.qs_dot_rows_int8(weight.data_ptr(), weight.shape[0], weight.shape[1], xq.data_ptr(), out.data_ptr(),
                                 _threads(threads), LEVELS.index(level)), "dot_rows_int8")
    return out


def release_workspace() -> None:
    """Free the scratch ``qs_viterbi`` keeps between calls (tens of MB at L = 16; BlockLDLQ calls it once per
    16-column block, and fresh pages each time cost more than a small call's search)."""
    _require().qs_release_workspace()


#: ``qs_viterbi``'s path metrics: float32 costs, or 16-bit integer costs (float32 where they do not fit).
VITERBI_METRICS = ("float32", "int16")


def viterbi(x: torch.Tensor, code: torch.Tensor, L: int, kv: int, tail_biting: bool,
            threads: int | None = None, level: str | None = None, metric: str = "int16",
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Native bitshift-trellis Viterbi (``qs_viterbi``): ``x`` float32 ``[B, N·V]``, ``code`` float32
    ``[2^L, V]`` -> ``(states int32 [B, N], costs float32 [B])``, at ``level`` (None: the selector's
    default; every level gives the same paths) with ``metric`` (:data:`VITERBI_METRICS`). See
    :func:`quipsharp.codebooks.trellis.viterbi`."""
    from quipsharp.kernels import select

    if metric not in VITERBI_METRICS:
        raise ValueError(f"viterbi: metric must be one of {VITERBI_METRICS}, got {metric!r}")

    kernel = select(level)
    if not kernel.native:
        raise KernelError(f"viterbi needs a native level, the selection gave {kernel.name!r}")
    cdll = _require()
    S, V = code.shape
    if S != 1 << L or x.dim() != 2 or x.shape[1] % V:
        raise ValueError(f"viterbi: code must be [2^{L}, V] and x [B, N·V], got {tuple(code.shape)} and "
                         f"{tuple(x.shape)}")
    _need(code, "code", torch.float32, (S, V))
    _need(x, "x", torch.float32, tuple(x.shape))
    B, N = x.shape[0], x.shape[1] // V
    states = torch.empty(B, N, dtype=torch.int32)
    costs = torch.empty(B, dtype=torch.float32)
    _check(cdll.qs_viterbi(x.data_ptr(), B, N, code.data_ptr(), L, kv, V, int(tail_biting), states.data_ptr(),
                           costs.data_ptr(), _threads(threads), LEVELS.index(kernel.name),
                           VITERBI_METRICS.index(metric)), "viterbi")
    return states, costs
