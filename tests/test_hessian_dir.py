"""Reusable Hessians (issue 16 item 2): ``quipsharp hessians``, ``merge-hessians`` and ``quantize --hessians``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from quipsharp.cli import main
from quipsharp.hessian_dir import MANIFEST, HessianDirError, open_hessians

NSAMPLES, CTX = 4, 32


def hessians_args(model_dir, calib_file, out, seed=0):
    return ["hessians", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--nsamples", str(NSAMPLES),
            "--ctx", str(CTX), "--seed", str(seed), "--batch-size", "2", "--quiet"]


def quantize_args(model_dir, out, *source):
    return ["quantize", str(model_dir), "--out", str(out), "--bits", "2", "--nsamples", str(NSAMPLES), "--ctx",
            str(CTX), "--batch-size", "2", "--quiet", *source]


@pytest.fixture(scope="module")
def shards(model_dir, calib_file, tmp_path_factory):
    """Hessian directories of two calibration shards (seeds 0 and 1) of the tiny Llama."""
    root = tmp_path_factory.mktemp("hessians")
    for seed in (0, 1):
        assert main(hessians_args(model_dir, calib_file, root / f"h{seed}", seed)) == 0
    return root / "h0", root / "h1"


def test_quantizing_with_saved_hessians_equals_the_original_inputs_mode(model_dir, calib_file, shards, tmp_path):
    with_dir, with_calib = tmp_path / "a", tmp_path / "b"
    assert main(quantize_args(model_dir, with_dir, "--hessians", str(shards[0]))) == 0
    assert main(quantize_args(model_dir, with_calib, "--calib", str(calib_file), "--hessian-inputs", "original")) == 0
    a, b = load_file(str(with_dir / "model.safetensors")), load_file(str(with_calib / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (with_dir / "README.md").read_text()
    assert "original inputs" in card and str(shards[0]) in card


def test_merged_shards_equal_one_run_over_all_windows_bit_for_bit(model_dir, calib_file, shards, tmp_path):
    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.hf import load_model
    from quipsharp.pipeline import collect_model_hessians

    merged = tmp_path / "merged"
    assert main(["merge-hessians", str(shards[1]), str(shards[0]), "--out", str(merged)]) == 0
    model, tokenizer = load_model(model_dir)
    docs = read_documents(calib_file)
    windows = torch.cat([calibration_windows(docs, tokenizer, NSAMPLES, CTX, seed) for seed in (0, 1)])
    at_once: list[dict] = []
    collect_model_hessians(model, windows, 2, lambda i, groups, h: at_once.append(h), progress=False)
    source = open_hessians([merged])
    on_the_fly = open_hessians([shards[0], shards[1]])
    for i, want in enumerate(at_once):
        for got in (source.block(i), on_the_fly.block(i)):
            assert got.keys() == want.keys()
            for name, acc in want.items():
                assert torch.equal(got[name].xtx_bins, acc.xtx_bins), f"block {i} {name}"
                assert torch.equal(got[name].xsum_bins, acc.xsum_bins) and got[name].count == acc.count
    manifest = json.loads((merged / MANIFEST).read_text())
    assert sorted(s["windows"] for s in manifest["shards"]) == [NSAMPLES, NSAMPLES]


def test_refusals(model_dir, calib_file, shards, tmp_path, capsys):
    from tests.tiny_models import save_tiny_model_dir

    # the same shard twice would count its tokens twice
    assert main(["merge-hessians", str(shards[0]), str(shards[0]), "--out", str(tmp_path / "m")]) == 2
    assert "count twice" in capsys.readouterr().err
    # another model (other weights): refused before anything is written
    other = save_tiny_model_dir(tmp_path / "other", seed=7)
    assert main(quantize_args(other, tmp_path / "q", "--hessians", str(shards[0]))) == 2
    assert "the model's weights differ" in capsys.readouterr().err and not (tmp_path / "q").exists()
    # other settings
    assert main(quantize_args(model_dir, tmp_path / "q", "--hessians", str(shards[0]), "--dtype", "bfloat16")) == 2
    assert "--dtype float32" in capsys.readouterr().err
    assert main(quantize_args(model_dir, tmp_path / "q", "--hessians", str(shards[0]), "--calib", str(calib_file))) == 2
    assert "not both" in capsys.readouterr().err
    assert main(quantize_args(model_dir, tmp_path / "q", "--hessians", str(shards[0]), "--finetune", "block")) == 2
    assert "--finetune needs calibration text" in capsys.readouterr().err
    # not a Hessian directory; a damaged one
    assert main(quantize_args(model_dir, tmp_path / "q", "--hessians", str(model_dir))) == 2
    assert "not a quipsharp Hessian directory" in capsys.readouterr().err
    damaged = shutil.copytree(shards[0], tmp_path / "damaged")
    manifest = json.loads((damaged / MANIFEST).read_text())
    manifest["blocks"][1]["groups"][0]["tokens"] += 1
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    assert main(quantize_args(model_dir, tmp_path / "q", "--hessians", str(damaged))) == 2
    assert "damaged" in capsys.readouterr().err and not (tmp_path / "q").exists()
    (damaged / manifest["blocks"][0]["groups"][0]["file"]).unlink()
    with pytest.raises(HessianDirError, match="no Hessian file"):
        open_hessians([damaged]).block(0)
    # a tokenizer that maps text to other ids
    identity = open_hessians([shards[0]]).identity
    with pytest.raises(HessianDirError, match="the tokenizer"):
        open_hessians([shards[0]]).check_model({**identity, "tokenizer": "0" * 64})


def test_outputs_are_never_replaced_unasked(model_dir, calib_file, shards, tmp_path, capsys, monkeypatch):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(hessians_args(model_dir, calib_file, keep)) == 2
    assert "not a quipsharp Hessian directory" in capsys.readouterr().err
    assert (keep / "notes.txt").read_text() == "mine"
    copy = shutil.copytree(shards[0], tmp_path / "copy")
    assert main(hessians_args(model_dir, calib_file, copy)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a run that fails half way leaves the old directory as it was and no staging directory behind
    import quipsharp.pipeline as pipeline

    real = pipeline.collect_hessians
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed in block 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "collect_hessians", failing)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([*hessians_args(model_dir, calib_file, copy, seed=1), "--overwrite"]) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert json.loads((copy / MANIFEST).read_text()) == json.loads((shards[0] / MANIFEST).read_text())
