"""Hugging Face integration: load models (directory, hub id, GGUF), save and load quantized models.

A quantized model directory holds:

* ``config.json``: the model's config plus ``quantization_config`` with ``quant_method: "quipsharp"``,
  ``format_version``, the :class:`~quipsharp.config.ModelQuantConfig` and one entry per quantized
  module (bits, codebook, shape, bias);
* ``model.safetensors``: every tensor of the model; quantized layers store the buffers of
  :class:`~quipsharp.nn.QuantizedLinear` (codes packed to exactly 2/3/4 bits per weight); tensors tied
  to another (e.g. the LM head tied to the embeddings) are stored once and re-tied on load;
* ``quipsharp_report.json`` (per-layer proxy loss and time) and the tokenizer files;
* ``quipsharp_autoload.py``: config.json is guarded (:func:`quipsharp.format.guard_config`), so that
  transformers loads the directory only through quipsharp (imported, or this module with
  ``trust_remote_code=True``) and never as random weights.

Every way to save writes such a directory: :func:`save_quantized`, and ``save_pretrained`` on a model
from :func:`quipsharp.quantize_model`, :func:`load_quantized` or ``from_pretrained``
(:func:`protect_save_pretrained`).

The directory is written under a hidden staging name and swapped into place whole, so an interrupted
save never leaves a directory that loads as valid, and nothing but an earlier quipsharp model is
ever replaced (:mod:`quipsharp.outputs`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quipsharp import faults
from quipsharp.card import CARD_FILE, model_card
from quipsharp.config import ModelQuantConfig
from quipsharp.format import (  # also re-exports the format's names from where they always were
    CHECKSUMS_FILE,
    CONFIG_FILE,
    FORMAT_METADATA_KEY,
    FORMAT_VERSION,
    QUANT_METHOD,
    REPORT_FILE,
    TIED_METADATA_KEY,
    WEIGHTS_FILE,
    ModelLoadError,
    QuantizationRecord,
    check_loaded_model,
    check_weights_checksum,
    check_weights_header,
    guard_config,
    is_quantized_dir,
    is_quipsharp_weights,
    load_metadata,
    read_header,
    read_headers,
    read_record,
    unguard_config,
    warn_model_config_changes,
    weight_files,
    write_autoload,
    write_checksums,
)
from quipsharp.io import atomic_save_safetensors, atomic_write_text, save_safetensors_streamed
from quipsharp.models.gguf_load import parsed_once
from quipsharp.models.walker import linear_shape, set_submodule
from quipsharp.nn import QuantizedLinear
from quipsharp.outputs import OutputError, check_output, locked, publish_dir, recover_leftovers, staging_dir

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"


# --------------------------------------------------------------------------- loading float models
def load_model(source: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a HF directory, a quipsharp directory, a ``.gguf`` file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = Path(source)
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        kwargs = {"gguf_file": path.name}
        location = str(path.parent)
    elif path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{path} has no {CONFIG_FILE}: not a Hugging Face model directory")
        if is_quantized_dir(path):
            return load_quantized(path), AutoTokenizer.from_pretrained(str(path))
        if is_quipsharp_weights(path / WEIGHTS_FILE):
            read_record(path)  # raises: quipsharp weights whose config.json lacks or garbles the quantization_config
        kwargs, location = {}, str(path)
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a {GGUF_SUFFIX} file")
    elif path.suffix or str(source).startswith((".", "/", "~")):
        raise ModelLoadError(f"model not found: {source}")
    else:
        kwargs, location = {}, str(source)  # a hub id: needs network access
    try:
        # a .gguf file's metadata parsed once, not for the config, the tokenizer and the tensors each
        with parsed_once() if "gguf_file" in kwargs else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise ModelLoadError(f"could not load model {source}: {err}") from err
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values
        raise ModelLoadError(f"{source} lacks {len(missing)} tensor{'s' if len(missing) > 1 else ''} of its "
                             f"architecture (e.g. {missing[0]}): they would be random; refusing to load it")
    config = model.config
    if getattr(config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del config.quantization_config  # the GGUF was dequantized to float; drop the loader's note
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- saving
def _dedupe_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one; returns (kept, {dropped: kept_name})."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    kept, tied = {}, {}
    for name, t in state.items():
        if t.is_meta:  # no storage to share (a streamed block, written from its own file)
            kept[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, tied


def quantization_record_of(model: nn.Module, config: ModelQuantConfig | None = None,
                           source: str | None = None, calibration: str | None = None) -> QuantizationRecord:
    """The validated ``quantization_config`` of config.json for a quantized ``model`` (its ``raw`` is
    what is written): one entry per :class:`~quipsharp.nn.QuantizedLinear`, ``config`` (default: the
    first layer's), format version :data:`~quipsharp.format.FORMAT_VERSION`."""
    modules = {
        name: {
            "bits": m.config.bits,
            "codebook": m.codebook.name,
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
    if not modules:
        raise ValueError("the model has no QuantizedLinear layer: quantize it before saving")
    first = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    qc: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "config": (config or ModelQuantConfig(layer=first.config)).to_dict(),
        "modules": modules,
    }
    if source is not None:
        qc["source_model"] = source
    if calibration is not None:
        qc["calibration"] = calibration
    return QuantizationRecord.from_dict(qc)  # write only what loads


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    config: ModelQuantConfig | None = None,
    reports: list[Any] | None = None,
    overwrite: bool = False,
    source: str | None = None,
    calibration: str | None = None,
    streamed_blocks: tuple[Path, str] | None = None,
) -> Path:
    """Save a model quantized by :func:`quipsharp.quantize_model` and return the (absolute) path.

    ``out_dir`` must not exist, be empty, or (with ``overwrite=True``) hold a quipsharp model, which
    is then replaced atomically: the new directory is written under a hidden name beside it and
    swapped in whole (:mod:`quipsharp.outputs`). Anything else is refused with
    :class:`~quipsharp.outputs.OutputError`. ``source`` (the float model it came from: a path or hub
    id) is recorded so that ``quipsharp finetune`` can find its teacher later, ``calibration`` (the
    calibration text's name) for the model card. config.json is guarded
    (:func:`~quipsharp.format.guard_config`): transformers loads the directory only through quipsharp.
    The directory gets a model card (``README.md``, :mod:`quipsharp.card`).

    ``streamed_blocks``: ``(work directory, blocks' module path)`` of a streamed quantization
    (``quantize_model(streamed=...)``), whose decoder blocks are no longer in ``model`` (they are on the
    meta device): the weights file is
    written from the blocks saved there, one block in memory at a time, with the same tensors as a
    save of the whole model."""
    record = quantization_record_of(model, config, source, calibration)
    out = check_output(out_dir, overwrite=overwrite)
    hf_config = {k: v for k, v in unguard_config(model.config.to_dict()).items() if k != "quantization_config"}
    state, tied = _dedupe_tied(model.state_dict())
    metadata = {FORMAT_METADATA_KEY: QUANT_METHOD, TIED_METADATA_KEY: json.dumps(tied),
                **load_metadata(record, hf_config)}

    def write_weights(path: Path) -> None:
        if streamed_blocks is None:
            atomic_save_safetensors(state, path, metadata)
        else:
            _save_weights_from_blocks(model, state, *streamed_blocks, path, metadata)

    hf_config = guard_config({**hf_config, "quantization_config": record.raw})
    with locked(out):
        recover_leftovers(out)
        out = check_output(out, overwrite=overwrite)  # again, under the lock
        tmp = staging_dir(out)
        try:
            write_weights(tmp / WEIGHTS_FILE)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(str(tmp))
            if reports is not None:
                atomic_write_text(tmp / REPORT_FILE, json.dumps([asdict(r) for r in reports], indent=1))
            atomic_write_text(tmp / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True, default=str))
            write_autoload(tmp)
            atomic_write_text(tmp / CARD_FILE, model_card(tmp, name=out.name))
            write_checksums(tmp)
            faults.point("save:staged")
            publish_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _save_weights_from_blocks(model: nn.Module, state: dict[str, torch.Tensor], work: Path, blocks_name: str,
                              path: Path, metadata: dict[str, str]) -> None:
    """The weights file of a streamed quantization: ``state``'s tensors outside the decoder blocks
    (in memory), then each block's from its file in the work directory (``block_NNNNN.safetensors``,
    read one at a time), in one safetensors file."""
    from quipsharp.outputs import BLOCK_FILE

    blocks = model.get_submodule(blocks_name)
    inside = f"{blocks_name}."
    outer = {k: v for k, v in sorted(state.items()) if not k.startswith(inside)}
    if any(t.is_meta for t in outer.values()):
        raise ValueError(f"tensors outside the blocks were never loaded: {[k for k, t in outer.items() if t.is_meta]}")
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = [(k, v.dtype, tuple(v.shape)) for k, v in outer.items()]
    files = [work / BLOCK_FILE.format(i) for i in range(len(blocks))]
    for i, file in enumerate(files):
        tensors, _ = read_header(file)
        for key in sorted(tensors):
            info = tensors[key]
            want = state.get(f"{inside}{i}.{key}")
            if want is None or tuple(want.shape) != info.shape or want.dtype != info.dtype:
                raise ValueError(f"{file} does not hold block {i} of this model ({key})")
            entries.append((f"{inside}{i}.{key}", info.dtype, info.shape))
    expected = {k for k in state if k.startswith(inside)}
    if expected != {e[0] for e in entries if e[0].startswith(inside)}:
        raise ValueError(f"the blocks saved in {work} do not cover the model's blocks")

    def parts() -> Any:
        yield outer
        for i, file in enumerate(files):
            block = load_file(str(file))
            yield {f"{inside}{i}.{k}": block[k] for k in sorted(block)}

    save_safetensors_streamed(path, entries, parts(), metadata)


