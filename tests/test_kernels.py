"""Native CPU kernels against the torch reference (exact for decode, tolerances for matmul)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from quipsharp import kernels
from quipsharp.codebooks import get_codebook
from quipsharp.config import QuIPSharpConfig
from quipsharp.hadamard import factor_dim, hadamard_transform, orthonormal_factor
from quipsharp.nn import QuantizedLinear

pytestmark = pytest.mark.skipif(not kernels.supported_levels(), reason="native kernels not built")

CODEBOOKS = ["E8P12", "E8P12RVQ3B", "E8P12RVQ4B"]
FLOAT_LEVELS = [lvl for lvl in ("scalar", "avx2", "avx512") if lvl in kernels.supported_levels()]
#: Relative error of the int8-activation path against float on Gaussian activations (measured ≈ 0.7%).
INT8_REL_TOL = 0.03
#: Sizes the model walker meets (K·2^k with K from Paley / Kronecker constructions, and powers of two).
HADAMARD_SIZES = [8, 192, 576, 1536, 2048, 4096, 11008, 1280, 960, 3072]


@pytest.fixture(autouse=True)
def _restore_level():
    before = kernels.selected()
    yield
    if before in kernels.LEVELS:
        kernels.set_level(before)


def random_codes(name: str, m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cb = get_codebook(name)
    codes = torch.randint(0, cb.num_codes, (m, n // 8), generator=gen)
    return codes, cb.pack(codes)


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", FLOAT_LEVELS)
def test_decode_is_bitwise_reference(name, level, gen):
    kernels.set_level(level)
    m, n = 29, 136
    codes, packed = random_codes(name, m, n, gen)
    ref = get_codebook(name).decode(codes).reshape(m, n)
    assert torch.equal(kernels.decode(packed, m, n, name), ref)


def test_decode_covers_every_code():
    # all 65,536 stage-1 codes, each once
    cb = get_codebook("E8P12")
    codes = torch.arange(cb.num_codes).reshape(256, 256)
    assert torch.equal(kernels.decode(cb.pack(codes), 256, 2048, "E8P12"), cb.decode(codes).reshape(256, 2048))


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", FLOAT_LEVELS)
@pytest.mark.parametrize("batch", [1, 2, 7, 8, 9, 33])
@pytest.mark.parametrize(("m", "n"), [(1, 8), (13, 72), (67, 200)])
def test_float_matmul_matches_reference(name, level, batch, m, n, gen):
    kernels.set_level(level)
    codes, packed = random_codes(name, m, n, gen)
    W = get_codebook(name).decode(codes).reshape(m, n)
    x = torch.randn(batch, n, generator=gen)
    torch.testing.assert_close(kernels.matmul(x, packed, m, name), x @ W.T, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif("avx512vnni" not in kernels.supported_levels(), reason="CPU without AVX-512 VNNI/VBMI/BITALG")
@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize(("m", "n"), [(5, 8), (31, 136), (64, 576)])
def test_int8_path_equals_its_scalar_reference(name, batch, m, n, gen):
    kernels.set_level("avx512vnni")
    codes, packed = random_codes(name, m, n, gen)
    x = torch.randn(batch, n, generator=gen)
    got = kernels.matmul(x, packed, m, name)
    assert torch.equal(got, kernels.matmul(x, packed, m, name, int8_reference=True))
    exact = x @ get_codebook(name).decode(codes).reshape(m, n).T
    assert float((got - exact).norm() / exact.norm()) < INT8_REL_TOL


@pytest.mark.parametrize("name", CODEBOOKS)
def test_int8_reference_is_close_to_float(name, gen):
    m, n = 40, 256
    codes, packed = random_codes(name, m, n, gen)
    x = torch.randn(4, n, generator=gen)
    exact = x @ get_codebook(name).decode(codes).reshape(m, n).T
    got = kernels.matmul(x, packed, m, name, int8_reference=True)
    assert float((got - exact).norm() / exact.norm()) < INT8_REL_TOL
    # zero activations give exact zeros (no division by a zero scale)
    assert torch.equal(kernels.matmul(torch.zeros(1, n), packed, m, name, int8_reference=True), torch.zeros(1, m))


@pytest.mark.parametrize("name", CODEBOOKS)
def test_paths_agree_and_threads_do_not_change_results(name, gen):
    m, n = 1100, 576  # 79,200 codewords: above the kernels' threshold for going parallel
    _, packed = random_codes(name, m, n, gen)
    x = torch.randn(3, n, generator=gen)
    outs = {}
    for level in FLOAT_LEVELS:
        kernels.set_level(level)
        one = kernels.matmul(x, packed, m, name, threads=1)
        assert torch.equal(one, kernels.matmul(x, packed, m, name, threads=2))
        assert torch.equal(one, kernels.matmul(x, packed, m, name, threads=3))
        outs[level] = one
    for level, out in outs.items():
        torch.testing.assert_close(out, outs["scalar"], rtol=1e-5, atol=1e-4, msg=level)


@pytest.mark.parametrize("level", FLOAT_LEVELS)
@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard_matches_torch(n, level, gen):
    kernels.set_level(level)
    K, _, kind = factor_dim(n)
    M = orthonormal_factor(K, kind).to(torch.float32)
    x = torch.randn(3, n, generator=gen)
    pre, post = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    got = kernels.hadamard(x.clone(), M.contiguous(), pre=pre)
    torch.testing.assert_close(got, hadamard_transform(x * pre), rtol=1e-5, atol=1e-5)
    got_t = kernels.hadamard(x.clone(), M.T.contiguous(), post=post, alpha=0.5)
    torch.testing.assert_close(got_t, hadamard_transform(x, transpose=True) * 0.5 * post, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_clear_errors(gen):
    m, n = 8, 64
    _, packed = random_codes("E8P12", m, n, gen)
    x = torch.randn(2, n)
    with pytest.raises(TypeError, match=r"x must be torch\.float32"):
        kernels.matmul(x.double(), packed, m, "E8P12")
    with pytest.raises(ValueError, match="x must be contiguous"):
        kernels.matmul(torch.randn(n, 2).T, packed, m, "E8P12")
    with pytest.raises(ValueError, match="codes must have shape"):
        kernels.matmul(x, packed[:, :-2], m, "E8P12")
    with pytest.raises(ValueError, match="codes must have shape"):
        kernels.matmul(x, packed, m + 1, "E8P12")
    with pytest.raises(TypeError, match=r"codes must be torch\.uint8"):
        kernels.decode(packed.to(torch.int16), m, n, "E8P12")
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.decode(packed, m, 60, "E8P12")
    with pytest.raises(ValueError, match="no native kernel"):
        kernels.matmul(x, packed, m, "E8")
    with pytest.raises(ValueError, match="does not split"):
        kernels.hadamard(torch.randn(2, 24), torch.eye(5))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 5, 20])
def test_module_native_forward_matches_reference(bits, batch, gen):
    n, m = 576, 192
    lin = torch.nn.Linear(n, m, bias=True)
    q = QuantizedLinear.from_linear(lin, None, QuIPSharpConfig(bits=bits), seed=3)
    x = torch.randn(batch, n, generator=gen)
    ref = q.reference_forward(x)
    with torch.no_grad():
        got = q(x)
    tol = INT8_REL_TOL if kernels.selected() == "avx512vnni" and batch <= kernels.FUSED_MAX_BATCH else 1e-5
    assert float((got - ref).norm() / ref.norm()) < tol
    # bf16 activations come back as bf16
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_module_training_uses_the_differentiable_reference(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    x = torch.randn(2, 64, generator=gen, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_custom_op_traces_with_fake_tensors(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), None, QuIPSharpConfig(bits=2), seed=0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.quipsharp.e8p_linear(
            torch.empty(3, 5, 64), q.codes, q.su, q.sv, q.wscale, None, q._m_in, q._m_out_t, "E8P12", True
        )
        assert out.shape == (3, 5, 24)


def test_env_forces_reference_path():
    code = "from quipsharp import kernels; print(kernels.selected())"
    env = {**os.environ, kernels.ENV_KERNEL: "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env[kernels.ENV_KERNEL] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "QUIPSHARP_KERNEL='sse9'" in bad.stderr


def test_module_compiles_without_graph_breaks(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), None, QuIPSharpConfig(bits=3), seed=0)
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)


def test_casting_a_model_keeps_quantized_state_float32(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24, bias=True), None, QuIPSharpConfig(bits=2), seed=0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), q)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    x = torch.randn(3, 64, generator=gen).bfloat16()
    assert model(x).dtype == torch.bfloat16


def test_without_the_library_everything_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_library_path", lambda: None)
    kernels._lib.cache_clear()
    kernels._selected_level.cache_clear()
    try:
        with caplog.at_level("INFO", logger="quipsharp.kernels"):
            assert kernels.selected() == "reference"
        assert "not built" in caplog.text and "path: reference" in caplog.text
        assert kernels.supported_levels() == []
        q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
        assert not q._native
        x = torch.randn(2, 64)
        torch.testing.assert_close(q(x), q.reference_forward(x), rtol=0, atol=0)
        with pytest.raises(kernels.KernelError, match="not built"):
            kernels.decode(q.codes, 16, 64, "E8P12")
    finally:
        monkeypatch.undo()
        kernels._lib.cache_clear()
        kernels._selected_level.cache_clear()
    assert kernels.selected() != "reference"


def test_int8_activations_only_after_the_hadamard_transform(gen):
    # without the RHT, activations keep their outlier channels: the layer must stay in float32
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2, use_hadamard=False), seed=0)
    x = torch.randn(1, 64, generator=gen)
    x[0, 5] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(q(x), q.reference_forward(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reference", [False, True])
def test_non_finite_activations_give_nan_not_garbage(reference, gen):
    _, packed = random_codes("E8P12", 8, 64, gen)
    x = torch.randn(2, 64, generator=gen)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    out = kernels.matmul(x, packed, 8, "E8P12", int8_reference=reference)
    assert torch.isnan(out).all()


def test_empty_inputs_give_empty_outputs(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    assert q(torch.empty(0, 64)).shape == (0, 16)
    assert q(torch.empty(2, 0, 64)).shape == (2, 0, 16)
    assert kernels.matmul(torch.empty(0, 64), q.codes, 16, "E8P12").shape == (0, 16)


def test_layer_state_on_another_device_is_refused(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    args = [torch.randn(1, 64), q.codes, q.su, q.sv, q.wscale, None, q._m_in, q._m_out_t, "E8P12", True]
    args[2] = q.su.to("meta")
    with pytest.raises(ValueError, match="su must be on the CPU"):
        kernels.linear(*args)
