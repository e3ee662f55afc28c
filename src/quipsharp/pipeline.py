"""Quantize a causal LM block by block with bounded memory (QuIP# §4 applied to a whole model).

1. Run the calibration windows through the model once, stopping after the last decoder block, to
   capture the hidden states entering block 0 and the extra arguments every block receives
   (attention masks, rotary embeddings: these differ per block in e.g. Gemma's local/global layers).
2. For each block: observe which linears read the same input (they share one Hessian), accumulate
   the Hessians over the calibration stream (float64), quantize every linear with
   :func:`quipsharp.quantize.quantize_weight`, swap it for a :class:`QuantizedLinear`, and compute the
   stream entering the next block — from the quantized block (``sequential``) or the float block
   (``original``, the paper's offline Hessians).
3. After each block, its quantized layers and the progress are saved to ``work_dir`` so that
   ``resume=True`` continues an interrupted run with exactly the same result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from quipsharp import faults
from quipsharp.allocation import LayerSensitivity
from quipsharp.codebooks import get_codebook
from quipsharp.config import SUPPORTED_BITS, ModelQuantConfig, QuIPSharpConfig
from quipsharp.finetune import finetune_block
from quipsharp.hessian import HessianAccumulator
from quipsharp.hf import protect_save_pretrained
from quipsharp.io import atomic_save_safetensors, atomic_write_text
from quipsharp.limits import trim_heap
from quipsharp.models.source import StreamedWeights
from quipsharp.models.walker import (
    BlockCall,
    UnsupportedModelError,
    block_linears,
    block_output,
    find_blocks,
    linear_shape,
    linear_weight,
    set_submodule,
)
from quipsharp.nn import QuantizedLinear
from quipsharp.outputs import BLOCK_FILE, PROGRESS_FILE, SPILL_DIR, WorkDir, locked, remove_spill
from quipsharp.quantize import quantize_weight

if TYPE_CHECKING:
    from quipsharp.distributed import RayCluster

logger = logging.getLogger(__name__)

SEED_MIX = 0x9E3779B1  # odd constant spreading the user seed across the 32-bit name hash
DEBUG_DELAY_ENV = "QUIPSHARP_DEBUG_BLOCK_DELAY"  # seconds to sleep after each block (tests of --resume)


@dataclass
class LayerReport:
    """What happened to one linear layer."""

    name: str
    bits: int
    codebook: str
    shape: tuple[int, int]
    proxy_loss: float
    damping: float
    seconds: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (which turns the shape into a list)."""
        return cls(**{**data, "shape": tuple(data["shape"])})


class StepTimes:
    """Seconds spent in each step of a run (monotonic clock), for the log line that ends the run:
    ``with times("Hessians"): ...`` adds that step's time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.monotonic() - start

    def summary(self) -> str:
        return ", ".join(f"{step} {s:.1f}s" for step, s in self.seconds.items())


class _StopForwardError(Exception):
    """Raised by a hook after the last decoder block: the LM head is not needed for calibration."""


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed for the sign vectors, stable across runs and Python versions."""
    return (zlib.crc32(name.encode()) ^ (seed * SEED_MIX)) % (2**63)


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A block call's ``(hidden states, other positional arguments, keyword arguments)``."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _run_until_stopped(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The model's forward on each batch, until a hook raises :class:`_StopForwardError`."""
    for batch in batches:
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForwardError:
            pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Hidden states entering block 0 (one tensor per batch) and every block's call arguments.

    Returns ``(stream, calls)`` with ``stream[b]`` ``[batch, ctx, hidden]`` and ``calls[i][b]`` the
    ``(args, kwargs)`` block ``i`` received for batch ``b`` (hidden states excluded).
    """
    stream: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    handles = []

    def make_pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, rest, kw = _split_call(args, kwargs)
            if index == 0:
                stream.append(hidden.detach())
            calls[index].append((rest, kw))

        return hook

    def stop(*_: Any) -> None:
        raise _StopForwardError

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True))
    handles.append(blocks[-1].register_forward_hook(stop))
    try:
        _run_until_stopped(model, batches)
    finally:
        for h in handles:
            h.remove()
    if len(stream) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise UnsupportedModelError("the decoder blocks were not all called once per forward pass")
    return stream, calls


