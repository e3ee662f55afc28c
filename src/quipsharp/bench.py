"""Decoding speed of a causal LM: prompt processing and generation tokens/s, batch 1.

``benchmark_generation(model, ...)`` times one forward over a prompt (prefill) and greedy
generation of ``new_tokens`` tokens (decode: total time minus the prefill of the same prompt),
each the median of ``runs`` runs after a warm-up, plus the process's peak RSS. Token ids are drawn
from a seeded generator, so no tokenizer or text is needed.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TOKENS = 64
DEFAULT_NEW_TOKENS = 64
DEFAULT_RUNS = 5
KB_PER_MB = 1024
#: Token ids are drawn below this bound (ids of ordinary text in every tokenizer we meet).
PROMPT_ID_BOUND = 1000


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB_PER_MB


@torch.inference_mode()
def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, cache: str | None) -> float:
    start = time.perf_counter()
    extra = {"cache_implementation": cache} if cache else {}
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **extra,
    )
    return time.perf_counter() - start


@torch.inference_mode()
def _prefill(model: nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def benchmark_generation(
    model: nn.Module,
    *,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    runs: int = DEFAULT_RUNS,
    threads: int | None = None,
    seed: int = 0,
    cache: str | None = None,
) -> dict[str, Any]:
    """Time prefill and decode of ``model`` at batch 1.

    ``cache``: a transformers ``cache_implementation`` for generation (e.g. ``"static"``); default
    the model's own (dynamic) cache.

    Returns:
        ``{"decode_tok_s", "prefill_tok_s", "threads", "peak_rss_mb", "prompt_tokens", "new_tokens",
        "runs", "decode_tok_s_runs", "prefill_tok_s_runs"}`` (medians; per-run values in the lists).
    Raises:
        ValueError: non-positive sizes.
    """
    if prompt_tokens < 1 or new_tokens < 1 or runs < 1:
        raise ValueError("prompt_tokens, new_tokens and runs must be positive")
    if threads is not None:
        torch.set_num_threads(threads)
    vocab = getattr(getattr(model, "config", None), "vocab_size", PROMPT_ID_BOUND)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(vocab, PROMPT_ID_BOUND), (1, prompt_tokens), generator=gen)
    model.eval()
    _prefill(model, ids)  # warm-up: kernels selected, caches allocated
    _generate(model, ids, min(new_tokens, 2), cache)
    prefill, decode = [], []
    for _ in range(runs):
        t_prefill = _prefill(model, ids)
        t_gen = _generate(model, ids, new_tokens + 1, cache)  # the first new token comes from the prefill
        prefill.append(prompt_tokens / t_prefill)
        decode.append(new_tokens / max(t_gen - t_prefill, 1e-9))
    result = {
        "decode_tok_s": statistics.median(decode),
        "prefill_tok_s": statistics.median(prefill),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "cache": cache or "dynamic",
        "decode_tok_s_runs": decode,
        "prefill_tok_s_runs": prefill,
    }
    logger.info("decode %.1f tok/s, prefill %.1f tok/s", result["decode_tok_s"], result["prefill_tok_s"])
    return result
