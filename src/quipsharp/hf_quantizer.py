"""Load quipsharp directories with ``transformers.AutoModelForCausalLM.from_pretrained``.

After ``import quipsharp``, ``AutoModelForCausalLM.from_pretrained(dir)`` loads a directory written by
:func:`quipsharp.save_quantized` and gives the same model as :func:`quipsharp.load_quantized` (bitwise
identical logits). It goes through transformers' official extension points: a
``QuantizationConfigMixin`` subclass registered with ``register_quantization_config("quipsharp")`` reads
the ``quantization_config`` of ``config.json``, and an ``HfQuantizer`` subclass registered with
``register_quantizer("quipsharp")`` swaps every listed linear layer for a
:class:`~quipsharp.nn.QuantizedLinear` on the meta device before transformers loads the weights into
its buffers.

Registration without importing transformers
-------------------------------------------
Both classes must subclass transformers classes, and importing transformers' quantizer registry costs
about two seconds, which ``import quipsharp`` should not pay (it needs only torch, numpy and
safetensors). So ``import quipsharp`` calls :func:`register_when_transformers_loads`, which

* registers at once if ``transformers.quantizers.auto`` (the module holding the registry) is already
  imported, and otherwise
* puts a finder on ``sys.meta_path`` that waits for that module to be imported (``from_pretrained``
  cannot run before it is: ``transformers.modeling_utils`` imports it) and registers right after the
  module has executed, then removes itself.

Either way ``from_pretrained`` sees the quipsharp quantizer whether transformers was imported before
or after quipsharp. The same hook on ``transformers.models.auto.configuration_auto`` registers
:class:`QuipSharpModelConfig` for ``model_type: "quipsharp"``, the guarded config.json that quipsharp
writes (:func:`quipsharp.format.guard_config`): AutoConfig reads it as the architecture's own config.

Without quipsharp imported, transformers does not know that model type and refuses the directory,
telling the user to pass ``trust_remote_code=True``; that imports the directory's
``quipsharp_autoload.py``, which imports quipsharp (or names the package to install), and loading
proceeds as above. A loaded model's ``save_pretrained`` writes a guarded directory again
(:func:`quipsharp.hf.protect_save_pretrained`).

:func:`register_with_transformers` registers explicitly (idempotent); the classes are built on first
registration and are reachable as ``quipsharp.hf_quantizer.QuipSharpQuantizationConfig``
and ``quipsharp.hf_quantizer.QuipSharpHfQuantizer`` (looking either up registers).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.format import (
    FORMAT_VERSION,
    GUARD_MODEL_TYPE,
    QUANT_METHOD,
    QUANTIZED_STATE_DTYPE,
    ModelLoadError,
    QuantizationRecord,
    check_format_version,
    check_loaded_model,
    check_weights_checksum,
    check_weights_header,
    read_headers,
    unguard_config,
    warn_model_config_changes,
)
from quipsharp.hf import protect_save_pretrained, quantized_slot
from quipsharp.models.walker import linear_shape, set_submodule
from quipsharp.nn import QuantizedLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# The transformers module that holds the quantization registry and `register_quantizer`.
REGISTRY_MODULE = "transformers.quantizers.auto"
# The transformers module that holds AutoConfig's model-type registry.
CONFIG_REGISTRY_MODULE = "transformers.models.auto.configuration_auto"
SAFETENSORS_SUFFIX = ".safetensors"
# Attribute of the meta stand-in weight a QuantizedLinear carries while transformers loads the model.
STAND_IN_WEIGHT = "weight"
CONFIG_CLASS_NAME = "QuipSharpQuantizationConfig"
QUANTIZER_CLASS_NAME = "QuipSharpHfQuantizer"
MODEL_CONFIG_CLASS_NAME = "QuipSharpModelConfig"

_registered: tuple[type, type] | None = None
_model_config: type | None = None


# --------------------------------------------------------------------------- registration
def register_with_transformers() -> tuple[type, type]:
    """Register the quipsharp quantization config and quantizer with transformers (idempotent), and
    the guarded config.json's model type (:func:`register_model_config`).

    Imports transformers. ``import quipsharp`` arranges this automatically (see the module docstring);
    call it yourself only to register eagerly. Returns ``(config class, quantizer class)``.
    """
    global _registered
    register_model_config()
    if _registered is None:
        _registered = _define_and_register()
    return _registered


def register_model_config() -> type:
    """Register :class:`QuipSharpModelConfig` for ``model_type: "quipsharp"`` with ``AutoConfig``
    (idempotent): AutoConfig then reads a guarded config.json (:func:`quipsharp.format.guard_config`)
    as the architecture's own config class."""
    global _model_config
    if _model_config is None:
        _model_config = _define_model_config()
    return _model_config