# --------------------------------------------------------------------------- save_pretrained
class QuipSharpSavePretrained:
    """``model.save_pretrained`` of a quantized model: transformers' own save, then config.json is
    rewritten as quipsharp's (the ``quantization_config`` of the model's layers, guarded:
    :func:`~quipsharp.format.guard_config`) and the autoload module written beside it, so the
    directory loads through every quipsharp path and never as random weights.

    Set on the model instance by :func:`protect_save_pretrained` (an object holding the model rather
    than a closure, so that ``copy.deepcopy`` of the model saves the copy)."""

    def __init__(self, model: nn.Module, config: ModelQuantConfig | None = None, source: str | None = None,
                 calibration: str | None = None) -> None:
        self.model = model
        self.config = config
        self.source = source
        self.calibration = calibration

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("push_to_hub"):
            raise OutputError("save_pretrained(push_to_hub=True) would upload config.json before quipsharp "
                              "rewrites it: save to a directory, then upload that directory")
        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            finish_pretrained_dir(self.model, save_directory, self.config, self.source, self.calibration)
        return result


def protect_save_pretrained(model: nn.Module, config: ModelQuantConfig | None = None,
                            source: str | None = None, calibration: str | None = None) -> nn.Module:
    """Make ``model.save_pretrained`` write a quipsharp directory (:class:`QuipSharpSavePretrained`);
    ``config`` is the run's :class:`~quipsharp.config.ModelQuantConfig` and ``source`` the float model
    it came from and ``calibration`` its calibration text, when known. Returns ``model``."""
    if hasattr(type(model), "save_pretrained"):
        model.__dict__["save_pretrained"] = QuipSharpSavePretrained(model, config, source, calibration)
    return model


