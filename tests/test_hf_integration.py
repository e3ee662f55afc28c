"""``transformers.AutoModelForCausalLM.from_pretrained`` on quipsharp directories (quipsharp.hf_quantizer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM

import quipsharp
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.hf import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, ModelLoadError, load_quantized, save_quantized
from quipsharp.hf_quantizer import QUANT_METHOD, QUANTIZED_STATE_DTYPE, register_with_transformers
from quipsharp.nn import QuantizedLinear
from quipsharp.pipeline import quantize_model
from tests.tiny_models import calibration_tokens, tiny_model

ARCHS = ["llama", "gpt2", "qwen2"]
TIED_ARCHS = {"llama", "gpt2"}  # tiny_models ties their LM head to the embeddings
# qwen2 also gets mixed precision, so per-layer configs (bits_map) are exercised
BITS_MAPS = {"qwen2": ((r"mlp\.down_proj", 4), (r"self_attn\.o_proj", 3))}
CALIB_SAMPLES, CALIB_CTX, EVAL_BATCH = 4, 16, 2
SRC_DIR = str(Path(__file__).resolve().parents[1] / "src")


def quantized_names(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return calibration_tokens(EVAL_BATCH, CALIB_CTX, seed=1)


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory) -> dict[str, Path]:
    """One 2-bit quipsharp directory per architecture, written by save_quantized."""
    root = tmp_path_factory.mktemp("quantized")
    dirs = {}
    for arch in ARCHS:
        config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), bits_map=BITS_MAPS.get(arch, ()),
                                  nsamples=CALIB_SAMPLES, ctx=CALIB_CTX, batch_size=CALIB_SAMPLES)
        model, reports = quantize_model(tiny_model(arch), config, calibration_tokens(CALIB_SAMPLES, CALIB_CTX),
                                        progress=False)
        dirs[arch] = save_quantized(model, root / arch, config=config, reports=reports)
    return dirs


def copy_with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of a quantized directory whose ``quantization_config`` went through ``edit``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG_FILE).read_text())
    edit(config["quantization_config"])
    (dst / CONFIG_FILE).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_matches_load_quantized(arch, quantized_dirs, tokens):
    path = quantized_dirs[arch]
    reference = load_quantized(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert quantized_names(model) == quantized_names(reference)
    assert torch.equal(logits(model, tokens), logits(reference, tokens))
    assert model.is_quantized and model.hf_quantizer.quantization_config.quant_method == QUANT_METHOD
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch in TIED_ARCHS)
    # the meta stand-in weights used while loading are gone
    assert not any("weight" in vars(m) for m in model.modules() if isinstance(m, QuantizedLinear))
    if arch in BITS_MAPS:
        layers = dict(model.named_modules())
        assert layers["model.layers.0.mlp.down_proj"].config.bits == 4
        assert layers["model.layers.0.self_attn.o_proj"].config.bits == 3
        assert layers["model.layers.0.mlp.up_proj"].config.bits == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_round_trips(arch, quantized_dirs, tokens, tmp_path):
    path = quantized_dirs[arch]
    expected = logits(load_quantized(path), tokens)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.hf_quantizer.is_serializable()
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / CONFIG_FILE).read_text())["quantization_config"]
    assert saved == json.loads((path / CONFIG_FILE).read_text())["quantization_config"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved"), tokens), expected)
    assert torch.equal(logits(load_quantized(tmp_path / "resaved"), tokens), expected)


def test_bfloat16_load_keeps_quantized_state_float32(quantized_dirs, tokens):
    path = quantized_dirs["llama"]
    reference = dict(load_quantized(path).named_buffers())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            for key in ("su", "sv", "wscale"):
                buffer = getattr(layer, key)
                assert buffer.dtype == QUANTIZED_STATE_DTYPE
                assert torch.equal(buffer, reference[f"{name}.{key}"])
    assert logits(model, tokens).dtype == torch.bfloat16


def test_bfloat16_directory_matches_load_quantized(tmp_path, tokens):
    """A directory whose unquantized tensors are bfloat16 (``quipsharp quantize --dtype bfloat16``)."""
    model = tiny_model("gpt2").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16  # as after from_pretrained(..., dtype=torch.bfloat16)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), nsamples=CALIB_SAMPLES, ctx=CALIB_CTX,
                              batch_size=CALIB_SAMPLES)
    model, reports = quantize_model(model, config, calibration_tokens(CALIB_SAMPLES, CALIB_CTX), progress=False)
    path = save_quantized(model, tmp_path / "bf16", config=config, reports=reports)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(logits(loaded, tokens), logits(load_quantized(path), tokens))


def test_auto_model_loads_the_base_model(quantized_dirs, tokens):
    path = quantized_dirs["llama"]
    reference = load_quantized(path).base_model
    model = AutoModel.from_pretrained(path)
    assert quantized_names(model) == quantized_names(reference)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).last_hidden_state, reference(input_ids=tokens).last_hidden_state)


def test_newer_format_version_is_refused(quantized_dirs, tmp_path):
    def bump(qc):
        qc["format_version"] = FORMAT_VERSION + 1

    path = copy_with_config(quantized_dirs["llama"], tmp_path / "newer", bump)
    with pytest.raises(ModelLoadError, match=f"format version {FORMAT_VERSION + 1}; this quipsharp reads up to"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unreadable_quantization_config_is_refused(quantized_dirs, tmp_path):
    def newer_run_config(qc):
        qc["config"]["version"] = ModelQuantConfig.VERSION + 1

    path = copy_with_config(quantized_dirs["llama"], tmp_path / "newer-config", newer_run_config)
    with pytest.raises(ModelLoadError, match="quantization config is not readable"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_quantized_tensor_is_refused(quantized_dirs, tmp_path):
    path = tmp_path / "missing"
    shutil.copytree(quantized_dirs["qwen2"], path)
    weights = path / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.layers.1.mlp.up_proj.su"}
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ModelLoadError, match=r"missing tensors: \['model\.layers\.1\.mlp\.up_proj\.su'\]"):
        AutoModelForCausalLM.from_pretrained(path)


def test_codes_of_another_codebook_are_refused(quantized_dirs, tmp_path):
    name = "model.layers.0.mlp.up_proj"

    def wrong_bits(qc):
        qc["modules"][name]["bits"] = 4

    def wrong_bits_and_codebook(qc):
        qc["modules"][name].update(bits=4, codebook="E8P12RVQ4B")

    path = copy_with_config(quantized_dirs["llama"], tmp_path / "wrong-bits", wrong_bits)
    with pytest.raises(ModelLoadError, match=f"module '{name}' is recorded with codebook E8P12 but the config "
                                             "selects E8P12RVQ4B"):
        AutoModelForCausalLM.from_pretrained(path)
    # a consistent edit is caught by the settings saved with the weights ...
    path = copy_with_config(quantized_dirs["llama"], tmp_path / "wrong-both", wrong_bits_and_codebook)
    with pytest.raises(ModelLoadError, match=rf"differs from the one saved with the weights \(modules\.{name}\.bits: "
                                             r"saved 2, config.json 4\)"):
        AutoModelForCausalLM.from_pretrained(path)
    # ... and, without them (a directory written by transformers), by the tensors' shapes
    weights = path / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "quantization_config"}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(weights), metadata=metadata)
    for load in (AutoModelForCausalLM.from_pretrained, load_quantized):
        with pytest.raises(ModelLoadError, match=rf"{name}\.codes is uint8 \[128, 16\], expected uint8 \[128, 32\]"):
            load(path)


def test_plain_directory_still_loads_normally(tmp_path, tokens):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "plain")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert not quantized_names(loaded)
    assert getattr(loaded, "hf_quantizer", None) is None
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_quantization_config_round_trips(quantized_dirs):
    config_cls, _ = register_with_transformers()
    assert register_with_transformers()[0] is config_cls  # idempotent
    assert quipsharp.hf_quantizer.QuipSharpQuantizationConfig is config_cls
    stored = json.loads((quantized_dirs["qwen2"] / CONFIG_FILE).read_text())["quantization_config"]
    config = config_cls.from_dict(stored)
    assert config.to_dict() == stored == dict(config)
    assert config.layer_config("model.layers.1.mlp.down_proj").bits == 4


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_registers_without_importing_transformers(transformers_first):
    """``import quipsharp`` alone does not import transformers, yet from_pretrained finds the quantizer,
    whichever of the two is imported first."""
    script = "\n".join([
        "import sys",
        "import transformers.quantizers.auto" if transformers_first else "",
        "import quipsharp",
        "assert ('transformers' in sys.modules) == " + str(transformers_first),
        "from transformers import AutoModelForCausalLM",
        "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING",
        f"assert AUTO_QUANTIZER_MAPPING[{QUANT_METHOD!r}].__module__ == 'quipsharp.hf_quantizer'",
        f"assert AUTO_QUANTIZATION_CONFIG_MAPPING[{QUANT_METHOD!r}].__module__ == 'quipsharp.hf_quantizer'",
    ])
    pythonpath = os.pathsep.join(p for p in (SRC_DIR, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
