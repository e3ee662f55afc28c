"""Hand a quantized model to tools that cannot run quipsharp's layers.

``torch.export`` keeps quipsharp's custom op and needs nothing here. ONNX has no form for the layers'
decode, so ``torch.onnx.export`` of a quantized model is refused (:class:`~quipsharp.errors.ExportError`,
raised by :class:`~quipsharp.nn.QuantizedLinear`) instead of writing a graph that holds one input's
outputs as constants. :func:`dense_copy` gives the same function with float weights, which every
exporter handles; it gives up the compression.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from quipsharp.models.walker import set_submodule
from quipsharp.nn import QuantizedLinear

logger = logging.getLogger(__name__)


@torch.no_grad()
def dense_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` with every :class:`~quipsharp.nn.QuantizedLinear` replaced by an
    ``nn.Linear`` holding its effective weight ``[out_features, in_features]`` (``S_V Hᵀ (s·Ŵ) H S_U``,
    QuIP# §3) and bias, in ``dtype`` (default float32): outputs equal the quantized model's up to
    float rounding, and any exporter (ONNX included) handles it. ``model`` is not changed.

    The copy is an ordinary float model: no ``quantization_config``, and ``save_pretrained`` writes a
    float checkpoint (float-sized; quipsharp directories stay the compact form).
    """
    return densify(copy.deepcopy(model), dtype)


@torch.no_grad()
def densify(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """:func:`dense_copy` in place: ``model`` itself loses its quantized layers (for a caller that
    already holds a copy of its own). Returns ``model``."""
    dense = model
    layers = [(name, m) for name, m in dense.named_modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("the model has no quantized layer: it needs no dense copy")
    for name, layer in layers:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.su.device, dtype=dtype or torch.float32)
        linear.weight.copy_(layer.dequantize())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        set_submodule(dense, name, linear)
    dense.__dict__.pop("save_pretrained", None)  # quipsharp's save (quipsharp.hf.protect_save_pretrained)
    config = getattr(dense, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        dense.__dict__.pop(attr, None)
    logger.info("dense copy: %d quantized layers as float weights", len(layers))
    return dense
