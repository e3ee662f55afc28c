"""Decoding speed of a causal LM: prompt processing and generation tokens/s, batch 1.

``benchmark_generation(model, ...)`` times one forward over a prompt (prefill) and greedy
generation of ``new_tokens`` tokens (decode: total time minus the prefill of the same prompt),
each the median of ``runs`` runs after a warm-up, plus the process's peak RSS. Token ids are drawn
from a seeded generator, so no tokenizer or text is needed.
"""

from __future__ import annotations

import functools
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


def _lean_generate(decoder: Any, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    produced = sum(1 for _ in decoder.generate(ids[0], new_tokens))
    if produced != new_tokens:
        raise RuntimeError(f"lean decoder produced {produced} of {new_tokens} tokens")
    return time.perf_counter() - start


def _lean_prefill(decoder: Any, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    decoder.reset()
    decoder.prefill(ids[0])
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
    engine: str = "auto",
    head_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Time prefill and decode of ``model`` at batch 1.

    ``engine``: ``"lean"`` runs :class:`quipsharp.fastdecode.LeanDecoder` (the families of
    :mod:`quipsharp.models.families`), ``"transformers"`` ``model.generate``, ``"auto"`` the lean loop
    when the model is supported and no ``cache`` is asked for. ``cache``: a transformers
    ``cache_implementation`` for ``model.generate`` (e.g. ``"static"``); default the model's own
    (dynamic) cache. ``head_dtype``: the lean loop's LM head dtype (default the model's).

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
    from quipsharp.fastdecode import LeanDecoder, supports

    max_len = prompt_tokens + new_tokens + 1
    if engine == "auto":
        engine = "lean" if cache is None and supports(model, max_len) else "transformers"
    if engine == "lean":  # LeanDecoder raises UnsupportedModelError naming what it cannot run
        decoder = LeanDecoder(model, max_len, head_dtype=head_dtype, threads=threads)
        prefill_fn = functools.partial(_lean_prefill, decoder, ids)
        generate_fn = functools.partial(_lean_generate, decoder, ids)
    elif engine == "transformers":
        prefill_fn = functools.partial(_prefill, model, ids)
        generate_fn = functools.partial(_generate, model, ids, cache=cache)
    else:
        raise ValueError(f"engine must be auto, lean or transformers, got {engine!r}")
    prefill_fn()  # warm-up: kernels selected, caches allocated
    generate_fn(min(new_tokens, 2))
    prefill, decode = [], []
    for _ in range(runs):
        t_prefill = prefill_fn()
        t_gen = generate_fn(new_tokens + 1)  # the first new token comes from the prefill
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
        "cache": cache or ("static" if engine == "lean" else "dynamic"),
        "engine": engine,
        "head_dtype": str(head_dtype).removeprefix("torch.") if engine == "lean" and head_dtype else "model",
        "decode_tok_s_runs": decode,
        "prefill_tok_s_runs": prefill,
    }
    logger.info("decode %.1f tok/s, prefill %.1f tok/s", result["decode_tok_s"], result["prefill_tok_s"])
    return result
