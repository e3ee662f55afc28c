"""Naive baselines to compare QuIP# against (pure tensors, no I/O).

Round-to-nearest (RTN) with asymmetric per-group scalar grids: the weight row is cut into groups of
``group_size`` inputs, each mapped linearly onto ``2**bits`` levels between its min and max. The scale
and minimum are stored in float16, so RTN costs ``bits + 32 / group_size`` bits per weight.
"""

from __future__ import annotations

import torch

SCALE_AND_ZERO_BITS = 32  # one float16 scale and one float16 minimum per group


def rtn_bits_per_weight(bits: int, group_size: int) -> float:
    """Storage cost of :func:`rtn_quantize`."""
    return bits + SCALE_AND_ZERO_BITS / group_size


def rtn_quantize(W: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Fake-quantize ``W`` ``[m, n]`` (``n % group_size == 0``): the dequantized RTN weight, same dtype."""
    m, n = W.shape
    if n % group_size:
        raise ValueError(f"in_features {n} is not a multiple of the RTN group size {group_size}")
    levels = 2**bits - 1
    groups = W.detach().float().reshape(m, n // group_size, group_size)
    lo = groups.amin(-1, keepdim=True).half().float()
    hi = groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float16).tiny).half().float()
    q = torch.clamp(torch.round((groups - lo) / scale), 0, levels)
    return (q * scale + lo).reshape(m, n).to(W.dtype)