class SpilledStream:
    """Hidden states of the calibration batches kept on disk, one file per batch, read back one batch
    at a time (``quantize --max-memory``: the stream between blocks is the largest thing in memory
    otherwise). Used like the list of per-batch tensors it stands for: ``append``, ``len``, indexing
    and iteration; its files are removed with it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="batches-", dir=directory))
        self.n = 0

    def _file(self, i: int) -> Path:
        return self.dir / f"{i:06d}.pt"

    def append(self, t: torch.Tensor) -> None:
        torch.save(t.detach().contiguous().clone(), self._file(self.n))
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return torch.load(self._file(i % self.n), weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.n))

    def empty_like(self) -> SpilledStream:
        return SpilledStream(self.dir.parent)

    def __del__(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


Stream = list[torch.Tensor] | SpilledStream


def _empty_like(stream: Stream) -> Stream:
    return stream.empty_like() if isinstance(stream, SpilledStream) else []


class _CallRecorder(nn.Module):
    """Stands in for a decoder block during :func:`capture_block_calls`: ``record`` keeps the call and
    returns the hidden states unchanged, in the block's output structure, so the model's loop runs on
    without the block's weights. Attributes the model reads from its blocks (e.g. Gemma's
    ``attention_type``) come from the block."""

    def __init__(self, block: nn.Module, record: Callable[..., Any]) -> None:
        super().__init__()
        self.block = block
        self.record = record

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.record(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


@torch.no_grad()
def capture_block_calls(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], load_first: Callable[[], None],
    stream: Stream | None = None,
) -> tuple[Stream, list[list[BlockCall]]]:
    """:func:`capture_block_inputs` for a model whose blocks' weights are not loaded (streaming): the
    blocks' arguments (masks, rotary embeddings) do not depend on the hidden states, so every block is
    replaced by a recorder that passes the hidden states through. ``load_first`` loads block 0, which
    runs once on the first batch to learn the structure of a block's output (a tensor or a tuple).
    ``stream``: where the hidden states entering block 0 go (default: a new list)."""
    stream = [] if stream is None else stream
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    structure: list[Callable[[torch.Tensor], Any]] = []

    def recorder(index: int) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            hidden, rest, kw = _split_call(args, kwargs)
            if index == 0:
                stream.append(hidden.detach())
            calls[index].append((rest, kw))
            if index == len(blocks) - 1:
                raise _StopForwardError
            if not structure:
                load_first()
                out = originals[0](hidden, *rest, **kw)
                if isinstance(out, torch.Tensor):
                    structure.append(lambda h: h)
                else:
                    structure.append(lambda h, _out=out: type(_out)((h, *tuple(_out)[1:])))
            return structure[0](hidden)

        return record

    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _CallRecorder(block, recorder(i))
    try:
        _run_until_stopped(model, batches)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(stream) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise UnsupportedModelError("the decoder blocks were not all called once per forward pass")
    return stream, calls


def _same_call(a: Any, b: Any) -> bool:
    """Whether two captured call arguments are equal: tensors element for element (and dtype, shape),
    containers member for member, anything else by ``==`` (an object that cannot tell: not equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_call(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same_call(a[k], b[k]) for k in a))
    try:
        return a is b or bool(a == b)
    except Exception:  # an object whose == raises or is ambiguous: treat as different
        return False


@torch.no_grad()
def capture_stream(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                   stream: Stream | None = None) -> tuple[Stream, list[list[BlockCall]]]:
    """:func:`capture_block_inputs` without running the decoder blocks: the blocks' arguments are
    recorded by pass-through recorders (:func:`capture_block_calls`), which skips a whole forward pass
    of the model over the calibration set. Checked on the first sequence against a real forward; a model
    whose blocks' arguments depend on the blocks' outputs differs there and gets the real capture.
    ``stream``: where the hidden states entering block 0 go (default: a new list).

    The check runs on the first batch's first sequence only (both ways): whether a block's arguments
    depend on the blocks' outputs is a property of the model, and the real forward through every block
    is the check's whole cost (for SmolLM2 at 8 × 512 tokens a batch, 12 of a calibration pass's 14 s)."""
    stream = [] if stream is None else stream
    if not batches:
        return stream, [[] for _ in blocks]
    probe = [batches[0][:1]]
    real_stream, real_calls = capture_block_inputs(model, blocks, probe)
    probe_stream, probe_calls = capture_block_calls(model, blocks, probe, lambda: None)
    if torch.equal(real_stream[0], probe_stream[0]) and all(
            _same_call(real[0], got[0]) for real, got in zip(real_calls, probe_calls, strict=True)):
        return capture_block_calls(model, blocks, batches, lambda: None, stream)
    logger.info("the blocks' arguments depend on their outputs: capturing them with a full forward pass")
    captured, calls = capture_block_inputs(model, blocks, batches)
    for h in captured:
        stream.append(h)
    return stream, calls


def _capture(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], stream: Stream,
             streamed: StreamedWeights | None) -> tuple[Stream, list[list[BlockCall]]]:
    """The hidden states entering block 0 (into ``stream``) and every block's call arguments
    (:func:`capture_stream`); for a streamed model the embeddings are read for this pass only, and
    block 0 (left loaded) while the recorders learn a block's output structure."""
    if streamed is None:
        return capture_stream(model, blocks, batches, stream)
    streamed.load(model, skip=blocks)  # embeddings, final norm, head: for this pass only
    first = blocks[0]
    stream, calls = capture_block_calls(model, blocks, batches, lambda: streamed.load(first), stream)
    streamed.drop_outside(blocks)  # read again when needed (the save)
    return stream, calls


