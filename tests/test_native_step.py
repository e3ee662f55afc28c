"""The native decoding step (issue 12): every block of a token in one C call (and the int8 LM head in
the same call), equal to the Python loop's step up to float rounding for every model family, float and
quantized, on every kernel level this CPU has; the head's int8 kernel equal to exact integer sums on
every level; NaN in, NaN out; refusals and bad arguments as one-line errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp import kernels
from quipsharp.fastdecode import LeanDecoder, UnsupportedModelError
from quipsharp.kernels import native as native_mod
from tests.test_fastdecode import FAMILIES, PROMPT, _family_model, _ids, _lean_incremental

STEPS = 10
#: float rounding only (other summation orders in norms and attention): measured ≤ 7e-6 on these models
STEP_TOL = 3e-5
#: int8 activations in the head against torch's bf16 ones, relative to the largest logit
HEAD_TOL = 3e-2
#: a trellis layer's int8 activations, relative to the logits' norm (see test_native_step_runs_trellis_layers)
INT8_FLIP_TOL = 1e-1
ALL_LEVELS = list(kernels.LEVELS)

native = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
pytestmark = native


def _level(level: str) -> str:
    if level not in kernels.supported_levels():
        pytest.skip(f"CPU lacks {level}")
    return level


def _both(model, max_len: int = 32, **kw) -> tuple[LeanDecoder, LeanDecoder]:
    python, fast = LeanDecoder(model, max_len, native_step=False, **kw), LeanDecoder(model, max_len, native_step=True,
                                                                                     **kw)
    assert python.native_step is None and fast.native_step is not None
    return python, fast


def _assert_steps_match(model, tol: float = STEP_TOL, **kw) -> None:
    python, fast = _both(model, **kw)
    ids = _ids(PROMPT + STEPS)
    expected, got = _lean_incremental(python, ids), _lean_incremental(fast, ids)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m, i=i: f"position {PROMPT + i - 1}: {m}")
    n = ids.numel()
    torch.testing.assert_close(fast.k_cache[:, :, :n], python.k_cache[:, :, :n], rtol=tol, atol=tol)
    torch.testing.assert_close(fast.v_cache[:, :, :n], python.v_cache[:, :, :n], rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("quantized", [False, True])
def test_native_step_equals_the_python_step(arch: str, quantized: bool) -> None:
    """Every family's features (fused or split q/k/v and gate/up, biases, q/k norms, post-norms, soft
    caps, sliding windows beyond their width, per-layer-type RoPE), float (dense) and 2-bit layers."""
    _assert_steps_match(_family_model(arch, quantized))


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_native_step_on_every_level(level: str, arch: str) -> None:
    model = kernels.use(_family_model(arch, quantized=True), _level(level))
    _assert_steps_match(model)


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize(("arch", "bits"), [("llama", 2), ("qwen2", 3), ("gemma2", 4)])
def test_native_step_runs_trellis_layers(level: str, arch: str, bits: int, monkeypatch) -> None:
    """Trellis (QTIP 1MAD) layers in the native step, with the activations the layer's own call
    (qs_trellis_linear) gives them: int8 behind the transform on the x86 levels, float32 on NEON.

    With float32 activations both loops agree up to float rounding. With int8 ones they agree until an
    activation that the two loops compute a rounding apart sits on an int8 rounding boundary: one
    flipped unit then moves the logits by about 1% (measured 1.4e-2 of their norm; wrong codes or scales
    move them by their whole size)."""
    model = kernels.use(_family_model(arch, quantized=True, codebook="qtip1mad", bits=bits), _level(level))
    layers = [m for m in model.modules() if type(m).__name__ == "QuantizedLinear"]
    assert layers and all(m.codebook.name == f"QTIP1MAD{bits}" for m in layers)
    assert all(m.bind().trellis_int8 == (level in native_mod.TRELLIS_INT8_LEVELS) for m in layers)
    with monkeypatch.context() as patch:
        patch.setattr(native_mod.NativeKernel, "_trellis_int8", lambda self, n: False)
        _assert_steps_match(model)
    python, fast = _both(model)
    ids = _ids(PROMPT + STEPS)
    for g, e in zip(_lean_incremental(fast, ids), _lean_incremental(python, ids), strict=True):
        assert float((g - e).norm()) <= INT8_FLIP_TOL * float(e.norm())


@pytest.mark.parametrize("level", ALL_LEVELS)
def test_a_bound_trellis_layer_equals_its_forward(level: str) -> None:
    """The bound call of a trellis layer (the lean loop's per-layer path) gives the bits of the layer's
    forward; with a residual, those bits plus the residual."""
    model = kernels.use(_family_model("llama", quantized=True, codebook="qtip1mad"), _level(level))
    layer = model.model.layers[0].mlp.down_proj
    bound = layer.bind()
    assert bound is not None and bound.trellis_k == 2
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0))
    out = torch.empty(1, layer.out_features)
    with torch.no_grad():
        want = layer(x)
    assert torch.equal(bound(x, out), want)
    residual = torch.randn(layer.out_features, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bound(x, torch.empty(1, layer.out_features), residual), want + residual)


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize(("arch", "codebook", "bits"), [("llama", "qtiphyb", 2), ("qwen2", "qtiphyb", 4),
                                                        ("llama", "qtip3inst", 3)])
def test_native_step_runs_tile_decoded_trellis_layers(level: str, arch: str, codebook: str, bits: int) -> None:
    """HYB layers (each with its own table, changed from the initial one as fine-tuning leaves it) and 3INST
    layers in the native step: float32 activations, so both loops agree up to float rounding; a bound
    layer gives its forward's bits."""
    model = _family_model(arch, quantized=True, codebook=codebook, bits=bits)
    layers = [m for m in model.modules() if type(m).__name__ == "QuantizedLinear"]
    assert layers and all(m.codebook.name == f"{codebook.upper()}{bits}" for m in layers)
    with torch.no_grad():
        for i, m in enumerate(layers):
            if m.lut is not None:
                m.lut.mul_(1.0 + 0.05 * i)
    kernels.use(model, _level(level))
    bounds = [m.bind() for m in layers]
    assert all(b is not None and b.trellis_code and not b.trellis_int8 for b in bounds)
    assert all(b.trellis_lut == (None if m.lut is None else m.lut.data_ptr()) for b, m in zip(bounds, layers,
                                                                                          strict=True))
    _assert_steps_match(model)
    layer = layers[0]
    x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(bounds[0](x, torch.empty(1, layer.out_features)), layer(x))


def test_longrope_switch_in_the_native_step() -> None:
    """Phi-3 LongRoPE with partial rotary dims: tokens whose pass ends past
    original_max_position_embeddings take the long-factor tables."""
    original = PROMPT + 3
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": original}
    model = _family_model("phi3", rope_parameters=rope, original_max_position_embeddings=original)
    _, fast = _both(model)
    assert fast.ropes[0].switch == original and fast.ropes[0].long is not None
    _assert_steps_match(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_head_in_the_step(arch: str) -> None:
    """The rotated int8 head with int8 activations (native) stays close to torch's bf16-activation int8
    head on the same rows and to the exact float head."""
    model = _family_model(arch, quantized=True)
    python, fast = _both(model, head_dtype=torch.int8)
    exact = LeanDecoder(model, 32, native_step=False)
    ids = _ids(PROMPT + STEPS)
    got, expected, float_head = (_lean_incremental(d, ids) for d in (fast, python, exact))
    assert fast.native_step.vocab == python.vocab
    for g, e, f in zip(got[1:], expected[1:], float_head[1:], strict=True):
        assert not torch.equal(g, e)  # int8 activations: not the same numbers
        torch.testing.assert_close(g, e, rtol=0, atol=HEAD_TOL * e.abs().max().item())
        torch.testing.assert_close(g, f, rtol=0, atol=HEAD_TOL * f.abs().max().item())
    # the step returns fresh logits (the native buffer is reused by the next token)
    assert got[1].data_ptr() != got[2].data_ptr()


@pytest.mark.parametrize("head_dtype", [None, torch.int8])
def test_nan_embedding_gives_nan_logits(head_dtype) -> None:
    model = _family_model("llama", quantized=True)
    fast = LeanDecoder(model, 32, native_step=True, head_dtype=head_dtype)
    fast.embed = fast.embed.clone()
    fast.embed[3] = float("nan")
    fast.prefill(_ids(PROMPT))
    assert torch.isnan(fast.step(3)).all()


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("n", [1, 31, 64, 65, 576, 1000])
def test_int8_head_kernel_is_exact_on_every_level(level: str, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    weight = torch.randint(-127, 128, (131, n), generator=gen, dtype=torch.int8)
    weight[0] = 127  # the extremes: pair sums at vpmaddubsw's limit
    weight[1] = -127
    xq = torch.randint(-127, 128, (n,), generator=gen, dtype=torch.int8)
    xq[::2] = -127
    exact = (weight.int() * xq.int()).sum(dim=1)
    assert torch.equal(native_mod.dot_rows_int8(weight, xq, _level(level)), exact)


def test_native_step_refusals_name_the_layer() -> None:
    model = _family_model("llama", quantized=False)
    model.model.layers[1].mlp.down_proj.to(torch.bfloat16)
    with pytest.raises(UnsupportedModelError, match=r"block 1: mlp\.down_proj .*bfloat16"):
        LeanDecoder(model, 32, native_step=True)
    auto = LeanDecoder(model, 32)  # the default falls back to the Python loop
    assert auto.native_step is None


def test_native_step_bad_arguments() -> None:
    fast = LeanDecoder(_family_model("llama", quantized=True), 16, native_step=True)
    step = fast.native_step
    with pytest.raises(ValueError, match="x must be"):
        step(torch.zeros(fast.hidden + 1), 0)
    with pytest.raises(ValueError, match="x must be"):
        step(torch.zeros(fast.hidden, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="position"):
        step(torch.zeros(fast.hidden), 16)
    with pytest.raises(ValueError, match="logits need a head"):
        step(torch.zeros(fast.hidden), 0, torch.zeros(fast.vocab))


def test_inconsistent_step_description_is_refused() -> None:
    """qs_step_check refuses a description whose shapes do not fit (here the o and down linears swapped)."""
    fast = LeanDecoder(_family_model("llama", quantized=True), 16, native_step=True)
    spec = fast.native_step._keep[0][0]  # the StepBlock list
    swapped = [dataclasses.replace(spec[0], o=spec[0].down, down=spec[0].o), *spec[1:]]
    ropes = fast.native_step._keep[0][1]
    with pytest.raises(native_mod.KernelError, match="bad argument"):
        native_mod.DecodeStep(swapped, ropes, hidden=fast.hidden, heads=fast.heads, kv_heads=fast.kv_heads,
                              head_dim=fast.head_dim, inter=fast.intermediate, max_len=16, act=fast.act_name,
                              eps=fast.eps, scale=fast.scale, attn_softcap=None)
