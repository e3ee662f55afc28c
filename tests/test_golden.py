"""Golden fixture: the checked-in format-1 directory keeps loading with the same logits, and
quantizing the checked-in float model again gives the same codes and signs bit for bit, and the same
scales within one unit in the last place (``tests/golden.py``: SCALE_ULPS)
(issue 13 item 6; the fixture is described in ``tests/golden.py``)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file

from quipsharp.format import FORMAT_VERSION, WEIGHTS_FILE, read_record, verify_checksums
from quipsharp.hf import load_quantized
from tests.golden import LOGITS_FILE, QUANT_DIR, SCALE_ULPS, dequantized_logits, requantize_in_subprocess

#: The layers' tensors that must come out of a new quantization exactly as stored (``wscale``: within
#: :data:`tests.golden.SCALE_ULPS`).
EXACT_BUFFERS = ("codes", "su", "sv", "wscale", "codebook_id")


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many float32 values lie between two finite float32 scalars of one sign (0 when equal)."""
    assert a.dtype == b.dtype == torch.float32 and bool(torch.isfinite(a)) and bool(torch.isfinite(b))
    return abs(int(a.view(torch.int32)) - int(b.view(torch.int32)))


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    return load_file(str(QUANT_DIR / WEIGHTS_FILE))


def test_the_fixture_is_intact_and_format_1():
    assert verify_checksums(QUANT_DIR) == []
    _, record = read_record(QUANT_DIR)
    assert record.format_version == 1 <= FORMAT_VERSION
    assert {spec.codebook for spec in record.modules.values()} == {"E8P12", "E8P12RVQ3B", "E8P12RVQ4B"}


def test_the_format_1_directory_loads_with_its_logits(tmp_path):
    expected = load_file(str(LOGITS_FILE))
    model = load_quantized(shutil.copytree(QUANT_DIR, tmp_path / "q"))  # (a copy: never write to the fixture)
    logits = dequantized_logits(model, expected["ids"])
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the kernels the model actually runs: close to the exact decode
        served = model(input_ids=expected["ids"]).logits
    assert (served - expected["logits"]).abs().max() < 0.05 * expected["logits"].abs().max()


def test_quantizing_again_reproduces_the_fixture(golden_state, tmp_path):
    requantize_in_subprocess(tmp_path / "state.safetensors")  # on the pinned numerical path (tests/golden.py)
    state = load_file(str(tmp_path / "state.safetensors"))
    compared = 0
    for name, stored in golden_state.items():
        kind = name.rsplit(".", 1)[-1]
        if kind == "wscale":
            assert _ulps_apart(state[name], stored) <= SCALE_ULPS, f"{name} differs from the golden fixture"
            compared += 1
        elif kind in EXACT_BUFFERS:
            assert torch.equal(state[name], stored), f"{name} differs from the golden fixture"
            compared += 1
    assert compared == 14 * len(EXACT_BUFFERS)


def test_ulps_apart_counts_float32_steps():
    x = torch.tensor(0.0191, dtype=torch.float32)
    up = torch.nextafter(x, torch.tensor(1.0))
    assert _ulps_apart(x, x) == 0
    assert _ulps_apart(x, up) == _ulps_apart(up, x) == 1
    assert _ulps_apart(x, torch.nextafter(up, torch.tensor(1.0))) == 2
    assert _ulps_apart(x, x * (1 + 1e-5)) > SCALE_ULPS  # a real change of scale is not within tolerance
