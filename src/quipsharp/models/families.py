"""Decoder-only model families as data: where a causal LM keeps its parts and how its blocks compute.

A :class:`Family` record says, for the transformers ``model_type`` values it covers, where the
embedding, the decoder blocks, the final norm and the rotary module live (attribute paths from the
``*ForCausalLM`` model), which linears and norms a block has (paths from the block), and the few
switches in which these families differ: the RMSNorm weight (``w`` or Gemma's ``1 + w``), the MLP
activation, Gemma's embedding scaled by ``sqrt(hidden)``, Gemma-2/3's norms around the attention and
MLP outputs, q/k norms over the head dimension (Gemma-3, Qwen3), attention and final-logit
soft-capping (Gemma-2), sliding windows on every layer or per ``config.layer_types`` entry, and one
RoPE per layer type (Gemma-3's local and global bases). The RoPE *kind* (default, linear, llama3,
yarn, dynamic, longrope; partial rotary dims) is read from the model's rotary module, not from here.

:mod:`quipsharp.fastdecode` runs every family through one block function reading these records;
adding a family that fits these switches is adding a record. The quantization walker
(:mod:`quipsharp.models.walker`) needs no record: it finds blocks and linears by structure.

Every block computes (``norm_*`` per the record; optional steps in brackets)::

    h = attn_norm(x)
    q, k, v = split(qkv(h))                       # one fused linear or three
    [q, k = q_norm(q), k_norm(k)]                 # per head
    q, k = rope(q), rope(k)
    a = o_proj(attention(q, k, v))                # [soft-capped scores], [sliding window]
    x = x + [attn_out_norm](a)
    h = mlp_norm(x)
    gate, up = split(gate_up(h))                  # one fused linear or two
    x = x + [mlp_out_norm](down_proj(act(gate) * up))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

#: ``"rms"``: ``w · x / rms(x)`` (Llama); ``"rms_one_plus"``: ``(1 + w) · x / rms(x)`` (Gemma stores ``w``
#: minus one).
NormKind = Literal["rms", "rms_one_plus"]
#: ``"global"``: ``config.sliding_window`` (None or an int) applies to every layer (Mistral, Phi-3);
#: ``"per_layer_type"``: only to layers whose ``config.layer_types`` entry is :data:`SLIDING_LAYER_TYPE`.
WindowRule = Literal["global", "per_layer_type"]
SLIDING_LAYER_TYPE = "sliding_attention"

#: transformers activation names (``ACT2FN`` keys) the lean loop reproduces, and their functions.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """Where one family's causal LM keeps its parts and which optional steps its blocks take.

    Paths are dotted attribute paths: ``layers`` … ``rotary`` from the ``*ForCausalLM`` model, the
    rest from one decoder block. ``qkv`` is one path (a fused ``[q | k | v]`` linear) or three;
    ``gate_up`` one (fused ``[gate | up]``) or two. ``*_key`` fields name config attributes.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o_proj: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down_proj: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    #: a norm of the attention output before the residual addition (Gemma-2/3), or None
    attn_out_norm: str | None = None
    #: a norm of the MLP output before the residual addition (Gemma-2/3), or None
    mlp_out_norm: str | None = None
    #: RMSNorms over the head dimension of q and k, before RoPE (Gemma-3, Qwen3), or None
    q_norm: str | None = None
    k_norm: str | None = None
    norm: NormKind = "rms"
    activation_key: str = "hidden_act"
    #: the embedding module multiplies its rows by its ``embed_scale`` buffer (Gemma: sqrt(hidden))
    scaled_embedding: bool = False
    #: config attribute of the attention-score soft cap ``c·tanh(s/c)`` (None: the family never caps)
    attn_softcap_key: str | None = None
    #: config attribute of the final-logit soft cap (None: the family never caps)
    final_softcap_key: str | None = None
    window: WindowRule = "global"
    #: the rotary module holds one set of frequencies per ``config.layer_types`` entry (Gemma-3)
    rope_per_layer_type: bool = False
    #: config flags that, when truthy, change the computation in a way this record does not describe
    refused_flags: tuple[str, ...] = ()

    @property
    def linear_paths(self) -> tuple[str, ...]:
        """The block's linears in the order the loop calls them."""
        return (*self.qkv, self.o_proj, *self.gate_up, self.down_proj)


LLAMA = Family("llama", ("llama",))
MISTRAL = Family("mistral", ("mistral",))
QWEN2 = Family("qwen2", ("qwen2",), window="per_layer_type")
QWEN3 = dataclasses.replace(QWEN2, name="qwen3", model_types=("qwen3",), q_norm="self_attn.q_norm",
                            k_norm="self_attn.k_norm")
PHI3 = Family("phi3", ("phi3",), qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",))
GEMMA = Family("gemma", ("gemma",), norm="rms_one_plus", scaled_embedding=True)
GEMMA2 = dataclasses.replace(
    GEMMA, name="gemma2", model_types=("gemma2",), mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm",
    activation_key="hidden_activation", attn_softcap_key="attn_logit_softcapping",
    final_softcap_key="final_logit_softcapping", window="per_layer_type",
    refused_flags=("use_bidirectional_attention",))
#: Gemma-3's text model (``Gemma3ForCausalLM``); transformers ignores ``attn_logit_softcapping`` here.
GEMMA3 = dataclasses.replace(GEMMA2, name="gemma3", model_types=("gemma3_text",), attn_softcap_key=None,
                             q_norm="self_attn.q_norm", k_norm="self_attn.k_norm", rope_per_layer_type=True)

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA, GEMMA2, GEMMA3)
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
#: every ``model_type`` with a record, in :data:`FAMILIES` order
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def family_for(model_type: str | None) -> Family | None:
    """The record of a transformers ``model_type``, or None."""
    return _BY_MODEL_TYPE.get(model_type) if model_type is not None else None


def resolve(root: object, path: str) -> object:
    """The attribute at dotted ``path`` under ``root`` (``AttributeError`` naming the missing part)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def layer_windows(family: Family, config: object, n_layers: int) -> list[int | None]:
    """The sliding window of each layer (None: full causal attention), as transformers applies it:
    a query at position p attends keys in ``(p - window, p]``."""
    window = getattr(config, "sliding_window", None)
    if family.window == "global" or window is None:
        return [window] * n_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * n_layers
    return [window if t == SLIDING_LAYER_TYPE else None for t in types[:n_layers]]