def finish_pretrained_dir(model: nn.Module, directory: str | os.PathLike, config: ModelQuantConfig | None = None,
                          source: str | None = None, calibration: str | None = None) -> None:
    """Turn a directory that transformers' ``save_pretrained`` wrote for quantized ``model`` into a
    quipsharp directory: guarded config.json with the layers' ``quantization_config``, the autoload
    module, a model card unless the directory has one, and fresh checksums if an earlier quipsharp
    save left some."""
    directory = Path(directory)
    cfg_file = directory / CONFIG_FILE
    raw = unguard_config(json.loads(cfg_file.read_text(encoding="utf-8")), cfg_file)
    saved = raw.get("quantization_config")
    if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
        source = source or saved.get("source_model")
        calibration = calibration or saved.get("calibration")
        if config is None:
            config = QuantizationRecord.from_dict(saved, f"{cfg_file}: ").config
    qc = quantization_record_of(model, config, source, calibration).raw
    atomic_write_text(cfg_file, json.dumps(guard_config({**raw, "quantization_config": qc}), indent=2,
                                           sort_keys=True, default=str))
    write_autoload(directory)
    if not (directory / CARD_FILE).exists():  # a card already there (the user's, or ours) stays
        atomic_write_text(directory / CARD_FILE, model_card(directory))
    if (directory / CHECKSUMS_FILE).exists():
        write_checksums(directory)


