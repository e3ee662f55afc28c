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


def same_hessian_dirs(a, b) -> bool:
    """Two Hessian directories hold the same identity, shards and sums, bit for bit."""
    x, y = open_hessians([a]), open_hessians([b])
    if x.identity != y.identity or len(x.manifests[0]["blocks"]) != len(y.manifests[0]["blocks"]):
        return False
    for i in range(len(x.manifests[0]["blocks"])):
        p, q = x.block(i), y.block(i)
        if p.keys() != q.keys() or not all(torch.equal(p[n].xtx_bins, q[n].xtx_bins) and p[n].count == q[n].count
                                           for n in p):
            return False
    return True


def test_streamed_hessians_equal_the_loaded_models(model_dir, calib_file, shards, tmp_path, capsys):
    """``hessians --max-memory`` reads one block at a time and writes the directory the loaded model
    gives (identity included, so either quantizes either way); ``quantize --hessians --max-memory``
    writes the loaded run's tensors."""
    streamed = tmp_path / "streamed"
    assert main([*hessians_args(model_dir, calib_file, streamed), "--max-memory", "4GB"]) == 0
    assert same_hessian_dirs(shards[0], streamed)
    assert not list(tmp_path.glob(".streamed*"))  # no staging or spill folder left beside it
    loaded_q, streamed_q = tmp_path / "a", tmp_path / "b"
    assert main(quantize_args(model_dir, loaded_q, "--hessians", str(streamed))) == 0
    assert main(quantize_args(model_dir, streamed_q, "--hessians", str(shards[0]), "--max-memory", "4GB")) == 0
    a, b = load_file(str(loaded_q / "model.safetensors")), load_file(str(streamed_q / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main([*hessians_args(model_dir, calib_file, tmp_path / "c"), "--max-memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory 0.10 GB is too small" in err and "needs about" in err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


def test_streamed_hessians_of_another_model_are_refused(model_dir, calib_file, shards, tmp_path, capsys):
    """The streamed identity digests the weights themselves: a checkpoint with one weight changed differs."""
    from quipsharp.hf import load_model

    model, tokenizer = load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    other = tmp_path / "other"
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(quantize_args(other, tmp_path / "q", "--hessians", str(shards[0]), "--max-memory", "4GB")) == 2
    err = capsys.readouterr().err
    assert "do not fit this run" in err and "weights" in err.split("do not fit this run")[1]
    assert not (tmp_path / "q").exists()


def test_a_spilled_stream_gives_the_same_hessians(model_dir, calib_file, tmp_path):
    """collect_model_hessians on a streamed skeleton with the stream on disk: the loaded model's sums."""
    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.hf import load_model
    from quipsharp.models.source import StreamedWeights, open_streamed
    from quipsharp.pipeline import collect_model_hessians

    model, tokenizer = load_model(model_dir)
    windows = calibration_windows(read_documents(calib_file), tokenizer, 6, CTX, 0)
    want: list[dict] = []
    collect_model_hessians(model, windows, 2, lambda i, groups, h: want.append(h), progress=False)
    skeleton, _, source = open_streamed(model_dir, torch.float32)
    got: list[dict] = []
    collect_model_hessians(skeleton, windows, 2, lambda i, groups, h: got.append(h), progress=False,
                           streamed=StreamedWeights(skeleton, source, torch.float32), spill=tmp_path / "spill")
    assert len(got) == len(want) > 1
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert all(torch.equal(g[n].xtx_bins, w[n].xtx_bins) and g[n].count == w[n].count for n in w)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())  # every block dropped again
    assert not any((tmp_path / "spill").rglob("*.pt"))
