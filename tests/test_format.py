"""Loads are verified: one format definition, damaged or mislabelled directories are refused by
every loader, ``inspect --verify`` finds what changed (issue 13 item 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from quipsharp.cli import main
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.format import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    ModuleSpec,
    QuantizationRecord,
    read_header,
    verify_checksums,
)
from quipsharp.hf import load_model, load_quantized, save_quantized
from quipsharp.pipeline import quantize_model
from tests.tiny_models import tiny_model, tiny_tokenizer

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model, reports = quantize_model(tiny_model("llama"), ModelQuantConfig(layer=QuIPSharpConfig(bits=2)),
                                    progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("fmt") / "q", tiny_tokenizer(), reports=reports)


def copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def edit_config(path: Path, change) -> None:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    change(cfg)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def edit_tensors(path: Path, change, keep_checksums: bool = False) -> None:
    """Change tensors of a saved directory. Unless ``keep_checksums``, its checksums are dropped too (as
    in a directory written by transformers), so what is tested is the check behind the checksum."""
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    change(state)
    save_file(state, str(path / WEIGHTS_FILE), metadata=metadata)
    if not keep_checksums:
        (path / CHECKSUMS_FILE).unlink()


def loaders(path: Path):
    """Every way a quipsharp directory is loaded."""
    return [("load_quantized", lambda: load_quantized(path)), ("load_model", lambda: load_model(path)),
            ("from_pretrained", lambda: AutoModelForCausalLM.from_pretrained(path))]


def refused_by_all(path: Path, pattern: str) -> None:
    for name, load in loaders(path):
        with pytest.raises(ModelLoadError, match=pattern):
            load()
            pytest.fail(f"{name} loaded a damaged directory")


def test_a_saved_directory_records_checksums_and_verifies(saved, capsys):
    assert (saved / CHECKSUMS_FILE).is_file() and verify_checksums(saved) == []
    assert main(["inspect", str(saved), "--verify"]) == 0
    assert "verified: every file matches its checksum" in capsys.readouterr().out


def test_a_truncated_weights_file_is_refused_and_inspect_says_so(saved, tmp_path, capsys):
    path = copy(saved, tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) - 1000])
    refused_by_all(path, "is truncated")
    assert main(["inspect", str(path)]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_a_bit_flip_in_a_scale_is_refused(saved, tmp_path, capsys):
    path = copy(saved, tmp_path)

    def flip(state):  # the exponent's top bit: 0.04 becomes ~1.4e37 (or inf/NaN for other values)
        bits = state[f"{LAYER}.wscale"].view(torch.int32)
        state[f"{LAYER}.wscale"] = (bits ^ (1 << 30)).view(torch.float32)

    edit_tensors(path, flip, keep_checksums=True)
    assert main(["inspect", str(path), "--verify"]) == 2
    assert "differs from what was saved (SHA-256 mismatch)" in capsys.readouterr().err
    refused_by_all(path, "differs from what was saved \\(checksum mismatch\\)")

    def nan(state):
        state[f"{LAYER}.wscale"] = torch.tensor(float("nan"))

    edit_tensors(path, nan)
    refused_by_all(path, rf"{LAYER}\.wscale is nan")


def test_nan_in_an_embedding_row_is_refused(saved, tmp_path):
    path = copy(saved, tmp_path)

    def nan_row(state):
        state["model.embed_tokens.weight"][17] = float("nan")

    edit_tensors(path, nan_row)
    refused_by_all(path, r"model\.embed_tokens\.weight holds 64 non-finite values")


@pytest.mark.parametrize(("field", "value", "difference"), [
    (("config", "layer", "use_hadamard"), False, "config.layer.use_hadamard: saved true, config.json false"),
    (("config", "layer", "scale_rho"), 0.5, "config.layer.scale_rho: saved null, config.json 0.5"),
    (("modules", LAYER, "bias"), True, f"modules.{LAYER}.bias: saved false, config.json true"),
])
def test_an_edited_config_is_refused_naming_the_field(saved, tmp_path, field, value, difference):
    path = copy(saved, tmp_path)

    def change(cfg):
        target = cfg["quantization_config"]
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = value

    edit_config(path, change)
    refused_by_all(path, f"differs from the one saved with the weights \\({difference}\\)")


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda cfg: cfg.pop("quantization_config"), "config.json has no quantization_config but model.safetensors "
                                                 "holds quipsharp weights"),
    (lambda cfg: cfg["quantization_config"].update(quant_method="awq"), "not a quipsharp model"),
    (lambda cfg: cfg["quantization_config"].pop("modules"), "lists no quantized modules"),
    (lambda cfg: cfg["quantization_config"]["modules"][LAYER].update(bits=5), "has bits 5"),
    (lambda cfg: cfg["quantization_config"]["modules"][LAYER].update(in_features=100),
     "100: in_features must be a positive multiple of 8"),
])
def test_a_missing_or_broken_quantization_config_is_refused(saved, tmp_path, change, pattern):
    path = copy(saved, tmp_path)
    edit_config(path, change)
    for name, load in loaders(path)[:2]:  # (transformers itself decides what a config without one means)
        with pytest.raises(ModelLoadError, match=pattern):
            load()
            pytest.fail(name)


@pytest.mark.parametrize(("tensor", "dtype", "pattern"), [
    (f"{LAYER}.codes", torch.int32, rf"{LAYER}\.codes is int32 \[64, 32\], expected uint8 \[64, 32\]"),
    (f"{LAYER}.codes", torch.float32, rf"{LAYER}\.codes is float32"),
    (f"{LAYER}.su", torch.float64, rf"{LAYER}\.su is float64"),
    ("model.norm.weight", torch.float64, r"model\.norm\.weight is float64 but model\.embed_tokens\.weight is float32"),
])
def test_tensors_of_the_wrong_dtype_are_refused(saved, tmp_path, tensor, dtype, pattern):
    path = copy(saved, tmp_path)

    def cast(state):
        state[tensor] = state[tensor].to(dtype)

    edit_tensors(path, cast)
    for name, load in loaders(path)[:2]:
        with pytest.raises(ModelLoadError, match=pattern):
            load()
            pytest.fail(name)


def test_read_header_matches_safetensors_and_the_schema(saved):
    tensors, metadata = read_header(saved / WEIGHTS_FILE)
    with safe_open(str(saved / WEIGHTS_FILE), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():
            t = f.get_tensor(name)
            assert (tensors[name].dtype, tensors[name].shape) == (t.dtype, tuple(t.shape))
        assert f.metadata() == metadata
    record = QuantizationRecord.from_dict(json.loads((saved / CONFIG_FILE).read_text())["quantization_config"])
    assert {k: (v.dtype, v.shape) for k, v in tensors.items() if k in record.schema()} == record.schema()


def test_module_spec_validation():
    good = {"bits": 3, "codebook": "E8P12RVQ3B", "in_features": 64, "out_features": 16, "bias": True}
    spec = ModuleSpec.from_dict("x", good)
    assert spec.to_dict() == good
    assert spec.schema(QuIPSharpConfig(bits=3))["codes"] == (torch.uint8, (16, 64 // 8 * 3))
    for bad, words in [({"bits": True}, "bits"), ({"in_features": 0}, "in_features"), ({"bias": 1}, "bias"),
                       ({"codebook": "E9"}, "unknown codebook")]:
        with pytest.raises(ModelLoadError, match=words):
            ModuleSpec.from_dict("x", {**good, **bad})
