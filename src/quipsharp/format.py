"""The quantized model directory, as data, and the checks every loader runs.

One definition serves :func:`quipsharp.load_quantized`, the transformers quantizer
(:mod:`quipsharp.hf_quantizer`) and ``quipsharp inspect``. A directory (format version 3; versions 1 and 2,
written before the config guard, still load) holds:

=========================== =============================================================================
file                        contents
=========================== =============================================================================
``config.json``             the model's config plus ``quantization_config``: ``quant_method: "quipsharp"``,
                            ``format_version``, ``config`` (:class:`~quipsharp.config.ModelQuantConfig`),
                            ``modules`` (one :class:`ModuleSpec` per quantized linear), ``source_model``;
                            guarded (version 3): ``model_type: "quipsharp"``, the architecture's own type
                            in ``quipsharp_base_model_type``, ``auto_map.AutoConfig`` naming the module
                            below (:func:`guard_config`)
``quipsharp_autoload.py``   imported by transformers with ``trust_remote_code=True``: imports quipsharp
``model.safetensors``       every tensor; metadata ``format: "quipsharp"``, ``tied`` (JSON ``{dropped:
                            kept}``: tensors stored once and re-tied on load) and ``quantization_config``
                            (a copy of config.json's, compared at load: a changed config is refused)
``quipsharp_report.json``   per-layer proxy loss and time (optional)
``quipsharp_checksums.json`` size and SHA-256 of every other file (optional; ``inspect --verify``)
tokenizer, generation config as transformers writes them
=========================== =============================================================================

Per quantized module ``NAME`` (:meth:`ModuleSpec.schema`): ``NAME.codes`` (vector codebooks: uint8
``[m, n/8·code_bytes]``; trellis codebooks, format version 2: int16 ``[m/16, (n/16)·16·bits]``),
``NAME.su`` float32 ``[n]``, ``NAME.sv`` float32 ``[m]``, ``NAME.wscale`` float32 ``[]``,
``NAME.codebook_id`` int64 ``[]``, with a bias ``NAME.bias`` float32 ``[m]`` and, for the trellis HYB
code, ``NAME.lut`` float32 ``[512, 2]``.

Tie policy: a tensor that shares storage with one saved earlier is dropped and named in ``tied``;
a loader re-ties it, and refuses a tie the model's own config does not declare.

Checks at every load (cheap): the safetensors header is complete (its size matches the file),
every quantized module's tensors exist with the schema's dtype and shape, the codebook id matches the
config, config.json's quantization settings equal those saved with the weights, and after loading
every scale, sign, bias, norm and embedding is finite (and every scale positive).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quipsharp.codebooks import codebook_id, get_codebook
from quipsharp.config import SUPPORTED_BITS, ModelQuantConfig, QuIPSharpConfig
from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

QUANT_METHOD = "quipsharp"
#: The directory format this quipsharp writes, and the newest it reads. Version 2 added the trellis
#: codebooks (int16 ``codes`` of 16 x 16 tiles); version 3 guards config.json (see
#: :func:`guard_config`) so that transformers without quipsharp refuses the directory instead of
#: loading random weights. Versions 1 and 2 still load.
FORMAT_VERSION = 3
#: ``model_type`` of a guarded config.json: transformers knows no such type, so it loads the directory
#: only through quipsharp (imported, or the ``auto_map`` module below with ``trust_remote_code=True``).
GUARD_MODEL_TYPE = "quipsharp"
#: config.json key holding the architecture's own ``model_type`` in a guarded config.
BASE_MODEL_TYPE_KEY = "quipsharp_base_model_type"
#: The module saved in every directory that transformers' ``trust_remote_code=True`` imports: it
#: imports quipsharp and names the config class that reads a guarded config.json.
AUTOLOAD_MODULE = "quipsharp_autoload"
AUTOLOAD_FILE = f"{AUTOLOAD_MODULE}.py"
AUTOLOAD_CONFIG_CLASS = "QuipSharpAutoConfig"
AUTOLOAD_REF = f"{AUTOLOAD_MODULE}.{AUTOLOAD_CONFIG_CLASS}"
AUTOLOAD_SOURCE = f'''"""Loads this quipsharp model with transformers' AutoConfig / AutoModelForCausalLM.

