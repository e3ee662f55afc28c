"""Byte packing of fixed-size codes and the plumbing shared by every concrete codebook.

Storage layout (see :mod:`quipsharp.codebooks.base`): a code is an unsigned integer of
``code_bytes * 8`` bits stored little-endian as ``code_bytes`` consecutive ``uint8`` values, so
codes ``[..., k]`` pack to ``[..., k * code_bytes]`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from quipsharp.codebooks.base import BITS_PER_BYTE
from quipsharp.errors import NumericalError

BYTE_MASK = 0xFF
#: Codes are carried in int64, so at most 7 bytes keep every code non-negative.
MAX_CODE_BYTES = 7
#: Bound on the bytes of per-chunk temporaries in the vectorised searches (≈ 64 MB).
SEARCH_TEMP_BYTES = 64 * 2**20
#: float32 element size in bytes, used to turn the temporary budget into a chunk length.
FLOAT32_BYTES = 4


def _check_code_bytes(code_bytes: int) -> None:
    if not 1 <= code_bytes <= MAX_CODE_BYTES:
        raise ValueError(f"code_bytes must be in [1, {MAX_CODE_BYTES}], got {code_bytes}")


def pack_codes(codes: torch.Tensor, code_bytes: int) -> torch.Tensor:
    """Pack integer codes little-endian into bytes.

    Args:
        codes: ``[..., k]`` integer tensor, every value in ``[0, 2**(8*code_bytes))``.
        code_bytes: bytes per code.
    Returns:
        ``[..., k * code_bytes]`` uint8; byte ``i*code_bytes + b`` is bits ``8b .. 8b+7`` of code ``i``.
    Raises:
        ValueError: non-integer dtype, a 0-d tensor, or a code out of range.
    """
    _check_code_bytes(code_bytes)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension [..., k]")
    codes = codes.to(torch.int64)
    if codes.numel() > 0:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << (BITS_PER_BYTE * code_bytes):
            raise ValueError(
                f"codes must lie in [0, 2**{BITS_PER_BYTE * code_bytes}) for code_bytes={code_bytes}, "
                f"got range [{lo}, {hi}]"
            )
    shifts = torch.arange(code_bytes, dtype=torch.int64, device=codes.device) * BITS_PER_BYTE
    packed = (codes.unsqueeze(-1) >> shifts) & BYTE_MASK  # [..., k, code_bytes]
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] * code_bytes)


def unpack_codes(packed: torch.Tensor, code_bytes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: ``[..., k * code_bytes]`` uint8.
        code_bytes: bytes per code.
    Returns:
        ``[..., k]`` int64 codes.
    Raises:
        ValueError: wrong dtype, or a last dimension that is not a multiple of ``code_bytes``.
    """
    _check_code_bytes(code_bytes)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] % code_bytes != 0:
        raise ValueError(
            f"last dimension of packed codes must be a multiple of code_bytes={code_bytes}, "
            f"got shape {tuple(packed.shape)}"
        )
    k = packed.shape[-1] // code_bytes
    shifts = torch.arange(code_bytes, dtype=torch.int64, device=packed.device) * BITS_PER_BYTE
    by_byte = packed.reshape(*packed.shape[:-1], k, code_bytes).to(torch.int64) << shifts
    return by_byte.sum(dim=-1)


def check_vectors(x: torch.Tensor, dim: int, what: str) -> None:
    """Raise unless ``x`` is a finite floating ``[..., dim]`` tensor.

    Raises:
        ValueError: wrong dtype or shape.
        NumericalError: NaN or ±inf entries.
    """
    if not x.dtype.is_floating_point:
        raise ValueError(f"{what}: input must be a floating tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{what}: input must have shape [..., {dim}], got {tuple(x.shape)}")
    if x.numel() > 0 and not bool(torch.isfinite(x).all()):
        raise NumericalError(f"{what}: input contains non-finite values")


