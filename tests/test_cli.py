"""The command line: quantize → inspect → eval → generate, resume after a killed run, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp.cli import main
from quipsharp.pipeline import DEBUG_DELAY_ENV, PROGRESS_FILE
from tests.tiny_models import TEXT

KILL_TIMEOUT_S = 180


def quantize_args(model_dir, calib_file, out):
    return ["quantize", str(model_dir), "--out", str(out), "--bits", "2", "--calib", str(calib_file),
            "--nsamples", "4", "--ctx", "32", "--quiet"]


def test_quantize_inspect_eval_generate(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "q2"
    assert main(quantize_args(model_dir, calib_file, out)) == 0
    assert "quantized 14 layers to 2.00 bits/weight" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits_per_weight"] == 2.0 and info["quantized_layers"] == 14 and len(info["layers"]) == 14
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    assert main(["eval", "ppl", str(out), "--data", str(text), "--ctx", "64", "--max-windows", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"ppl", "ctx", "windows", "tokens"}
    assert result["windows"] == 3 and result["ctx"] == 64 and result["tokens"] == 3 * 63
    assert 1 < result["ppl"] < 1e4
    texts = {}
    for engine in ("lean", "transformers"):
        assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5", "--engine", engine,
                     "--head-dtype", "model"]) == 0
        texts[engine] = capsys.readouterr().out
    assert texts["lean"].strip() != "" and texts["lean"] == texts["transformers"]  # greedy: the same tokens
    for dtype, engine in (("float32", "auto"), ("bfloat16", "auto"), ("float32", "transformers")):
        assert main(["bench", str(out), "--threads", "1", "--new-tokens", "4", "--prompt-tokens", "8", "--runs", "2",
                     "--dtype", dtype, "--engine", engine, "--json"]) == 0
        speed = json.loads(capsys.readouterr().out)
        assert speed["engine"] == ("lean" if engine == "auto" else engine)
        assert speed["head_dtype"] == ("int8" if engine == "auto" else "model")  # auto: int8 head, quantized
        assert {"decode_tok_s", "prefill_tok_s", "threads", "peak_rss_mb"} <= set(speed)
        assert speed["threads"] == 1 and speed["decode_tok_s"] > 0 and speed["prefill_tok_s"] > 0
        assert len(speed["decode_tok_s_runs"]) == 2 and speed["peak_rss_mb"] > 0
    assert main(["bench", str(out), "--threads", "0"]) == 2
    expected = "quipsharp: error: bench: argument --threads: must be ≥ 1, got 0 (see --help)"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "/nonexistent/model", "--out", "x", "--data-free"], "model not found"),
        (["eval", "ppl", "/nonexistent/dir", "--data", __file__], "model not found"),
        (["eval", "ppl", "/nonexistent/dir", "--data", "/nonexistent/x.txt"], "evaluation file not found"),
        (["inspect", "/nonexistent/dir"], "no config.json"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quipsharp: error:") and message in err and "\n" not in err


def test_option_errors(model_dir, calib_file, tmp_path, capsys):
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "o")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main([*quantize_args(model_dir, calib_file, tmp_path / "o"), "--bits-map", "nonsense"]) == 2
    assert "REGEX=BITS" in capsys.readouterr().err
    assert main([*quantize_args(model_dir, calib_file, tmp_path / "o"), "--bits-map", "mlp=5"]) == 2
    assert "bits must be one of" in capsys.readouterr().err
    missing_calib = ["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--calib", str(tmp_path / "no.jsonl")]
    assert main(missing_calib) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "ppl", str(model_dir), "--data", str(tmp_path / "none.txt")]) == 2
    assert "evaluation file not found" in capsys.readouterr().err


def _run_cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "quipsharp.cli", *args], env=env, **kwargs)


def kill_after_first_block(argv, out):
    """Run ``quipsharp ARGV`` (writing ``out``) slowed after every block and kill it as soon as its work
    directory records a finished block (or after KILL_TIMEOUT_S); returns the progress file's path."""
    proc = _run_cli(argv, env={**os.environ, DEBUG_DELAY_ENV: "5"})
    progress = out.with_name(out.name + ".quipsharp-work") / PROGRESS_FILE
    deadline = time.time() + KILL_TIMEOUT_S
    while not progress.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return progress


def test_bfloat16_unquantized_tensors_halve_their_size(model_dir, calib_file, tmp_path, capsys):
    from safetensors.torch import load_file

    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    assert main(quantize_args(model_dir, calib_file, f32)) == 0
    capsys.readouterr()
    assert main([*quantize_args(model_dir, calib_file, bf16), "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # --json: one object and nothing else on stdout
    assert result["out"] == str(bf16.resolve()) and result["quantized_layers"] == 14
    assert result["codes_bits_per_weight"] == 2.0
    assert result["disk_bytes"] == (bf16 / "model.safetensors").stat().st_size
    a, b = load_file(str(f32 / "model.safetensors")), load_file(str(bf16 / "model.safetensors"))
    assert a["model.embed_tokens.weight"].dtype == torch.float32
    assert b["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert b["model.layers.0.mlp.down_proj.codes"].dtype == torch.uint8
    assert (bf16 / "model.safetensors").stat().st_size < 0.75 * (f32 / "model.safetensors").stat().st_size
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    assert main(["eval", "ppl", str(bf16), "--data", str(text), "--ctx", "64", "--max-windows", "2", "--json"]) == 0
    assert 1 < json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] < 1e4


def _options(parser, command=()):
    """``(command, action)`` for every option and positional of every subcommand."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*command, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield command, action


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from quipsharp.cli import build_parser

    options = list(_options(build_parser()))
    assert len(options) > 60
    for command, action in options:
        name = " ".join(command) + " " + (action.option_strings or [action.dest])[-1]
        assert action.help, f"{name} has no help text"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in action.help, f"{name} does not show its default ({action.default!r})"


def test_resume_after_killed_run_gives_identical_files(model_dir, calib_file, tmp_path):
    from safetensors.torch import load_file

    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _run_cli(quantize_args(model_dir, calib_file, ref)).wait() == 0
    progress = kill_after_first_block(quantize_args(model_dir, calib_file, out), out)
    assert progress.is_file(), "the run never completed a block"
    assert len(json.loads(progress.read_text())["blocks"]) == 1
    assert not out.exists()
    resumed = _run_cli(["-v", *quantize_args(model_dir, calib_file, out), "--resume"],
                       stderr=subprocess.PIPE, text=True)
    _, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert "resuming after 1 completed blocks" in stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv", [["inspect", "q-v1"], ["inspect", "q-v1", "--json"], ["--help"]])
def test_a_closed_pipe_is_not_an_error(argv):
    """``quipsharp inspect DIR | head``: the reader leaving early gives no traceback and exit code 0."""
    from tests.golden import QUANT_DIR

    argv = [str(QUANT_DIR) if a == "q-v1" else a for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "quipsharp.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err