@torch.no_grad()
def run_block(block: nn.Module, stream: Stream, calls: list[BlockCall]) -> Stream:
    """The block's outputs for every batch of the stream.

    Quantized linears run as dense layers holding their dequantized weight (computed once here):
    the same function as :class:`QuantizedLinear` up to float rounding, at the cost of a float
    matmul instead of a decode and two Hadamard transforms per batch.
    """
    outputs = _empty_like(stream)
    dtype = stream[0].dtype if len(stream) else torch.float32
    with _dequantized(block, dtype):
        for h, (args, kwargs) in zip(stream, calls, strict=True):
            outputs.append(block_output(block(h, *args, **kwargs)))
    return outputs


def dense_weight(module: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """``Ŵ`` of a quantized linear in ``dtype`` ``[out_features, in_features]``: what :func:`run_block`
    multiplies by."""
    return module.dequantize().to(dtype)


@contextlib.contextmanager
def _dequantized(block: nn.Module, dtype: torch.dtype,
                 ready: dict[str, tuple[QuantizedLinear, torch.Tensor]] | None = None) -> Iterator[None]:
    """Temporarily swap every :class:`QuantizedLinear` of ``block`` for an ``nn.Linear`` of ``Ŵ``
    (:func:`dense_weight`; ``ready``: those already computed, by the linear's name in ``block``, each
    with the module it was computed from: used only while that module is still there)."""
    swapped = []
    for name, module in list(block.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.codes.device, dtype=dtype)
            source, given = (ready or {}).get(name, (None, None))
            dense.weight.data = given if source is module else dense_weight(module, dtype)
            if module.bias is not None:
                dense.bias.data = module.bias.to(dtype)
            set_submodule(block, name, dense)
            swapped.append((name, module))
    try:
        yield
    finally:
        for name, module in swapped:
            set_submodule(block, name, module)


@torch.no_grad()
def shared_input_groups(
    block: nn.Module, names: list[str], hidden: torch.Tensor, call: BlockCall
) -> list[list[str]]:
    """Group the block's linears by the input tensor they read, in order of first use (members of
    ``names`` only; a linear the block never calls is in no group).

    q/k/v read the same normalised hidden states and gate/up the same MLP input, so each group
    shares one Hessian (QuIP# §4, DESIGN.md §4). Observed by running the block once.
    """
    seen: dict[int, list[str]] = {}
    handles = []
    keep_alive: list[torch.Tensor] = []  # so that ids of inputs are not reused within the pass

    for name in names:
        def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
            keep_alive.append(args[0])
            seen.setdefault(id(args[0]), [])
            if _name not in seen[id(args[0])]:
                seen[id(args[0])].append(_name)

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        block(hidden, *call[0], **call[1])
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    missing = [n for n in names if not any(n in g for g in groups)]
    if missing:
        logger.warning("linears never called by their block (left unquantized): %s", missing)
    return groups


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    groups: list[list[str]],
    stream: list[torch.Tensor],
    calls: list[BlockCall],
    keep_outputs: bool,
) -> tuple[dict[str, HessianAccumulator], list[torch.Tensor] | None]:
    """Accumulate one Hessian per group over the stream; optionally return the block's outputs.

    Without ``keep_outputs`` the block's forward on a batch stops as soon as every group has read its
    input: the rest of the block (at least the last linear's product, and with a single group much
    more, as in-block fine-tuning asks for) is not computed. Only once the first batch has shown, run
    to the end, that each group's linear is called exactly once per forward; otherwise every batch
    runs to the end. The sums are the same either way: the same inputs reach the hooks."""
    accs: dict[str, HessianAccumulator] = {}
    handles = []
    fired: list[int] = []  # per batch: which groups' hooks ran (their indices, in call order)
    stop_early = False  # set after the first batch

    for g, group in enumerate(groups):
        first = block.get_submodule(group[0])
        acc = HessianAccumulator(linear_shape(first)[1])
        for name in group:
            accs[name] = acc

        def hook(module: nn.Module, args: tuple, _acc: HessianAccumulator = acc, _g: int = g) -> None:
            _acc.add_batch(args[0])
            fired.append(_g)
            if stop_early and len(set(fired)) == len(groups):
                raise _StopForwardError

        handles.append(first.register_forward_pre_hook(hook))
    try:
        if keep_outputs:
            return accs, run_block(block, stream, calls)
        dtype = stream[0].dtype if len(stream) else torch.float32
        with _dequantized(block, dtype):
            for b, (h, (args, kwargs)) in enumerate(zip(stream, calls, strict=True)):
                fired.clear()
                try:
                    block(h, *args, **kwargs)
                except _StopForwardError:
                    continue
                if b == 0:  # run to the end: each group called exactly once?
                    stop_early = sorted(fired) == list(range(len(groups)))
    finally:
        for h in handles:
            h.remove()
    return accs, None


