"""File I/O: Hessians (and, later, quantized models) in safetensors, written atomically.

Every write goes to a temporary file in the destination directory and is renamed into place, so an
interrupted write never leaves a file that loads as valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quipsharp import faults
from quipsharp.hessian import HessianAccumulator, split_exact
from quipsharp.outputs import normal_file_mode

HESSIAN_FORMAT = "quipsharp-hessian"
HESSIAN_FORMAT_VERSION = 2  # 2: exact binned sums (hessian.BIN_GRIDS); 1: plain float64 sums


@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        normal_file_mode(tmp)
        faults.point("atomic-write:before-rename")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """Write ``tensors`` to ``path`` via a temporary file and an atomic rename."""
    with _atomic_target(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


#: A tensor of a streamed safetensors file: name, dtype, shape (its bytes come later, in this order).
TensorEntry = tuple[str, torch.dtype, tuple[int, ...]]


def save_safetensors_streamed(path: str | os.PathLike, entries: list[TensorEntry],
                              parts: Iterator[dict[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose tensors are never all in memory: the header from ``entries``, then
    the data of each dict ``parts`` yields (together, exactly ``entries``, in their order). Atomic, like
    :func:`atomic_save_safetensors`; a part that does not match the header is refused."""
    from quipsharp.format import SAFETENSORS_DTYPES

    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data start 8-byte aligned
    with _atomic_target(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        pending = iter(entries)
        for part in parts:
            for name, tensor in part.items():
                want = next(pending, None)
                if want is None or want[0] != name or tensor.dtype != want[1] or tuple(tensor.shape) != want[2]:
                    raise ValueError(f"streamed tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the "
                                     f"header's next entry {want}")
                flat = tensor.detach().contiguous().cpu().reshape(-1)
                if flat.numel():
                    out.write(memoryview(flat.view(torch.uint8).numpy()))
        if next(pending, None) is not None:
            raise ValueError("the streamed parts ended before every tensor of the header was written")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    with _atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_hessian(acc: HessianAccumulator, path: str | os.PathLike) -> None:
    """Save an accumulator's float64 statistics to a safetensors file."""
    atomic_save_safetensors(
        acc.state_dict(), path, {"format": HESSIAN_FORMAT, "version": str(HESSIAN_FORMAT_VERSION)}
    )


def load_hessian(path: str | os.PathLike) -> HessianAccumulator:
    """Load a Hessian saved by :func:`save_hessian`; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Hessian file at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if meta.get("format") != HESSIAN_FORMAT:
        raise ValueError(f"{path} is not a quipsharp Hessian file (format {meta.get('format')!r})")
    version = int(meta.get("version", "0"))
    if version > HESSIAN_FORMAT_VERSION:
        raise ValueError(f"{path} has Hessian format version {version}, newer than supported {HESSIAN_FORMAT_VERSION}")
    if version < 2:  # plain sums: binned as they are (exact from here on)
        try:
            xtx, xsum, count = tensors["xtx"], tensors["xsum"], int(tensors["count"].reshape(-1)[0])
        except KeyError as err:
            raise ValueError(f"Hessian file {path} is missing tensor {err}") from err
        tensors = {"xtx_bins": split_exact(xtx), "xsum_bins": split_exact(xsum),
                   "count": torch.tensor([count, 1], dtype=torch.int64)}
    try:
        return HessianAccumulator.from_state_dict(tensors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

