"""Stable codebook names and integer ids (the file format stores the id).

========== === ===========================================
name        id  codebook
========== === ===========================================
E8P12        0  E8P12, 2 bits/weight
E8P12RVQ3B   1  E8P12 + E81B residual, 3 bits/weight
E8P12RVQ4B   2  E8P12 + E8P12 residual, 4 bits/weight
scalar2     16  Lloyd–Max scalar, 2 bits/weight (ablation)
scalar3     17  Lloyd–Max scalar, 3 bits/weight (ablation)
scalar4     18  Lloyd–Max scalar, 4 bits/weight (ablation)
QTIP1MAD2   32  bitshift trellis, 1MAD code, 2 bits/weight (QTIP)
QTIP1MAD3   33  bitshift trellis, 1MAD code, 3 bits/weight
QTIP1MAD4   34  bitshift trellis, 1MAD code, 4 bits/weight
QTIP3INST2  35  bitshift trellis, 3INST code, 2 bits/weight
QTIP3INST3  36  bitshift trellis, 3INST code, 3 bits/weight
QTIP3INST4  37  bitshift trellis, 3INST code, 4 bits/weight
QTIPHYB2    38  bitshift trellis, HYB code (per-matrix 512 x 2 table), 2 bits/weight
QTIPHYB3    39  bitshift trellis, HYB code, 3 bits/weight
QTIPHYB4    40  bitshift trellis, HYB code, 4 bits/weight
========== === ===========================================

Families (``QuIPSharpConfig.codebook``): ``e8p`` (E8P12 and its residual versions; with
``use_e8_lattice=False`` the scalar ablation), ``qtip1mad``, ``qtip3inst`` and ``qtiphyb`` (the trellis
codes).

Ids are part of the on-disk format: never renumber, only append.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from quipsharp.codebooks.base import Codebook
from quipsharp.codebooks.e8p import E8P12
from quipsharp.codebooks.rvq import E8P12RVQ3B, E8P12RVQ4B
from quipsharp.codebooks.scalar import ScalarCodebook
from quipsharp.codebooks.trellis import TrellisCodebook
from quipsharp.config import CODEBOOK_FAMILIES

SCALAR_BITS = (2, 3, 4)
#: Codebook families a config can select (defined with the config, which imports no torch).
FAMILIES = CODEBOOK_FAMILIES

_FACTORIES: dict[str, tuple[int, Callable[[], Codebook]]] = {
    "E8P12": (0, E8P12),
    "E8P12RVQ3B": (1, E8P12RVQ3B),
    "E8P12RVQ4B": (2, E8P12RVQ4B),
    "scalar2": (16, functools.partial(ScalarCodebook, 2)),
    "scalar3": (17, functools.partial(ScalarCodebook, 3)),
    "scalar4": (18, functools.partial(ScalarCodebook, 4)),
    **{f"QTIP{code.upper()}{bits}": (32 + 3 * i + bits - 2, functools.partial(TrellisCodebook, code, bits))
       for i, code in enumerate(("1mad", "3inst", "hyb")) for bits in (2, 3, 4)},
}
_ID_TO_NAME = {cid: name for name, (cid, _) in _FACTORIES.items()}
_LATTICE_BY_BITS = {2: "E8P12", 3: "E8P12RVQ3B", 4: "E8P12RVQ4B"}
_SCALAR_BY_BITS = {bits: f"scalar{bits}" for bits in SCALAR_BITS}


def available_codebooks() -> list[str]:
    """Names of all registered codebooks, in id order."""
    return [_ID_TO_NAME[cid] for cid in sorted(_ID_TO_NAME)]


def codebook_id(name: str) -> int:
    """Stable integer id of a codebook name (``ValueError`` if unknown)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown codebook name {name!r}; valid names: {available_codebooks()}")
    return _FACTORIES[name][0]


def codebook_name(cid: int) -> str:
    """Codebook name of a stable integer id (``ValueError`` if unknown)."""
    if isinstance(cid, bool) or not isinstance(cid, int) or cid not in _ID_TO_NAME:
        raise ValueError(f"unknown codebook id {cid!r}; valid ids: {dict(sorted(_ID_TO_NAME.items()))}")
    return _ID_TO_NAME[cid]


@functools.cache
def _instance(name: str) -> Codebook:
    return _FACTORIES[name][1]()


def get_codebook(name_or_id: str | int) -> Codebook:
    """The (cached, shared) codebook for a name or id.

    Raises:
        ValueError: unknown name or id; the message lists the valid ones.
    """
    if isinstance(name_or_id, str):
        codebook_id(name_or_id)  # validates
        return _instance(name_or_id)
    return _instance(codebook_name(name_or_id))


def codebook_for_bits(bits: int, use_e8_lattice: bool = True, family: str = "e8p") -> Codebook:
    """The codebook of a bit width and family. ``e8p``: 2 → E8P12, 3 → E8P12RVQ3B, 4 → E8P12RVQ4B, or
    ``scalar{bits}`` when ``use_e8_lattice`` is False (the no-lattice ablation at the same rate);
    ``qtip1mad`` / ``qtip3inst`` / ``qtiphyb``: ``QTIP1MAD{bits}`` / ``QTIP3INST{bits}`` / ``QTIPHYB{bits}``.

    Raises:
        ValueError: unsupported ``bits`` or family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown codebook family {family!r}; valid: {list(FAMILIES)}")
    if family != "e8p":
        if isinstance(bits, bool) or bits not in SCALAR_BITS:
            raise ValueError(f"unsupported bits {bits!r} for {family}; valid: {list(SCALAR_BITS)}")
        return get_codebook(f"QTIP{family.removeprefix('qtip').upper()}{bits}")
    table = _LATTICE_BY_BITS if use_e8_lattice else _SCALAR_BY_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in table:
        raise ValueError(
            f"unsupported bits {bits!r} (use_e8_lattice={use_e8_lattice}); valid: {sorted(table)}"
        )
    return get_codebook(table[bits])
