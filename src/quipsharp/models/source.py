"""A float model whose weights stay on disk until needed (issue 16 item 1, block streaming).

:func:`open_streamed` builds the model's skeleton with every parameter on the meta device (buffers
such as rotary frequencies are real: they are computed, not stored) and a :class:`WeightSource` that
reads single tensors by their Hugging Face name from safetensors files (a model directory, sharded
or not: memory-mapped, only that tensor is read) or from a GGUF file (that tensor dequantized, with
the reordering transformers applies when it loads the whole file). :class:`StreamedWeights`
materialises a module's parameters from the source and sends them back to the meta device, so a
quantization holds the embeddings, one decoder block and its Hessians at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quipsharp.errors import QuipSharpError
from quipsharp.models.gguf_load import parsed_once

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
HASH_CHUNK = 16 * 2**20


class SourceError(QuipSharpError, ValueError):
    """A model source that cannot be streamed, or lacks a tensor its architecture needs."""


class WeightSource:
    """Tensors of a float checkpoint by Hugging Face name (:meth:`get`)."""

    files: list[Path]

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def digest(self) -> str:
        """SHA-256 of the checkpoint files' bytes (what a resumed run must share with the first)."""
        h = hashlib.sha256()
        for file in self.files:
            h.update(f"{file.name}:{file.stat().st_size};".encode())
            with file.open("rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    h.update(chunk)
        return h.hexdigest()


class SafetensorsSource(WeightSource):
    """``model.safetensors`` or the shards listed by ``model.safetensors.index.json`` of a directory."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SourceError(f"{index} is not a readable safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SAFETENSORS_FILE).is_file():
            files = [SAFETENSORS_FILE]
        else:
            raise SourceError(f"{directory} holds no {SAFETENSORS_FILE} (or {SAFETENSORS_INDEX}): only safetensors "
                              "checkpoints can be streamed")
        self.files = [directory / f for f in files]
        self._files = {}
        self._where: dict[str, str] = {}
        for file in files:
            path = directory / file
            if Path(file).is_absolute() or ".." in Path(file).parts or not path.is_file():
                raise SourceError(f"{directory}: the shard {file} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise SourceError(f"{path} is not a readable safetensors file ({err})") from None
            self._files[file] = handle
            for key in handle.keys():
                self._where[key] = file

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise SourceError(f"the checkpoint has no tensor {name}")
        return self._files[self._where[name]].get_tensor(name)


class GGUFSource(WeightSource):
    """Tensors of a GGUF file under their Hugging Face names, dequantized one at a time with
    transformers' own name map and tensor processing (e.g. Llama's q/k row order)."""

    def __init__(self, path: Path, skeleton: nn.Module) -> None:
        try:
            from gguf import GGUFReader
            from gguf.quants import dequantize
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
                load_gguf_checkpoint,
            )
        except ImportError as err:
            raise SourceError(f"streaming a GGUF file needs the gguf package and transformers' GGUF support ({err})"
                              ) from None
        self.files = [path]
        self._dequantize = dequantize
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        self._parsed = {"config": parsed["config"]}  # (not its tokenizer: ~100 MB of Python strings)
        del parsed
        arch = self._parsed["config"].get("model_type")
        reader = GGUFReader(str(path))
        config = self._parsed["config"]
        processor_class = TENSOR_PROCESSORS.get(_gguf_arch(reader), TensorProcessor)
        self._processor = processor_class(config=config)
        self._map = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {}
        for tensor in reader.tensors:
            hf = self._map.get(tensor.name)
            if hf is not None:
                self._tensors[hf] = tensor
        if processor_class not in (TensorProcessor,) and processor_class.__name__ not in _GGUF_PER_TENSOR_PROCESSORS:
            raise SourceError(f"GGUF files of {arch!r} models are converted with merged or renamed tensors; "
                              "streaming supports them from a safetensors directory (save the float model with "
                              "save_pretrained first)")

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np

        if name not in self._tensors:
            raise SourceError(f"the GGUF file has no tensor for {name}")
        tensor = self._tensors[name]
        weights = self._dequantize(tensor.data, tensor.tensor_type)
        result = self._processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self._map,
                                         parsed_parameters=self._parsed)
        return torch.from_numpy(np.copy(result.weights))


#: transformers' GGUF tensor processors that map one GGUF tensor to one HF tensor of the same name
_GGUF_PER_TENSOR_PROCESSORS = ("LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor")


def _gguf_arch(reader: Any) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model with its parameters on the meta device and its buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # (not done under init_empty_weights): tied parameters are one object, read once
    model.eval()
    return model


def open_streamed(source: str | os.PathLike, dtype: torch.dtype) -> tuple[nn.Module, Any, WeightSource]:
    """``(skeleton, tokenizer, weights)`` of a float model directory (safetensors) or ``.gguf`` file, no
    weight read yet. The skeleton's parameters are on the meta device (see :class:`StreamedWeights`)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise SourceError(f"--max-memory streams the weights from a local model directory or .gguf file; "
                          f"{source} is neither")
    kwargs: dict[str, Any] = {}
    location = str(path)
    if path.is_file() and path.suffix == ".gguf":
        kwargs, location = {"gguf_file": path.name}, str(path.parent)
    # a .gguf file's metadata parsed once for the config, the tokenizer and the tensor index
    with parsed_once() if kwargs else contextlib.nullcontext():
        try:
            config = AutoConfig.from_pretrained(location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SourceError(f"could not read the model at {source}: {err}") from None
        if getattr(config, "quantization_config", None) is not None and kwargs:
            del config.quantization_config
        model = _skeleton(config, dtype)
        weights: WeightSource = GGUFSource(path, model) if kwargs else SafetensorsSource(path)
    return model, tokenizer, weights


class StreamedWeights:
    """Loads and drops the parameters of a streamed model's modules (``load(module)`` reads every meta
    parameter under it from the source, in ``dtype``; ``drop(module)`` sends them back to meta)."""

    def __init__(self, model: nn.Module, source: WeightSource, dtype: torch.dtype) -> None:
        self.model = model
        self.source = source
        self.dtype = dtype
        self._names = source.names()
        self._prefix = {id(m): f"{n}." if n else "" for n, m in model.named_modules(remove_duplicate=False)}
        self.tied = _tied_names(model)
        # tied parameters (one object under several names) are read once: id(meta) -> (meta, loaded)
        self._shared = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in self.tied}
        self._loaded: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}

    def load(self, module: nn.Module, skip: nn.Module | None = None) -> None:
        """Read every meta parameter under ``module`` (except under ``skip``) from the source."""
        prefix = self._prefix[id(module)]
        skipped = {id(m) for m in skip.modules()} if skip is not None else set()
        for name, sub in module.named_modules(remove_duplicate=False):
            if id(sub) in skipped:
                continue
            for pname, param in list(sub._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) in self._loaded:  # tied to one loaded already
                    sub._parameters[pname] = self._loaded[id(param)][1]
                    continue
                full = f"{prefix}{name + '.' if name else ''}{pname}"
                key = full if full in self._names else self.tied.get(full, full)
                tensor = self.source.get(key)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise SourceError(f"the checkpoint's {key} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{tuple(param.shape)}")
                loaded = nn.Parameter(tensor.to(self.dtype), requires_grad=False)
                if id(param) in self._shared:
                    self._loaded[id(param)] = (param, loaded)
                sub._parameters[pname] = loaded

    def drop(self, module: nn.Module) -> None:
        """Send ``module``'s parameters and buffers back to the meta device (frees their memory; a
        parameter tied to one outside ``module`` stays loaded there)."""
        module.to("meta")

    def drop_outside(self, blocks: nn.Module) -> None:
        """Send every parameter outside ``blocks`` (embeddings, final norm, head) back to the meta
        device, keeping ties (buffers such as rotary frequencies stay: they are computed, not read)."""
        inside = {id(m) for m in blocks.modules()}
        replaced: dict[int, nn.Parameter] = {}
        for module in self.model.modules():
            if id(module) in inside:
                continue
            for pname, param in list(module._parameters.items()):
                if param is None or param.is_meta:
                    continue
                if id(param) not in replaced:
                    replaced[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                module._parameters[pname] = replaced[id(param)]
        self._loaded = {}
        self._shared |= {id(p) for p in replaced.values()}

    def state_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's ``state_dict()`` items in order, each parameter still on the meta device read
        from the source in ``dtype`` (one at a time): the items of the loaded model's state dict."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_meta:
                key = name if name in self._names else self.tied.get(name, name)
                tensor = self.source.get(key).to(self.dtype)
            yield name, tensor

    def missing(self) -> list[str]:
        """Parameters the source cannot provide (checked before any work)."""
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                if n not in self._names and self.tied.get(n) not in self._names]


def _tied_names(model: nn.Module) -> dict[str, str]:
    """``{name: other name}`` for parameters tied to another (e.g. lm_head.weight and embed_tokens.weight)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    out = {}
    for names in by_id.values():
        for a in names:
            for b in names:
                if a != b:
                    out.setdefault(a, b)
    return out