def register_when_transformers_loads() -> None:
    """Register now what transformers has imported the registry of, the rest right after it imports it."""
    for module, register in ((CONFIG_REGISTRY_MODULE, register_model_config),
                             (REGISTRY_MODULE, register_with_transformers)):
        if module in sys.modules:
            register()
        elif not any(isinstance(finder, _RegistryImportHook) and finder.module == module for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegistryImportHook(module, register))


def _register_after_import(register: Callable[[], Any]) -> None:
    """Run by the import hook; a failure must not break ``import transformers``, so it is logged."""
    try:
        register()
    except Exception as err:  # reported; from_pretrained then refuses the guarded directory
        logger.warning("quipsharp could not register with transformers: %s", err)


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    """Finds ``module`` through the other finders and runs ``register`` after it executes."""

    def __init__(self, module: str, register: Callable[[], Any]) -> None:
        self.module = module
        self.register = register

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # one shot; also keeps the lookup below from reaching this finder
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                _run_after_exec(spec.loader, fullname, self.register)
                return spec
        return None  # not found: the import machinery raises its usual error


def _run_after_exec(loader: importlib.abc.Loader, fullname: str, register: Callable[[], Any]) -> None:
    """Wrap ``loader.exec_module`` (on the instance, once) to register after ``fullname`` executes."""
    exec_module = loader.exec_module

    def exec_then_register(module: ModuleType) -> None:
        try:
            exec_module(module)
        finally:
            if module.__name__ == fullname:
                with contextlib.suppress(AttributeError):
                    del loader.exec_module  # restore the class's method
        if module.__name__ == fullname:
            _register_after_import(register)

    loader.exec_module = exec_then_register  # type: ignore[method-assign]


def __getattr__(name: str) -> type:
    """``QuipSharpQuantizationConfig``, ``QuipSharpHfQuantizer`` and ``QuipSharpModelConfig`` exist once
    registered (PEP 562)."""
    if name == MODEL_CONFIG_CLASS_NAME:
        return register_model_config()
    if name in (CONFIG_CLASS_NAME, QUANTIZER_CLASS_NAME):
        config_cls, quantizer_cls = register_with_transformers()
        return config_cls if name == CONFIG_CLASS_NAME else quantizer_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_and_register() -> tuple[type, type]:
    """Define both classes on transformers' bases and register them (reusing an earlier registration)."""
    try:
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as err:
        raise ModelLoadError(
            f"this transformers has no quantizer registry ({err}); loading quipsharp directories with "
            "from_pretrained needs transformers 5; quipsharp.load_quantized works with any version"
        ) from err

    existing = (
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD),
        auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD),
    )
    if all(cls is not None and cls.__module__ == __name__ for cls in existing):
        _publish(*existing)  # registered by an earlier copy of this module (e.g. after a reload)
        return existing  # type: ignore[return-value]

    config_cls = _make_config_class(QuantizationConfigMixin)
    quantizer_cls = _make_quantizer_class(HfQuantizer, config_cls)
    auto.register_quantization_config(QUANT_METHOD)(config_cls)
    auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    _publish(config_cls, quantizer_cls)
    logger.debug("registered the %r quantizer with transformers", QUANT_METHOD)
    return config_cls, quantizer_cls


def _publish(*classes: type) -> None:
    """Make the classes module attributes under their own names (so pickling finds them)."""
    for cls in classes:
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


# --------------------------------------------------------------------------- the guarded config.json
def _define_model_config() -> type:
    """Define :class:`QuipSharpModelConfig` and register it with AutoConfig (reusing an earlier one)."""
    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, AutoConfig

    if GUARD_MODEL_TYPE in CONFIG_MAPPING and CONFIG_MAPPING[GUARD_MODEL_TYPE].__module__ == __name__:
        existing = CONFIG_MAPPING[GUARD_MODEL_TYPE]
        _publish(existing)
        return existing

    class QuipSharpModelConfig(PreTrainedConfig):  # type: ignore[misc, valid-type]
        """Reads a guarded quipsharp config.json (``model_type: "quipsharp"``) as the architecture's
        own config class (e.g. ``LlamaConfig``): it is never instantiated itself.

        ``AutoConfig`` reaches it by the registered model type (after ``import quipsharp``) or through
        the directory's ``auto_map`` with ``trust_remote_code=True``; either way the model classes,
        quantizer and tools see the architecture's config with its ``quantization_config``.
        """

        model_type = GUARD_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
            base = unguard_config(config_dict)
            try:
                base_class = CONFIG_MAPPING[base["model_type"]]
            except KeyError:
                raise ModelLoadError(
                    f"this quipsharp model is a {base['model_type']!r} model, which this transformers does not know"
                ) from None
            return base_class.from_dict(base, **kwargs)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
            # the trust_remote_code path lands here; the registered model type now reads the file
            kwargs.pop("trust_remote_code", None)
            return AutoConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)

    AutoConfig.register(GUARD_MODEL_TYPE, QuipSharpModelConfig, exist_ok=True)
    _publish(QuipSharpModelConfig)
    logger.debug("registered model type %r with AutoConfig", GUARD_MODEL_TYPE)
    return QuipSharpModelConfig