def _quantizable(block_name: str, block: nn.Module, config: ModelQuantConfig) -> list[str]:
    names = []
    for name, module in block_linears(block).items():
        full = f"{block_name}.{name}"
        if config.is_skipped(full):
            continue
        out_features, in_features = linear_shape(module)
        problem = get_codebook(config.layer_config(full).codebook_name).shape_problem(out_features, in_features)
        if problem:
            logger.warning("%s (%dx%d): %s; kept in full precision", full, out_features, in_features, problem)
            continue
        names.append(name)
    return names


class SharedMeans:
    """``name -> E[x xᵀ]`` of a layer (from its accumulator, or given as the mean); layers sharing an
    accumulator (q/k/v, gate/up) share one mean, computed once, on first use."""

    def __init__(self, hessians: dict[str, HessianAccumulator | torch.Tensor]) -> None:
        self.hessians = hessians
        self.means: dict[int, torch.Tensor] = {}  # id(accumulator) -> its mean

    def __call__(self, name: str) -> torch.Tensor:
        acc = self.hessians[name]
        if isinstance(acc, torch.Tensor):
            return acc
        if id(acc) not in self.means:
            self.means[id(acc)] = acc.mean()
        return self.means[id(acc)]

    def release(self, name: str) -> None:
        """Drop ``name``'s Hessian and its mean, for every layer sharing it (from ``hessians`` too)."""
        acc = self.hessians[name]
        self.means.pop(id(acc), None)
        for other in [n for n, h in self.hessians.items() if h is acc]:
            del self.hessians[other]


def take_means(hessians: dict[str, HessianAccumulator]) -> dict[str, torch.Tensor]:
    """Each layer's ``E[x xᵀ]`` (one tensor per shared accumulator), emptying ``hessians``: the exact
    sums (three float64 copies per group) are freed before the layers are quantized."""
    mean = SharedMeans(hessians)
    out = {name: mean(name) for name in hessians}
    hessians.clear()
    return out


@torch.no_grad()
def quantize_linear(module: nn.Module, full_name: str, cfg: QuIPSharpConfig,
                    H: torch.Tensor | None) -> tuple[QuantizedLinear, LayerReport]:
    """One linear-like ``module`` (weight ``[m, n]``) quantized with ``H`` ``[n, n]`` (None: data-free)
    into a new :class:`QuantizedLinear`, with its report; the sign vectors' seed comes from ``full_name``."""
    out_features, in_features = linear_shape(module)
    start = time.perf_counter()
    q = _empty_quantized_like(module, cfg)
    qw = q.quantize_weight(linear_weight(module).float(), H, seed=layer_seed(cfg.hadamard_seed, full_name))
    if module.bias is not None:
        q.bias.copy_(module.bias.detach().float())
    seconds = time.perf_counter() - start
    logger.info("%s: %d-bit %dx%d proxy loss %.4g (σ=%g) in %.2fs",
                full_name, cfg.bits, out_features, in_features, qw.proxy_loss, qw.damping, seconds)
    return q, LayerReport(full_name, cfg.bits, q.codebook.name, (out_features, in_features),
                          qw.proxy_loss, qw.damping, seconds)


