"""A lean batch-1 decoding loop for Llama-family causal LMs (Llama, SmolLM2, Mistral, Qwen2).

For a 135M model the quantized layers are a minority of the time per token under
``model.generate``: transformers' per-token machinery (cache objects, masks, rotary recomputation,
module hooks) and the Python around 210 layer calls cost more. :class:`LeanDecoder` keeps the
model's own weights and modules but runs decoding as a flat sequence of tensor operations:

* a static KV cache ``[layers, kv_heads, max_len, head_dim]`` and rotary tables built once;
* every quantized linear bound once to its native call (:class:`quipsharp.kernels.BoundLinear`),
  q/k/v and gate/up writing into slices of one buffer, the residual additions of ``o_proj`` and
  ``down_proj`` fused into their calls;
* optionally a bfloat16 or int8 copy of the LM head (half or a quarter of the bytes of its float32
  GEMV, the largest single matrix of a small model).

The prompt goes through the same blocks as one batch (causal attention); each new token is then
one step. Logits equal the transformers model's up to float rounding (tested against it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quipsharp import kernels
from quipsharp.errors import QuipSharpError
from quipsharp.nn import QuantizedLinear

logger = logging.getLogger(__name__)

#: transformers ``model_type`` values whose decoder blocks this loop reproduces exactly.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SILU_ACTIVATIONS = ("silu", "swish")
INT8_MAX = 127
#: The linears of a decoder block, in the order the loop calls them (the fields of ``_Block``).
BLOCK_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
#: RoPE types whose frequencies transformers recomputes from the sequence length.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
#: torch's _weight_int8pack_mm is only correct for these multiples here (other shapes returned garbage
#: or crashed in tests): the hidden size must be a multiple of the first, the head rows are padded to the second.
INT8_HEAD_K_MULTIPLE = 64
INT8_HEAD_N_MULTIPLE = 8


class UnsupportedModelError(QuipSharpError, ValueError):
    """The model is not one the lean loop reproduces (use ``model.generate``)."""


LinearCall = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _bind(layer: nn.Module, threads: int | None) -> LinearCall:
    """``call(x [1, n], out [1, m], residual [m] | None)`` for one linear layer, float32."""
    bound = layer.bind(threads) if isinstance(layer, QuantizedLinear) else None
    if bound is not None:
        if bound.has_bias:
            def with_bias(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
                bound(x, out)
                return out if residual is None else out.add_(residual)
            return with_bias
        return bound
    if isinstance(layer, nn.Linear):
        weight, bias = layer.weight, layer.bias

        def dense(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            if weight.dtype == out.dtype:
                torch.mm(x, weight.T, out=out)
            else:  # a bf16/fp16 float layer in the float32 loop
                out.copy_(x.to(weight.dtype) @ weight.T)
            if bias is not None:
                out.add_(bias)
            return out if residual is None else out.add_(residual)
        return dense

    def generic(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out.copy_(layer(x))
        return out if residual is None else out.add_(residual)
    return generic


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization of ``weight`` ``[rows, n]``: ``(q int8 [rows, n], scales bf16 [rows])``
    with ``weight ≈ q · scales[:, None]`` (the lean loop's int8 LM head)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX).to(torch.bfloat16)
    q = torch.round(weight / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
    return q, scales


def _batched(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for float32 ``x`` ``[T, n]`` -> float32, whatever the layer's dtype."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and weight is not None and weight.dtype != x.dtype:
        return layer(x.to(weight.dtype)).float()
    return layer(x)


@dataclasses.dataclass
class _Block:
    norm1: torch.Tensor
    norm2: torch.Tensor
    q: LinearCall
    k: LinearCall
    v: LinearCall
    o: LinearCall
    gate: LinearCall
    up: LinearCall
    down: LinearCall
    modules: dict[str, nn.Module]  # the same layers as modules, for the prompt's batched pass


def check_supported(model: nn.Module, max_len: int | None = None) -> None:
    """Raise :class:`UnsupportedModelError` naming why the lean loop cannot run ``model`` (for
    sequences of up to ``max_len`` tokens)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"lean decoding supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}")
    act = getattr(cfg, "hidden_act", None)
    if act not in SILU_ACTIVATIONS:
        raise UnsupportedModelError(f"lean decoding needs a SiLU MLP, {model_type} model has {act!r}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers / model.rotary_emb")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and (max_len is None or max_len > window):
        raise UnsupportedModelError(f"lean decoding does not implement sliding-window attention (window {window}, "
                                    f"sequence {max_len})")
    rotary = inner.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str):
        raise UnsupportedModelError("lean decoding needs one RoPE type for all layers")
    limit = getattr(rotary, "original_max_seq_len", None)
    if rope_type in LENGTH_DEPENDENT_ROPE and (max_len is None or limit is None or max_len > limit):
        # transformers picks these frequencies from the current length; the lean tables are built once
        raise UnsupportedModelError(f"lean decoding builds RoPE tables once: {rope_type!r} RoPE beyond its "
                                    f"original {limit} positions changes with the sequence length")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise UnsupportedModelError("lean decoding runs on CPU")


