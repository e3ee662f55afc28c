"""Fault injection: kill -9 at every point where quantize, save and fine-tune change files; the output
is then absent, complete, or completed by re-running the same command with ``--resume``, to the
identical result (issue 13 item 7). The points are those of :mod:`quipsharp.faults`.

The default run kills at a seeded sample of the points; ``make test-slow`` kills at every one
(with and without an earlier model being replaced).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from quipsharp.faults import KILL_ENV, LOG_ENV
from quipsharp.format import WEIGHTS_FILE
from quipsharp.hf import load_quantized
from quipsharp.outputs import LOCK_SUFFIX, STAGING_INFIX
from tests.tiny_models import TEXT, save_tiny_model_dir

SAMPLE_SEED = 13
DEFAULT_SAMPLE = 5
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model_dir(root / "model")
    calib = root / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i * 300: (i + 1) * 300]}) for i in range(10)))
    return root, model, calib


def command(model: Path, calib: Path, out: Path, seed: int = 0, finetune: str = "e2e") -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--bits", "2", "--calib", str(calib), "--nsamples", "8",
            "--ctx", "32", "--seed", str(seed), "--finetune", finetune, "--ft-e2e-epochs", "1", "--quiet"]


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "quipsharp.cli", *args], env=full_env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / WEIGHTS_FILE))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run: its output, the untuned model it saves first, and the points it passes."""
    root, model, calib = setup
    log = root / "points.log"
    done = run(command(model, calib, root / "ref"), **{LOG_ENV: str(log)})
    assert done.returncode == 0, done.stderr
    points = log.read_text().split()
    untuned = run(command(model, calib, root / "untuned", finetune="none"))
    assert untuned.returncode == 0, untuned.stderr
    old = run(command(model, calib, root / "old", seed=1, finetune="none"))  # an earlier, different model
    assert old.returncode == 0, old.stderr
    return {"final": tensors(root / "ref"), "untuned": tensors(root / "untuned"), "old": root / "old",
            "points": points}


def kill_and_recover(setup, reference, index: int, replace: bool, tmp_path: Path) -> str:
    """Kill the run at point ``index`` (1-based), check what is on disk, re-run, check the result."""
    _, model, calib = setup
    out = tmp_path / "out"
    args = command(model, calib, out)
    old = None
    if replace:
        import shutil

        shutil.copytree(reference["old"], out)
        old = tensors(out)
        args.append("--overwrite")
    killed = run(args, **{KILL_ENV: str(index)})
    assert killed.returncode == -signal.SIGKILL, f"point {index} was not reached: {killed.stderr[-500:]}"
    if out.exists():  # never a half-written model: it loads and is one of the complete states
        load_quantized(out)
        found = tensors(out)
        state = next((name for name, ref in (("final", reference["final"]), ("untuned", reference["untuned"]),
                                             ("old", old)) if ref is not None and same(found, ref)), None)
        assert state is not None, f"killed at point {index}: {out} holds a model that is none of the complete ones"
    else:
        state = "absent"
    again = run([*args, "--resume", "--overwrite"] if "--overwrite" not in args else [*args, "--resume"])
    assert again.returncode == 0, f"re-run after a kill at point {index} failed: {again.stderr[-800:]}"
    assert same(tensors(out), reference["final"]), f"re-run after a kill at point {index} differs"
    leftovers = [p.name for p in tmp_path.iterdir() if STAGING_INFIX in p.name or p.name.endswith(LOCK_SUFFIX)
                 or p.name.endswith(".quipsharp-work")]
    assert leftovers == [], f"after a kill at point {index} and a re-run: {leftovers}"
    return state


def test_the_run_passes_through_every_kind_of_fault_point(reference):
    kinds = set(reference["points"])
    assert {"block:quantized", "block:saved", "atomic-write:before-rename", "save:staged", "e2e:saved-untuned",
            "finetune:epoch", "quantize:saved"} <= kinds
    assert len(reference["points"]) >= 20


def _sample(reference) -> list[int]:
    points = range(1, len(reference["points"]) + 1)
    return sorted(random.Random(SAMPLE_SEED).sample(list(points), DEFAULT_SAMPLE))


@pytest.mark.parametrize("draw", range(DEFAULT_SAMPLE))
def test_a_kill_at_a_sampled_point_loses_nothing(setup, reference, draw, tmp_path):
    kill_and_recover(setup, reference, _sample(reference)[draw], replace=False, tmp_path=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("replace", [False, True])
def test_a_kill_at_every_point_loses_nothing(setup, reference, replace, tmp_path):
    outcomes: dict[str, int] = {}
    for index in range(1, len(reference["points"]) + 1):
        case = tmp_path / f"p{index}"
        case.mkdir()
        state = kill_and_recover(setup, reference, index, replace, case)
        outcomes[state] = outcomes.get(state, 0) + 1
    print(f"replace={replace}: {len(reference['points'])} kill points, outcomes {outcomes}")
    assert sum(outcomes.values()) == len(reference["points"])
