"""Never lose a user's data: outputs, work directories, locks, leftovers and honest resume (issue 13)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from quipsharp import outputs
from quipsharp.cli import main
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.hf import CONFIG_FILE, WEIGHTS_FILE, load_quantized, save_quantized
from quipsharp.outputs import STAGING_INFIX, WORK_MARKER, LockedError, OutputError, WorkDir, check_output, locked
from quipsharp.pipeline import PROGRESS_FILE, quantize_model
from tests.tiny_models import tiny_model

ARGS = ["--bits", "2", "--nsamples", "4", "--ctx", "32", "--quiet"]


@pytest.fixture(scope="module")
def qmodel():
    """A 2-bit tiny Llama, quantized once for the library tests."""
    return quantize_model(tiny_model("llama"), ModelQuantConfig(layer=QuIPSharpConfig(bits=2)), progress=False)[0]


RESUME_CONFIG = ModelQuantConfig(layer=QuIPSharpConfig(bits=2))


def resume_calibration() -> torch.Tensor:
    return torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def finished_work(tmp_path_factory) -> tuple[Path, nn.Module]:
    """The work directory of a run killed after its last block (before saving), and its model."""
    work = tmp_path_factory.mktemp("resume") / "w"
    model, _ = quantize_model(tiny_model("llama"), RESUME_CONFIG, resume_calibration(), work_dir=work, progress=False)
    return work, model


def quantize(model_dir, calib_file, out, *extra, capsys=None):
    code = main(["quantize", str(model_dir), "--out", str(out), "--calib", str(calib_file), *ARGS, *extra])
    if code == 0 and capsys is not None:
        capsys.readouterr()  # the loader's progress output: not what the error checks read
    return code


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: what must not change."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("quipsharp: error:") and "\n" not in err, err
    return err


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if STAGING_INFIX in p.name or p.name.endswith(outputs.LOCK_SUFFIX)]


# --------------------------------------------------------------------------- outputs
def test_a_directory_with_a_users_files_is_refused_and_untouched(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree(out)
    for extra in ([], ["--overwrite"]):
        assert quantize(model_dir, calib_file, out, *extra) == 2
        assert "is not a quipsharp model directory: refusing to replace it" in error_line(capsys)
        assert tree(out) == before


def test_the_input_model_is_never_the_output(model_dir, calib_file, tmp_path, capsys):
    before = tree(model_dir)
    for out in (model_dir, model_dir.parent):
        assert quantize(model_dir, calib_file, out, "--overwrite") == 2
        assert "the input" in error_line(capsys)
    assert tree(model_dir) == before


def test_a_file_is_never_replaced_by_a_directory(model_dir, calib_file, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert quantize(model_dir, calib_file, target, "--overwrite") == 2
    assert "exists and is not a directory" in error_line(capsys)
    assert target.read_text() == "keep me"
    assert quantize(model_dir, calib_file, calib_file, "--overwrite") == 2  # nor the calibration text
    assert "the input" in error_line(capsys)


def test_the_current_directory_is_refused(model_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        assert quantize(model_dir, calib_file, out) == 2
        assert "current directory" in error_line(capsys)


def test_an_unwritable_output_is_refused_before_any_work(model_dir, calib_file, capsys, monkeypatch):
    import quipsharp.hf

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(quipsharp.hf, "load_model", must_not_load)
    assert quantize(model_dir, calib_file, "/proc/quipsharp-out") == 2  # /proc: not writable, even by root
    assert "cannot write to /proc" in error_line(capsys)


def test_overwrite_replaces_only_a_quipsharp_model_and_leaves_nothing_behind(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(model_dir, calib_file, out, capsys=capsys) == 0
    first = tree(out)
    assert quantize(model_dir, calib_file, out) == 2
    assert "pass --overwrite" in error_line(capsys)
    assert tree(out) == first
    assert quantize(model_dir, calib_file, out, "--overwrite", "--seed", "1", capsys=capsys) == 0
    assert tree(out) != first and load_quantized(out) is not None
    assert no_leftovers(tmp_path) == [] and not (tmp_path / "q.quipsharp-work").exists()


def test_an_empty_directory_is_used(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert quantize(model_dir, calib_file, out, capsys=capsys) == 0
    assert (out / WEIGHTS_FILE).is_file()


def test_the_library_refuses_to_replace_without_overwrite(tmp_path, qmodel):
    model = qmodel
    out = save_quantized(model, tmp_path / "q")
    with pytest.raises(OutputError, match="pass --overwrite"):
        save_quantized(model, out)
    assert save_quantized(model, out, overwrite=True) == out.resolve()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="not a quipsharp model"):
        save_quantized(model, tmp_path / "user", overwrite=True)
    assert (tmp_path / "user" / "a.txt").read_text() == "x"


def test_replace_without_atomic_exchange(tmp_path, qmodel, monkeypatch):
    model = qmodel
    out = save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(outputs, "_rename_exchange", lambda a, b: False)
    save_quantized(model, out, overwrite=True)
    assert load_quantized(out) is not None and no_leftovers(tmp_path) == []


def test_files_get_the_umasks_modes(tmp_path, qmodel):
    model = qmodel
    old = os.umask(0o022)
    try:
        out = save_quantized(model, tmp_path / "q")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / WEIGHTS_FILE).stat().st_mode) == 0o644
    assert stat.S_IMODE((out / CONFIG_FILE).stat().st_mode) == 0o644


# --------------------------------------------------------------------------- leftovers and locks
def test_leftovers_of_a_crashed_save_are_cleaned_and_a_parked_model_restored(tmp_path, qmodel):
    model = qmodel
    out = save_quantized(model, tmp_path / "q")
    stale = tmp_path / f".q{STAGING_INFIX}abc123"
    stale.mkdir()
    (stale / WEIGHTS_FILE).write_bytes(b"half a file")
    other = tmp_path / f".q.other{STAGING_INFIX}xyz"  # another output's staging: not ours to touch
    other.mkdir()
    save_quantized(model, out, overwrite=True)
    assert not stale.exists() and other.exists()
    parked = tmp_path / ".q.old"  # where quipsharp 0.1 parked the old output mid-replace
    out.rename(parked)
    with locked(out):
        messages = outputs.recover_leftovers(out)
    assert out.is_dir() and not parked.exists() and "restored" in messages[0]


def _hold_lock_in_child(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from quipsharp.outputs import locked\n"
            f"with locked({str(path)!r}):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_the_same_output_is_refused_while_the_first_lives(model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    proc = _hold_lock_in_child(out)
    try:
        assert quantize(model_dir, calib_file, out) == 2
        assert f"in use by pid {proc.pid}" in error_line(capsys)
        assert not out.exists()
    finally:
        proc.kill()  # a killed holder leaves its lock file behind; the kernel has dropped the lock
        proc.wait()
    assert outputs.lock_path(out.resolve()).exists()
    assert quantize(model_dir, calib_file, out, capsys=capsys) == 0
    assert not outputs.lock_path(out.resolve()).exists()


def test_locks_are_reentrant_and_exclusive(tmp_path):
    target = tmp_path / "d"
    with locked(target), locked(target):
        code = f"from quipsharp.outputs import locked\nwith locked({str(target)!r}): pass"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "LockedError" in proc.stderr
    with locked(target):
        pass
    with pytest.raises(LockedError):
        proc = _hold_lock_in_child(target)
        try:
            with locked(target):
                pass
        finally:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- work directories
def test_a_users_work_dir_is_never_removed(model_dir, calib_file, tmp_path, capsys):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "notes.md").write_text("mine")
    assert quantize(model_dir, calib_file, tmp_path / "q", "--work-dir", str(work)) == 2
    assert "holds files quipsharp did not write" in error_line(capsys)
    assert tree(work) == {"notes.md": b"mine"}
    (work / "notes.md").unlink()
    assert quantize(model_dir, calib_file, tmp_path / "q", "--work-dir", str(work)) == 0
    assert work.is_dir() and list(work.iterdir()) == []  # our files gone, the user's directory kept


def test_progress_of_an_interrupted_run_is_not_discarded_without_resume(model_dir, calib_file, finished_work, tmp_path,
                                                                        capsys):
    work, _ = finished_work
    config = RESUME_CONFIG
    before = tree(work)
    assert quantize(model_dir, calib_file, tmp_path / "q", "--work-dir", str(work)) == 2
    assert "pass --resume" in error_line(capsys)
    assert tree(work) == before
    with pytest.raises(OutputError, match="pass --resume"):
        quantize_model(tiny_model("llama"), config, work_dir=work, progress=False)
    assert tree(work) == before


def test_work_dir_rules(tmp_path):
    created = WorkDir(tmp_path / "new")
    created.create()
    (created.path / PROGRESS_FILE).write_text("{}")
    created.cleanup()
    assert not created.path.exists()
    (tmp_path / "given").mkdir()
    given = WorkDir(tmp_path / "given")
    given.create()
    assert json.loads((given.path / WORK_MARKER).read_text())["created"] is False
    given.cleanup()
    assert given.path.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        WorkDir(tmp_path / "file")


def test_check_output_names_the_problem(tmp_path):
    assert check_output(tmp_path / "new") == (tmp_path / "new").resolve()
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model.gguf").write_text("x")
    with pytest.raises(OutputError, match="contains the input"):
        check_output(tmp_path, inputs=(tmp_path / "dir" / "model.gguf",))


# --------------------------------------------------------------------------- honest resume
@pytest.mark.parametrize(("change", "words"), [
    ("weights", "the source model's weights"),
    ("calibration", "the calibration tokens"),
    ("settings", "the quantization settings"),
])
def test_resume_refuses_a_different_run_naming_what_differs(finished_work, change, words):
    work, _ = finished_work
    before = tree(work)
    model, config, calibration = tiny_model("llama"), RESUME_CONFIG, resume_calibration()
    if change == "weights":  # same architecture, one weight nudged: a different checkpoint
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    elif change == "calibration":
        calibration[0, 0] += 1
    else:
        config = ModelQuantConfig(layer=QuIPSharpConfig(bits=3))
    with pytest.raises(ValueError, match=words) as err:
        quantize_model(model, config, calibration, work_dir=work, resume=True, progress=False)
    assert sum(w in str(err.value) for w in ("weights", "calibration tokens", "settings")) == 1
    assert tree(work) == before


def test_resume_of_the_same_run_is_accepted(finished_work, tmp_path):
    work = shutil.copytree(finished_work[0], tmp_path / "w")
    again, _ = quantize_model(tiny_model("llama"), RESUME_CONFIG, resume_calibration(), work_dir=work, resume=True,
                              progress=False)
    a, b = finished_work[1].state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_old_progress_without_content_hashes_is_refused(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / PROGRESS_FILE).write_text(json.dumps({"fingerprint": "abc", "blocks": []}))
    with pytest.raises(ValueError, match="older quipsharp"):
        quantize_model(tiny_model("llama"), ModelQuantConfig(), work_dir=work, resume=True, progress=False)


def test_a_damaged_block_file_in_the_work_dir_is_a_clear_error(finished_work, tmp_path):
    work = shutil.copytree(finished_work[0], tmp_path / "w")
    block = work / "block_00001.safetensors"
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot resume: .*block_00001\.safetensors is damaged"):
        quantize_model(tiny_model("llama"), RESUME_CONFIG, resume_calibration(), work_dir=work, resume=True,
                       progress=False)