The model's config.json says model_type "{GUARD_MODEL_TYPE}", which transformers alone does not know:
without quipsharp the directory is refused instead of loading with random weights. Load it after
``import quipsharp``, or with ``trust_remote_code=True``, which imports this file. Needs the quipsharp
package (``pip install quipsharp``).
"""

from quipsharp.hf_quantizer import QuipSharpModelConfig as {AUTOLOAD_CONFIG_CLASS}  # noqa: F401
'''
WEIGHTS_FILE = "model.safetensors"
#: The index transformers writes with a checkpoint split into shards (``save_pretrained(max_shard_size=...)``).
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "quipsharp_report.json"
CHECKSUMS_FILE = "quipsharp_checksums.json"
FORMAT_METADATA_KEY = "format"
TIED_METADATA_KEY = "tied"
QCONFIG_METADATA_KEY = "quantization_config"
MODEL_CONFIG_METADATA_KEY = "model_config"
#: config.json keys that change without changing the model (who wrote the file, how it loads).
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "quantization_config",
                        "architectures", "use_cache", "output_attentions", "output_hidden_states", "return_dict")
#: Fields of ``quantization_config`` that decide how the weights are read (compared with the copy
#: saved in the weights' metadata; ``source_model`` is a record only).
LOAD_FIELDS = ("quant_method", "format_version", "config", "modules")
#: dtype of the float state (signs, scale, bias) of a quantized module.
QUANTIZED_STATE_DTYPE = torch.float32
SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                      "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64, "BOOL": torch.bool}
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 2**20
HASH_CHUNK = 16 * 2**20


class ModelLoadError(QuipSharpError, ValueError):
    """A model or quantized directory cannot be loaded; the message names the problem."""


# --------------------------------------------------------------------------- the quantization config
@dataclass(frozen=True)
class ModuleSpec:
    """One quantized linear as ``config.json`` records it."""

    bits: int
    codebook: str
    in_features: int
    out_features: int
    bias: bool

    @classmethod
    def from_dict(cls, name: str, data: Any) -> ModuleSpec:
        """Validate an entry of the ``modules`` map (:class:`ModelLoadError` naming the field)."""
        if not isinstance(data, dict):
            raise ModelLoadError(f"quantization_config: module {name!r} is not an object")
        missing = [k for k in ("bits", "in_features", "out_features", "bias") if k not in data]
        if missing:
            raise ModelLoadError(f"quantization_config: module {name!r} lacks {missing}")
        bits, n, m, bias = data["bits"], data["in_features"], data["out_features"], data["bias"]
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ModelLoadError(f"quantization_config: module {name!r} has bits {bits!r}, not one of {SUPPORTED_BITS}")
        for key, value in (("in_features", n), ("out_features", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelLoadError(f"quantization_config: module {name!r} has {key} {value!r}")
        if not isinstance(bias, bool):
            raise ModelLoadError(f"quantization_config: module {name!r} has bias {bias!r}, not true/false")
        codebook = data.get("codebook")
        if codebook is not None:
            try:
                codebook_id(codebook)
            except ValueError as err:
                raise ModelLoadError(f"quantization_config: module {name!r}: {err}") from None
        problem = get_codebook(codebook or "E8P12").shape_problem(m, n)
        if problem:
            raise ModelLoadError(f"quantization_config: module {name!r} is {m}x{n}: {problem}")
        return cls(bits, codebook, n, m, bias)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "codebook": self.codebook, "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias}

    def schema(self, layer_config: QuIPSharpConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{buffer name: (dtype, shape)}`` of this module's tensors under ``layer_config``."""
        out = {
            "codes": get_codebook(layer_config.codebook_name).packed_spec(self.out_features, self.in_features),
            "su": (QUANTIZED_STATE_DTYPE, (self.in_features,)),
            "sv": (QUANTIZED_STATE_DTYPE, (self.out_features,)),
            "wscale": (QUANTIZED_STATE_DTYPE, ()),
            "codebook_id": (torch.int64, ()),
        }
        if self.bias:
            out["bias"] = (QUANTIZED_STATE_DTYPE, (self.out_features,))
        lut_shape = get_codebook(layer_config.codebook_name).lut_shape
        if lut_shape:
            out["lut"] = (QUANTIZED_STATE_DTYPE, lut_shape)
        return out


