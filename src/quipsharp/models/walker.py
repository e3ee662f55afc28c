"""Find the decoder blocks and linear layers of any Hugging Face causal LM, without per-family forks.

The walker relies on structure, not on names: the decoder blocks are the longest ``nn.ModuleList``
whose elements contain linear layers, and the linears of a block are its ``nn.Linear`` modules and
GPT-2 style ``Conv1D`` modules (which store their weight transposed, ``[in, out]``). Which linears
read the same input (q/k/v, gate/up) is observed while the block runs (see
:func:`quipsharp.pipeline.shared_input_groups`), so no list of projection names is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quipsharp.errors import QuipSharpError

CONV1D_CLASS_NAME = "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W [in, out]


class UnsupportedModelError(QuipSharpError, ValueError):
    """The model has no decoder blocks or no linear layers quipsharp can quantize."""


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or type(module).__name__ == CONV1D_CLASS_NAME


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    in_features, out_features = module.weight.shape  # Conv1D stores [in, out]
    return out_features, in_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (transposing ``Conv1D``)."""
    weight = module.weight.detach()
    return weight if isinstance(module, nn.Linear) else weight.T


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: ``(dotted path, ModuleList)`` of the longest list of blocks with linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(is_linear(m) for m in block.modules()) for block in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no list of decoder blocks with linear layers was found; "
            "quipsharp quantizes the linear layers of transformer blocks"
        )
    return best


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of one block by their name relative to the block, in definition order."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def match_first(patterns: Iterable[tuple[str, int]], name: str) -> int | None:
    """The value of the first ``(regex, value)`` whose regex matches ``name`` (``re.search``)."""
    for pattern, value in patterns:
        if re.search(pattern, name):
            return value
    return None


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# How a decoder block was called: (positional args after hidden_states, kwargs).
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


def block_output(out: Any) -> Any:
    """The hidden states a decoder block returned (blocks return a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out
