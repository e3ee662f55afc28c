"""Resource limits checked before work starts: positions a model can attend to, KV-cache memory.

A request that cannot be served is refused (or, for generation length, capped with a warning)
before anything large is allocated, with a message that names the limit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
#: Part of the memory available now that one allocation may take (the rest: weights' working set,
#: activations, the OS).
MEMORY_HEADROOM = 0.8
MEMINFO = Path("/proc/meminfo")
CGROUP_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_CURRENT = Path("/sys/fs/cgroup/memory.current")
KIB = 1024


class LimitError(QuipSharpError, ValueError):
    """A request exceeds what the model or the machine can serve; the message names the limit."""


def model_positions(config: Any) -> int | None:
    """The longest sequence a model's position embeddings (or RoPE training length) cover, or None."""
    text = getattr(config, "get_text_config", lambda: config)()
    for attr in POSITION_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def available_memory_bytes() -> int | None:
    """Memory this process may still allocate: ``MemAvailable``, bounded by the cgroup's limit."""
    available = None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = CGROUP_MAX.read_text().strip()
        if limit != "max":
            room = int(limit) - int(CGROUP_CURRENT.read_text().strip())
            available = room if available is None else min(available, room)
    except (OSError, ValueError):
        pass
    return available


def kv_cache_bytes(config: Any, max_len: int, dtype_bytes: int = 4) -> int:
    """Bytes of a static key/value cache of ``max_len`` positions for a decoder config."""
    text = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    head_dim = getattr(text, "head_dim", None) or hidden // max(heads, 1)
    return 2 * layers * kv_heads * head_dim * max_len * dtype_bytes


def check_memory(nbytes: int, what: str) -> None:
    """Refuse an allocation of ``nbytes`` that does not fit in the memory available now."""
    available = available_memory_bytes()
    if available is not None and nbytes > MEMORY_HEADROOM * available:
        raise LimitError(f"{what} needs {nbytes / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of memory is "
                         "available")


def generation_length(config: Any, prompt_tokens: int, max_new_tokens: int, dtype_bytes: int = 4) -> int:
    """How many tokens to generate: ``max_new_tokens`` capped by the model's positions (with a warning).

    Raises :class:`LimitError` for an empty prompt, a prompt that already fills the model's positions,
    or a KV cache that would not fit in memory."""
    if prompt_tokens < 1:
        raise LimitError("the prompt is empty: give at least one token of text")
    if max_new_tokens < 1:
        raise LimitError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    positions = model_positions(config)
    if positions is not None:
        if prompt_tokens >= positions:
            raise LimitError(f"the prompt has {prompt_tokens} tokens; the model attends to at most {positions}")
        if prompt_tokens + max_new_tokens > positions:
            capped = positions - prompt_tokens
            logger.warning("generating %d tokens, not %d: the model attends to at most %d positions",
                           capped, max_new_tokens, positions)
            max_new_tokens = capped
    check_memory(kv_cache_bytes(config, prompt_tokens + max_new_tokens, dtype_bytes),
                 f"a KV cache of {prompt_tokens + max_new_tokens} positions")
    return max_new_tokens


def check_window(config: Any, ctx: int) -> None:
    """Refuse an evaluation/calibration window longer than the model's positions or shorter than 2."""
    if ctx < 2:
        raise LimitError(f"--ctx must be at least 2 (a window predicts ctx - 1 tokens), got {ctx}")
    positions = model_positions(config)
    if positions is not None and ctx > positions:
        raise LimitError(f"--ctx {ctx} is longer than the model's {positions} positions")


def current_rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/status``), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Block-by-block quantization frees large tensors (Hessians, a block's weights, its activations)
    every block; glibc keeps most of those pages (measured on SmolLM2 with --max-memory: the resident
    size grew from 0.55 to 1.5 GB over 13 blocks with 8 MB of live tensors, and fell back to 0.55 GB
    after a trim), so each block's peak would come on top of the last ones' leftovers.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
