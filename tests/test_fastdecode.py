"""The lean decoding loop (issues 4 and 12): for every model family, the same logits as transformers'
cached decoding and the same greedy tokens, float and quantized, beyond sliding windows and across a
LongRoPE switch; bound native calls equal to the checked ones; one-line refusals of what it does not run."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from quipsharp import kernels
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.fastdecode import LeanDecoder, UnsupportedModelError, supports, unsupported_reason
from quipsharp.models.families import SUPPORTED_MODEL_TYPES, family_for
from quipsharp.nn import QuantizedLinear
from quipsharp.pipeline import quantize_model
from tests.tiny_models import VOCAB, tiny_config, tiny_model

PROMPT = 6
STEPS = 10  # 16 positions: beyond the tiny Gemma-2/3 sliding window of 8
TOL = 1e-5  # float rounding only: both sides run the same kernels at the same batch sizes
#: tiny_models architectures of every family the lean loop runs
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"]
WINDOW = 8
#: large enough that attention is far from uniform (a wrong mask, window or RoPE changes the logits)
INIT_RANGE = 0.2
NORM_NOISE = 0.3
#: Gemma-2 soft caps that bite at these magnitudes (the defaults 50 and 30 barely change tiny logits)
GEMMA2_CAPS = {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 5.0}
native = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")


def _quantize(model, codebook: str = "e8p", bits: int = 2):
    model, _ = quantize_model(model, ModelQuantConfig(layer=QuIPSharpConfig(bits=bits, codebook=codebook)), None,
                              progress=False)
    return model


def _quantized(arch: str):
    return _quantize(tiny_model(arch))


def _family_model(arch: str, quantized: bool = False, codebook: str = "e8p", bits: int = 2, **changes):
    """A tiny random ``arch`` model whose logits depend on every step the loop takes: weights of
    :data:`INIT_RANGE`, norm weights moved off their init (1, or Gemma's 0 for ``1 + w``), Gemma-2
    caps that bite, config ``changes``; quantized with ``codebook`` at ``bits`` (data-free) if
    ``quantized``."""
    cfg = tiny_config(arch)
    cfg.initializer_range = INIT_RANGE
    for key, value in {**(GEMMA2_CAPS if arch == "gemma2" else {}), **changes}.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(NORM_NOISE * torch.randn(p.shape, generator=gen))
    return _quantize(model, codebook, bits) if quantized else model


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 8, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hf_incremental(model, ids: torch.Tensor, prompt: int = PROMPT) -> list[torch.Tensor]:
    """transformers' logits: the prompt in one pass, then one token at a time through its cache."""
    out = model(input_ids=ids[None, :prompt], use_cache=True)
    logits, cache = [out.logits[0, -1]], out.cache
    for t in range(prompt, ids.numel()):
        out = model(input_ids=ids[None, t:t + 1], cache=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        cache = out.cache
    return logits


def _lean_incremental(dec: LeanDecoder, ids: torch.Tensor, prompt: int = PROMPT) -> list[torch.Tensor]:
    return [dec.prefill(ids[:prompt])] + [dec.step(int(t)) for t in ids[prompt:]]


def _assert_same_logits(model, ids: torch.Tensor, prompt: int = PROMPT, max_len: int = 32) -> LeanDecoder:
    expected = _hf_incremental(model, ids, prompt)
    dec = LeanDecoder(model, max_len=max_len)
    got = _lean_incremental(dec, ids, prompt)
    assert dec.length == ids.numel()
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=TOL, atol=TOL, msg=lambda m, i=i: f"position {prompt + i - 1}: {m}")
    return dec


def test_each_tested_arch_is_one_family_record() -> None:
    assert {family_for(tiny_config(a).model_type).name for a in FAMILIES} == set(FAMILIES)
    assert set(SUPPORTED_MODEL_TYPES) >= {tiny_config(a).model_type for a in FAMILIES}


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=native)])
def test_lean_logits_match_transformers(arch: str, quantized: bool) -> None:
    model = _family_model(arch, quantized)
    assert quantized == any(isinstance(m, QuantizedLinear) for m in model.modules())
    _assert_same_logits(model, _ids(PROMPT + STEPS))


@native
@pytest.mark.parametrize("arch", FAMILIES)
def test_lean_greedy_tokens_equal_generate(arch: str) -> None:
    # an untied head: a tied one makes some of these random models echo their last token forever
    model = _family_model(arch, quantized=True, tie_word_embeddings=False)
    prompt, new = _ids(PROMPT, seed=1), STEPS + 2
    with torch.no_grad():
        ref = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, PROMPT, dtype=torch.long),
                             max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)[0, PROMPT:]
    dec = LeanDecoder(model, max_len=PROMPT + new)
    assert list(dec.generate(prompt, new)) == ref.tolist()
    assert len(set(ref.tolist())) > 1  # not a degenerate model repeating one token


