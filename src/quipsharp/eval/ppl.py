"""Perplexity over non-overlapping windows (the QuIP#/GPTQ/AQLM protocol).

``ppl = exp(mean NLL)`` over every predicted token of every window: a window of ``ctx`` tokens
predicts ``ctx − 1`` of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    max_windows: int | None = None,
    batch_size: int = 1,
    step: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``windows`` ``[W, ctx]`` int64.

    ``step``: feed each window ``step`` tokens at a time through the KV cache, as generation does
    (with ``step`` ≤ ``quipsharp.kernels.FUSED_MAX_BATCH`` this measures the decoding kernels'
    numerics); default: the whole window in one forward.

    Returns ``{"ppl", "nll", "ctx", "windows", "tokens"}`` where ``tokens`` counts predicted tokens.
    """
    if step is not None and step < 1:
        raise ValueError(f"step must be positive, got {step}")
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"need a non-empty [windows, ctx] tensor, got {tuple(windows.shape)}")
    model.eval()
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity")
    for batch in batches:
        logits = _window_logits(model, batch, step)  # [B, ctx, vocab]
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    mean = total / count
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "ctx": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens": count,
    }


def _window_logits(model: nn.Module, batch: torch.Tensor, step: int | None) -> torch.Tensor:
    """Logits ``[B, ctx, vocab]`` of ``batch`` ``[B, ctx]``: one forward, or ``step`` tokens at a time."""
    if step is None:
        return model(input_ids=batch, use_cache=False).logits
    parts, past = [], None
    for start in range(0, batch.shape[1], step):
        out = model(input_ids=batch[:, start : start + step], past_key_values=past, use_cache=True)
        past = out.past_key_values
        parts.append(out.logits)
    return torch.cat(parts, dim=1)
