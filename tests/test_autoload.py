"""Never silent garbage (issue 15 item 1): a quipsharp directory loads through transformers only with
quipsharp (imported, or via the saved autoload module with ``trust_remote_code=True``); plain
transformers refuses it instead of filling the quantized layers with random weights; every way to
save writes such a directory."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.format import (
    AUTOLOAD_FILE,
    AUTOLOAD_REF,
    BASE_MODEL_TYPE_KEY,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    GUARD_MODEL_TYPE,
    ModelLoadError,
    guard_config,
    read_config,
    unguard_config,
    verify_checksums,
)
from quipsharp.hf import QuipSharpSavePretrained, load_quantized, save_quantized
from quipsharp.outputs import OutputError
from quipsharp.pipeline import quantize_model
from tests.golden import QUANT_DIR
from tests.tiny_models import calibration_tokens, tiny_model

CALIB_SAMPLES, CALIB_CTX = 4, 16
REPO = Path(__file__).resolve().parents[1]
#: Makes ``import quipsharp`` fail as it does where quipsharp is not installed.
HIDE_QUIPSHARP = textwrap.dedent("""
    import importlib.abc, sys
    class _NoQuipsharp(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "quipsharp" or name.startswith("quipsharp."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _NoQuipsharp())
""")


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return calibration_tokens(2, CALIB_CTX, seed=1)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``(model from quantize_model, its config, directory written by save_quantized)``."""
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), bits_map=((r"mlp\.down_proj", 3),),
                              nsamples=CALIB_SAMPLES, ctx=CALIB_CTX, batch_size=CALIB_SAMPLES)
    model, reports = quantize_model(tiny_model("llama"), config, calibration_tokens(CALIB_SAMPLES, CALIB_CTX),
                                    progress=False)
    path = save_quantized(model, tmp_path_factory.mktemp("autoload") / "q", config=config, reports=reports,
                          source="tiny-llama")
    return model, config, path


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no quipsharp imported unless the code does), stdin closed
    (transformers' remote-code prompt then refuses at once), module cache under ``tmp_path``."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600, cwd=tmp_path)


def test_saved_config_is_guarded_and_reads_back_unguarded(quantized):
    _, config, path = quantized
    raw = json.loads((path / CONFIG_FILE).read_text())
    assert raw["model_type"] == GUARD_MODEL_TYPE and raw[BASE_MODEL_TYPE_KEY] == "llama"
    assert raw["auto_map"] == {"AutoConfig": AUTOLOAD_REF}
    assert raw["quantization_config"]["format_version"] == FORMAT_VERSION == 3
    assert (path / AUTOLOAD_FILE).is_file()
    assert verify_checksums(path) == []  # the autoload module is listed too
    unguarded, qc = read_config(path)
    assert unguarded["model_type"] == "llama" and "auto_map" not in unguarded and BASE_MODEL_TYPE_KEY not in unguarded
    assert ModelQuantConfig.from_dict(qc["config"]) == config and qc["source_model"] == "tiny-llama"


def test_guard_round_trips_and_keeps_other_auto_classes():
    config = {"model_type": "llama", "hidden_size": 8, "auto_map": {"AutoTokenizer": "x.Tok"}}
    guarded = guard_config(config)
    assert guarded["auto_map"] == {"AutoTokenizer": "x.Tok", "AutoConfig": AUTOLOAD_REF}
    assert guard_config(guarded) == guarded
    assert unguard_config(guarded) == config
    assert unguard_config(config) is config
    with pytest.raises(ModelLoadError, match="no model_type"):
        guard_config({"hidden_size": 8})


def test_damaged_guard_is_refused(quantized, tmp_path):
    path = shutil.copytree(quantized[2], tmp_path / "damaged")
    raw = json.loads((path / CONFIG_FILE).read_text())
    del raw[BASE_MODEL_TYPE_KEY]
    (path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="names no architecture"):
        load_quantized(path)


def test_transformers_without_quipsharp_refuses_and_trust_remote_code_loads(quantized, tokens, tmp_path):
    path = quantized[2]
    torch.save({"tokens": tokens, "logits": logits(load_quantized(path), tokens)}, tmp_path / "expected.pt")
    plain = run_python(f"from transformers import AutoModelForCausalLM\n"
                       f"AutoModelForCausalLM.from_pretrained({str(path)!r})", tmp_path)
    assert plain.returncode != 0
    assert "trust_remote_code=True" in plain.stderr and "import quipsharp" not in plain.stdout
    refused = run_python(f"from transformers import AutoModelForCausalLM\n"
                         f"AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=False)", tmp_path)
    assert refused.returncode != 0 and "trust_remote_code=True" in refused.stderr
    trusted = run_python(textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(input_ids=expected["tokens"]).logits
        print("MODEL", type(model.config).__name__, type(model.model.layers[0].mlp.down_proj).__name__,
              torch.equal(got, expected["logits"]))
    """), tmp_path)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert "MODEL LlamaConfig QuantizedLinear True" in trusted.stdout


def test_trust_remote_code_without_quipsharp_installed_says_what_to_install(quantized, tmp_path):
    result = run_python(HIDE_QUIPSHARP + f"from transformers import AutoModelForCausalLM\n"
                        f"AutoModelForCausalLM.from_pretrained({str(quantized[2])!r}, trust_remote_code=True)",
                        tmp_path)
    assert result.returncode != 0
    assert "pip install quipsharp" in result.stderr


def test_import_quipsharp_registers_the_model_type_before_any_loader(quantized, tmp_path):
    """``AutoConfig`` is used before transformers' quantizer registry is imported (the hook on
    AutoConfig's own module registers the guarded model type)."""
    result = run_python(textwrap.dedent(f"""
        import sys
        import quipsharp
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained({str(quantized[2])!r})
        print("CONFIG", type(config).__name__, config.model_type, config.quantization_config["quant_method"])
    """), tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CONFIG LlamaConfig llama quipsharp" in result.stdout


@pytest.mark.parametrize("loader", ["quantize_model", "load_quantized", "from_pretrained"])
def test_every_save_pretrained_writes_a_quipsharp_directory(loader, quantized, tokens, tmp_path):
    model, config, path = quantized
    expected = logits(load_quantized(path), tokens)
    source = {"quantize_model": lambda: model, "load_quantized": lambda: load_quantized(path),
              "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(path)}[loader]()
    assert isinstance(source.save_pretrained, QuipSharpSavePretrained)
    out = tmp_path / "resaved"
    source.save_pretrained(out)
    raw = json.loads((out / CONFIG_FILE).read_text())
    assert raw["model_type"] == GUARD_MODEL_TYPE and (out / AUTOLOAD_FILE).is_file()
    qc = raw["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION
    assert ModelQuantConfig.from_dict(qc["config"]) == config  # the run's bits_map survives
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 3
    assert qc.get("source_model") == (None if loader == "quantize_model" else "tiny-llama")
    assert torch.equal(logits(load_quantized(out), tokens), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), tokens), expected)


def test_resaved_directory_is_refused_by_plain_transformers(quantized, tmp_path):
    out = tmp_path / "resaved"
    load_quantized(quantized[2]).save_pretrained(out)
    result = run_python(f"from transformers import AutoModelForCausalLM\n"
                        f"AutoModelForCausalLM.from_pretrained({str(out)!r})", tmp_path)
    assert result.returncode != 0 and "trust_remote_code=True" in result.stderr


def test_save_pretrained_over_a_quipsharp_directory_renews_its_checksums(quantized, tokens, tmp_path):
    path = shutil.copytree(quantized[2], tmp_path / "q")
    model = load_quantized(path)
    with torch.no_grad():
        next(m for m in model.modules() if hasattr(m, "wscale")).wscale.mul_(2)  # different weights, same files
    model.save_pretrained(path)
    assert verify_checksums(path) == []
    assert torch.equal(logits(load_quantized(path), tokens), logits(model, tokens))


def test_a_deep_copy_saves_itself(quantized, tokens, tmp_path):
    model = copy.deepcopy(load_quantized(quantized[2]))
    assert model.save_pretrained.model is model
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.save_pretrained(tmp_path / "copy")
    assert torch.equal(logits(load_quantized(tmp_path / "copy"), tokens), logits(model, tokens))


def test_push_to_hub_is_refused_before_writing(quantized, tmp_path):
    with pytest.raises(OutputError, match="push_to_hub"):
        load_quantized(quantized[2]).save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


def test_unguarded_directories_still_load(quantized, tokens, tmp_path):
    """Directories written before the guard (format 1 and 2) load through both loaders."""
    golden = shutil.copytree(QUANT_DIR, tmp_path / "golden")
    assert json.loads((golden / CONFIG_FILE).read_text())["model_type"] != GUARD_MODEL_TYPE
    ids = torch.arange(8).reshape(1, 8)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(golden), ids), logits(load_quantized(golden), ids))
    # an unguarded copy of a new directory (its weights' metadata carries no settings to compare)
    path = shutil.copytree(quantized[2], tmp_path / "old")
    raw = unguard_config(json.loads((path / CONFIG_FILE).read_text()))
    raw["quantization_config"]["format_version"] = 1
    (path / CONFIG_FILE).write_text(json.dumps(raw))
    (path / AUTOLOAD_FILE).unlink()
    (path / CHECKSUMS_FILE).unlink()
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = {k: v for k, v in handle.metadata().items() if k != "quantization_config"}
    save_file(tensors, str(path / "model.safetensors"), metadata=metadata)
    expected = logits(load_quantized(quantized[2]), tokens)
    assert torch.equal(logits(load_quantized(path), tokens), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(path), tokens), expected)


def test_a_sharded_save_pretrained_loads_through_every_loader(quantized, tokens, tmp_path, capsys):
    from quipsharp.card import tensor_bytes_by_kind
    from quipsharp.cli import main

    _, _, path = quantized
    expected = logits(load_quantized(path), tokens)
    out = tmp_path / "sharded"
    load_quantized(path).save_pretrained(out, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert torch.equal(logits(load_quantized(out), tokens), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), tokens), expected)
    assert sum(tensor_bytes_by_kind(out).values()) > 0
    assert main(["inspect", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    shards[-1].unlink()  # a missing shard is named, not a traceback
    with pytest.raises(ModelLoadError, match=f"lists {shards[-1].name}, which is missing"):
        load_quantized(out)
