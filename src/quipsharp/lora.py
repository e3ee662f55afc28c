"""LoRA / QLoRA adapters on quantized models with peft (``pip install quipsharp[peft]``).

peft wraps the layers it knows; :class:`~quipsharp.nn.QuantizedLinear` is registered with a
:class:`peft.LoraConfig` through peft's custom-module mapping, so the usual calls work::

    import peft, quipsharp.lora as ql
    config = ql.register(peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(quantized_model, config)      # or ql.get_peft_model(quantized_model, config)
    ...train (transformers' Trainer accepts it)...
    model.save_pretrained("adapter")                          # the adapter only
    model = ql.load_adapter(quipsharp.load_quantized("q"), "adapter")   # back, on the quantized base
    float_model = ql.merge_dense(model)                       # adapter merged into float weights

The quantized layer stays frozen and runs on its native kernel; the input gradient that the adapters
of earlier layers need flows through :meth:`QuantizedLinear.input_grad` (QLoRA's recipe: frozen
low-bit base, trainable low-rank update ``ΔW = (α/r)·B A``, Dettmers et al. 2023). An adapter is not
merged into the codes (that would need requantizing); :func:`merge_dense` merges it into a float copy.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quipsharp.errors import QuipSharpError
from quipsharp.export import densify
from quipsharp.models.walker import set_submodule
from quipsharp.nn import QuantizedLinear

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)

MERGE_MESSAGE = ("a LoRA adapter cannot be merged into a quantized layer's codes (that would need "
                 "requantizing): keep it as an adapter, or merge it into float weights with "
                 "quipsharp.lora.merge_dense(model)")

_lora_class: type | None = None


class LoraError(QuipSharpError, ValueError):
    """A LoRA operation quipsharp's quantized layers do not support; the message says what to do."""


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise LoraError("LoRA adapters need peft: pip install quipsharp[peft]") from err
    return peft


def lora_layer_class() -> type:
    """The peft LoRA layer that wraps a :class:`QuantizedLinear` (defined on first use: peft is optional)."""
    global _lora_class
    if _lora_class is None:
        _lora_class = _define_lora_class()
    return _lora_class


def _define_lora_class() -> type:
    from peft.tuners.lora import LoraLayer

    class QuipSharpLoraLinear(nn.Module, LoraLayer):
        """``y = Q(x) + Σ_adapters (α/r)·B(A(dropout(x)))`` with ``Q`` a frozen :class:`QuantizedLinear`."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            for option in ("use_dora", "use_qalora"):
                if getattr(config, option, False):
                    raise LoraError(f"{option}=True is not supported on quipsharp's quantized layers")
            if getattr(config, "velora_config", None) is not None:
                raise LoraError("VeLoRA is not supported on quipsharp's quantized layers")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                              **{k: v for k, v in kwargs.items() if k in ("lora_dropout", "init_lora_weights")})

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                h = self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))
                result = result + (lora_B(lora_A(h)) * self.scaling[name]).to(result.dtype)
            return result

        def merge(self, *args: Any, **kwargs: Any) -> None:
            raise LoraError(MERGE_MESSAGE)

        def unmerge(self, *args: Any, **kwargs: Any) -> None:
            return None  # never merged

        def delta_weight(self, adapter: str) -> torch.Tensor:
            """``(α/r)·B A`` ``[out_features, in_features]`` float32 of ``adapter``."""
            A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (B.float() @ A.float()) * self.scaling[adapter]

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuipSharpLoraLinear


def register(config: LoraConfig) -> LoraConfig:
    """Map :class:`QuantizedLinear` to quipsharp's LoRA layer in ``config`` (peft's custom-module
    mapping; not saved with the adapter, so loading goes through :func:`load_adapter`). Returns ``config``."""
    _peft()
    config._register_custom_module({QuantizedLinear: lora_layer_class()})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` with ``config`` :func:`register` -ed."""
    return _peft().get_peft_model(model, register(config), **kwargs)


def load_adapter(model: nn.Module, adapter: str | os.PathLike, is_trainable: bool = False,
                 **kwargs: Any) -> PeftModel:
    """A saved adapter (``PeftModel.save_pretrained``) on the quantized ``model``."""
    peft = _peft()
    config = register(peft.LoraConfig.from_pretrained(str(adapter)))
    return peft.PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=is_trainable, **kwargs)


@torch.no_grad()
def merge_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A float copy of a peft model on a quantized base with the active adapters merged: every
    wrapped quantized layer becomes an ``nn.Linear`` with weight ``W_eff + Σ (α/r)·B A``, every other
    quantized layer its effective weight (:func:`quipsharp.export.dense_copy`). ``model`` is not changed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_cls = lora_layer_class()
    wrapped = [(name, m) for name, m in base.named_modules() if isinstance(m, lora_cls)]
    if not wrapped:
        raise LoraError("the model has no LoRA adapter on a quantized layer: use quipsharp.export.dense_copy")
    deltas = {name: sum(m.delta_weight(a) for a in m.active_adapters if a in m.lora_A) for name, m in wrapped}
    dense = densify(_unwrapped_copy(base, lora_cls), dtype)  # one copy of the model, made dense in place
    for name, delta in deltas.items():
        linear = dense.get_submodule(name)
        linear.weight.add_(delta.to(linear.weight.dtype))
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        dense.__dict__.pop(attr, None)
    logger.info("merged LoRA adapters of %d quantized layers into float weights", len(deltas))
    return dense


def _unwrapped_copy(base: nn.Module, lora_cls: type) -> nn.Module:
    """A copy of ``base`` whose LoRA wrappers are replaced by their quantized base layers."""
    import copy

    out = copy.deepcopy(base)
    for name, module in list(out.named_modules()):
        if isinstance(module, lora_cls):
            set_submodule(out, name, module.get_base_layer())
    return out