@dataclass(frozen=True)
class QuantizationRecord:
    """The ``quantization_config`` of a quipsharp directory, validated."""

    format_version: int
    config: ModelQuantConfig
    modules: dict[str, ModuleSpec]
    source_model: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, qc: Any, where: str = "") -> QuantizationRecord:
        """Validate a ``quantization_config`` dict; ``where`` prefixes messages (e.g. a path)."""
        if not isinstance(qc, dict) or not qc:
            raise ModelLoadError(f"{where}config.json has no quantization_config: not a quipsharp model")
        if qc.get("quant_method") != QUANT_METHOD:
            raise ModelLoadError(f"{where}not a quipsharp model (quant_method {qc.get('quant_method')!r})")
        check_format_version(qc.get("format_version"), where)
        try:
            config = ModelQuantConfig.from_dict(qc.get("config", {}))
        except (ValueError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{where}the quipsharp quantization config is not readable: {err}") from err
        modules = qc.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise ModelLoadError(f"{where}the quipsharp quantization_config lists no quantized modules")
        specs = {name: ModuleSpec.from_dict(name, spec) for name, spec in modules.items()}
        record = cls(qc["format_version"], config, specs, qc.get("source_model"), copy.deepcopy(qc))
        if qc.get("calibration") is not None and not isinstance(qc["calibration"], str):
            raise ModelLoadError(f"{where}the quantization_config's calibration is not a string")
        needed = format_version_for(spec.codebook for spec in specs.values())
        if needed > record.format_version:
            raise ModelLoadError(f"{where}the quantization_config says format version {record.format_version} but "
                                 f"lists trellis codebooks, which need version {needed}: the config was edited")
        for name, spec in specs.items():
            layer = record.layer_config(name)
            if spec.codebook is not None and spec.codebook != layer.codebook_name:
                raise ModelLoadError(f"{where}module {name!r} is recorded with codebook {spec.codebook} but the "
                                     f"config selects {layer.codebook_name}")
            problem = get_codebook(layer.codebook_name).shape_problem(spec.out_features, spec.in_features)
            if problem:
                raise ModelLoadError(f"{where}module {name!r} is {spec.out_features}x{spec.in_features}: {problem}")
        return record

    def layer_config(self, name: str) -> QuIPSharpConfig:
        """The config of quantized module ``name``; its recorded bit width wins."""
        config = self.config.layer_config(name)
        bits = self.modules[name].bits
        return config if config.bits == bits else config.replace(bits=bits)

    def codebook_counts(self) -> dict[str, int]:
        """``{codebook name: quantized modules using it}``, in module order."""
        counts: dict[str, int] = {}
        for name in self.modules:
            codebook = self.layer_config(name).codebook_name
            counts[codebook] = counts.get(codebook, 0) + 1
        return counts

    def bits_per_weight(self) -> float:
        """Code bits per quantized weight, averaged over the weights of every quantized module."""
        weights = sum(m.in_features * m.out_features for m in self.modules.values())
        return sum(m.bits * m.in_features * m.out_features for m in self.modules.values()) / weights

    def schema(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``{tensor name: (dtype, shape)}`` of every quantized module's tensors."""
        return {f"{name}.{key}": value for name, spec in self.modules.items()
                for key, value in spec.schema(self.layer_config(name)).items()}


def format_version_for(codebooks: Any) -> int:
    """The oldest directory format version that can hold modules of these codebook names: 2 with a
    trellis, else 1 (a record claiming less is refused; new directories are written as
    :data:`FORMAT_VERSION`)."""
    return 2 if any(get_codebook(name).tile_rows > 1 for name in codebooks if name is not None) else 1


def check_format_version(version: Any, where: str = "") -> None:
    """Refuse a ``format_version`` this quipsharp cannot read."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > FORMAT_VERSION:
        raise ModelLoadError(
            f"{where}this model's config.json has quipsharp format version {version!r}; this quipsharp reads up "
            f"to {FORMAT_VERSION}: upgrade quipsharp"
        )


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config.json as a dict, its quantization_config)`` of a directory claiming to be quipsharp's;
    refuses a missing or foreign quantization_config. The dict is the architecture's config as
    transformers knows it (a guarded config is returned unguarded: :func:`unguard_config`)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} has no {CONFIG_FILE}: not a quantized model directory")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_file} is not a JSON object")
    raw = unguard_config(raw, cfg_file)
    qc = raw.get("quantization_config")
    if not qc:
        hint = " but model.safetensors holds quipsharp weights (config.json damaged?)" if is_quipsharp_weights(
            path / WEIGHTS_FILE) else ""
        raise ModelLoadError(f"{path}: config.json has no quantization_config{hint}: not a quipsharp model")
    return raw, qc


def read_record(path: str | os.PathLike) -> tuple[dict[str, Any], QuantizationRecord]:
    """``(config.json as a dict, its validated QuantizationRecord)``."""
    raw, qc = read_config(path)
    return raw, QuantizationRecord.from_dict(qc, f"{path}: ")


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """True if ``path/config.json`` declares ``quant_method: quipsharp``."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


# --------------------------------------------------------------------------- the config guard
def guard_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as quipsharp writes it (format version 3): ``model_type`` becomes
    :data:`GUARD_MODEL_TYPE`, the architecture's own type moves to :data:`BASE_MODEL_TYPE_KEY`, and
    ``auto_map["AutoConfig"]`` names the module :data:`AUTOLOAD_FILE` saved beside it.

    transformers without quipsharp then refuses the directory ("contains custom code ... pass
    ``trust_remote_code=True``") instead of skipping an unknown ``quant_method`` and filling the
    quantized layers with random weights; with quipsharp imported, or with ``trust_remote_code=True``,
    it reads the config through :class:`quipsharp.hf_quantizer.QuipSharpModelConfig`, which gives back
    the architecture's own config class. Idempotent."""
    if config.get("model_type") == GUARD_MODEL_TYPE:
        return copy.deepcopy(config)
    base_type = config.get("model_type")
    if not isinstance(base_type, str) or not base_type:
        raise ModelLoadError("the model config has no model_type: cannot write a quipsharp directory for it")
    guarded = copy.deepcopy(config)
    guarded["model_type"] = GUARD_MODEL_TYPE
    guarded[BASE_MODEL_TYPE_KEY] = base_type
    guarded["auto_map"] = {**(config.get("auto_map") or {}), "AutoConfig": AUTOLOAD_REF}
    return guarded


def unguard_config(config: dict[str, Any], where: Any = "config.json") -> dict[str, Any]:
    """The architecture's own config of a guarded config.json (a copy; others are returned as they are)."""
    if config.get("model_type") != GUARD_MODEL_TYPE:
        return config
    base_type = config.get(BASE_MODEL_TYPE_KEY)
    if not isinstance(base_type, str) or not base_type or base_type == GUARD_MODEL_TYPE:
        raise ModelLoadError(f"{where} says model_type {GUARD_MODEL_TYPE!r} but names no architecture in "
                             f"{BASE_MODEL_TYPE_KEY!r}: the config is damaged")
    out = {k: copy.deepcopy(v) for k, v in config.items() if k != BASE_MODEL_TYPE_KEY}
    out["model_type"] = base_type
    auto_map = {k: v for k, v in (config.get("auto_map") or {}).items() if v != AUTOLOAD_REF}
    if auto_map:
        out["auto_map"] = auto_map
    else:
        out.pop("auto_map", None)
    return out


def write_autoload(directory: Path) -> None:
    """Write :data:`AUTOLOAD_FILE` (what ``trust_remote_code=True`` imports) into ``directory``."""
    from quipsharp.io import atomic_write_text

    atomic_write_text(Path(directory) / AUTOLOAD_FILE, AUTOLOAD_SOURCE)


# --------------------------------------------------------------------------- safetensors headers
@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype | None  # None: a dtype torch has no name for here
    shape: tuple[int, ...]


def read_header(file: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: TensorInfo}, metadata)`` of a safetensors file, read from its header alone.

    Refuses (:class:`ModelLoadError`) a file that is not safetensors or whose data are truncated or
    overlap (the header's offsets must tile the data exactly)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(HEADER_LENGTH_BYTES)
            if len(head) < HEADER_LENGTH_BYTES:
                raise ModelLoadError(f"{file} is not a safetensors file (only {len(head)} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - HEADER_LENGTH_BYTES):
                raise ModelLoadError(f"{file} is not a safetensors file or is truncated (header of {length} bytes)")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise ModelLoadError(f"cannot read {file}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{file} is not a safetensors file (header is not JSON: {err})") from err
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{file}: malformed header entry for {name!r}") from err
        tensors[name] = TensorInfo(dtype, shape)
        spans.append((start, end))
    data_bytes = size - HEADER_LENGTH_BYTES - length
    covered = 0
    for start, end in sorted(spans):
        if start != covered or end < start:
            raise ModelLoadError(f"{file} is damaged (tensor data overlap or leave a gap at byte {covered})")
        covered = end
    if covered != data_bytes:
        state = "truncated" if covered > data_bytes else "longer than its header says"
        raise ModelLoadError(f"{file} is {state}: its header describes {covered} data bytes, the file holds "
                             f"{data_bytes}")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory: ``model.safetensors``, or the shards its index lists
    (in the index's order of first appearance); refuses a directory with neither, or an index naming
    a file that is missing or outside the directory."""
    path = Path(path)
    single = path / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = path / WEIGHTS_INDEX_FILE
    if not index.is_file():
        raise ModelLoadError(f"{path} has no {WEIGHTS_FILE} (nor a {WEIGHTS_INDEX_FILE} of shards)")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{index} is damaged (no weight_map of tensor names to files)") from None
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name:
            raise ModelLoadError(f"{index} names {name!r}, not a file in {path}")
        if not (path / name).is_file():
            raise ModelLoadError(f"{index} lists {name}, which is missing from {path}")
        files.append(path / name)
    return files


def read_headers(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, str]]:
    """``({tensor name: TensorInfo}, metadata, {dropped tied name: kept name})`` of a checkpoint's
    safetensors files (headers only): the union of their tensors (a tensor stored in two files is
    refused), the metadata of the first file carrying quipsharp's (empty when none does, as in a
    directory written by transformers), and the ties every file records."""
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    tied: dict[str, str] = {}
    for file in files:
        names, meta = read_header(file)
        twice = sorted(set(names) & set(tensors))
        if twice:
            raise ModelLoadError(f"{file} stores {twice[0]} again: the shards overlap")
        tensors.update(names)
        if not metadata and (meta.get(FORMAT_METADATA_KEY) == QUANT_METHOD or TIED_METADATA_KEY in meta):
            metadata = meta
        if meta.get(TIED_METADATA_KEY):
            try:
                tied.update(_json_object(meta[TIED_METADATA_KEY]))
            except ValueError as err:
                raise ModelLoadError(f"{file}: the {TIED_METADATA_KEY!r} metadata is not a JSON object") from err
    return tensors, metadata, tied


def _json_object(text: str) -> dict[str, str]:
    """Parse a JSON object of strings (raises ``ValueError`` otherwise)."""
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("not a JSON object of strings")
    return value


def is_quipsharp_weights(file: str | os.PathLike) -> bool:
    """Whether a safetensors file was written by :func:`quipsharp.save_quantized`."""
    try:
        return read_header(file)[1].get(FORMAT_METADATA_KEY) == QUANT_METHOD
    except (ModelLoadError, FileNotFoundError):
        return False


def check_weights_header(tensors: dict[str, TensorInfo], metadata: dict[str, str], record: QuantizationRecord,
                         file: str | os.PathLike, key: Any = None) -> None:
    """Check a weights file's header against the quantization record.

    Every quantized module's tensors must exist with the schema's dtype and shape, and the
    quantization settings saved with the weights (if any) must equal config.json's. ``key`` maps a
    saved tensor name to the name looked up (for loaders that strip a prefix)."""
    _check_saved_settings(metadata.get(QCONFIG_METADATA_KEY), record, file)
    key = key or (lambda name: name)
    missing, wrong = [], []
    for name, (dtype, shape) in record.schema().items():
        info = tensors.get(key(name))
        if info is None:
            missing.append(name)
        elif info.dtype != dtype or info.shape != shape:
            found = str(info.dtype).removeprefix("torch.") if info.dtype is not None else "unknown dtype"
            wrong.append(f"{name} is {found} {list(info.shape)}, expected {str(dtype).removeprefix('torch.')} "
                         f"{list(shape)}")
    if missing:
        raise ModelLoadError(f"{file} is missing tensors: {missing[:5]}")
    if wrong:
        raise ModelLoadError(f"{file}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def _check_saved_settings(saved: str | None, record: QuantizationRecord, file: str | os.PathLike) -> None:
    """Config.json's quantization settings must equal those saved with the weights (when there are)."""
    if saved is None:  # written by transformers' save_pretrained or an older quipsharp: nothing to compare
        return
    try:
        saved_qc = json.loads(saved)
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{file}: the saved quantization settings are not JSON ({err})") from err
    differences = _differences({k: saved_qc.get(k) for k in LOAD_FIELDS}, {k: record.raw.get(k) for k in LOAD_FIELDS})
    if differences:
        raise ModelLoadError(f"config.json's quantization_config differs from the one saved with the weights "
                             f"({differences[0]}): the config was edited or belongs to other weights")


def _differences(saved: Any, now: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as ``path: saved X, config.json Y`` lines."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            out += _differences(saved.get(k), now.get(k), f"{path}.{k}" if path else k)
        return out
    if saved != now:
        return [f"{path}: saved {json.dumps(saved)}, config.json {json.dumps(now)}"]
    return []


def load_metadata(record: QuantizationRecord, model_config: dict[str, Any] | None = None) -> dict[str, str]:
    """The metadata :func:`quipsharp.save_quantized` writes into the weights file: the quantization
    settings (an edit is refused at load) and the model's config (an edit is reported)."""
    out = {QCONFIG_METADATA_KEY: json.dumps({k: record.raw.get(k) for k in LOAD_FIELDS}, sort_keys=True)}
    if model_config is not None:
        kept = {k: v for k, v in model_config.items() if k not in VOLATILE_CONFIG_KEYS}
        out[MODEL_CONFIG_METADATA_KEY] = json.dumps(kept, sort_keys=True, default=str)
    return out


def model_config_changes(metadata: dict[str, str], config: dict[str, Any]) -> list[str]:
    """How ``config`` (config.json, or a loaded model's config) differs from the model config saved
    with the weights, field by field; keys a reader adds or drops are ignored."""
    saved = metadata.get(MODEL_CONFIG_METADATA_KEY)
    if saved is None:
        return []
    try:
        saved_config = json.loads(saved)
    except json.JSONDecodeError:
        return ["the model config saved with the weights is not JSON"]
    now = json.loads(json.dumps(config, default=str))
    return [line for key in sorted(saved_config) if key in now
            for line in _differences(saved_config[key], now[key], key)]


def warn_model_config_changes(metadata: dict[str, str], config: dict[str, Any], where: str = "") -> list[str]:
    """Log a warning naming how the model config differs from the one saved with the weights (an
    edit such as a longer RoPE scaling may be deliberate, so it is reported, not refused)."""
    changes = model_config_changes(metadata, config)
    if changes:
        more = f" and {len(changes) - 1} more" if len(changes) > 1 else ""
        logger.warning("%sconfig.json differs from the model config saved with the weights (%s%s): the model may "
                       "not behave as it did when quantized", where, changes[0], more)
    return changes


# --------------------------------------------------------------------------- after loading
def check_loaded_model(model: nn.Module, where: str = "") -> None:
    """Refuse a loaded model whose float state is not finite or whose scales are not positive.

    Runs at every load: a flipped bit in a scale or a NaN in an embedding row would otherwise give
    NaN logits or silent garbage. Cost: one pass over the float tensors."""
    from quipsharp.nn import QuantizedLinear

    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            scale = float(module.wscale)
            if not (scale > 0 and scale < float("inf")):
                raise ModelLoadError(f"{where}{name}.wscale is {scale}: the weights are damaged")
            if module.lut is not None and not bool(torch.isfinite(module.lut).all()):
                raise ModelLoadError(f"{where}{name}.lut holds non-finite values: the weights are damaged")
    quantized_state = {id(t) for m in model.modules() if isinstance(m, QuantizedLinear) for t in m.buffers()}
    float_dtypes: dict[torch.dtype, str] = {}
    seen: set[int] = set()
    for tname, t in model.named_parameters():  # (buffers such as RoPE tables keep float32 in any model)
        if t.is_floating_point() and id(t) not in quantized_state:
            float_dtypes.setdefault(t.dtype, tname)
        if t is None or not t.is_floating_point() or t.is_meta or id(t) in seen:
            continue
        seen.add(id(t))
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ModelLoadError(f"{where}{tname} holds {bad} non-finite value{'s' if bad > 1 else ''}: "
                                 "the weights are damaged")
    if len(float_dtypes) > 1:  # one dtype for the tensors left in float (quantize --dtype): mixed is damage
        (d1, n1), (d2, n2) = list(float_dtypes.items())[:2]
        raise ModelLoadError(f"{where}{n2} is {str(d2).removeprefix('torch.')} but {n1} is "
                             f"{str(d1).removeprefix('torch.')}: the weights were altered after saving")


# --------------------------------------------------------------------------- inspect
def check_dir(path: str | os.PathLike, verify: bool = False) -> tuple[dict[str, Any], QuantizationRecord, list[str]]:
    """``(config.json dict, record, problems)`` of a quantized directory.

    Always: the config is readable and consistent and the weights header matches it (structure,
    sizes, dtypes, shapes, saved settings). With ``verify``: every file against its recorded
    checksum, and every stored float tensor finite (every ``wscale`` positive), read tensor by tensor.
    Unreadable config raises :class:`ModelLoadError`; anything else found is a line in ``problems``."""
    from safetensors import safe_open

    path = Path(path)
    raw, record = read_record(path)
    problems = []
    files: list[Path] = []
    try:
        files = weight_files(path)
        tensors, metadata, _ = read_headers(files)
        check_weights_header(tensors, metadata, record, files[0])
    except (ModelLoadError, FileNotFoundError) as err:
        problems.append(str(err))
    if verify:
        problems += verify_checksums(path) or []  # None: no checksums recorded (saved by transformers)
        if not problems:
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        t = handle.get_tensor(name)
                        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            problems.append(f"{name} holds non-finite values")
                        elif name.endswith(".wscale") and not float(t) > 0:
                            problems.append(f"{name} is {float(t)}, not a positive scale")
    return raw, record, problems


# --------------------------------------------------------------------------- checksums
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory`` (not in subfolders) in
    :data:`CHECKSUMS_FILE`."""
    from quipsharp.io import atomic_write_text

    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    atomic_write_text(directory / CHECKSUMS_FILE, json.dumps({"files": files}, indent=1, sort_keys=True))


def update_checksums(directory: Path, names: list[str]) -> None:
    """Re-record the checksums of the files ``names`` that quipsharp itself rewrote (an evaluation
    record, its model card) in a directory with a manifest; every other entry is kept as it was, so
    damage elsewhere is not blessed. A directory without a manifest is left without one."""
    from quipsharp.io import atomic_write_text

    manifest = directory / CHECKSUMS_FILE
    if not manifest.is_file():
        return
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"{manifest} is damaged") from None
    for name in names:
        path = directory / name
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    atomic_write_text(manifest, json.dumps({**data, "files": files}, indent=1, sort_keys=True))


def check_weights_checksum(directory: Path, name: str = WEIGHTS_FILE) -> None:
    """Refuse a weights file whose bytes differ from those saved (every load runs this: one read of
    the file at SHA-256 speed, ~2 GB/s here). Other files, which users may edit on purpose (a chat
    template), are checked by ``inspect --verify``; a directory without checksums passes."""
    manifest = directory / CHECKSUMS_FILE
    if not manifest.is_file():
        return
    try:
        want = json.loads(manifest.read_text(encoding="utf-8"))["files"][name]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"{manifest} is damaged or does not list {name}") from None
    path = directory / name
    if path.stat().st_size != want.get("bytes") or file_sha256(path) != want.get("sha256"):
        raise ModelLoadError(f"{path} differs from what was saved (checksum mismatch): the file is damaged")


def verify_checksums(directory: Path, full: bool = True) -> list[str] | None:
    """Problems found comparing ``directory`` with its recorded checksums (empty: all match; None: no
    checksums recorded, as in a directory written by transformers' ``save_pretrained``).

    ``full=False`` compares sizes only (cheap); ``True`` also hashes every file."""
    manifest = directory / CHECKSUMS_FILE
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return [f"{manifest} is damaged"]
    problems = []
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {want.get('bytes')} were saved")
        elif full and file_sha256(path) != want.get("sha256"):
            problems.append(f"{name} differs from what was saved (SHA-256 mismatch)")
    return problems
