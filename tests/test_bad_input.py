"""Bad input gets one clear line and exit code 2, before work starts where it can (issue 13 items 4-5)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp import limits
from quipsharp.cli import EXIT_UNEXPECTED, main
from quipsharp.limits import LimitError, generation_length, kv_cache_bytes
from tests.tiny_models import TEXT, save_tiny_model_dir

QUANTIZE = ["--bits", "2", "--nsamples", "4", "--ctx", "32", "--quiet"]


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory) -> Path:
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path_factory.mktemp("q") / "q2"
    assert main(["quantize", str(model_dir), "--out", str(out), "--calib", str(calib), *QUANTIZE]) == 0
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(TEXT)
    return path


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quipsharp:")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("quipsharp: error:")
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "ppl", "m", "--data", "d", "--ctx", "1"], "argument --ctx: must be ≥ 2, got 1"),
    (["eval", "ppl", "m", "--data", "d", "--ctx", "0"], "argument --ctx: must be ≥ 2, got 0"),
    (["eval", "ppl", "m", "--data", "d", "--batch-size", "0"], "argument --batch-size: must be ≥ 1"),
    (["eval", "ppl", "m", "--data", "d", "--step", "-3"], "argument --step: must be ≥ 1"),
    (["quantize", "m", "--out", "o", "--batch-size", "0"], "argument --batch-size: must be ≥ 1"),
    (["quantize", "m", "--out", "o", "--damping", "inf"], "expected a finite number"),
    (["quantize", "m", "--out", "o", "--ft-lr", "nan"], "expected a finite number"),
    (["generate", "m", "--prompt", "x", "--temperature", "nan"], "expected a finite number"),
    (["generate", "m", "--prompt", "x", "--temperature", "-1"], "must be ≥ 0"),
    (["generate", "m", "--prompt", "x", "--max-new-tokens", "0"], "must be ≥ 1"),
    (["bench", "m", "--runs", "x"], "expected an integer, got 'x'"),
    (["nonsense"], "invalid choice"),
])
def test_numeric_options_are_checked_at_parse_time(argv, message, capsys):
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line and line.endswith("(see --help)")


def test_binary_or_non_utf8_calibration_text_is_refused_before_the_model_loads(model_dir, tmp_path, capsys,
                                                                              monkeypatch):
    import quipsharp.hf

    monkeypatch.setattr(quipsharp.hf, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    binary = tmp_path / "calib.txt"
    binary.write_bytes(b"some text\n" + bytes(range(256)))
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--calib", str(binary), *QUANTIZE]) == 2
    assert "is not a text file (NUL byte at offset 10)" in one_error_line(capsys)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + b"\xe9\"}\n")
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--calib", str(latin1), *QUANTIZE]) == 2
    assert "is not UTF-8 text (invalid byte at offset 13)" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_eval_refuses_binary_text_and_windows_beyond_the_models_positions(tmp_path, text_file, capsys):
    opt = save_tiny_model_dir(tmp_path / "opt", arch="opt")  # OPT: learned positions, an IndexError before
    assert main(["eval", "ppl", str(opt), "--data", str(text_file), "--ctx", "300"]) == 2
    assert "--ctx 300 is longer than the model's 256 positions" in one_error_line(capsys)
    binary = tmp_path / "eval.bin"
    binary.write_bytes(b"\x00\x01")
    assert main(["eval", "ppl", str(opt), "--data", str(binary), "--ctx", "64"]) == 2
    assert "NUL byte at offset 0" in one_error_line(capsys)


def test_quantize_refuses_calibration_windows_beyond_the_models_positions(model_dir, text_file, tmp_path, capsys):
    argv = ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--calib", str(text_file), "--ctx", "512"]
    assert main(argv) == 2
    assert "--ctx 512 is longer than the model's 256 positions" in one_error_line(capsys)


def test_generation_is_capped_by_the_models_positions(quantized_dir, capsys, caplog):
    assert main(["generate", str(quantized_dir), "--prompt", "The quick", "--max-new-tokens", "1000000",
                 "--head-dtype", "model"]) == 0
    assert "generating 247 tokens, not 1000000: the model attends to at most 256 positions" in caplog.text
    assert len(capsys.readouterr().out) > 0


def test_an_empty_prompt_is_refused(quantized_dir, capsys):
    for engine in ("lean", "transformers"):
        assert main(["generate", str(quantized_dir), "--prompt", "", "--engine", engine]) == 2
        assert "the prompt is empty" in one_error_line(capsys)


def test_a_prompt_that_is_not_utf8_is_refused(quantized_dir, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python passes invalid bytes in argv
    assert main(["generate", str(quantized_dir), "--prompt", bad]) == 2
    assert "--prompt is not valid UTF-8 text (byte 3 of the argument)" in one_error_line(capsys)


def test_a_kv_cache_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    config = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                             max_position_embeddings=8192)
    assert kv_cache_bytes(config, 1000) == 2 * 30 * 3 * 64 * 1000 * 4
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 100 * 2**20)
    assert generation_length(config, 10, 50) == 50  # 2.3 MB: fits
    with pytest.raises(LimitError, match=r"a KV cache of 8192 positions needs 0\.4 GiB but only 0\.1 GiB"):
        generation_length(config, 10, 10**6)  # capped to 8182 new tokens, still too big for 100 MiB
    with pytest.raises(LimitError, match="attends to at most 8192"):
        generation_length(config, 8192, 1)


@pytest.mark.parametrize(("value", "message"), [
    (float("nan"), "model.norm.weight holds 64 non-finite values: the weights are damaged"),  # refused at load
    (3e38, "perplexity is nan: the model's logits are not finite"),  # finite weights whose logits overflow
])
def test_non_finite_weights_or_perplexity_are_errors_not_numbers(quantized_dir, text_file, tmp_path, capsys,
                                                                 value, message):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    damaged = Path(shutil.copytree(quantized_dir, tmp_path / "damaged"))
    with safe_open(str(damaged / "model.safetensors"), framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], value)
    save_file(state, str(damaged / "model.safetensors"), metadata=metadata)
    (damaged / "quipsharp_checksums.json").unlink()  # (the checksum would catch it first: test what is behind it)
    code = main(["eval", "ppl", str(damaged), "--data", str(text_file), "--ctx", "64", "--max-windows", "1"])
    assert code == 2
    assert message in one_error_line(capsys)


def test_unexpected_errors_are_one_line_unless_verbose(monkeypatch, capsys):
    import quipsharp.cli

    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(quipsharp.cli, "cmd_inspect", boom)
    assert main(["inspect", "x"]) == EXIT_UNEXPECTED
    line = one_error_line(capsys)
    assert line == "quipsharp: error: unexpected RuntimeError: kernel exploded (run with -v for the traceback)"
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["inspect", "x", "-v"])  # -v after the subcommand works too


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("quipsharp ")
