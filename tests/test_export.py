"""Export that is honest (issue 15 item 4): torch.export keeps quipsharp's custom op; ONNX export of
quantized layers is refused with a clear error (never a graph of constants); ``dense_copy`` gives
the same function with float weights, which exports to ONNX and runs in onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from quipsharp import kernels
from quipsharp.config import QuIPSharpConfig
from quipsharp.errors import ExportError
from quipsharp.export import dense_copy
from quipsharp.nn import ONNX_EXPORT_MESSAGE, QuantizedLinear

ONNX_DEPS = ("onnx", "onnxscript", "onnxruntime")


def small_net(seed: int = 0) -> nn.Module:
    """Two quantized layers (E8P12 2-bit with bias, a 3-bit 1MAD trellis without) around a GELU."""
    gen = torch.Generator().manual_seed(seed)
    first, second = nn.Linear(128, 64), nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / 8)
        first.bias.copy_(torch.randn(64, generator=gen))
    return nn.Sequential(
        QuantizedLinear.from_linear(first, config=QuIPSharpConfig(bits=2)), nn.GELU(),
        QuantizedLinear.from_linear(second, config=QuIPSharpConfig(bits=3, codebook="qtip1mad")),
    ).eval()


def reference(net: nn.Module) -> nn.Module:
    for module in net.modules():
        if isinstance(module, QuantizedLinear):
            module.use_kernel(kernels.REFERENCE)
    return net


def exception_chain(err: BaseException) -> list[BaseException]:
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def test_dense_copy_computes_the_same_function():
    net = reference(small_net())
    dense = dense_copy(net)
    assert not any(isinstance(m, QuantizedLinear) for m in dense.modules())
    assert all(isinstance(m, QuantizedLinear) for m in (net[0], net[2]))  # the original is unchanged
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = net(x), dense(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(dense[0].weight, net[0].dequantize()) and dense[2].bias is None
    with pytest.raises(ValueError, match="no quantized layer"):
        dense_copy(dense)


def test_torch_export_keeps_the_custom_op():
    net = small_net()
    x = torch.randn(3, 128)
    program = torch.export.export(net, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "quipsharp.e8p_linear.default" in targets
    with torch.no_grad():
        assert torch.equal(program.module()(x), net(x))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_of_quantized_layers_is_refused(dynamo, tmp_path):
    for dep in ONNX_DEPS[:2] if dynamo else ("onnx",):
        pytest.importorskip(dep)
    net = small_net()
    out = tmp_path / "net.onnx"
    with pytest.raises(Exception) as info:  # the dynamo exporter wraps our error in its own
        torch.onnx.export(net, (torch.randn(3, 128),), str(out), dynamo=dynamo)
    errors = [e for e in exception_chain(info.value) if isinstance(e, ExportError)]
    assert errors and str(errors[0]) == ONNX_EXPORT_MESSAGE
    assert "dense_copy" in ONNX_EXPORT_MESSAGE


def test_dense_copy_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    for dep in ONNX_DEPS:
        pytest.importorskip(dep)
    import onnxruntime

    net = reference(small_net())
    out = tmp_path / "dense.onnx"
    torch.onnx.export(dense_copy(net), (torch.randn(3, 128),), str(out), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = net(x)
    assert got.shape == (7, 32)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_dense_copy_of_a_loaded_model_saves_a_float_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from quipsharp.config import ModelQuantConfig
    from quipsharp.hf import load_quantized, save_quantized
    from quipsharp.pipeline import quantize_model
    from tests.tiny_models import calibration_tokens, tiny_model

    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), nsamples=4, ctx=16, batch_size=4)
    model, _ = quantize_model(tiny_model("llama"), config, calibration_tokens(4, 16), progress=False)
    model = reference(load_quantized(save_quantized(model, tmp_path / "q", config=config)))
    dense = dense_copy(model)
    assert getattr(dense.config, "quantization_config", None) is None and "save_pretrained" not in vars(dense)
    dense.save_pretrained(tmp_path / "dense")
    saved = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "quantization_config" not in saved
    tokens = calibration_tokens(2, 16, seed=1)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "expected.pt")
    code = (  # plain transformers, no quipsharp: an ordinary float model
        "import torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r})\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n    got = m(input_ids=e['tokens']).logits\n"
        "print('ERR', float((got - e['logits']).abs().max() / e['logits'].abs().max()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split("ERR")[1]) < 1e-4