@torch.no_grad()
def quantize_linears(
    block: nn.Module,
    block_name: str,
    names: list[str],
    hessians: dict[str, HessianAccumulator | torch.Tensor] | None,
    config: ModelQuantConfig,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> list[LayerReport]:
    """Replace the named linears of ``block`` by :class:`QuantizedLinear` (data-free if no Hessians).

    ``on_layer`` is called with each layer's report as soon as it is quantized (progress display).
    ``hessians`` is handed over: each entry is removed once the last layer using it is quantized, so
    that a block's Hessians (float64 ``[n, n]`` each) leave memory as they are used.
    """
    reports = []
    mean = SharedMeans(hessians) if hessians is not None else None
    last_use = {id(hessians[name]): name for name in names if name in hessians} if hessians is not None else {}
    for name in names:
        full = f"{block_name}.{name}"
        q, report = quantize_linear(block.get_submodule(name), full, config.layer_config(full),
                                    mean(name) if mean is not None else None)
        if mean is not None and last_use.get(id(hessians.get(name))) == name:
            mean.release(name)
        set_submodule(block, name, q)
        reports.append(report)
        if on_layer is not None:
            on_layer(report)
    return reports


#: ``block index -> {linear name within the block: its accumulator}`` (layers sharing an input share one
#: accumulator): Hessians computed beforehand (:mod:`quipsharp.hessian_dir`), the "original inputs" mode.
HessianProvider = Callable[[int], dict[str, HessianAccumulator]]


@torch.no_grad()
def collect_model_hessians(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    on_block: Callable[[int, list[list[str]], dict[str, HessianAccumulator]], None],
    *,
    progress: bool = True,
    streamed: StreamedWeights | None = None,
    spill: Path | None = None,
) -> str:
    """Every decoder block's input Hessians over the float model (the "original inputs" of QuIP# §4:
    each block sees the float outputs of the block before), for every linear of every block.

    ``on_block(i, groups, hessians)`` receives block ``i``'s groups of linears that read one input
    (names within the block) and one accumulator per name (shared within a group) as soon as the
    block is done, so that the caller can store them and let them go: memory holds one block's
    Hessians and the calibration stream. Returns the blocks' module path (e.g. ``model.layers``).

    ``streamed``: the model is a skeleton whose weights stay in a checkpoint (as in
    :func:`quantize_model`): each block is read while its Hessians are summed and dropped after.
    ``spill``: keep the calibration stream in this directory (:class:`SpilledStream`) instead of memory.
    The sums are the same either way, bit for bit.
    """
    blocks_name, blocks = find_blocks(model)
    model.eval()
    stream: Stream = SpilledStream(spill) if spill is not None else []
    stream, calls = _capture(model, blocks, list(calibration.split(batch_size)), stream, streamed)
    trim_heap()
    for i in _progress(range(len(blocks)), progress, "Hessians"):
        block = blocks[i]
        if streamed is not None:
            streamed.load(block)
        names = list(block_linears(block))
        groups = shared_input_groups(block, names, stream[0], calls[i][0])
        hessians, stream = collect_hessians(block, groups, stream, calls[i], keep_outputs=True)
        on_block(i, groups, hessians)
        del hessians
        if streamed is not None:
            streamed.drop(block)
        trim_heap()
    return blocks_name


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    config: ModelQuantConfig,
    calibration: torch.Tensor,
    bits: tuple[int, ...] = SUPPORTED_BITS,
    progress: bool = True,
) -> list[LayerSensitivity]:
    """Every quantizable linear's proxy loss at each width in ``bits`` (for :mod:`quipsharp.allocation`).

    One pass through the float model: each block's Hessians come from the float block inputs (as
    ``hessian_inputs="original"``), each linear is quantized at every width with its own config
    otherwise (codebook family, damping, seeds) and put back; the model is not changed.
    Cost: one quantization per width plus a float forward pass.
    """
    blocks_name, blocks = find_blocks(model)
    batches = list(calibration.split(config.batch_size))
    stream, calls = capture_stream(model, blocks, batches)
    out = []
    for i in _progress(range(len(blocks)), progress, "sensitivity"):
        block, block_name = blocks[i], f"{blocks_name}.{i}"
        names = _quantizable(block_name, block, config)
        groups = shared_input_groups(block, names, stream[0], calls[i][0])
        hessians, stream = collect_hessians(block, groups, stream, calls[i], keep_outputs=True)
        mean = SharedMeans(hessians)
        for name in (n for group in groups for n in group):  # a linear its block never calls is left out
            full = f"{block_name}.{name}"
            H = mean(name)
            W = linear_weight(block.get_submodule(name)).float()
            losses = {}
            for b in bits:
                cfg = config.layer_config(full).replace(bits=b)
                losses[b] = quantize_weight(W, H, cfg, seed=layer_seed(cfg.hadamard_seed, full)).proxy_loss
            out.append(LayerSensitivity(full, W.numel(), losses))
            logger.info("%s: proxy loss %s", full, ", ".join(f"{b} bits {v:.4g}" for b, v in losses.items()))
    return out


def _empty_quantized_like(module: nn.Module, cfg: QuIPSharpConfig) -> QuantizedLinear:
    """An unfilled :class:`QuantizedLinear` with the shape, bias and device of a linear-like module."""
    out_features, in_features = linear_shape(module)
    return QuantizedLinear(in_features, out_features, cfg, bias=module.bias is not None,
                           device=module.weight.device)


#: What a resume fingerprint covers, with the words a refusal uses for each part.
FINGERPRINT_PARTS = {
    "settings": "the quantization settings",
    "structure": "the model's tensor names, shapes or dtypes",
    "weights": "the source model's weights",
    "calibration": "the calibration tokens",
}


