"""A lean batch-1 decoding loop for decoder-only causal LMs: Llama/SmolLM2, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3.

For a 135M model the quantized layers are a minority of the time per token under
``model.generate``: transformers' per-token machinery (cache objects, masks, rotary recomputation,
module hooks) and the Python around 210 layer calls cost more. :class:`LeanDecoder` keeps the
model's own weights and modules but runs decoding as a flat sequence of tensor operations:

* a static KV cache ``[layers, kv_heads, max_len, head_dim]`` and rotary tables built once;
* each new token through every block in one native call (:class:`quipsharp.kernels.native.DecodeStep`:
  norms, quantized or dense float32 linears, RoPE, the cache, attention and the MLP in C, the threads
  kept in one parallel region) when every linear allows it; otherwise a Python step with every
  quantized linear bound once to its native call (:class:`quipsharp.kernels.BoundLinear`), q/k/v
  and gate/up writing into slices of one buffer, the residual additions of ``o_proj`` and
  ``down_proj`` fused into their calls (when no norm sits between them, i.e. not in Gemma-2/3);
* optionally a bfloat16 or int8 copy of the LM head (half or a quarter of the bytes of its float32
  GEMV, the largest single matrix of a small model); the int8 one runs inside the native step.

The families differ only in data (:mod:`quipsharp.models.families`): attribute paths, the norm's
weight, the activation, embedding scaling, extra norms, q/k norms, soft-capping, sliding windows
and RoPE per layer type. One block function (:meth:`LeanDecoder._blocks`) runs T tokens: the
prompt as one batch (causal attention), and each new token as a batch of one through the bound
native calls when the native step is unavailable. Logits equal the transformers model's up to float
rounding (tested against it for every family). What the loop does not reproduce is refused with a
one-line reason (:func:`unsupported_reason`).
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
from quipsharp.hadamard import factor_dim, hadamard_transform, orthonormal_factor
from quipsharp.kernels.native import (
    STEP_ACTIVATIONS,
    BlockParams,
    DecodeStep,
    StepBlock,
    StepHead,
    StepLinear,
    StepRope,
)
from quipsharp.models.families import (
    ACTIVATIONS,
    SUPPORTED_MODEL_TYPES,
    Family,
    family_for,
    layer_windows,
    resolve,
)
from quipsharp.nn import QuantizedLinear

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_MODEL_TYPES", "LeanDecoder", "UnsupportedModelError", "check_supported", "default_head_dtype",
           "int8_rows", "rotated_int8_head", "supports", "unsupported_reason"]

INT8_MAX = 127
#: RoPE types whose frequencies transformers fixes when it builds the rotary module.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: RoPE types (substring) whose frequencies transformers recomputes from the sequence length beyond
#: the rotary module's ``original_max_seq_len``; the lean tables are built once, so refused beyond it.
DYNAMIC_ROPE = "dynamic"
#: LongRoPE (Phi-3): short-factor frequencies while a forward pass ends within
#: ``original_max_position_embeddings`` positions, long-factor ones after (two tables here).
LONG_ROPE = "longrope"
#: torch's _weight_int8pack_mm is only correct for these multiples here (other shapes returned garbage
#: or crashed in tests): the hidden size must be a multiple of the first, the head rows are padded to the second.
INT8_HEAD_K_MULTIPLE = 64
INT8_HEAD_N_MULTIPLE = 8


class UnsupportedModelError(QuipSharpError, ValueError):
    """The model is not one the lean loop reproduces (use ``model.generate``)."""


#: ``call(x [T, n], out [T, m], residual [T, m] | None) -> out``: ``out = layer(x) (+ residual)``, float32.
LinearCall = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _bind(layer: nn.Module, threads: int | None) -> LinearCall:
    """The one-token call of a linear layer: its bound native call when it has one (``T == 1``; the
    residual, ``[1, m]``, fused into the kernel), else a dense ``mm`` into ``out``."""
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
    return _batched_call(layer)


def _batched_call(layer: nn.Module) -> LinearCall:
    """The T-token call of a linear layer: the module's own forward (as transformers calls it), copied into ``out``."""
    def batched(x: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = _batched(layer, x)
        return out.copy_(y) if residual is None else torch.add(y, residual, out=out)
    return batched


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization of ``weight`` ``[rows, n]``: ``(q int8 [rows, n], scales bf16 [rows])``
    with ``weight ≈ q · scales[:, None]`` (the lean loop's int8 LM head)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX).to(torch.bfloat16)
    q = torch.round(weight / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()
    return q, scales


def rotated_int8_head(weight: torch.Tensor, final_norm: torch.Tensor, row_multiple: int = 1) -> StepHead:
    """The int8 LM head of ``weight`` ``[vocab, hidden]``: its rows rotated by the Hadamard transform
    ``U`` of the hidden size (``W Uᵀ``: logits ``= (W Uᵀ)(U h)``, and the native step may quantize the
    rotated vector ``U h`` to int8 with one scale, the rotation spreading the few large channels of
    ``h``), then per-row absmax int8, zero rows appended up to a multiple of ``row_multiple``.
    On 2-bit SmolLM2 (1,024 WikiText tokens; ``benchmarks/decode_step.py --parts head``) the mean NLL
    moves by -0.0003 nats with these rows and float32 activations (+0.0011 unrotated), by +0.0013
    with int8 activations (+0.0079 unrotated)."""
    vocab, hidden = weight.shape
    rows = -(-vocab // row_multiple) * row_multiple
    q, scales = int8_rows(F.pad(hadamard_transform(weight.detach().float()), (0, 0, 0, rows - vocab)))
    K, _, kind = factor_dim(hidden)
    return StepHead(final_norm.contiguous(), q, scales.float(), orthonormal_factor(K, kind).float().contiguous())


def _batched(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for float32 ``x`` ``[T, n]`` -> float32, whatever the layer's dtype."""
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and weight is not None and weight.dtype != x.dtype:
        return layer(x.to(weight.dtype)).float()
    return layer(x)


# ---------------------------------------------------------------------------------------------- support checks
def _rope_layer_types(family: Family, config: object) -> list[str | None]:
    """The rotary module's frequency sets the loop needs: one per layer type (Gemma-3) or one (None)."""
    if not family.rope_per_layer_type:
        return [None]
    return sorted(set(getattr(config, "layer_types", None) or []))


def _rope_type(rotary: nn.Module, layer_type: str | None) -> object:
    """The rotary module's RoPE type (a str when usable) for ``layer_type`` (None: the module's only one)."""
    kinds = getattr(rotary, "rope_type", "default")
    if layer_type is None:
        return kinds
    return kinds.get(layer_type) if isinstance(kinds, dict) else None


def _rope_reason(rotary: nn.Module, config: object, layer_type: str | None, max_len: int | None) -> str | None:
    kind = _rope_type(rotary, layer_type)
    where = "" if layer_type is None else f" ({layer_type} layers)"
    if not isinstance(kind, str):
        return f"lean decoding needs one RoPE type per layer type, got {kind!r}{where}"
    if kind in STATIC_ROPE:
        return None
    if DYNAMIC_ROPE in kind:
        limit = getattr(rotary, "original_max_seq_len", None)
        if max_len is None or limit is None or max_len > limit:
            # transformers picks these frequencies from the current length; the lean tables are built once
            return (f"lean decoding builds RoPE tables once: {kind!r} RoPE{where} beyond its original {limit} "
                    f"positions changes with the sequence length (asked for {max_len})")
        return None
    if kind == LONG_ROPE:
        params = _rope_parameters(config, layer_type)
        if "original_max_position_embeddings" not in params:
            return f"lean decoding needs original_max_position_embeddings for {kind!r} RoPE{where}"
        return None
    return f"lean decoding does not implement {kind!r} RoPE{where}"


def _rope_parameters(config: object, layer_type: str | None) -> dict:
    """``config.rope_parameters``, or its entry for ``layer_type``."""
    params = getattr(config, "rope_parameters", None) or {}
    return (params.get(layer_type) or {}) if layer_type is not None else params


def unsupported_reason(model: nn.Module, max_len: int | None = None) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` for sequences of up to ``max_len`` tokens (one
    line), or None when it can. ``max_len`` None: any length (refuses length-dependent RoPE)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    family = family_for(model_type)
    if family is None:
        return f"lean decoding supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}"
    for flag in family.refused_flags:
        if getattr(cfg, flag, False):
            return f"lean decoding does not implement {model_type} with {flag}={getattr(cfg, flag)!r}"
    act = getattr(cfg, family.activation_key, None)
    if act not in ACTIVATIONS:
        return f"lean decoding needs a {'/'.join(ACTIVATIONS)} MLP, {model_type} model has {act!r}"
    name = type(model).__name__
    try:
        layers = resolve(model, family.layers)
        for path in (family.embed, family.final_norm, family.rotary):
            resolve(model, path)
    except AttributeError as e:
        return f"{name} does not have the {family.name} layout: {e}"
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return f"{name}: {family.layers} is not a non-empty ModuleList"
    block_paths = (*family.linear_paths, family.attn_norm, family.mlp_norm,
                   *(p for p in (family.attn_out_norm, family.mlp_out_norm, family.q_norm, family.k_norm) if p))
    for i, layer in enumerate(layers):
        for path in block_paths:
            try:
                resolve(layer, path)
            except AttributeError:
                return f"{name} block {i} has no {path} ({family.name} layout)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "weight", None) is None or head.weight.dim() != 2:
        return f"{name} has no LM head with a [vocab, hidden] weight"
    rotary = resolve(model, family.rotary)
    layer_types = _rope_layer_types(family, cfg)
    if not layer_types:
        return f"{name}: {family.name} needs config.layer_types for its per-layer-type RoPE"
    for layer_type in layer_types:
        reason = _rope_reason(rotary, cfg, layer_type, max_len)
        if reason is not None:
            return reason
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "lean decoding runs on CPU"
    return None


def check_supported(model: nn.Module, max_len: int | None = None) -> None:
    """Raise :class:`UnsupportedModelError` naming why the lean loop cannot run ``model`` (for
    sequences of up to ``max_len`` tokens)."""
    reason = unsupported_reason(model, max_len)
    if reason is not None:
        raise UnsupportedModelError(reason)


def supports(model: nn.Module, max_len: int | None = None) -> bool:
    """Whether :class:`LeanDecoder` can run ``model``; when not, the one-line reason is logged (INFO)."""
    reason = unsupported_reason(model, max_len)
    if reason is not None:
        logger.info("lean decoding unavailable, use transformers: %s", reason)
    return reason is None


# ---------------------------------------------------------------------------------------------- model state
@dataclasses.dataclass(frozen=True)
class _RopeTable:
    """RoPE as ``rot(x) = x·cos + x[..., perm]·ssin`` per position: cos and signed sin ``[max_len, D]``
    (rotate-half RoPE on the first ``2·len(inv_freq)`` dims, identity — cos 1, sin 0 — on the rest).
    LongRoPE: ``long`` holds the long-factor tables, used by passes ending after ``switch`` positions."""

    cos: torch.Tensor
    ssin: torch.Tensor
    perm: torch.Tensor
    long: tuple[torch.Tensor, torch.Tensor] | None = None
    switch: int = 0

    def rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cos [T, 1, D], ssin [T, 1, D], perm [D])`` for positions ``start..end-1`` of one pass."""
        cos, ssin = self.cos, self.ssin
        if self.long is not None and end > self.switch:
            cos, ssin = self.long
        return cos[start:end, None], ssin[start:end, None], self.perm


def _rope_tables(inv_freq: torch.Tensor, scaling: float, max_len: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, ssin)`` ``[max_len, head_dim]`` from ``inv_freq`` ``[rotary_dim / 2]`` as transformers computes them."""
    freqs = torch.arange(max_len)[:, None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    half = inv_freq.numel()
    sign = torch.cat([-torch.ones(half), torch.ones(half)])
    rest = head_dim - 2 * half
    cos = torch.cat([cos, torch.ones(max_len, rest)], dim=1)
    ssin = torch.cat([sin * sign, torch.zeros(max_len, rest)], dim=1)
    return cos.contiguous(), ssin.contiguous()


def _rope_table(rotary: nn.Module, config: object, layer_type: str | None, max_len: int,
                head_dim: int) -> _RopeTable:
    """The tables of the rotary module's frequencies for ``layer_type`` (None: its only set), read
    from the values it was built with (``original_inv_freq``: a dynamic RoPE may have grown its own)."""
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv_freq = getattr(rotary, f"{prefix}original_inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(rotary, f"{prefix}inv_freq")
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    half = inv_freq.numel()
    if 2 * half > head_dim:
        raise UnsupportedModelError(f"RoPE over {2 * half} dims does not fit heads of {head_dim}")
    perm = torch.cat([torch.arange(half, 2 * half), torch.arange(half), torch.arange(2 * half, head_dim)])
    cos, ssin = _rope_tables(inv_freq, scaling, max_len, head_dim)
    if _rope_type(rotary, layer_type) != LONG_ROPE:
        return _RopeTable(cos, ssin, perm)
    switch = int(_rope_parameters(config, layer_type)["original_max_position_embeddings"])
    if max_len <= switch:
        return _RopeTable(cos, ssin, perm)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # transformers swaps the frequencies and keeps the module's attention scaling
    long_freq, _ = ROPE_INIT_FUNCTIONS[LONG_ROPE](config, None, seq_len=switch + 1, layer_type=layer_type)
    return _RopeTable(cos, ssin, perm, _rope_tables(long_freq, scaling, max_len, head_dim), switch)


@dataclasses.dataclass(frozen=True)
class _Calls:
    """A block's linears as :data:`LinearCall` s, in the order the loop calls them."""

    qkv: tuple[LinearCall, ...]  # one fused [q | k | v] linear or three
    o: LinearCall
    gate_up: tuple[LinearCall, ...]  # one fused [gate | up] linear or two
    down: LinearCall


@dataclasses.dataclass(frozen=True)
class _Block(BlockParams):
    """One decoder block: its norms, window and RoPE table (:class:`BlockParams`) and its linears."""

    step: _Calls  # one token: bound native calls, residuals fused
    batch: _Calls  # T tokens: the modules' forwards


@dataclasses.dataclass(frozen=True)
class _Buffers:
    """The activations of one pass over T tokens (the single-token step's are allocated once)."""

    qkv: torch.Tensor  # [T, (H + 2·Hk)·D]
    qkv_parts: tuple[torch.Tensor, ...]  # the column slices the q/k/v (or fused) linears write
    gate_up: torch.Tensor  # [T, 2·I]
    gate_up_parts: tuple[torch.Tensor, ...]
    x2: torch.Tensor  # [T, hidden]: the residual stream after attention
    tmp: torch.Tensor  # [T, hidden]: an attention/MLP output before its norm (Gemma-2/3)


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


class LeanDecoder:
    """Batch-1 decoding of ``model`` with a static cache of ``max_len`` positions.

    The loop computes in float32; a bfloat16 model's embeddings, norms and float layers are read in
    their dtype and its activations rounded only where its float layers need bf16 inputs, so its
    logits are close to, not equal to, transformers' bf16 forward. Sliding-window layers keep every
    position in the cache and attend to the last ``window`` of them, so sequences may exceed the window.

    Args:
        model: a causal LM of a family in :mod:`quipsharp.models.families` on CPU, float32 or
            bfloat16, quantized or not; read-only.
        max_len: prompt plus generated tokens, at most.
        head_dtype: dtype of the LM head's matmul, the largest single matrix of a small model: None
            keeps the model's; ``torch.bfloat16`` halves its bytes (logits rounded to bf16);
            ``torch.int8`` quarters them (:func:`rotated_int8_head`: per-row absmax int8 rows of the
            head rotated by the Hadamard transform; the native step multiplies them with the int8
            rotated hidden state in the same call, the prompt's logits come from torch's
            ``_weight_int8pack_mm`` with bf16 activations).
        threads: native kernel threads (default torch's).
        native_step: run each new token's blocks as one native call (:class:`~quipsharp.kernels.native.DecodeStep`:
            no Python per layer, the threads kept in one parallel region) — True: required, False: the
            Python loop, None (default): when every linear is quantized on a native kernel or dense
            float32 and the kernels are built. Logits equal the Python loop's up to float rounding.

    Raises:
        UnsupportedModelError: a model the loop does not reproduce (see :func:`unsupported_reason`),
            or ``native_step=True`` for one the native step does not run (the reason named).
    """

    def __init__(self, model: nn.Module, max_len: int, *, head_dtype: torch.dtype | None = None,
                 threads: int | None = None, native_step: bool | None = None) -> None:
        check_supported(model, max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        cfg = model.config
        fam = family_for(cfg.model_type)
        assert fam is not None  # check_supported
        self.family = fam
        layers = list(resolve(model, fam.layers))
        attn0 = resolve(layers[0], fam.o_proj.rpartition(".")[0])
        self.max_len = max_len
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(attn0, "head_dim", None) or getattr(cfg, "head_dim", None) or self.hidden // self.heads
        self.intermediate = cfg.intermediate_size
        self.scale = float(getattr(attn0, "scaling", self.head_dim ** -0.5))
        self.act_name = getattr(cfg, fam.activation_key)
        self.act = ACTIVATIONS[self.act_name]
        final_norm = resolve(model, fam.final_norm)
        self.eps = _eps(final_norm)
        embed = resolve(model, fam.embed)
        self.embed = embed.weight
        self.embed_scale = embed.embed_scale.to(self.embed.dtype) if fam.scaled_embedding else None
        self.final_norm = self._norm_weight(final_norm)  # the loop computes in float32 (bf16 models too)
        self.attn_softcap = getattr(cfg, fam.attn_softcap_key, None) if fam.attn_softcap_key else None
        self.final_softcap = getattr(cfg, fam.final_softcap_key, None) if fam.final_softcap_key else None
        head = model.get_output_embeddings()
        self.head_bias = getattr(head, "bias", None)
        self.head_scales: torch.Tensor | None = None
        self.vocab = head.weight.shape[0]
        if head_dtype is not None and head_dtype != torch.int8:
            self.head = head.weight.detach().to(head_dtype)
        else:
            self.head = head.weight  # int8: built below, for the native step or for torch
        rotary = resolve(model, fam.rotary)
        rope_types = _rope_layer_types(fam, cfg)
        self.ropes = [_rope_table(rotary, cfg, t, max_len, self.head_dim) for t in rope_types]
        layer_types = getattr(cfg, "layer_types", None) or []
        windows = layer_windows(fam, cfg, len(layers))
        self.blocks = [self._block(layer, windows[i], rope_types.index(layer_types[i]) if fam.rope_per_layer_type
                                   else 0, threads) for i, layer in enumerate(layers)]
        shape = (len(layers), self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._qkv_sizes = (q, kv, kv) if len(fam.qkv) == 3 else (q + 2 * kv,)
        self._gate_up_sizes = (self.intermediate,) * 2 if len(fam.gate_up) == 2 else (2 * self.intermediate,)
        self._x = torch.empty(1, self.hidden)
        self._step_buffers = self._buffers(1)
        self.length = 0
        step_head = None
        if head_dtype == torch.int8:
            if self.hidden % INT8_HEAD_K_MULTIPLE:
                raise ValueError(f"an int8 LM head needs a hidden size that is a multiple of "
                                 f"{INT8_HEAD_K_MULTIPLE}, got {self.hidden}: use bfloat16")
            step_head = rotated_int8_head(head.weight, self.final_norm, INT8_HEAD_N_MULTIPLE)
            # torch's int8 matmul (the prompt's logits; every token's without the native step) reads the
            # same int8 rows with bf16 activations
            self.head, self.head_scales = step_head.weight, step_head.scales.to(torch.bfloat16)
        self.native_step: DecodeStep | None = None
        if native_step is not False:
            reason = self._build_native_step(layers, threads, step_head)
            if reason is not None and native_step:
                raise UnsupportedModelError(f"no native decoding step: {reason}")
            if reason is not None:
                logger.info("native decoding step unavailable, Python loop per token: %s", reason)
        self._step_logits = torch.empty(self.vocab) if self.native_step is not None and self.native_step.vocab else None
        calls = [c for b in self.blocks for c in (*b.step.qkv, b.step.o, *b.step.gate_up, b.step.down)]
        logger.info("lean decoding (%s): %d blocks, %d of %d linears on bound native calls, %s step, LM head %s, "
                    "cache %d", fam.name, len(self.blocks), sum(isinstance(c, kernels.BoundLinear) for c in calls),
                    len(calls), "native" if self.native_step is not None else "Python", self.head.dtype, max_len)

    def _build_native_step(self, layers: list[nn.Module], threads: int | None, head: StepHead | None) -> str | None:
        """Build :attr:`native_step` for ``layers`` (with the int8 ``head`` when given); or the reason
        it cannot run this model (one line)."""
        if not kernels.available():
            return "the native kernels are not built"
        if self.act_name not in STEP_ACTIVATIONS:
            return f"activation {self.act_name!r}"
        level = kernels.select(None).name
        fam = self.family

        def linear(layer: nn.Module, path: str) -> StepLinear | str:
            module = resolve(layer, path)
            if isinstance(module, QuantizedLinear):
                bound = module.bind(threads)
                return f"{path} is not on a native kernel" if bound is None else StepLinear.quantized(bound)
            weight = getattr(module, "weight", None)
            if type(module) is nn.Linear and weight is not None and weight.dtype == torch.float32:
                return StepLinear.dense(weight, module.bias, level)
            return f"{path} is a {type(module).__name__} of {getattr(weight, 'dtype', None)}"

        blocks = []
        for i, (layer, blk) in enumerate(zip(layers, self.blocks, strict=True)):
            parts = [linear(layer, p) for p in (*fam.qkv, fam.o_proj, *fam.gate_up, fam.down_proj)]
            bad = next((p for p in parts if isinstance(p, str)), None)
            if bad is not None:
                return f"block {i}: {bad}"
            nq, ng = len(fam.qkv), len(fam.gate_up)
            blocks.append(StepBlock(tuple(parts[:nq]), parts[nq], tuple(parts[nq + 1:nq + 1 + ng]), parts[-1],
                                    blk, self.k_cache[i], self.v_cache[i]))
        ropes = [StepRope(r.cos, r.ssin, r.perm, r.long, r.switch) for r in self.ropes]
        self.native_step = DecodeStep(blocks, ropes, hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads,
                                      head_dim=self.head_dim, inter=self.intermediate, max_len=self.max_len,
                                      act=self.act_name, eps=self.eps, scale=self.scale,
                                      attn_softcap=self.attn_softcap, threads=threads, level=level,
                                      head=None if head is None else dataclasses.replace(
                                          head, weight=head.weight[:self.vocab], scales=head.scales[:self.vocab]))
        return None

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        """The float32 weight the loop multiplies by: ``w`` or Gemma's ``1 + w``."""
        weight = norm.weight.detach().float()
        return weight + 1.0 if self.family.norm == "rms_one_plus" else weight

    def _block(self, layer: nn.Module, window: int | None, rope: int, threads: int | None) -> _Block:
        fam = self.family

        def calls(make: Callable[[nn.Module], LinearCall]) -> _Calls:
            return _Calls(tuple(make(resolve(layer, p)) for p in fam.qkv), make(resolve(layer, fam.o_proj)),
                          tuple(make(resolve(layer, p)) for p in fam.gate_up), make(resolve(layer, fam.down_proj)))

        def norm(path: str | None) -> torch.Tensor | None:
            return None if path is None else self._norm_weight(resolve(layer, path))

        return _Block(norm(fam.attn_norm), norm(fam.mlp_norm), norm(fam.attn_out_norm), norm(fam.mlp_out_norm),
                      norm(fam.q_norm), norm(fam.k_norm), window, rope,
                      step=calls(lambda m: _bind(m, threads)), batch=calls(_batched_call))

    def _buffers(self, T: int) -> _Buffers:
        def split(buf: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(buf.split(sizes, dim=1)) if len(sizes) > 1 else (buf,)

        qkv, gate_up = torch.empty(T, sum(self._qkv_sizes)), torch.empty(T, 2 * self.intermediate)
        return _Buffers(qkv, split(qkv, self._qkv_sizes), gate_up, split(gate_up, self._gate_up_sizes),
                        torch.empty(T, self.hidden), torch.empty(T, self.hidden))

    def reset(self) -> None:
        """Forget the cached sequence."""
        self.length = 0

    # ------------------------------------------------------------------ forward passes
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dimension of ``x`` ``[..., len(weight)]``."""
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def _embed(self, ids: torch.Tensor | int) -> torch.Tensor:
        """Float32 embeddings of ``ids`` (``[T]`` -> ``[T, hidden]``; an int -> ``[hidden]``), scaled as the
        model scales them."""
        rows = self.embed[ids]
        if self.embed_scale is not None:
            rows = rows * self.embed_scale  # in the embedding's dtype, as transformers rounds it
        return rows.float()

    def _attention(self, layer: int, window: int | None, q: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of queries ``q`` ``[T, H, D]`` at positions ``start..start+T-1`` over the cached
        keys and values of ``layer`` (causal, within ``window``); returns ``[T, H·D]``."""
        T, H, D = q.shape
        end = start + T
        lo = 0 if window is None else max(0, start - window + 1)  # the first key any of these queries sees
        k, v = self.k_cache[layer, None, :, lo:end], self.v_cache[layer, None, :, lo:end]
        mask, causal = None, False
        if T > 1:
            if start == 0 and (window is None or window >= end):
                causal = True
            else:
                qpos, kpos = torch.arange(start, end)[:, None], torch.arange(lo, end)[None]
                mask = (kpos <= qpos) & (kpos > qpos - window) if window is not None else kpos <= qpos
        if self.attn_softcap is None:
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.scale, enable_gqa=self.kv_heads != H)
            return out[0].transpose(0, 1).reshape(T, H * D)
        # soft-capped scores (Gemma-2), as transformers' eager attention: cap · tanh(s / cap), mask, softmax
        if causal:
            mask = torch.ones(T, T, dtype=torch.bool).tril()
        g, Hk = H // self.kv_heads, self.kv_heads
        qg = q.transpose(0, 1).reshape(Hk, g * T, D)  # query head kv·g + r at rows r·T .. r·T + T-1 of group kv
        scores = torch.matmul(qg, k[0].transpose(1, 2)) * self.scale  # [Hk, g·T, L]
        scores = torch.tanh(scores / self.attn_softcap) * self.attn_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask.repeat(g, 1), float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v[0])  # [Hk, g·T, D]
        return out.view(H, T, D).transpose(0, 1).reshape(T, H * D)

    def _blocks(self, x: torch.Tensor, start: int, buffers: _Buffers) -> torch.Tensor:
        """Run ``x`` ``[T, hidden]`` float32, the tokens at positions ``start..start+T-1``, through every
        block, writing their keys and values into the cache; returns ``x``, overwritten with the output.

        The hot loop: one token (``T == 1``) goes through the bound native calls with residuals fused
        into ``o_proj``/``down_proj`` and preallocated buffers; T tokens through the modules' forwards.
        """
        T = x.shape[0]
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        k_end, inter = (H + Hk) * D, self.intermediate
        qkv, gate_up, x2, tmp = buffers.qkv, buffers.gate_up, buffers.x2, buffers.tmp
        end = start + T
        ropes = [r.rows(start, end) for r in self.ropes]
        act, one = self.act, T == 1
        for layer, blk in enumerate(self.blocks):
            calls = blk.step if one else blk.batch
            h = self._rms(x, blk.attn_norm)
            for call, out in zip(calls.qkv, buffers.qkv_parts, strict=True):
                call(h, out)
            qk = qkv[:, :k_end].view(T, H + Hk, D)
            if blk.q_norm is not None:
                qk = torch.cat([self._rms(qk[:, :H], blk.q_norm), self._rms(qk[:, H:], blk.k_norm)], dim=1)
            cos, ssin, perm = ropes[blk.rope]
            # not addcmul: its fused multiply-add rounds unlike transformers, and int8-activation kernels
            # (avx512vnni) turn one-ulp differences into 1e-2 logit differences
            qk = qk * cos + qk[..., perm] * ssin
            self.k_cache[layer, :, start:end] = qk[:, H:].transpose(0, 1)
            self.v_cache[layer, :, start:end] = qkv[:, k_end:].view(T, Hk, D).transpose(0, 1)
            attn = self._attention(layer, blk.window, qk[:, :H], start)
            if blk.attn_out_norm is None:
                calls.o(attn, x2, x)  # x2 = o(attn) + x
            else:
                calls.o(attn, tmp)
                torch.add(x, self._rms(tmp, blk.attn_out_norm), out=x2)
            h = self._rms(x2, blk.mlp_norm)
            for call, out in zip(calls.gate_up, buffers.gate_up_parts, strict=True):
                call(h, out)
            a = act(gate_up[:, :inter]) * gate_up[:, inter:]
            if blk.mlp_out_norm is None:
                calls.down(a, x, x2)  # x = down(a) + x2
            else:
                calls.down(a, tmp)
                torch.add(x2, self._rms(tmp, blk.mlp_out_norm), out=x)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[vocab]`` float32 of the last row of ``x`` ``[T, hidden]``."""
        h = self._rms(x[-1:], self.final_norm)
        if self.head_scales is not None:  # rows of W Uᵀ: rotate h by U
            logits = torch._weight_int8pack_mm(hadamard_transform(h).to(torch.bfloat16), self.head, self.head_scales)
            logits = logits[0, : self.vocab].float()
            if self.head_bias is not None:
                logits = logits + self.head_bias
        else:
            logits = F.linear(h.to(self.head.dtype), self.head, self.head_bias).float()[0]
        return self._softcap(logits)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` ``[T]`` int64 from an empty cache; returns the last position's logits ``[vocab]``."""
        T = ids.numel()
        if T < 1 or T >= self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit a cache of {self.max_len}")
        x = self._embed(ids.reshape(-1))
        self._blocks(x, 0, self._step_buffers if T == 1 else self._buffers(T))
        self.length = T
        return self._logits(x)

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append one token at position ``self.length``; returns its next-token logits ``[vocab]``."""
        pos = self.length
        if pos >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} positions is full")
        x = self._x
        x.copy_(self._embed(token))
        if self._step_logits is not None:  # blocks, final norm and int8 head in one native call
            self.native_step(x, pos, self._step_logits)
            self.length = pos + 1
            logits = self._step_logits.clone()
            return self._softcap(logits if self.head_bias is None else logits.add_(self.head_bias))
        if self.native_step is not None:
            self.native_step(x, pos)
        else:
            self._blocks(x, pos, self._step_buffers)
        self.length = pos + 1
        return self._logits(x)

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