class LeanDecoder:
    """Batch-1 decoding of ``model`` with a static cache of ``max_len`` positions.

    The loop computes in float32; a bfloat16 model's embeddings, norms and float layers are read in
    their dtype and its activations rounded only where its float layers need bf16 inputs, so its
    logits are close to, not equal to, transformers' bf16 forward.

    Args:
        model: a Llama/Mistral/Qwen2 causal LM on CPU, float32 or bfloat16, quantized or not; read-only.
        max_len: prompt plus generated tokens, at most.
        head_dtype: dtype of the LM head's matmul, the largest single matrix of a small model: None
            keeps the model's; ``torch.bfloat16`` halves its bytes (logits rounded to bf16);
            ``torch.int8`` quarters them (per-row absmax int8 weights times bf16 activations through
            torch's ``_weight_int8pack_mm``; logit errors near 1% of the largest logit).
        threads: native kernel threads (default torch's).

    Raises:
        UnsupportedModelError: another architecture (see :func:`check_supported`).
    """

    def __init__(self, model: nn.Module, max_len: int, *, head_dtype: torch.dtype | None = None,
                 threads: int | None = None) -> None:
        check_supported(model, max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        cfg = model.config
        inner = model.model
        self.max_len = max_len
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.intermediate = cfg.intermediate_size
        layers = list(inner.layers)
        attn0 = layers[0].self_attn
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.eps = float(inner.norm.variance_epsilon)
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight.float()  # the loop computes in float32 (bf16 models too)
        head = model.get_output_embeddings()
        self.head_bias = getattr(head, "bias", None)
        self.head_scales: torch.Tensor | None = None
        self.vocab = head.weight.shape[0]
        if head_dtype == torch.int8:  # per-row absmax int8 weights, bf16 activations (llama.cpp's Q8_0 idea)
            if self.hidden % INT8_HEAD_K_MULTIPLE:
                raise ValueError(f"an int8 LM head needs a hidden size that is a multiple of "
                                 f"{INT8_HEAD_K_MULTIPLE}, got {self.hidden}: use bfloat16")
            rows = -(-self.vocab // INT8_HEAD_N_MULTIPLE) * INT8_HEAD_N_MULTIPLE
            self.head, self.head_scales = int8_rows(F.pad(head.weight.detach().float(), (0, 0, 0, rows - self.vocab)))
        elif head_dtype is not None:
            self.head = head.weight.detach().to(head_dtype)
        else:
            self.head = head.weight
        self.blocks = [self._block(layer, threads) for layer in layers]
        self._rotary_tables(inner.rotary_emb)
        shape = (len(layers), self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._qkv = torch.empty(1, q + 2 * kv)
        self._gate_up = torch.empty(1, 2 * self.intermediate)
        self._x = [torch.empty(1, self.hidden), torch.empty(1, self.hidden)]
        self.length = 0
        calls = [getattr(b, name) for b in self.blocks for name in BLOCK_LINEARS]
        logger.info("lean decoding: %d blocks, %d of %d linears on bound native calls, LM head %s, cache %d",
                    len(self.blocks), sum(isinstance(c, kernels.BoundLinear) for c in calls), len(calls),
                    self.head.dtype, max_len)

    def _block(self, layer: nn.Module, threads: int | None) -> _Block:
        attn, mlp = layer.self_attn, layer.mlp
        modules = dict(zip(BLOCK_LINEARS, (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                           mlp.up_proj, mlp.down_proj), strict=True))
        return _Block(layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float(),
                      **{k: _bind(m, threads) for k, m in modules.items()}, modules=modules)

    def _rotary_tables(self, rotary: nn.Module) -> None:
        """cos and signed sin per position, so that ``rot(x) = x·cos + x[:, perm]·ssin`` (rotate-half RoPE)."""
        positions = torch.arange(self.max_len).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        half = self.head_dim // 2
        self.cos = cos[0].float().contiguous()  # [max_len, head_dim]
        sign = torch.cat([-torch.ones(half), torch.ones(half)])
        self.ssin = (sin[0].float() * sign).contiguous()
        self.perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)])

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.length = 0

    # ------------------------------------------------------------------ forward passes
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden,), weight, self.eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self._rms(x, self.final_norm)
        if self.head_scales is not None:
            logits = torch._weight_int8pack_mm(h.to(torch.bfloat16), self.head, self.head_scales)
            logits = logits[:, : self.vocab].float()
            return logits if self.head_bias is None else logits + self.head_bias
        return F.linear(h.to(self.head.dtype), self.head, self.head_bias).float()

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` ``[T]`` int64 from an empty cache; returns the last position's logits ``[vocab]``."""
        T = ids.numel()
        if T < 1 or T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit a cache of {self.max_len}")
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        q_end, k_end = H * D, (H + Hk) * D
        x = self.embed[ids.reshape(-1)].float()
        cos, ssin = self.cos[:T, None], self.ssin[:T, None]
        for layer, blk in enumerate(self.blocks):
            h = self._rms(x, blk.norm1)
            mods = blk.modules
            qkv = torch.cat([_batched(mods["q"], h), _batched(mods["k"], h), _batched(mods["v"], h)], dim=-1)
            qk = qkv[:, :k_end].reshape(T, H + Hk, D)
            qk = qk * cos + qk[..., self.perm] * ssin
            self.k_cache[layer, :, :T] = qk[:, H:].transpose(0, 1)
            self.v_cache[layer, :, :T] = qkv[:, k_end:].reshape(T, Hk, D).transpose(0, 1)
            attn = F.scaled_dot_product_attention(
                qk[:, :H].transpose(0, 1)[None], self.k_cache[layer, None, :, :T], self.v_cache[layer, None, :, :T],
                is_causal=True, scale=self.scale, enable_gqa=Hk != H)
            x = x + _batched(mods["o"], attn[0].transpose(0, 1).reshape(T, q_end))
            h = self._rms(x, blk.norm2)
            x = x + _batched(mods["down"], F.silu(_batched(mods["gate"], h)) * _batched(mods["up"], h))
        self.length = T
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append one token at position ``self.length``; returns its next-token logits ``[vocab]``."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        q_end, k_end, inter = H * D, (H + Hk) * D, self.intermediate
        qkv, gate_up = self._qkv, self._gate_up
        x, x2 = self._x
        x.copy_(self.embed[token])  # (casts a bf16 embedding row)
        cos, ssin, perm = self.cos[pos], self.ssin[pos], self.perm
        for layer, blk in enumerate(self.blocks):
            h = self._rms(x, blk.norm1)
            blk.q(h, qkv[:, :q_end])
            blk.k(h, qkv[:, q_end:k_end])
            blk.v(h, qkv[:, k_end:])
            qk = qkv[0, :k_end].view(H + Hk, D)
            qk = torch.addcmul(qk * cos, qk[:, perm], ssin)
            self.k_cache[layer, :, pos] = qk[H:]
            self.v_cache[layer, :, pos] = qkv[0, k_end:].view(Hk, D)
            attn = F.scaled_dot_product_attention(
                qk[:H].view(1, H, 1, D), self.k_cache[layer, None, :, : pos + 1],
                self.v_cache[layer, None, :, : pos + 1], scale=self.scale, enable_gqa=Hk != H)
            blk.o(attn.reshape(1, q_end), x2, x[0])  # x2 = o(attn) + x
            h = self._rms(x2, blk.norm2)
            blk.gate(h, gate_up[:, :inter])
            blk.up(h, gate_up[:, inter:])
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            blk.down(act, x, x2[0])  # x = down(act) + x2
        self.length = pos + 1
        return self._logits(x)[0]

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | list[int] | None = None,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids after ``prompt`` ``[T]`` (greedy when
        ``temperature`` is 0, else sampled from ``softmax(logits / temperature)`` with ``generator``)."""
        ids = prompt.reshape(-1).to(torch.int64)
        if ids.numel() + max_new_tokens > self.max_len:
            raise ValueError(f"{ids.numel()} prompt + {max_new_tokens} new tokens exceed the cache of {self.max_len}")
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self.reset()
        logits = self.prefill(ids)
        for i in range(max_new_tokens):
            token = _pick(logits, temperature, generator)
            yield token
            if token in stops or i == max_new_tokens - 1:
                return
            logits = self.step(token)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def default_head_dtype(model: nn.Module) -> torch.dtype | None:
    """The LM-head dtype the CLI's ``--head-dtype auto`` picks: int8 for a model with quantized layers
    (costs +0.06% perplexity on SmolLM2, BENCHMARKS.md) when the hidden size allows it, else the
    model's own (None)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0)
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    return torch.int8 if quantized and hidden and hidden % INT8_HEAD_K_MULTIPLE == 0 else None


def supports(model: nn.Module, max_len: int | None = None) -> bool:
    """Whether :class:`LeanDecoder` can run ``model``."""
    try:
        check_supported(model, max_len)
    except UnsupportedModelError:
        return False
    return True
