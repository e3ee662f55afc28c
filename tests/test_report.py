"""The model card, recorded evaluations and ``quipsharp report`` (issue 15 item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from quipsharp.card import CARD_FILE, card_is_ours, read_eval, record_eval, tensor_bytes_by_kind
from quipsharp.cli import main
from quipsharp.format import read_record, verify_checksums
from tests.tiny_models import TEXT


def quantize(model_dir, calib_file, out, bits=2, extra=()) -> Path:
    argv = ["quantize", str(model_dir), "--out", str(out), "--bits", str(bits), "--calib", str(calib_file),
            "--nsamples", "4", "--ctx", "32", "--quiet", *extra]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def dirs(model_dir, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return {bits: quantize(model_dir, calib_file, root / f"q{bits}", bits) for bits in (2, 4)}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


def test_the_output_gets_a_model_card(dirs, calib_file):
    path = dirs[2]
    card = (path / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: quipsharp\n")
    assert "quantized to **2.00 bits per weight**" in card
    assert str(calib_file.resolve()) in card and "4 windows x 32 tokens, seed 0" in card
    assert "E8P12 (14 layers)" in card and "| architecture | llama |" in card
    assert f'quipsharp.load_quantized("{path.name}")' in card and "Not measured yet" in card
    assert "base_model" not in card  # the source is a local path, not a hub id
    assert verify_checksums(path) == [] and card_is_ours(path)


def test_recorded_perplexity_reaches_the_card_and_checksums(dirs, text_file, tmp_path, capsys):
    path = shutil.copytree(dirs[2], tmp_path / "q")
    assert main(["eval", "ppl", str(path), "--data", str(text_file), "--ctx", "64", "--max-windows", "2",
                 "--json", "--record"]) == 0
    measured = json.loads(capsys.readouterr().out)
    (entry,) = read_eval(path)
    assert entry["kind"] == "ppl" and entry["ppl"] == measured["ppl"] and entry["data"] == "eval.txt"
    card = (path / CARD_FILE).read_text()
    assert f"| perplexity, eval.txt | {measured['ppl']:.3f} | ctx 64, 2 windows" in card
    assert "Not measured yet" not in card
    assert verify_checksums(path) == []  # the rewritten card and the results file are re-recorded


def test_an_edited_card_is_never_overwritten(dirs, tmp_path):
    path = shutil.copytree(dirs[2], tmp_path / "q")
    (path / CARD_FILE).write_text("# my notes\n")
    assert not card_is_ours(path)
    assert record_eval(path, {"kind": "ppl", "data": "x.txt", "ppl": 12.5, "ctx": 64, "windows": 2}) is False
    assert (path / CARD_FILE).read_text() == "# my notes\n"
    assert read_eval(path)[0]["ppl"] == 12.5


def test_record_needs_a_quipsharp_directory(model_dir, text_file, capsys):
    assert main(["eval", "ppl", str(model_dir), "--data", str(text_file), "--record"]) == 2
    assert "--record keeps the result in a quipsharp directory" in capsys.readouterr().err


def test_size_breakdown_adds_up_to_the_weights_file(dirs):
    from safetensors import safe_open

    sizes = tensor_bytes_by_kind(dirs[2])
    with safe_open(str(dirs[2] / "model.safetensors"), framework="pt") as handle:
        total = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert sum(sizes.values()) == total
    _, record = read_record(dirs[2])
    assert sizes["codes"] * 8 == 2 * sum(m.in_features * m.out_features for m in record.modules.values())
    assert sizes["embeddings and head"] > 0 and sizes["layer state"] > 0


def test_report_writes_a_page_and_figures(dirs, text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    q2, q4 = (shutil.copytree(dirs[b], tmp_path / f"q{b}") for b in (2, 4))
    for path in (q2, q4):
        assert main(["eval", "ppl", str(path), "--data", str(text_file), "--ctx", "64", "--max-windows", "2",
                     "--record"]) == 0
    capsys.readouterr()
    assert main(["report", str(q2), "--compare", str(q4), "--float-ppl", "50"]) == 0
    page = q2 / "report" / "index.html"
    assert f"report written to {page}" in capsys.readouterr().out
    text = page.read_text()
    figures = ("proxy_loss.png", "bits.png", "size.png", "ppl_bits.png")
    for figure in figures:
        assert f"src='{figure}'" in text
        image = matplotlib.image.imread(q2 / "report" / figure)
        assert image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 0.01  # drawn, not blank
    assert text.count("model.layers.") == 14 and "perplexity, eval.txt" in text
    assert verify_checksums(q2) == []  # the report folder is not part of the directory's files
    assert main(["report", str(q2)]) == 0  # an earlier report is replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["report", str(q2), "--out", str(foreign)]) == 2
    assert "holds files quipsharp did not write" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_report_renders_in_headless_chromium(dirs, text_file, tmp_path):
    """The page renders in a real browser: a screenshot that is not blank (look at it: BENCHMARKS.md)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium)")
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path = shutil.copytree(dirs[2], tmp_path / "q")
    assert main(["eval", "ppl", str(path), "--data", str(text_file), "--ctx", "64", "--max-windows", "2",
                 "--record"]) == 0
    assert main(["report", str(path)]) == 0
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,2400", (path / "report" / "index.html").as_uri()],
                   capture_output=True, timeout=180, check=False)
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2400, 1000)
    assert image.std() > 0.05  # text and figures, not an empty page