@pytest.mark.parametrize("arch,changes", [
    ("mistral", {"sliding_window": WINDOW}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
               "layer_types": ["full_attention", "sliding_attention"]}),
    ("phi3", {"sliding_window": WINDOW}),
    ("gemma2", {}),
    ("gemma3", {}),
])
def test_prompts_and_decoding_beyond_the_sliding_window(arch: str, changes: dict) -> None:
    model = _family_model(arch, **changes)
    ids = _ids(2 * WINDOW + 4, seed=2)
    dec = _assert_same_logits(model, ids, prompt=WINDOW + 4)  # the prompt's own mask is banded
    assert any(b.window == WINDOW for b in dec.blocks)
    unwindowed = _family_model(arch, **{**changes, "sliding_window": None})  # the window changes the logits
    far = _lean_incremental(LeanDecoder(unwindowed, max_len=32), ids, WINDOW + 4)[-1]
    assert not torch.allclose(far, _lean_incremental(dec, ids, WINDOW + 4)[-1], atol=1e-3)


def test_longrope_switches_to_long_factors_where_transformers_does() -> None:
    """Phi-3 LongRoPE with partial rotary dims: short factors while a pass ends within the original
    length (10 here), long factors after, so decoding crosses the switch."""
    original = 10
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": original}
    cfg = tiny_config("phi3")
    cfg = type(cfg)(**{**cfg.to_dict(), "rope_parameters": rope, "original_max_position_embeddings": original,
                       "initializer_range": INIT_RANGE})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    dec = _assert_same_logits(model, _ids(2 * original), prompt=PROMPT)
    table = dec.ropes[0]
    assert table.switch == original and table.long is not None and not torch.equal(table.long[0], table.cos)
    rotary = dec.head_dim // 2  # partial_rotary_factor 0.5: the other half of each head passes unrotated
    assert torch.equal(table.cos[:, rotary:], torch.ones_like(table.cos[:, rotary:]))
    assert not table.ssin[:, rotary:].any()
    _assert_same_logits(model, _ids(original + 6), prompt=original + 2)  # a prompt beyond the switch: long from 0


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


@native
def test_lean_generation_restarts_and_stops_at_eos() -> None:
    model = _quantized("llama")
    prompt = _ids(PROMPT, seed=1)
    dec = LeanDecoder(model, max_len=PROMPT + 12)
    first = list(dec.generate(prompt, 12))
    assert list(dec.generate(prompt, 12)) == first  # a second run starts from an empty cache
    assert list(dec.generate(prompt, 12, eos_token_id=first[0])) == [first[0]]  # stops at (and yields) EOS


def _refusal(model, max_len: int | None = None) -> str:
    """The one-line reason, checked to agree with supports() and LeanDecoder's error."""
    reason = unsupported_reason(model, max_len)
    assert reason is not None and "\n" not in reason and not supports(model, max_len)
    with pytest.raises(UnsupportedModelError) as err:
        LeanDecoder(model, max_len=max_len or 16)
    assert str(err.value) == reason
    return reason


def test_unsupported_models_are_refused_in_one_line(caplog) -> None:
    for arch in ("gpt2", "opt"):
        reason = _refusal(tiny_model(arch))
        assert reason.startswith("lean decoding supports") and repr(arch) in reason
    with caplog.at_level(logging.INFO, logger="quipsharp.fastdecode"):
        supports(tiny_model("gpt2"))
    assert "'gpt2'" in caplog.text  # the auto engines log why they fall back to transformers
    assert "use_bidirectional_attention" in _refusal(_family_model("gemma3", use_bidirectional_attention=True))
    assert "'relu'" in _refusal(_family_model("llama", hidden_act="relu"))
    odd_rope = tiny_model("llama")
    odd_rope.model.rotary_emb.rope_type = "mystery"
    assert "'mystery' RoPE" in _refusal(odd_rope)
    rewired = tiny_model("phi3")
    del rewired.model.layers[1].mlp.gate_up_proj
    assert "block 1 has no mlp.gate_up_proj" in _refusal(rewired)
    assert all(supports(_family_model(a)) for a in FAMILIES)


def test_bad_lengths_are_clear_errors() -> None:
    dec = LeanDecoder(tiny_model("llama"), max_len=8)
    with pytest.raises(ValueError, match="exceed the cache"):
        list(dec.generate(_ids(6), 3))
    with pytest.raises(ValueError, match="does not fit"):
        dec.prefill(_ids(8))
    dec.prefill(_ids(7))
    dec.step(1)
    with pytest.raises(ValueError, match="full"):
        dec.step(1)


def _variant(**changes):
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
    _assert_same_logits(model, _ids(PROMPT + STEPS), max_len=16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=native)])
def test_bfloat16_model_decodes_close_to_transformers(arch: str, quantized: bool) -> None:
    model = (_quantized(arch) if quantized else tiny_model(arch)).to(torch.bfloat16)
    ids = _ids(PROMPT + STEPS)
    expected = _hf_incremental(model, ids)
    got = _lean_incremental(LeanDecoder(model, max_len=32), ids)
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
    gemma_dir = save_tiny_model_dir(tmp_path / "gemma3", arch="gemma3")
    assert main(["generate", str(gemma_dir), "--prompt", "The", "--max-new-tokens", "12", "--engine", "lean"]) == 0


def test_cli_auto_engine_respects_the_generation_config() -> None:
    from types import SimpleNamespace

    from quipsharp.cli import _lean_engine, _stop_ids

    assert _lean_engine("auto", tiny_model("gemma2"), 16)
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
