"""Proxy Hessians ``H = E[x xᵀ]`` of a linear layer's inputs (QuIP# §2, DESIGN.md §4).

Statistics gathering is kept apart from solving (as in GPTQ's ``add_batch``): a
:class:`HessianAccumulator` streams over batches of any shape and keeps ``Σ x xᵀ`` and ``Σ x`` in
float64; :func:`regularize` turns the mean into the damped, normalised matrix BlockLDLQ uses.
Saving and loading lives in :mod:`quipsharp.io` (this module does no I/O).
"""

from __future__ import annotations

import torch

from quipsharp.errors import NumericalError

# Rows multiplied at once in float32 before being added to the float64 sum: bounds both the float32
# rounding error of one product and the temporary memory.
ACCUMULATE_CHUNK_ROWS = 4096


class HessianAccumulator:
    """Running ``Σ x xᵀ``, ``Σ x`` and token count of a layer's inputs.

    Args:
        n: input features of the layer.
        device: where the float64 sums live (default CPU).
    """

    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        if n <= 0:
            raise ValueError(f"Hessian size must be positive, got {n}")
        self.n = n
        self.xtx = torch.zeros(n, n, dtype=torch.float64, device=device)  # [n, n]
        self.xsum = torch.zeros(n, dtype=torch.float64, device=device)  # [n]
        self.count = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` of shape ``[..., n]`` (every leading index is one token)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"expected inputs with last dim {self.n}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.n)
        if not torch.isfinite(rows).all():
            raise NumericalError("non-finite values in the inputs given to the Hessian accumulator")
        for start in range(0, rows.shape[0], ACCUMULATE_CHUNK_ROWS):
            chunk = rows[start : start + ACCUMULATE_CHUNK_ROWS].to(self.xtx.device, torch.float32)
            self.xtx += (chunk.T @ chunk).to(torch.float64)
            self.xsum += chunk.sum(0, dtype=torch.float64)
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's statistics (e.g. from another process or shard)."""
        if other.n != self.n:
            raise ValueError(f"cannot merge Hessians of sizes {self.n} and {other.n}")
        self.xtx += other.xtx.to(self.xtx.device)
        self.xsum += other.xsum.to(self.xsum.device)
        self.count += other.count

    def mean(self) -> torch.Tensor:
        """``E[x xᵀ]`` as float64 ``[n, n]``; raises if no token was seen."""
        if self.count == 0:
            raise NumericalError("the Hessian accumulator has seen no inputs")
        return self.xtx / self.count

    def mean_input(self) -> torch.Tensor:
        """``E[x]`` as float64 ``[n]``."""
        if self.count == 0:
            raise NumericalError("the Hessian accumulator has seen no inputs")
        return self.xsum / self.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the accumulator (for :func:`quipsharp.io.save_hessian`)."""
        return {
            "xtx": self.xtx,
            "xsum": self.xsum,
            "count": torch.tensor([self.count], dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> HessianAccumulator:
        """Inverse of :meth:`state_dict`, with shape checks."""
        for key in ("xtx", "xsum", "count"):
            if key not in state:
                raise ValueError(f"Hessian state is missing tensor {key!r}")
        xtx = state["xtx"]
        n = xtx.shape[-1]
        if xtx.shape != (n, n) or state["xsum"].shape != (n,):
            raise ValueError(
                f"inconsistent Hessian state: xtx {tuple(xtx.shape)}, xsum {tuple(state['xsum'].shape)}"
            )
        acc = cls(n, device=xtx.device)
        acc.xtx.copy_(xtx)
        acc.xsum.copy_(state["xsum"])
        acc.count = int(state["count"].reshape(-1)[0])
        return acc


def normalize(H: torch.Tensor) -> torch.Tensor:
    """``H / mean(diag(H))`` in float64 ``[n, n]``; raises on a non-finite or zero Hessian."""
    H = H.to(torch.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"a Hessian must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise NumericalError("the Hessian has non-finite entries")
    scale = torch.diagonal(H).mean()
    if not scale > 0:
        raise NumericalError(
            f"the Hessian's mean diagonal is {float(scale):g}, not positive (all-zero inputs, or not a Hessian)"
        )
    return H / scale


def regularize(H: torch.Tensor, sigma: float) -> torch.Tensor:
    """``H / mean(diag(H)) + σ I`` (float64 ``[n, n]``), symmetrised (DESIGN.md §4)."""
    Hn = normalize(H)
    Hn = (Hn + Hn.T) / 2
    return Hn + sigma * torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device)