# --------------------------------------------------------------------------- the quantization config
def _make_config_class(base: type) -> type:
    """The ``QuantizationConfigMixin`` subclass holding the ``quantization_config`` of ``config.json``."""

    class QuipSharpQuantizationConfig(base):  # type: ignore[misc, valid-type]
        """The ``quantization_config`` of a quipsharp directory, as transformers sees it.

        Args:
            format_version: version of the directory format; newer than this quipsharp reads is refused.
            config: :meth:`quipsharp.config.ModelQuantConfig.to_dict` of the quantization run.
            modules: ``{module name: {"bits", "codebook", "in_features", "out_features", "bias"}}``.
            source_model: the float model the directory was quantized from (optional).
            calibration: the calibration text's name (optional, for the model card).
            quant_method: always ``"quipsharp"``.
        """

        def __init__(
            self,
            format_version: int = FORMAT_VERSION,
            config: dict[str, Any] | None = None,
            modules: dict[str, dict[str, Any]] | None = None,
            source_model: str | None = None,
            quant_method: str = QUANT_METHOD,
            calibration: str | None = None,
            **unknown: Any,
        ) -> None:
            check_format_version(format_version)
            if quant_method != QUANT_METHOD:
                raise ModelLoadError(f"quant_method {quant_method!r} is not {QUANT_METHOD!r}")
            if unknown:  # as quipsharp.load_quantized: not needed to load; kept so that saving keeps them
                logger.warning("quipsharp quantization_config: ignoring unknown fields %s", sorted(unknown))
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.config = copy.deepcopy(config) if config is not None else ModelQuantConfig().to_dict()
            self.modules = copy.deepcopy(modules) if modules is not None else {}
            self.source_model = source_model
            self.calibration = calibration
            self.unknown_fields = copy.deepcopy(unknown)
            if modules is not None:  # the whole record (format version, modules), as every quipsharp loader checks it
                QuantizationRecord.from_dict(self.to_dict())
            self.model_quant_config()  # refuse an unreadable config now, not halfway through loading

        def record(self) -> QuantizationRecord:
            """The validated :class:`~quipsharp.format.QuantizationRecord`."""
            return QuantizationRecord.from_dict(self.to_dict())

        def model_quant_config(self) -> ModelQuantConfig:
            """The :class:`~quipsharp.config.ModelQuantConfig` of the run."""
            try:
                return ModelQuantConfig.from_dict(self.config)
            except (ValueError, TypeError) as err:
                raise ModelLoadError(f"the quipsharp quantization config is not readable: {err}") from err

        def layer_config(self, name: str) -> QuIPSharpConfig:
            """The config of quantized module ``name``; its recorded bit width wins."""
            return self.record().layer_config(name)

        def to_dict(self) -> dict[str, Any]:
            """The dictionary stored in ``config.json`` (what :func:`quipsharp.save_quantized` writes)."""
            out = {
                **copy.deepcopy(self.unknown_fields),
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "config": copy.deepcopy(self.config),
                "modules": copy.deepcopy(self.modules),
            }
            if self.source_model is not None:
                out["source_model"] = self.source_model
            if self.calibration is not None:
                out["calibration"] = self.calibration
            return out

        def __iter__(self) -> Iterator[tuple[str, Any]]:
            yield from self.to_dict().items()

    return QuipSharpQuantizationConfig


# --------------------------------------------------------------------------- the quantizer
@contextlib.contextmanager
def _building_quantized_layers() -> Iterator[None]:
    """Step out of transformers' init context (default device ``meta``, default dtype the load dtype).

    A :class:`QuantizedLinear` puts its buffers on ``meta`` itself, but the codebook tables and kernel
    factors it builds are cached for the whole process and must be real CPU tensors; and its float
    state is float32 whatever the model's dtype (transformers then loads into the buffers' dtype).
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(QUANTIZED_STATE_DTYPE)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def model_key(model: nn.Module, name: str) -> str:
    """A checkpoint name as the model names it: drops the base-model prefix when loading a bare base
    model (``AutoModel``) from a causal LM checkpoint, as transformers does for the tensors."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != "." and name.startswith(prefix) and not hasattr(model, prefix[:-1]):
        return name[len(prefix):]
    return name


