"""Compression report: bits per weight of the quantized layers and whole-model size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from quipsharp.nn import QuantizedLinear

FLOAT16_BYTES = 2
BITS_PER_BYTE = 8


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _unique_tensors(module))


def compression_report(model: nn.Module, saved_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Sizes of a quantized model.

    Returns ``quantized_layers``, ``quantized_weights`` (count), ``codes_bits_per_weight`` (code
    storage only), ``layer_bits_per_weight`` (codes plus sign vectors and scales),
    ``float16_model_bytes`` (the same model with every weight in float16), ``in_memory_bytes`` and,
    when ``saved_dir`` is given, ``disk_bytes`` and ``disk_vs_float16``.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    code_bytes = sum(m.codes.numel() * m.codes.element_size() for m in layers)
    layer_bytes = sum(_tensor_bytes(m) for m in layers)
    # the float16 model: every quantized weight and every other tensor at 2 bytes per value
    other_values = sum(t.numel() for t in _unique_tensors(model) if not _belongs_to(t, layers))
    float16_bytes = (weights + other_values) * FLOAT16_BYTES
    out: dict[str, Any] = {
        "quantized_layers": len(layers),
        "quantized_weights": weights,
        "codes_bits_per_weight": code_bytes * BITS_PER_BYTE / weights if weights else 0.0,
        "layer_bits_per_weight": layer_bytes * BITS_PER_BYTE / weights if weights else 0.0,
        "float16_model_bytes": float16_bytes,
        "in_memory_bytes": _tensor_bytes(model),
    }
    if saved_dir is not None:
        disk = disk_bytes(saved_dir)
        out["disk_bytes"] = disk
        out["disk_vs_float16"] = disk / float16_bytes
    return out


def disk_bytes(saved_dir: str | os.PathLike) -> int:
    """Total size of the ``.safetensors`` files of a saved model directory."""
    return sum(p.stat().st_size for p in Path(saved_dir).iterdir() if p.suffix == ".safetensors")


def _unique_tensors(model: nn.Module) -> list:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _belongs_to(t, layers: list[QuantizedLinear]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == b.untyped_storage().data_ptr() for m in layers for b in m.buffers())
