"""Reading a ``.gguf`` file through transformers with its metadata parsed once.

transformers' GGUF support builds a new ``gguf.GGUFReader`` for each thing it takes from the file: the
config, the tokenizer and the tensors. Each reader parses every metadata field again; for SmolLM2's
49k-token vocabulary that is about 3 s a time. It also rebuilds gguf's tensor name map for every module
of the model: 397 times for SmolLM2, 4 s in all. Inside :func:`parsed_once`:
- the readers of one path are one object;
- the name map is built once per (architecture, block count).
Outside it both are gguf's own. The values read are the same; a test compares every tensor, the config
and the tokenizer's output.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

#: Serialises the patched region: the patch is process-wide (transformers imports both names from the
#: ``gguf`` package at call time), so two loads at once must not restore each other's functions.
_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader(path)`` returns one reader per (path, mode) and
    ``gguf.get_tensor_name_map`` one map per (architecture, block count). A no-op without the gguf
    package or if it lacks either name."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader_class = getattr(gguf, "GGUFReader", None)
    name_map = getattr(gguf, "get_tensor_name_map", None)
    if reader_class is None or name_map is None:
        yield
        return
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: str | os.PathLike, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    with _PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
