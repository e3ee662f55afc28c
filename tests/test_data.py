"""Calibration windows: seeded, disjoint when the text allows, clear errors when it is too short."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from quipsharp.data import DataError, calibration_windows

WORDS_PER_DOC = 50


class CountingTokenizer:
    """Every word is its own integer token: windows that share a token share text."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [int(w) for w in text.split()]}


def _docs(n: int) -> list[str]:
    return [" ".join(str(d * WORDS_PER_DOC + i) for i in range(WORDS_PER_DOC)) for d in range(n)]


@pytest.mark.parametrize("nsamples,ctx", [(16, 32), (7, 50), (1, 2), (40, 13)])
def test_windows_are_disjoint_slices_of_the_stream(nsamples: int, ctx: int) -> None:
    w = calibration_windows(_docs(100), CountingTokenizer(), nsamples, ctx, seed=3)
    assert w.shape == (nsamples, ctx) and w.dtype == torch.int64
    assert w.unique().numel() == nsamples * ctx  # no token in two windows
    # each window is a contiguous run of the stream (documents in random order, words in order)
    diffs = w[:, 1:] - w[:, :-1]
    assert ((diffs == 1) | (w[:, 1:] % WORDS_PER_DOC == 0)).all()


def test_windows_are_seeded() -> None:
    tok = CountingTokenizer()
    a = calibration_windows(_docs(100), tok, 8, 20, seed=1)
    assert torch.equal(a, calibration_windows(_docs(100), tok, 8, 20, seed=1))
    assert not torch.equal(a, calibration_windows(_docs(100), tok, 8, 20, seed=2))


def test_short_text_overlaps_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quipsharp.data"):
        w = calibration_windows(_docs(2), CountingTokenizer(), 5, 40, seed=0)  # 100 tokens for 200
    assert w.shape == (5, 40)
    assert "windows overlap" in caplog.text


def test_too_short_for_one_window() -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(_docs(1), CountingTokenizer(), 1, WORDS_PER_DOC + 1)
    with pytest.raises(DataError, match="nsamples"):
        calibration_windows(_docs(1), CountingTokenizer(), 0, 8)
