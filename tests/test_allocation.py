"""``--target-bpw`` (issue 15 item 5): the bit allocation is the exact optimum (checked against brute
force), stays within the budget, and the whole path quantizes a model to the chosen size."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quipsharp import allocation
from quipsharp.allocation import LayerSensitivity, allocate_bits, bits_per_weight, total_loss

WIDTHS = (2, 3, 4)


def brute_force(layers, target):
    best = None
    for combo in itertools.product(WIDTHS, repeat=len(layers)):
        bits = {layer.name: b for layer, b in zip(layers, combo, strict=True)}
        if bits_per_weight(layers, bits) <= target + 1e-12:
            value = total_loss(layers, bits)
            if best is None or value < best - 1e-15:
                best = value
    return best


def random_layers(seed: int, count: int, unit: int = 64) -> list[LayerSensitivity]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(count):
        weights = unit * int(torch.randint(1, 6, (1,), generator=gen))
        # decreasing with the width, not always convex (allocation must not assume it)
        p2 = float(torch.rand(1, generator=gen)) * 0.1 + 0.02
        p3 = p2 * float(torch.rand(1, generator=gen)) * 0.8
        p4 = p3 * float(torch.rand(1, generator=gen)) * 0.8
        layers.append(LayerSensitivity(f"layer{i}", weights, {2: p2, 3: p3, 4: p4}))
    return layers


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 6), target=st.floats(2.0, 4.0))
def test_allocation_is_the_brute_force_optimum(seed, count, target):
    layers = random_layers(seed, count)
    bits = allocate_bits(layers, target)
    assert set(bits.values()) <= set(WIDTHS)
    assert bits_per_weight(layers, bits) <= target + 1e-12
    assert total_loss(layers, bits) == pytest.approx(brute_force(layers, target), rel=1e-12, abs=1e-15)


def test_lagrangian_fallback_is_within_budget_and_beats_uniform(monkeypatch):
    monkeypatch.setattr(allocation, "MAX_DP_STATES", 0)  # force the fallback
    layers = random_layers(7, 40)
    for target in (2.0, 2.5, 3.0, 3.5, 4.0):
        bits = allocate_bits(layers, target)
        assert bits_per_weight(layers, bits) <= target + 1e-12
        floor = {layer.name: math.floor(target) for layer in layers}
        assert total_loss(layers, bits) <= total_loss(layers, floor) + 1e-15
        exact = brute_force(layers[:6], target)  # and close to exact on a brute-forceable part
        assert total_loss(layers[:6], allocate_bits(layers[:6], target)) <= exact * 1.5 + 1e-12


def test_edges():
    layers = random_layers(1, 3)
    assert set(allocate_bits(layers, 2.0).values()) == {2}
    assert set(allocate_bits(layers, 4.0).values()) == {4}
    with pytest.raises(ValueError, match="below the narrowest"):
        allocate_bits(layers, 1.9)
    with pytest.raises(ValueError, match="no layers"):
        allocate_bits([], 3.0)
    with pytest.raises(ValueError, match="finite"):
        LayerSensitivity("x", 64, {2: math.nan})


def test_target_bpw_quantizes_to_the_chosen_size(model_dir, calib_file, tmp_path, capsys):
    pytest.importorskip("transformers")
    from quipsharp.cli import main
    from quipsharp.format import read_record

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--target-bpw", "3", "--calib", str(calib_file),
                 "--nsamples", "4", "--ctx", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, record = read_record(out)
    widths = {name: spec.bits for name, spec in record.modules.items()}
    weights = {name: spec.in_features * spec.out_features for name, spec in record.modules.items()}
    mean = sum(widths[n] * weights[n] for n in widths) / sum(weights.values())
    assert mean <= 3.0 + 1e-12 and mean > 2.5  # the budget is used, not exceeded
    assert len(set(widths.values())) > 1  # mixed widths
    assert result["codes_bits_per_weight"] == pytest.approx(mean)
    # the widths are the optimum for the sensitivity measured on the same model and calibration windows
    from quipsharp.config import ModelQuantConfig
    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.hf import load_model
    from quipsharp.pipeline import measure_sensitivity

    model, tokenizer = load_model(model_dir)
    config = ModelQuantConfig(nsamples=4, ctx=32)
    windows = calibration_windows(read_documents(calib_file), tokenizer, 4, 32, config.seed)
    assert allocate_bits(measure_sensitivity(model, config, windows, progress=False), 3.0) == widths
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "x"), "--target-bpw", "3", "--bits", "2",
                 "--calib", str(calib_file)]) == 2
    assert "--bits and --target-bpw both set the width" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "y"), "--target-bpw", "3", "--data-free"]) == 2
    assert "measures each layer's sensitivity on calibration text: give --calib" in capsys.readouterr().err


def test_sensitivity_is_measured_at_every_width_and_leaves_the_model_alone():
    pytest.importorskip("transformers")
    from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
    from quipsharp.pipeline import measure_sensitivity
    from tests.tiny_models import calibration_tokens, tiny_model

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), nsamples=4, ctx=16, batch_size=4)
    layers = measure_sensitivity(model, config, calibration_tokens(4, 16), progress=False)
    assert len(layers) == 14 and all(set(la.losses) == set(WIDTHS) for la in layers)
    assert all(la.losses[2] > la.losses[3] > la.losses[4] > 0 for la in layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sensitivity_file_is_reused_for_other_sizes_and_refused_for_other_runs(model_dir, calib_file, tmp_path,
                                                                               capsys):
    pytest.importorskip("transformers")
    from quipsharp.cli import main
    from quipsharp.format import read_record

    cache = tmp_path / "sens.json"
    base = [str(model_dir), "--calib", str(calib_file), "--nsamples", "4", "--ctx", "32", "--quiet",
            "--sensitivity", str(cache)]
    assert main(["quantize", "--out", str(tmp_path / "a"), "--target-bpw", "2.5", *base]) == 0
    saved = json.loads(cache.read_text())
    assert len(saved["layers"]) == 14 and set(saved["fingerprint"]) == {"settings", "structure", "weights",
                                                                        "calibration"}
    cache.write_text(json.dumps({**saved, "layers": [  # a doctored loss: the reuse shows in the allocation
        {**la, "losses": {"2": 1.0, "3": 0.0, "4": 0.0}} if la["name"].endswith("layers.0.mlp.up_proj") else la
        for la in saved["layers"]]}))
    assert main(["quantize", "--out", str(tmp_path / "b"), "--target-bpw", "2.5", *base]) == 0
    bits = {n: s.bits for n, s in read_record(tmp_path / "b")[1].modules.items()}
    assert bits["model.layers.0.mlp.up_proj"] == 3  # read from the file, not measured again
    other = [a if a != "4" else "8" for a in base]  # other calibration windows
    assert main(["quantize", "--out", str(tmp_path / "c"), "--target-bpw", "2.5", *other]) == 2
    assert "was measured with other settings and calibration" in capsys.readouterr().err
    assert main(["quantize", "--out", str(tmp_path / "d"), "--bits", "2", *base]) == 2
    assert "--sensitivity keeps the measurement --target-bpw makes" in capsys.readouterr().err