def _digest_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes to a hash without copying it (any dtype)."""
    flat = t.detach().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.contiguous().view(torch.uint8).numpy()))


def run_fingerprint(model: nn.Module, config: ModelQuantConfig, calibration: torch.Tensor | None,
                    weights_digest: str | None = None, streamed: StreamedWeights | None = None) -> dict[str, str]:
    """SHA-256 digests of everything a resumed run must share with the run it continues: the
    settings, the tensor layout, the source weights (content, streamed; or ``weights_digest``, the
    checkpoint files' digest, when the model's weights are not in memory) and the calibration tokens.
    ``streamed``: the model is a skeleton; its weights are read from the checkpoint one tensor at a
    time, which gives the digest of the loaded model."""
    settings = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    structure, weights = hashlib.sha256(), hashlib.sha256()
    items = model.state_dict().items() if streamed is None else streamed.state_items()
    for name, t in items:
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if weights_digest is None:
            _digest_tensor(weights, t)
    return {"settings": settings.hexdigest(), "structure": structure.hexdigest(),
            "weights": weights_digest or weights.hexdigest(), "calibration": calibration_digest(calibration)}


def calibration_digest(calibration: torch.Tensor | None) -> str:
    """SHA-256 of calibration token windows (shape, dtype and ids), or of "data-free"."""
    calib = hashlib.sha256()
    if calibration is None:
        calib.update(b"data-free")
    else:
        calib.update(f"{tuple(calibration.shape)}:{calibration.dtype};".encode())
        _digest_tensor(calib, calibration)
    return calib.hexdigest()


def _check_resumable(saved: dict[str, Any], fingerprint: dict[str, str], work: Path) -> None:
    """Refuse, naming what differs, to resume progress made by a different run."""
    recorded = saved.get("fingerprint")
    if not isinstance(recorded, dict):
        raise ValueError(f"{work} holds progress written by an older quipsharp that cannot be checked against this "
                         "run: remove it and start afresh")
    differ = [words for part, words in FINGERPRINT_PARTS.items() if recorded.get(part) != fingerprint[part]]
    if differ:
        raise ValueError(f"cannot resume from {work}: {', '.join(differ)} differ from the interrupted run's; "
                         "start afresh without --resume, or use another work directory")


def _save_block(work_dir: Path, index: int, block: nn.Module, names: list[str], reports: list[LayerReport],
                done: list[dict[str, Any]], fingerprint: dict[str, str]) -> None:
    # the whole block: in-block fine-tuning also changes its norms and float layers
    tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
    atomic_save_safetensors(tensors, work_dir / BLOCK_FILE.format(index), {"block": str(index)})
    done.append({"names": names, "reports": [asdict(r) for r in reports]})
    atomic_write_text(work_dir / PROGRESS_FILE, json.dumps({"fingerprint": fingerprint, "blocks": done}))


def _load_block(work_dir: Path, index: int, block: nn.Module, block_name: str, names: list[str],
                config: ModelQuantConfig) -> None:
    path = work_dir / BLOCK_FILE.format(index)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot resume: {path} is damaged or missing ({err}); remove {work_dir} and start "
                         "afresh") from err
    for name in names:
        set_submodule(block, name, _empty_quantized_like(block.get_submodule(name),
                                                         config.layer_config(f"{block_name}.{name}")))
    block.load_state_dict(state)


def quantize_model(
    model: nn.Module,
    config: ModelQuantConfig | None = None,
    calibration: torch.Tensor | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    hessians: HessianProvider | None = None,
    streamed: StreamedWeights | None = None,
    spill: bool = False,
    cluster: RayCluster | None = None,
) -> tuple[nn.Module, list[LayerReport]]:
    """Quantize the linears of every decoder block of ``model`` in place.

    Args:
        model: a Hugging Face causal LM (any architecture with a list of decoder blocks).
        config: settings (default :class:`ModelQuantConfig`).
        calibration: ``[nsamples, ctx]`` int64 token ids, or None for data-free quantization (H = I).
        work_dir: where per-block progress is saved (needed for ``resume``).
        resume: continue from the last completed block saved in ``work_dir``.
        progress: show tqdm progress bars.
        hessians: Hessians computed beforehand, block by block (:data:`HessianProvider`; then
            ``calibration`` must be None): the float model's inputs to every block ("original
            inputs"), whatever ``config.hessian_inputs`` says.
        streamed: the model is a skeleton whose weights stay in a checkpoint
            (:func:`quipsharp.models.source.open_streamed`): each block is read when it is quantized and
            dropped (back to the meta device) once saved to ``work_dir``, which is then required; the
            quantized model is assembled from the work directory (``save_quantized(streamed_blocks=...)``).
            The embeddings and head are read for the calibration pass and dropped after it.
        spill: keep the calibration stream between blocks on disk (:class:`SpilledStream`, in
            ``work_dir``) instead of in memory.
        cluster: run the heavy steps on a Ray cluster (:class:`quipsharp.distributed.RayCluster`): the
            calibration stream is split across its workers, which sum each block's Hessians and run
            the block, and the linears are quantized as parallel tasks. Same result, bit for bit, as
            this process with the cluster's threads per task.

    ``config.finetune`` with mode ``block`` or ``both`` tunes each block while it is quantized
    (needs calibration); the end-to-end stage needs the float model as teacher and is run afterwards
    by :func:`quipsharp.finetune.finetune_model`.

    Returns:
        ``(model, reports)``: the same model object with :class:`QuantizedLinear` layers, and one
        :class:`LayerReport` per quantized layer.
    """
    config = config or ModelQuantConfig()
    if hessians is not None and calibration is not None:
        raise ValueError("give either calibration tokens or Hessians computed beforehand, not both")
    if config.finetune.block and calibration is None:
        raise ValueError(f"fine-tuning mode {config.finetune.mode!r} needs calibration data")
    if (streamed is not None or spill) and (work_dir is None or config.finetune.block):
        raise ValueError("streaming the weights or the calibration stream needs a work directory and no in-block "
                         "fine-tuning")
    if cluster is not None and config.finetune.block:
        raise ValueError("in-block fine-tuning does not run on a Ray cluster yet")
    blocks_name, blocks = find_blocks(model)
    per_block = [_quantizable(f"{blocks_name}.{i}", b, config) for i, b in enumerate(blocks)]
    if not any(per_block):
        raise UnsupportedModelError("no linear layer to quantize (all skipped or unsuitable)")
    model.eval()
    if work_dir is None:
        if resume:
            raise ValueError("resume needs a work directory")
        return _quantize_blocks(model, config, calibration, (blocks_name, blocks, per_block), None, progress,
                                hessians, None, False, cluster)
    with locked(work_dir) as work_path:
        return _quantize_blocks(model, config, calibration, (blocks_name, blocks, per_block),
                                WorkDir(work_path, resume), progress, hessians, streamed, spill, cluster)


def _quantize_blocks(model: nn.Module, config: ModelQuantConfig, calibration: torch.Tensor | None,
                     found: tuple[str, Any, list[list[str]]], work_dir: WorkDir | None,
                     progress: bool, precomputed: HessianProvider | None,
                     streamed: StreamedWeights | None, spill: bool,
                     cluster: RayCluster | None) -> tuple[nn.Module, list[LayerReport]]:
    """The body of :func:`quantize_model` (``found``: the blocks and their linears), with the work
    directory checked and locked."""
    blocks_name, blocks, per_block = found
    work = work_dir.path if work_dir is not None else None
    fingerprint = {}
    if work is not None:
        fingerprint = run_fingerprint(model, config, calibration,
                                      weights_digest=streamed.source.digest() if streamed is not None else None)
    if work is not None and precomputed is not None:  # the Hessians stand for the calibration
        fingerprint["calibration"] = getattr(precomputed, "fingerprint", "precomputed Hessians")
    done: list[dict[str, Any]] = []
    if work_dir is not None and work_dir.resume:
        progress_path = work / PROGRESS_FILE
        if progress_path.is_file():
            saved = json.loads(progress_path.read_text())
            _check_resumable(saved, fingerprint, work)
            done = saved["blocks"]
            logger.info("resuming after %d completed blocks", len(done))
        else:
            logger.warning("%s holds no progress to resume: starting afresh", work)
    if work_dir is not None:
        work_dir.create()
    reports = [LayerReport.from_dict(r) for b in done for r in b["reports"]]
    delay = float(os.environ.get(DEBUG_DELAY_ENV, "0"))

    stream: Stream = []
    calls: list[list[BlockCall]] = []
    times = StepTimes()
    if spill:
        remove_spill(work / SPILL_DIR)  # an interrupted run's
        stream = SpilledStream(work / SPILL_DIR)
    if calibration is not None:
        with times("calibration pass"):
            stream, calls = _capture(model, blocks, list(calibration.split(config.batch_size)), stream, streamed)
            if cluster is not None:  # from here on the stream lives on the workers
                cluster.scatter(stream, calls)
                stream, calls = _empty_like(stream), []
        trim_heap()
    # in-block tuning targets the float model's own hidden states, so each block also learns to undo
    # the error of the quantized blocks before it (with "original" inputs the stream is that already)
    float_stream = list(stream) if config.finetune.block and config.hessian_inputs == "sequential" else None

    bar = _progress(range(len(blocks)), progress, "blocks")
    set_postfix = getattr(bar, "set_postfix_str", None)

    def on_layer(report: LayerReport) -> None:  # the layer being done, under the block bar
        if set_postfix is not None:
            set_postfix(f"{report.name} proxy loss {report.proxy_loss:.3g}")

    def advance(block: nn.Module, i: int) -> None:  # the stream, through block i as it stands
        nonlocal stream
        with times("next stream"):
            if cluster is None:
                stream = run_block(block, stream, calls[i])
            else:
                cluster.advance(block, i)

    def quantize(*args: Any, next_stream: bool = False) -> list[LayerReport]:  # next_stream: advance follows
        with times("quantizing"):
            if cluster is None:
                return quantize_linears(*args)
            return cluster.quantize_linears(*args, next_stream=next_stream)

    for i in bar:
        block, block_name, names = blocks[i], f"{blocks_name}.{i}", per_block[i]
        if streamed is not None:
            streamed.load(block)
        if i < len(done):  # resumed: rebuild the block and the stream exactly as the first run did
            needed = calibration is not None and i + 1 < len(blocks)  # by a block still to quantize
            if needed and config.hessian_inputs == "original":
                advance(block, i)
            if float_stream is not None:
                float_stream = run_block(block, float_stream, calls[i])
            _load_block(work, i, block, block_name, done[i]["names"], config)
            if needed and config.hessian_inputs == "sequential":
                advance(block, i)
            if streamed is not None:
                streamed.drop(block)
            continue
        if precomputed is not None:
            given = precomputed(i)
            missing = [n for n in names if n not in given]
            if missing:
                raise ValueError(f"the Hessians given hold none for {block_name}.{missing[0]}")
            names = [n for n in given if n in names]  # in the order of use, as with calibration
            block_reports = quantize(block, block_name, names, take_means(given), config, on_layer)
        elif calibration is None:
            block_reports = quantize(block, block_name, names, None, config, on_layer)
        elif config.finetune.block:
            targets = run_block(block, stream if float_stream is None else float_stream, calls[i])
            block_reports, stream = _quantize_block_finetuned(block, block_name, names, stream, targets, calls[i],
                                                              config, on_layer, set_postfix)
            if float_stream is not None:
                float_stream = targets
            names = [r.name.removeprefix(f"{block_name}.") for r in block_reports]
        else:
            original = config.hessian_inputs == "original"
            with times("Hessians"):
                if cluster is None:
                    groups = shared_input_groups(block, names, stream[0], calls[i][0])
                    hessians, outputs = collect_hessians(block, groups, stream, calls[i], keep_outputs=original)
                    if original:
                        stream = outputs
                    del outputs
                else:  # with original inputs, the workers keep the float block's outputs as their stream
                    groups, hessians = cluster.hessians(block, names, i, keep_outputs=original)
            names = [n for g in groups for n in g]
            next_stream = not original and i + 1 < len(blocks)  # the stream after the last block is not used
            block_reports = quantize(block, block_name, names, take_means(hessians) if cluster is None else hessians,
                                     config, on_layer, next_stream=next_stream)
            del hessians  # on a cluster: its references, so the store frees the block's bins before the next block's
            if next_stream:
                advance(block, i)
        reports.extend(block_reports)
        faults.point("block:quantized")
        if work is not None:
            with times("saving blocks"):
                _save_block(work, i, block, names, block_reports, done, fingerprint)
            faults.point("block:saved")
        if streamed is not None:
            streamed.drop(block)
        trim_heap()  # what this block freed, back to the OS before the next one's peak
        if delay:
            time.sleep(delay)
    logger.info("time by step: %s", times.summary())
    if cluster is not None:
        logger.info("Ray driver's own time: %s", cluster.times.summary())
    return protect_save_pretrained(model, config), reports


def _quantize_block_finetuned(
    block: nn.Module,
    block_name: str,
    names: list[str],
    stream: list[torch.Tensor],
    targets: list[torch.Tensor],
    calls: list[BlockCall],
    config: ModelQuantConfig,
    on_layer: Callable[[LayerReport], None],
    set_postfix: Callable[[str], None] | None,
) -> tuple[list[LayerReport], list[torch.Tensor]]:
    """Quantize one block group by group with in-block fine-tuning after each group (QuIP# §5).

    ``stream`` are the block's inputs (per batch ``[b, ctx, hidden]``), ``targets`` the float model's
    hidden states after this block for the same windows: the tuning maps the one to the other (MSE).
    Each group's Hessian is collected just before it is quantized, from the block as it stands
    (earlier groups quantized and everything tuned), so later layers are quantized in the context
    they will run in. Returns the layer reports and the stream entering the next block.
    """
    groups = shared_input_groups(block, names, stream[0], calls[0])
    reports: list[LayerReport] = []
    for group in groups:
        hessians, _ = collect_hessians(block, [group], stream, calls, keep_outputs=False)
        reports.extend(quantize_linears(block, block_name, group, hessians, config, on_layer))
        label = f"{block_name} after {'+'.join(n.rsplit('.', 1)[-1] for n in group)}"
        ft = finetune_block(block, stream, targets, calls, config.finetune,
                            seed=layer_seed(config.seed, label), name=label)
        if set_postfix is not None:
            set_postfix(f"{label}: fine-tuning held-out MSE -{ft.gain:.0%}")
        del hessians
    if config.hessian_inputs == "original":
        return reports, targets
    return reports, run_block(block, stream, calls)


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc)


class QuIPSharpQuantizer:
    """The seed API: ``QuIPSharpQuantizer(config).quantize_model(model)``, a door onto :func:`quantize_model`.

    Args:
        config: a per-layer :class:`QuIPSharpConfig` (applied to every layer) or a full
            :class:`ModelQuantConfig`.
    """

    def __init__(self, config: QuIPSharpConfig | ModelQuantConfig | None = None) -> None:
        if isinstance(config, QuIPSharpConfig):
            config = ModelQuantConfig(layer=config)
        self.config = config or ModelQuantConfig()
        self.reports: list[LayerReport] = []

    def quantize_model(self, model: nn.Module, calibration: torch.Tensor | None = None, **kwargs: Any) -> nn.Module:
        """Quantize ``model`` in place (data-free when ``calibration`` is None) and return it."""
        model, self.reports = quantize_model(model, self.config, calibration, **kwargs)
        return model