def replace_quantized_layers(model: nn.Module, quantization_config: Any) -> dict[str, QuantizedLinear]:
    """Swap every module listed in ``quantization_config.modules`` for an empty (meta) QuantizedLinear.

    Returns the new layers by their name in ``model``.
    """
    layers: dict[str, QuantizedLinear] = {}
    record = quantization_config.record()  # validated once, not once per layer
    with _building_quantized_layers():
        for saved_name, spec in quantization_config.modules.items():
            name = model_key(model, saved_name)
            module = quantized_slot(model, name, spec, label=saved_name)
            out_features, in_features = linear_shape(module)
            layer = QuantizedLinear(in_features, out_features, record.layer_config(saved_name),
                                    bias=bool(spec["bias"]), device="meta")
            # transformers' weight initialisation (which runs after loading, for missing keys) reads the
            # ``weight`` of known linears from their parents (e.g. GPT-2's ``attn.c_proj.weight``); give
            # it an initialised meta stand-in it skips, removed again after loading.
            stand_in = torch.empty_like(module.weight, device="meta")
            stand_in._is_hf_initialized = True
            layer.__dict__[STAND_IN_WEIGHT] = stand_in
            set_submodule(model, name, layer)
            layers[name] = layer
    return layers


def check_checkpoint_covers(model: nn.Module, quantization_config: Any, files: Sequence[str | Path]) -> None:
    """Refuse checkpoints that lack quantized tensors (or hold them with another dtype or shape), whose
    saved quantization settings differ from config.json's, or that tie tensors the model does not tie.

    transformers would fill a missing buffer with uninitialised memory, so this is checked up front
    (:func:`quipsharp.format.check_weights_header`, the check :func:`quipsharp.load_quantized` runs).
    """
    if not files or not all(str(f).endswith(SAFETENSORS_SUFFIX) for f in files):
        return
    tensors, metadata, tied = read_headers([Path(f) for f in files])
    declared = set(getattr(model, "all_tied_weights_keys", {}) or {})
    state = model.state_dict()
    for dropped, kept in tied.items():
        dropped_key = model_key(model, dropped)
        if dropped_key in state and dropped_key not in declared:
            raise ModelLoadError(
                f"{files[0]} stores {dropped} as a copy of {kept}, a tie this model's config does not declare"
            )
    check_weights_header(tensors, metadata, quantization_config.record(), files[0])
    for file in files:
        check_weights_checksum(Path(file).parent, Path(file).name)
    warn_model_config_changes(metadata, model.config.to_dict(), f"{Path(files[0]).parent}: ")


def finish_loaded_layers(model: nn.Module) -> None:
    """Drop the stand-in weights and check that every QuantizedLinear holds codes of the codebook its
    config selects (transformers' loader does not run the layer's ``load_state_dict`` hook that does)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            module.__dict__.pop(STAND_IN_WEIGHT, None)
            try:
                module._check_loaded_codebook()
            except ValueError as err:
                raise ModelLoadError(f"{name}: {err}") from err
    check_loaded_model(model)


def _make_quantizer_class(base: type, config_cls: type) -> type:
    """The ``HfQuantizer`` subclass that prepares the model skeleton for a quipsharp checkpoint."""

    class QuipSharpHfQuantizer(base):  # type: ignore[misc, valid-type]
        """Loads quipsharp checkpoints: swaps the listed linears for meta :class:`QuantizedLinear` layers
        before the weights load; transformers then fills their buffers from ``model.safetensors``.

        Quantizing a float model on the fly is not supported (it needs calibration data): quantize with
        :func:`quipsharp.quantize_model` or the ``quipsharp`` CLI.
        """

        requires_calibration = True

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            if not isinstance(quantization_config, config_cls):
                raise ModelLoadError(
                    f"the quipsharp quantizer needs a {config_cls.__name__}, got {type(quantization_config).__name__}"
                )
            super().__init__(quantization_config, **kwargs)

        def _process_model_before_weight_loading(
            self, model: PreTrainedModel, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
        ) -> PreTrainedModel:
            layers = replace_quantized_layers(model, self.quantization_config)
            check_checkpoint_covers(model, self.quantization_config, checkpoint_files or [])
            logger.debug("replaced %d linear layers with QuantizedLinear", len(layers))
            return model

        def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
            finish_loaded_layers(model)
            protect_save_pretrained(model)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            """``save_pretrained`` writes a directory that both loaders read back identically."""
            return True

        @property
        def is_trainable(self) -> bool:
            """Adapters (peft LoRA, :mod:`quipsharp.lora`) train with transformers' ``Trainer``; the
            quantized layers stay frozen (transformers refuses a quantized model without adapters)."""
            return True

    return QuipSharpHfQuantizer
