from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from quipsharp.config import QuIPSharpConfig
from quipsharp.nn import QuantizedLinear, QuIPSharpLinear
from tests.conftest import decaying_hessian


@pytest.mark.parametrize(("n", "m", "bits"), [(64, 32, 2), (576, 192, 3), (192, 576, 4), (40, 24, 2)])
def test_forward_matches_dequantized_weight(n, m, bits, gen):
    lin = nn.Linear(n, m, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=gen))
        lin.bias.copy_(torch.randn(m, generator=gen))
    H = decaying_hessian(n, seed=n) + 1e-3 * torch.eye(n, dtype=torch.float64)
    q = QuantizedLinear.from_linear(lin, H, QuIPSharpConfig(bits=bits), seed=1)
    # inputs distributed as the Hessian says: E[x xᵀ] = H
    x = (torch.randn(3, 5, n, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(H).T).float()
    expected = x @ q.dequantize().T + lin.bias.detach()
    torch.testing.assert_close(q.reference_forward(x), expected, rtol=1e-4, atol=1e-4)
    if q._kernel.int8_activations:  # native kernels: int8 activations behind the Hadamard transform
        assert float((q(x) - expected).norm() / expected.norm()) < 0.03
    else:
        torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-4)
    # and it approximates the float layer (on such inputs the error is the proxy loss)
    rel = (q(x) - lin(x)).square().mean() / lin(x).square().mean()
    assert rel < 0.1


def test_buffers_and_meta_construction():
    q = QuantizedLinear(64, 48, QuIPSharpConfig(bits=3), bias=True, device="meta")
    state = q.state_dict()
    assert set(state) == {"codes", "su", "sv", "wscale", "codebook_id", "bias"}
    assert all(t.device.type == "meta" for t in state.values())
    assert state["codes"].shape == (48, 64 // 8 * 3) and state["codes"].dtype == torch.uint8


def test_state_dict_round_trip_is_bitwise(gen):
    W = torch.randn(32, 64, generator=gen)
    src = QuIPSharpLinear(64, 32, QuIPSharpConfig(bits=2), bias=False)
    src.quantize_weight(W)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = QuantizedLinear(64, 32, QuIPSharpConfig(bits=2), bias=False, device="meta")
    dst.load_state_dict(torch.load(buf), assign=True)
    x = torch.randn(7, 64, generator=gen)
    assert torch.equal(src(x), dst(x))


def test_unquantized_layer_refuses_to_run():
    with pytest.raises(RuntimeError, match="before its weight was quantized"):
        QuantizedLinear(16, 8)(torch.zeros(1, 16))


def test_wrong_codebook_in_state_dict_is_detected(gen):
    src = QuantizedLinear(64, 32, QuIPSharpConfig(bits=2))
    src.quantize_weight(torch.randn(32, 64, generator=gen))
    dst = QuantizedLinear(64, 32, QuIPSharpConfig(bits=2))
    state = src.state_dict()
    state["codebook_id"] = torch.tensor(1)
    with pytest.raises(ValueError, match="codebook id 1"):  # refused when loaded, before any forward
        dst.load_state_dict(state)


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantizedLinear(12, 8)
    q = QuantizedLinear(16, 8)
    with pytest.raises(ValueError, match="does not match layer"):
        q.quantize_weight(torch.zeros(8, 24))
    with pytest.raises(ValueError, match="last dim 16"):
        q(torch.zeros(2, 8))
