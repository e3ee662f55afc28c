"""Shared fixtures and helpers for the quipsharp tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def decaying_hessian(n: int, seed: int, decay: float = 0.9, outlier: float | None = None) -> torch.Tensor:
    """A random SPD ``[n, n]`` float64 Hessian with a geometrically decaying spectrum.

    ``outlier`` multiplies one input channel's scale (an activation outlier channel, as in real LLMs).
    """
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = decay ** torch.arange(n, dtype=torch.float64) + 1e-3
    H = (Q * eig) @ Q.T
    if outlier is not None:
        d = torch.ones(n, dtype=torch.float64)
        d[int(torch.randint(n, (1,), generator=gen))] = outlier
        H = d[:, None] * H * d[None, :]
    return (H + H.T) / 2


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama as a Hugging Face directory (weights + tokenizer), shared read-only by CLI tests."""
    pytest.importorskip("transformers")
    from tests.tiny_models import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """Ten JSON-lines documents of the tiny models' training text, for calibration."""
    from tests.tiny_models import TEXT

    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT[i * 300: (i + 1) * 300]}) for i in range(10)))
    return path
