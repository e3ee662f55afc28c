"""The codebook protocol shared by every vector quantizer in quipsharp.

A codebook maps vectors of ``dim`` consecutive weights to integer codes and back. Inputs are in
*codebook units*: the caller divides the (incoherence-processed) weights by
``Wscale = RMS(W) / opt_scale`` so that they have RMS ``opt_scale`` before calling
:meth:`Codebook.quantize` (QuIP# paper §4, "scale"; DESIGN.md §1).

Storage layout (used by the file format): a code is an unsigned integer of ``code_bytes * 8`` bits,
stored little-endian as ``code_bytes`` consecutive ``uint8`` values, so a tensor of codes of shape
``[..., k]`` packs to ``[..., k * code_bytes]`` bytes. ``bits_per_weight == code_bytes * 8 / dim``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

BITS_PER_BYTE = 8


@runtime_checkable
class Codebook(Protocol):
    """What BlockLDLQ, the layer and the file format need of any codebook: quantize a column block of
    ``dim`` columns, store and decode a whole matrix. Vector codebooks (:class:`VectorCodebook`) code
    each row of a block on its own (``tile_rows = 1``); the trellis codes (QTIP) code ``16 × 16`` tiles."""

    name: str
    #: Columns per BlockLDLQ block (8 for the E8 codebooks, 16 for the trellis).
    dim: int
    #: Output rows coded together (1, or 16 for the trellis).
    tile_rows: int
    opt_scale: float
    #: Shape of the table stored with each matrix (the trellis HYB code), else None.
    lut_shape: tuple[int, int] | None

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per scalar weight."""
        ...

    def shape_problem(self, m: int, n: int) -> str | None:
        """Why an ``[m, n]`` weight cannot use this codebook, or None."""
        ...

    def packed_spec(self, m: int, n: int) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of an ``[m, n]`` matrix's stored codes."""
        ...

    def quantize_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[m, dim]`` -> ``(xhat [m, dim], codes of the block)``."""
        ...

    def pack_matrix(self, codes: torch.Tensor) -> torch.Tensor:
        """A matrix's codes (the blocks' codes stacked on dim 1) -> the stored form."""
        ...

    def unpack_matrix(self, packed: torch.Tensor, m: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack_matrix`."""
        ...

    def decode_matrix(self, codes: torch.Tensor, m: int, n: int, lut: torch.Tensor | None = None) -> torch.Tensor:
        """A matrix's codes (and its table, when ``lut_shape``) -> the unscaled weight ``[m, n]`` float32."""
        ...


@runtime_checkable
class VectorCodebook(Codebook, Protocol):
    """A vector quantizer over ``dim``-dimensional vectors with fixed-size integer codes."""

    code_bytes: int

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codeword search.

        Args:
            x: ``[..., dim]`` float tensor in codebook units.
        Returns:
            ``(xhat, codes)``: ``xhat`` ``[..., dim]`` (dtype of ``x``) the chosen codewords,
            ``codes`` ``[...]`` int64 their codes.
        """
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[...]`` int64 -> codewords ``[..., dim]`` float32."""
        ...

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[..., k]`` int64 -> ``[..., k * code_bytes]`` uint8 (little-endian)."""
        ...

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` ``[..., k * code_bytes]`` uint8 -> codes ``[..., k]`` int64."""
        ...
