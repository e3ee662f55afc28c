"""The lean decoding loop (issue 4): same logits as transformers' cached decoding, same greedy tokens,
bound native calls equal to the checked ones, clear errors for what it does not run."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp import kernels
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.fastdecode import LeanDecoder, UnsupportedModelError, supports
from quipsharp.nn import QuantizedLinear
from quipsharp.pipeline import quantize_model
from tests.tiny_models import VOCAB, tiny_config, tiny_model

PROMPT = 6
STEPS = 6
TOL = 1e-5  # float rounding only: both sides run the same kernels at the same batch sizes
native = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")


def _quantized(arch: str):
    model, _ = quantize_model(tiny_model(arch), ModelQuantConfig(layer=QuIPSharpConfig(bits=2)), None,
                              progress=False)
    return model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 8, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_incremental(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' logits: the prompt in one pass, then one token at a time through its cache."""
    out = model(input_ids=ids[None, :PROMPT], use_cache=True)
    logits, past = [out.logits[0, -1]], out.past_key_values
    for t in range(PROMPT, ids.numel()):
        out = model(input_ids=ids[None, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits[0, -1])
        past = out.past_key_values
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=native)])
def test_lean_logits_match_transformers(arch: str, quantized: bool) -> None:
    model = _quantized(arch) if quantized else tiny_model(arch)
    ids = _ids(PROMPT + STEPS)
    expected = _hf_incremental(model, ids)
    dec = LeanDecoder(model, max_len=32)
    got = [dec.prefill(ids[:PROMPT])] + [dec.step(int(t)) for t in ids[PROMPT:]]
    assert dec.length == PROMPT + STEPS
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL)


@native
def test_lean_greedy_generation_equals_generate_and_restarts() -> None:
    model = _quantized("llama")
    prompt = _ids(PROMPT, seed=1)
    with torch.no_grad():
        ref = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)[0, PROMPT:]
    dec = LeanDecoder(model, max_len=PROMPT + 12)
    assert list(dec.generate(prompt, 12)) == ref.tolist()
    assert list(dec.generate(prompt, 12)) == ref.tolist()  # a second run starts from an empty cache
    first = ref[0].item()
    assert list(dec.generate(prompt, 12, eos_token_id=first)) == [first]  # stops at (and yields) EOS


def test_sampling_is_seeded() -> None:
    dec = LeanDecoder(tiny_model("llama"), max_len=40)
    prompt = _ids(PROMPT)

    def sample(seed: int) -> list[int]:
        return list(dec.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed)))
    assert sample(3) == sample(3) and sample(3) != sample(4)


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2e-2), (torch.int8, 3e-2)])
def test_low_precision_heads_stay_close(dtype: torch.dtype, rel: float) -> None:
    model = tiny_model("llama")
    ids = _ids(PROMPT)
    exact = LeanDecoder(model, max_len=16).prefill(ids)
    dec = LeanDecoder(model, max_len=16, head_dtype=dtype)
    approx = dec.prefill(ids)
    assert dec.head.dtype == dtype and approx.dtype == torch.float32 and not torch.equal(approx, exact)
    torch.testing.assert_close(approx, exact, rtol=0, atol=rel * exact.abs().max().item())


def test_unsupported_models_and_bad_lengths_are_clear_errors() -> None:
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LeanDecoder(tiny_model("gpt2"), max_len=16)
    assert not supports(tiny_model("gemma2")) and supports(tiny_model("llama"))
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("mistral")
    cfg.sliding_window = 8
    windowed = AutoModelForCausalLM.from_config(cfg)
    assert supports(windowed, max_len=8)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        LeanDecoder(windowed, max_len=16)
    dec = LeanDecoder(tiny_model("llama"), max_len=8)
    with pytest.raises(ValueError, match="exceed the cache"):
        list(dec.generate(_ids(6), 3))
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(_ids(8))


