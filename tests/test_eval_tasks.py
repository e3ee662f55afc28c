"""lm-eval on quipsharp models (issue 15 item 2): ``quipsharp eval tasks`` through lm-eval's Python API
and the ``lm_eval`` command line on a quipsharp directory by path agree, on a local task (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from quipsharp.cli import main
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.hf import load_model, save_quantized
from quipsharp.pipeline import quantize_model
from tests.tiny_models import TEXT, calibration_tokens

TASK = "qs_tiny_choice"
DOCS = 12
CHOICES = 4


def write_local_task(root: Path) -> Path:
    """A multiple-choice task over a local JSON-lines file: pick the sentence's true ending among
    ``CHOICES`` endings of other sentences (HellaSwag-style, from the tiny models' text)."""
    sentences = [s.strip() for s in TEXT.split(". ") if s.strip()][: DOCS + CHOICES]
    docs = []
    for i in range(DOCS):
        words = sentences[i].split()
        cut = max(1, len(words) // 2)
        endings = [" ".join(sentences[(i + k) % len(sentences)].split()[cut:]) or "." for k in range(CHOICES)]
        label = i % CHOICES
        endings[0], endings[label] = endings[label], endings[0]
        docs.append({"context": " ".join(words[:cut]), "endings": endings, "label": label})
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{endings}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return root


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), nsamples=4, ctx=16, batch_size=4)
    model, tokenizer = load_model(model_dir)
    model, reports = quantize_model(model, config, calibration_tokens(4, 16), progress=False)
    quantized = save_quantized(model, root / "q", tokenizer, config=config, reports=reports)
    (root / "tasks").mkdir()
    return quantized, write_local_task(root / "tasks")


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def test_cli_and_lm_eval_command_line_agree(setup, tmp_path, capsys):
    quantized, tasks = setup
    code, out = run_cli(["eval", "tasks", str(quantized), "--tasks", TASK, "--include-path", str(tasks), "--json"],
                        capsys)
    assert code == 0
    ours = json.loads(out)[TASK]
    assert 0.0 <= ours["acc"] <= 1.0 and ours["acc"] * DOCS == pytest.approx(round(ours["acc"] * DOCS))
    assert ours["acc_stderr"] > 0
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf",
         "--model_args", f"pretrained={quantized},trust_remote_code=True", "--device", "cpu",
         "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = list((tmp_path / "out").rglob("results_*.json"))
    theirs = json.loads(written.read_text())["results"][TASK]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]


def test_limit_and_text_output(setup, capsys):
    quantized, tasks = setup
    code, out = run_cli(["eval", "tasks", str(quantized), "--tasks", TASK, "--include-path", str(tasks),
                         "--limit", "3"], capsys)
    assert code == 0 and out.startswith(f"{TASK}: acc ")
    acc = float(out.split("acc ")[1].split()[0])
    assert acc in (0.0, pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), 1.0)


def test_unknown_task_is_refused_before_loading(capsys):
    assert main(["eval", "tasks", "/nonexistent/model", "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task no_such_task_xyz" in capsys.readouterr().err
