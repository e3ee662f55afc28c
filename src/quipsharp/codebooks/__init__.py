"""Codebooks of quipsharp: the E8 lattice, E8P12 (2 bits), its residual 3/4-bit versions, the
scalar Lloyd–Max ablation and the QTIP bitshift-trellis codes, plus the stable name ↔ id registry
used by the file format."""

from quipsharp.codebooks.base import Codebook, VectorCodebook
from quipsharp.codebooks.e8 import E8Lattice, e8_points_with_norm_at_most, nearest_d8, nearest_e8
from quipsharp.codebooks.e8p import E8P12
from quipsharp.codebooks.packing import pack_codes, unpack_codes
from quipsharp.codebooks.registry import (
    FAMILIES,
    available_codebooks,
    codebook_for_bits,
    codebook_id,
    codebook_name,
    get_codebook,
)
from quipsharp.codebooks.rvq import E8P12RVQ3B, E8P12RVQ4B, E81B, ResidualCodebook
from quipsharp.codebooks.scalar import ScalarCodebook
from quipsharp.codebooks.trellis import TrellisCodebook

__all__ = [
    "E8P12",
    "E8P12RVQ3B",
    "E8P12RVQ4B",
    "E81B",
    "FAMILIES",
    "Codebook",
    "E8Lattice",
    "ResidualCodebook",
    "ScalarCodebook",
    "TrellisCodebook",
    "VectorCodebook",
    "available_codebooks",
    "codebook_for_bits",
    "codebook_id",
    "codebook_name",
    "e8_points_with_norm_at_most",
    "get_codebook",
    "nearest_d8",
    "nearest_e8",
    "pack_codes",
    "unpack_codes",
]