def _variant(**changes):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    for key, value in changes.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_int8_head_pads_odd_vocabularies_and_refuses_odd_hidden_sizes() -> None:
    model = _variant(vocab_size=250)
    ids = _ids(PROMPT)
    exact = LeanDecoder(model, max_len=16).prefill(ids)
    approx = LeanDecoder(model, max_len=16, head_dtype=torch.int8).prefill(ids)
    assert approx.shape == exact.shape == (250,)
    torch.testing.assert_close(approx, exact, rtol=0, atol=3e-2 * exact.abs().max().item())
    with pytest.raises(ValueError, match="multiple of 64"):
        LeanDecoder(_variant(hidden_size=40), max_len=16, head_dtype=torch.int8)


def test_length_dependent_rope_is_refused_beyond_its_original_length() -> None:
    model = _variant(max_position_embeddings=16,
                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        LeanDecoder(model, max_len=32)
    ids = _ids(PROMPT + STEPS)
    expected = _hf_incremental(model, ids)
    dec = LeanDecoder(model, max_len=16)
    got = [dec.prefill(ids[:PROMPT])] + [dec.step(int(t)) for t in ids[PROMPT:]]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=native)])
def test_bfloat16_model_decodes_close_to_transformers(quantized: bool) -> None:
    model = (_quantized("llama") if quantized else tiny_model("llama")).to(torch.bfloat16)
    ids = _ids(PROMPT + STEPS)
    expected = _hf_incremental(model, ids)
    dec = LeanDecoder(model, max_len=32)
    got = [dec.prefill(ids[:PROMPT])] + [dec.step(int(t)) for t in ids[PROMPT:]]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e.float(), rtol=0, atol=5e-2 * e.abs().max().item())


@native
def test_bound_linear_equals_the_checked_call_and_fuses_the_residual() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen))
    layer = QuantizedLinear.from_linear(linear, config=QuIPSharpConfig(bits=2), seed=0)
    bound = layer.bind()
    assert bound is not None
    for batch in (1, 3, kernels.FUSED_MAX_BATCH):
        x = torch.randn(batch, 64, generator=gen)
        out = torch.empty(batch, 48)
        assert torch.equal(bound(x, out), layer(x))
    x, residual = torch.randn(1, 64, generator=gen), torch.randn(48, generator=gen)
    torch.testing.assert_close(bound(x, torch.empty(1, 48), residual), layer(x) + residual, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="BoundLinear"):
        bound(torch.randn(kernels.FUSED_MAX_BATCH + 1, 64), torch.empty(kernels.FUSED_MAX_BATCH + 1, 48))
    with pytest.raises(ValueError, match="BoundLinear"):
        bound(torch.randn(1, 64, dtype=torch.float64), torch.empty(1, 48))
    with pytest.raises(ValueError, match="BoundLinear"):
        bound(torch.randn(1, 64), torch.empty(48, 1))
    with pytest.raises(ValueError, match="residual"):
        bound(torch.randn(2, 64), torch.empty(2, 48), torch.randn(48))
    out = torch.empty(1, 48)
    with pytest.raises(ValueError, match="overlap"):
        bound(torch.randn(1, 64), out, out[0])


def test_cli_lean_engine_on_an_unsupported_model_is_one_line(tmp_path, capsys) -> None:
    from quipsharp.cli import main
    from tests.tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "gpt2", arch="gpt2")
    assert main(["generate", str(model_dir), "--prompt", "The", "--max-new-tokens", "2", "--engine", "lean"]) == 2
    err = capsys.readouterr().err
    assert "lean decoding supports" in err and "gpt2" in err
    assert main(["generate", str(model_dir), "--prompt", "The", "--max-new-tokens", "2"]) == 0  # auto: generate


def test_cli_auto_engine_respects_the_generation_config() -> None:
    from types import SimpleNamespace

    from quipsharp.cli import _lean_engine, _stop_ids

    model = tiny_model("llama")
    assert _lean_engine("auto", model, 16)
    model.generation_config.eos_token_id = [5, 7]
    assert _stop_ids(model, SimpleNamespace(eos_token_id=0)) == [5, 7, 0]
    model.generation_config.repetition_penalty = 1.3  # transformers applies it even to greedy decoding
    assert not _lean_engine("auto", model, 16) and _lean_engine("lean", model, 16)


@native
def test_auto_head_is_int8_for_quantized_models_only() -> None:
    from quipsharp.fastdecode import default_head_dtype

    assert default_head_dtype(tiny_model("llama")) is None
    assert default_head_dtype(_quantized("llama")) == torch.int8