# --------------------------------------------------------------------------- loading quantized models
def read_quantization_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_config_dict, quantization_config)`` of a quantized directory, validated
    (:class:`~quipsharp.format.QuantizationRecord`)."""
    raw, record = read_record(path)
    return raw, record.raw


def quantized_slot(model: nn.Module, name: str, spec: dict[str, Any], context: str = "",
                   label: str | None = None) -> nn.Module:
    """The linear-like module ``name`` of ``model`` that quantized layer ``spec`` (an entry of the
    ``modules`` map) replaces, after checking that it exists and has the recorded shape.

    ``context`` prefixes error messages; ``label`` is the name they show (default ``name``)."""
    label = label or name
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ModelLoadError(f"{context}the model has no module {label!r} listed as quantized") from err
    out_features, in_features = linear_shape(module)
    if (out_features, in_features) != (spec["out_features"], spec["in_features"]):
        raise ModelLoadError(
            f"{context}module {label} is {out_features}x{in_features} in the model config but "
            f"{spec['out_features']}x{spec['in_features']} in the quantization config"
        )
    return module


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a directory written by :func:`save_quantized`; logits are bitwise those of the saved model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from quipsharp.hf_quantizer import register_model_config

    register_model_config()  # AutoConfig reads a guarded config.json
    path = Path(path)
    raw, record = read_record(path)
    files = weight_files(path)  # model.safetensors, or the shards of a sharded save_pretrained
    weights = files[0]
    tensors, metadata, _ = read_headers(files)
    check_weights_header(tensors, metadata, record, weights)
    for file in files:
        check_weights_checksum(path, file.name)
    warn_model_config_changes(metadata, raw, f"{path}: ")
    try:  # transformers' own config errors are of many types; each is a damaged config.json here
        hf_config = AutoConfig.from_pretrained(str(path))
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # transformers raises many unrelated types for a bad config
        raise ModelLoadError(f"{path}: config.json does not describe a model transformers can build: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    for name, spec in record.modules.items():
        module = quantized_slot(model, name, spec.to_dict(), f"{path}: ")
        out_features, in_features = linear_shape(module)
        set_submodule(model, name, QuantizedLinear(in_features, out_features, record.layer_config(name),
                                                   bias=spec.bias, device="meta"))
    state = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{file} is not a readable safetensors file: {err}") from err
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{weights}: tensors do not fit the model: {str(err).splitlines()[0]}") from err
    if result.unexpected_keys:
        raise ModelLoadError(f"{weights}: unexpected tensors {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    still_empty = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_empty:
        raise ModelLoadError(f"{weights} is missing tensors: {still_empty[:5]}")
    check_loaded_model(model, f"{path}: ")
    model.to(device)
    model.eval()
    return protect_save_pretrained(model, record.config, record.source_model, record.raw.get("calibration"))