def row_chunks(
    n_rows: int, bytes_per_row: int, budget: int = SEARCH_TEMP_BYTES, max_rows: int | None = None
) -> Iterator[slice]:
    """Slices of ``range(n_rows)`` whose per-chunk temporaries stay within ``budget`` bytes.

    Args:
        n_rows: number of rows to cover.
        bytes_per_row: temporary bytes the search allocates per row.
        budget: bound on the bytes of one chunk's temporaries.
        max_rows: optional further cap on the rows of a chunk (e.g. to stay cache-resident).
    """
    step = max(1, budget // max(1, bytes_per_row))
    if max_rows is not None:
        step = max(1, min(step, max_rows))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


class PackedCodebook:
    """Shared behaviour of the concrete codebooks: bits per weight, packing and input checks.

    Subclasses set ``name``, ``dim``, ``code_bytes``, ``opt_scale`` and implement ``quantize`` and
    ``decode`` (see :class:`quipsharp.codebooks.base.Codebook`).
    """

    name: str
    dim: int
    code_bytes: int
    opt_scale: float

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per scalar weight: ``code_bytes * 8 / dim``."""
        return self.code_bytes * BITS_PER_BYTE / self.dim

    @property
    def num_codes(self) -> int:
        """Number of distinct codes, ``2 ** (8 * code_bytes)``."""
        return 1 << (BITS_PER_BYTE * self.code_bytes)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[..., k]`` int64 -> ``[..., k * code_bytes]`` uint8 (little-endian)."""
        return pack_codes(codes, self.code_bytes)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` ``[..., k * code_bytes]`` uint8 -> codes ``[..., k]`` int64."""
        return unpack_codes(packed, self.code_bytes)

    # -------------------------------------------------------------- a whole matrix (BlockLDLQ, storage)
    #: Output rows that are quantized together (1: every row on its own).
    tile_rows = 1
    #: Shape of a per-matrix table stored with each layer (only the trellis HYB code has one).
    lut_shape: tuple[int, int] | None = None

    def shape_problem(self, m: int, n: int) -> str | None:
        """Why an ``[m, n]`` weight cannot use this codebook, or None."""
        if m <= 0 or n <= 0 or n % self.dim:
            return (f"in_features must be a positive multiple of {self.dim} ({self.name} quantizes {self.dim} "
                    "weights per code)")
        return None

    def packed_spec(self, m: int, n: int) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of an ``[m, n]`` matrix's stored codes: uint8 ``[m, n/dim·code_bytes]``."""
        return torch.uint8, (m, n // self.dim * self.code_bytes)

    def quantize_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One BlockLDLQ block: ``x`` ``[m, dim]`` -> ``(xhat [m, dim], codes [m])``."""
        return self.quantize(x)

    def pack_matrix(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[m, n/dim]`` (as BlockLDLQ returns them) -> the stored form (:meth:`packed_spec`)."""
        return self.pack(codes)

    def unpack_matrix(self, packed: torch.Tensor, m: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack_matrix`."""
        return self.unpack(packed)

    def decode_matrix(self, codes: torch.Tensor, m: int, n: int, lut: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[m, n/dim]`` -> the unscaled weight ``[m, n]`` float32 (``lut``: unused here)."""
        return self.decode(codes).reshape(m, n)

    def _check_input(self, x: torch.Tensor) -> None:
        """Validate a search input.

        Raises:
            ValueError: ``x`` is not a floating ``[..., dim]`` tensor.
            NumericalError: ``x`` holds NaN or ±inf (the nearest codeword is undefined).
        """
        check_vectors(x, self.dim, self.name)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Validate codes (integer, in range) and return them as int64."""
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"{self.name}: codes must be an integer tensor, got {codes.dtype}")
        codes = codes.to(torch.int64)
        if codes.numel() > 0 and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise ValueError(f"{self.name}: codes must lie in [0, {self.num_codes})")
        return codes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, code_bytes={self.code_bytes}, "
            f"bits_per_weight={self.bits_per_weight:g}, opt_scale={self.opt_scale:g})"
        )


def search_in_chunks(
    x: torch.Tensor,
    search: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    bytes_per_row: int,
    max_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a row-wise nearest search over ``x`` in memory-bounded chunks.

    Args:
        x: ``[..., d]`` input.
        search: maps rows ``[b, d]`` to ``(xhat [b, d'] , codes [b])``.
        bytes_per_row: temporary bytes ``search`` allocates per row.
        max_rows: optional cap on the rows of one chunk.
    Returns:
        ``(xhat [..., d'], codes [...])``.
    """
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n == 0:
        empty_hat, empty_codes = search(rows[:0])
        return empty_hat.reshape(*lead, empty_hat.shape[-1]), empty_codes.reshape(lead)
    hats, codes = [], []
    for sl in row_chunks(n, bytes_per_row, max_rows=max_rows):
        h, c = search(rows[sl])
        hats.append(h)
        codes.append(c)
    xhat = torch.cat(hats) if len(hats) > 1 else hats[0]
    code = torch.cat(codes) if len(codes) > 1 else codes[0]
    return xhat.reshape(*lead, xhat.shape[-1]), code.reshape(lead)
