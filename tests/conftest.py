"""Shared fixtures and helpers for the quipsharp tests."""

from __future__ import annotations

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
