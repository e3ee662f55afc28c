"""Fine-tuning of what stays continuous after quantization (QuIP# §5, DESIGN.md §5).

Two stages, both with the codes frozen and Adam on the continuous state:

* :func:`finetune_block` — inside one decoder block while it is being quantized: the block's
  remaining float weights, its norms and the real-valued sign vectors ``S_U``/``S_V`` (and biases)
  of its quantized layers learn to map the block's inputs to given targets (MSE): in the pipeline,
  the float model's hidden states after that block.
* :func:`finetune_model` — end to end: sign vectors, norms and the LM head learn to match the float
  model's next-token distribution (KL divergence on the logits; the teacher's final hidden states
  are computed once and its logits one chunk of positions at a time).

Both hold out part of the calibration windows, measure the held-out loss before training and after
every epoch, and restore the best state (so fine-tuning never ends worse on held-out data than it
started). :class:`quipsharp.nn.QuantizedLinear` trains through a cached dense core (see
``enable_training``); everything here is device-generic.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from quipsharp import faults
from quipsharp.config import FinetuneConfig
from quipsharp.errors import NumericalError
from quipsharp.models.walker import BlockCall, block_output
from quipsharp.nn import QuantizedLinear

logger = logging.getLogger(__name__)

@dataclass
class FinetuneReport:
    """Held-out losses of one fine-tuning stage: ``losses[0]`` before training, then one per epoch."""

    name: str
    losses: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    parameters: int = 0
    after_cast: float | None = None  # held-out loss once a bf16/fp16 model is cast back from float32

    @property
    def gain(self) -> float:
        """Relative reduction of the held-out loss (0 when training did not help)."""
        return 1.0 - self.losses[self.best_epoch] / self.losses[0] if self.losses and self.losses[0] > 0 else 0.0


def split_holdout(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` indices of ``n`` windows: the last ``round(n·fraction)`` (at least 1) held out."""
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 calibration windows (one held out), got {n}")
    held = min(n - 1, max(1, round(n * fraction)))
    return list(range(n - held)), list(range(n - held, n))


@contextlib.contextmanager
def _training_state(module: nn.Module, extra_trainable: list[torch.Tensor]) -> Iterator[list[QuantizedLinear]]:
    """Enable training of the quantized layers in ``module`` (and of ``extra_trainable``) for a while.

    Every parameter of ``module`` is frozen except ``extra_trainable``; the quantized layers get their
    dense training cache. Everything is put back on exit, also after an error.
    """
    quantized = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    flags = {id(p): p.requires_grad for p in module.parameters()}
    was_training = module.training
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        for t in extra_trainable:
            t.requires_grad_(True)
        for q in quantized:
            q.enable_training()
        yield quantized
    finally:
        for q in quantized:
            q.disable_training()
        for p in module.parameters():
            p.requires_grad_(flags[id(p)])
        module.train(was_training)


def _param_groups(sign_state: list[torch.Tensor], weights: list[torch.Tensor], cfg: FinetuneConfig) -> list[dict]:
    groups = []
    if sign_state:
        groups.append({"params": sign_state, "lr": cfg.sign_lr})
    if weights:
        groups.append({"params": weights, "lr": cfg.lr})
    return groups


def _train(
    name: str,
    trainable: list[torch.Tensor],
    groups: list[dict],
    train_batches: list[Any],
    held_batches: list[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    epochs: int,
    cfg: FinetuneConfig,
    generator: torch.Generator,
    on_epoch: Callable[[FinetuneReport], None] | None = None,
    progress: bool = False,
) -> FinetuneReport:
    """Adam over ``train_batches`` for ``epochs``; held-out early stopping with best-state restore."""
    report = FinetuneReport(name, parameters=sum(t.numel() for t in trainable))
    start = time.perf_counter()

    def held_out_loss() -> float:
        return _held_out_loss(name, loss_fn, held_batches)

    report.losses.append(held_out_loss())
    best = [t.detach().clone() for t in trainable]
    optimizer = torch.optim.Adam(groups)
    bar = _progress_bar(epochs * len(train_batches), name) if progress else None
    try:
        with torch.enable_grad():  # callers may hold torch.no_grad() (e.g. around quantize_model)
            _epochs(report, trainable, best, optimizer, bar, train_batches, held_out_loss, loss_fn, epochs, cfg,
                    generator, on_epoch)
    finally:  # also after an error or an interrupt: the best state measured so far, never a half-trained one
        if bar is not None:
            bar.close()
        with torch.no_grad():
            for t, b in zip(trainable, best, strict=True):
                t.copy_(b)
    report.seconds = time.perf_counter() - start
    logger.info("%s: held-out loss %.4g -> %.4g (best epoch %d of %d, %d parameters, %.1fs)", name,
                report.losses[0], report.losses[report.best_epoch], report.best_epoch, epochs,
                report.parameters, report.seconds)
    return report


@torch.no_grad()
def _held_out_loss(name: str, loss_fn: Callable[[Any], torch.Tensor], held_batches: list[Any]) -> float:
    """Mean loss over the held-out batches; raises :class:`NumericalError` when it is not finite."""
    total = sum(float(loss_fn(b)) for b in held_batches) / len(held_batches)
    if not math.isfinite(total):
        raise NumericalError(f"{name}: held-out fine-tuning loss is not finite ({total})")
    return total


def _in_float32(module: nn.Module, state: list[torch.Tensor], run: Callable[[], FinetuneReport],
                held_out_loss: Callable[[], float]) -> FinetuneReport:
    """``run()`` a training stage with ``module``'s parameters in float32, then cast them back.

    Adam updates at fine-tuning learning rates vanish in bf16, so the parameters of a bf16/fp16
    model train in float32 (buffers such as RoPE frequencies keep their dtype). Casting back rounds
    the tuned norms and weights: the held-out loss is measured in the model's own dtype before
    training and again after the cast (``report.after_cast``), and ``state`` (every trained tensor,
    as it was before training) is restored if the rounded tuning no longer beats the untrained model.
    """
    params = [p for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if not params:
        return run()
    dtypes = [p.dtype for p in params]
    before = [t.detach().clone() for t in state]
    untrained = held_out_loss()
    for p in params:
        p.data = p.data.float()
    try:
        report = run()
    finally:
        for p, dtype in zip(params, dtypes, strict=True):
            p.data = p.data.to(dtype)
    if report.best_epoch:
        report.after_cast = held_out_loss()
        if report.after_cast >= untrained:
            logger.warning("%s: casting back to %s undid the tuning (held-out loss %.4g, untrained %.4g): "
                           "restoring the untrained state", report.name, dtypes[0], report.after_cast, untrained)
            with torch.no_grad():
                for t, b in zip(state, before, strict=True):
                    t.copy_(b)
            report.best_epoch = 0
            report.after_cast = untrained
    return report


def _epochs(report: FinetuneReport, trainable: list[torch.Tensor], best: list[torch.Tensor],
            optimizer: torch.optim.Optimizer, bar: Any, train_batches: list[Any],
            held_out_loss: Callable[[], float], loss_fn: Callable[[Any], torch.Tensor], epochs: int,
            cfg: FinetuneConfig, generator: torch.Generator,
            on_epoch: Callable[[FinetuneReport], None] | None) -> None:
    """The epochs of :func:`_train`; ``best`` is updated in place whenever the held-out loss improves."""
    for epoch in range(1, epochs + 1):
        faults.point("finetune:epoch")
        order = torch.randperm(len(train_batches), generator=generator).tolist()
        optimizer.zero_grad(set_to_none=True)
        for step, index in enumerate(order, start=1):
            loss = loss_fn(train_batches[index]) / cfg.grad_accum
            loss.backward()
            if step % cfg.grad_accum == 0 or step == len(order):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"epoch {epoch} loss {float(loss) * cfg.grad_accum:.4g}")
        report.losses.append(held_out_loss())
        if bar is not None:
            bar.write(f"{report.name}: epoch {epoch} held-out loss {report.losses[-1]:.4g} "
                      f"(before {report.losses[0]:.4g})")
        if report.losses[-1] < report.losses[report.best_epoch]:
            report.best_epoch = epoch
            with torch.no_grad():
                for t, b in zip(trainable, best, strict=True):
                    b.copy_(t)
        if on_epoch is not None:
            on_epoch(report)
        if cfg.patience and epoch - report.best_epoch >= cfg.patience:
            logger.info("%s: no held-out improvement for %d epochs, stopping after epoch %d", report.name,
                        cfg.patience, epoch)
            break


def _progress_bar(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc)


# --------------------------------------------------------------------------- in-block
def _slice_call(call: BlockCall, rows: int, stop: int) -> BlockCall:
    """The block arguments of a calibration batch of ``rows`` windows cut to its first ``stop``.

    Calibration windows have no padding, so per-window tensors (masks, positions) are equal across
    rows and the first ``stop`` rows serve any micro-batch of that size.
    """
    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows and rows > 1:
            return value[:stop]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    args, kwargs = call
    return cut(args), {k: cut(v) for k, v in kwargs.items()}


def finetune_block(
    block: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    calls: list[BlockCall],
    cfg: FinetuneConfig,
    *,
    seed: int = 0,
    name: str = "block",
) -> FinetuneReport:
    """Tune ``block`` in place so that ``block(inputs) ≈ targets`` (MSE), codes frozen (QuIP# §5).

    Trained: every float parameter of the block (not-yet-quantized linears, norms) at ``cfg.lr`` and
    the sign vectors and biases of its quantized layers at ``cfg.sign_lr``.

    Args:
        block: a decoder block, partly quantized.
        inputs, targets: per calibration batch, ``[b, ctx, hidden]`` hidden states entering the block
            and the outputs it should give for them (the pipeline passes the float model's hidden
            states after this block, so the block also learns to undo upstream quantization error).
        calls: per batch, the block's other arguments (as captured by the pipeline).
        cfg: fine-tuning settings (``block_epochs``, ``lr``, ``sign_lr``, ``batch_size``, ``grad_accum``,
            ``holdout``).
        seed: seed of the shuffling.
    """
    if not inputs or len(inputs) != len(targets) or len(inputs) != len(calls):
        raise ValueError("finetune_block needs one input, target and call per calibration batch")
    rows = inputs[0].shape[0]
    micro = min(cfg.batch_size, rows)
    windows = [(b, r) for b, x in enumerate(inputs) for r in range(x.shape[0])]
    train_idx, held_idx = split_holdout(len(windows), cfg.holdout)

    def take(tensors: list[torch.Tensor], chunk: list[tuple[int, int]]) -> torch.Tensor:
        """The windows of ``chunk`` as one tensor: a view when they are consecutive rows of one batch."""
        b0, r0 = chunk[0]
        if chunk == [(b0, r0 + i) for i in range(len(chunk))]:
            return tensors[b0][r0:r0 + len(chunk)]
        return torch.stack([tensors[b][r] for b, r in chunk])

    def batches(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, BlockCall]]:
        out = []
        for start in range(0, len(indices), micro):
            chunk = [windows[i] for i in indices[start:start + micro]]
            x, y = take(inputs, chunk), take(targets, chunk)
            # calls[0] is a full batch: the last batch of the stream may be smaller than a micro-batch
            out.append((x, y, _slice_call(calls[0], rows, len(chunk))))
        return out

    train_batches, held_batches = batches(train_idx), batches(held_idx)

    def loss_fn(batch: tuple[torch.Tensor, torch.Tensor, BlockCall]) -> torch.Tensor:
        x, y, (args, kwargs) = batch
        dtype = next(block.parameters()).dtype  # float32 while training, the block's own dtype after
        out = block_output(block(x.to(dtype), *args, **kwargs))
        return F.mse_loss(out.float(), y.float())

    quantized = [m for m in block.modules() if isinstance(m, QuantizedLinear)]
    sign_state = [t for q in quantized for t in q.trainable_state()]
    weights = [p for p in block.parameters()]

    def run() -> FinetuneReport:
        with _training_state(block, sign_state + weights):
            block.eval()  # no dropout: the targets are deterministic
            return _train(name, sign_state + weights, _param_groups(sign_state, weights, cfg),
                          train_batches, held_batches, loss_fn, cfg.block_epochs, cfg,
                          torch.Generator().manual_seed(seed))

    return _in_float32(block, sign_state + weights, run, lambda: _held_out_loss(name, loss_fn, held_batches))


# --------------------------------------------------------------------------- end to end
#: Positions whose vocabulary-sized logits exist at once in the end-to-end loss (per chunk, recomputed
#: in the backward pass): ``KL_CHUNK_POSITIONS × vocab`` floats instead of ``batch × ctx × vocab``.
KL_CHUNK_POSITIONS = 256
#: How closely ``head(base_model(ids))`` must reproduce ``model(ids).logits`` for the split path.
SPLIT_HEAD_RTOL = 1e-5  # the same operations run either way: equal up to float noise
SPLIT_HEAD_ATOL = 1e-6


@dataclass
class TeacherTargets:
    """The float teacher reduced to what end-to-end tuning needs (QuIP# §5).

    Attributes:
        hidden: ``[nsamples, ctx, hidden]`` the teacher's final hidden states (after its last norm)
            for every calibration window, in the teacher's dtype.
        head: the teacher's output layer (only ever run without gradients): ``head(hidden)`` are its logits.

    Built by :func:`teacher_targets`, after which the teacher itself can be freed: its blocks never
    run again, and its logits exist only one chunk of positions at a time.
    """

    hidden: torch.Tensor
    head: nn.Module


def _causal_lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[b, ctx, vocab]`` the logits of a causal LM for token ids ``[b, ctx]``."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits


def _final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[b, ctx, hidden]`` the final hidden states of a causal LM (its base model's output)."""
    device = next(model.parameters()).device
    return model.base_model(input_ids=ids.to(device), use_cache=False).last_hidden_state


def _split_head_ok(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits are exactly its output layer applied to its base model's output.

    Models that scale or soft-cap their logits (or have no separate base model / head) fail this and
    use the full-logits path."""
    head = model.get_output_embeddings()
    if head is None or model.base_model is model:
        return False
    with torch.no_grad():
        try:
            split = head(_final_hidden(model, ids)).float()
        except (AttributeError, TypeError):
            return False
        full = _causal_lm_logits(model, ids).float()
    return split.shape == full.shape and torch.allclose(split, full, rtol=SPLIT_HEAD_RTOL, atol=SPLIT_HEAD_ATOL)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, calibration: torch.Tensor, batch_size: int) -> TeacherTargets | None:
    """The teacher's final hidden states for ``calibration`` ``[nsamples, ctx]`` (None if its logits are
    not ``head(hidden)``; :func:`finetune_model` then runs the whole teacher on every batch)."""
    _check_calibration(calibration)
    teacher.eval()
    if not _split_head_ok(teacher, calibration[:1]):
        logger.info("teacher logits are not head(final hidden states): the teacher runs on every batch")
        return None
    hidden = torch.cat([_final_hidden(teacher, ids).cpu() for ids in calibration.split(batch_size)])
    return TeacherTargets(hidden, teacher.get_output_embeddings())  # used under no_grad only


def _check_calibration(calibration: torch.Tensor) -> None:
    if calibration.dim() != 2 or calibration.dtype != torch.int64:
        raise ValueError(f"calibration must be [nsamples, ctx] int64 token ids, got {tuple(calibration.shape)} "
                         f"{calibration.dtype}")


def _chunk_kl(head: nn.Module, hidden: torch.Tensor, target_head: nn.Module,
              target_hidden: torch.Tensor) -> torch.Tensor:
    """``Σ KL(teacher ‖ model)`` over the positions of one chunk: ``hidden`` ``[n, hidden]`` (model) and
    ``target_hidden`` ``[n, hidden_teacher]`` (teacher)."""
    logp = F.log_softmax(head(hidden).float(), dim=-1)
    with torch.no_grad():
        target = F.log_softmax(target_head(target_hidden.to(logp.device)).float(), dim=-1)
    return F.kl_div(logp, target, log_target=True, reduction="sum")


def chunked_kl(head: nn.Module, hidden: torch.Tensor, target_head: nn.Module, target_hidden: torch.Tensor,
               chunk: int = KL_CHUNK_POSITIONS) -> torch.Tensor:
    """Mean over positions of ``KL(softmax(target_head(target_hidden)) ‖ softmax(head(hidden)))``.

    Args:
        head: the model's output layer (trained).
        hidden: ``[b, ctx, hidden]`` the model's final hidden states (with gradients).
        target_head: the teacher's output layer (frozen).
        target_hidden: ``[b, ctx, hidden_teacher]`` the teacher's final hidden states.
        chunk: positions per chunk. Each chunk's logits are recomputed in the backward pass
            (activation checkpointing), so at most one chunk of ``[chunk, vocab]`` tensors is alive.

    Equal to ``F.kl_div(log_softmax(model logits), log_softmax(teacher logits), reduction="batchmean")``
    over the flattened positions, without the ``[b, ctx, vocab]`` tensors.
    """
    if hidden.shape[:-1] != target_hidden.shape[:-1]:
        raise ValueError(f"model and teacher hidden states cover different positions: {tuple(hidden.shape)} "
                         f"vs {tuple(target_hidden.shape)}")
    flat, target = hidden.reshape(-1, hidden.shape[-1]), target_hidden.reshape(-1, target_hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        args = (head, flat[start:start + chunk], target_head, target[start:start + chunk])
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl, *args, use_reentrant=False)
        else:
            total = total + _chunk_kl(*args)
    return total / flat.shape[0]


def finetune_model(
    model: nn.Module,
    teacher: nn.Module | TeacherTargets,
    calibration: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    seed: int = 0,
    on_epoch: Callable[[FinetuneReport], None] | None = None,
    progress: bool = False,
) -> FinetuneReport:
    """End-to-end tuning of a quantized causal LM against its float ``teacher`` (QuIP# §5).

    Trained, codes frozen: the sign vectors and biases of every :class:`QuantizedLinear` at
    ``cfg.sign_lr``; every float parameter except the input embeddings (norms, the LM head, layers
    left in float) at ``cfg.lr`` — when the LM head is tied to the embeddings it trains them too.
    Loss: ``KL(teacher ‖ model)`` over the next-token distributions of all positions.

    When the logits of both models are ``head(final hidden states)`` (Llama, Mistral, Qwen2, ... —
    checked, not assumed), the teacher's final hidden states are computed once and the KL runs
    over chunks of :data:`KL_CHUNK_POSITIONS` positions (:func:`chunked_kl`); otherwise the whole
    teacher runs on every batch and the full logits are compared.

    Args:
        model: the quantized model, tuned in place.
        teacher: the float model it was quantized from (same vocabulary), left unchanged, or its
            :func:`teacher_targets` for ``calibration`` (so the caller can free the teacher first).
        calibration: ``[nsamples, ctx]`` int64 token ids; ``cfg.holdout`` of them held out.
        cfg: fine-tuning settings (``e2e_epochs``, ``lr``, ``sign_lr``, ``batch_size``, ``grad_accum``,
            ``holdout``, ``gradient_checkpointing``).
        seed: seed of the shuffling.
        on_epoch: called with the report after every epoch.
        progress: show a tqdm bar over the optimizer micro-batches with the training loss.
    """
    _check_calibration(calibration)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not quantized:
        raise ValueError("finetune_model needs a quantized model (no QuantizedLinear found)")
    train_idx, held_idx = split_holdout(calibration.shape[0], cfg.holdout)
    train_batches = list(torch.tensor(train_idx).split(cfg.batch_size))
    held_batches = list(torch.tensor(held_idx).split(cfg.batch_size))
    model.eval()
    targets: TeacherTargets | None = None  # None: the whole teacher runs on every batch
    if isinstance(teacher, nn.Module):
        teacher.eval()
        if _split_head_ok(model, calibration[:1]):
            targets = teacher_targets(teacher, calibration, cfg.batch_size)
    elif teacher.hidden.shape[:2] != calibration.shape:
        raise ValueError(f"teacher targets cover {tuple(teacher.hidden.shape[:2])} windows x positions, "
                         f"calibration is {tuple(calibration.shape)}")
    elif not _split_head_ok(model, calibration[:1]):
        raise ValueError("the model's logits are not head(final hidden states): pass the teacher model itself")
    else:
        targets = teacher
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    frozen = {id(p) for p in embeddings.parameters()} - head_ids
    sign_state = [t for q in quantized for t in q.trainable_state()]
    weights = [p for p in model.parameters() if id(p) not in frozen]

    def loss_fn(rows: torch.Tensor) -> torch.Tensor:
        ids = calibration[rows]
        if targets is not None:
            return chunked_kl(head, _final_hidden(model, ids), targets.head, targets.hidden[rows])
        with torch.no_grad():
            target = F.log_softmax(_causal_lm_logits(teacher, ids).float(), dim=-1)
        logp = F.log_softmax(_causal_lm_logits(model, ids).float(), dim=-1)
        target = target.to(logp.device)
        vocab = logp.shape[-1]
        return F.kl_div(logp.reshape(-1, vocab), target.reshape(-1, vocab), log_target=True, reduction="batchmean")

    checkpointing = cfg.gradient_checkpointing and _checkpointing_switch(model) is not None
    state = sign_state + weights  # parameters keep their identity through .float()/.to(dtype)
    return _in_float32(
        model, state,
        lambda: _finetune_model_float32(model, loss_fn, sign_state, weights, train_batches, held_batches, cfg,
                                        checkpointing, seed, on_epoch, progress),
        lambda: _held_out_loss("end-to-end", loss_fn, held_batches))


def _finetune_model_float32(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                            sign_state: list[torch.Tensor], weights: list[torch.Tensor], train_batches: list[Any],
                            held_batches: list[Any], cfg: FinetuneConfig, checkpointing: bool, seed: int,
                            on_epoch: Callable[[FinetuneReport], None] | None, progress: bool) -> FinetuneReport:
    with _training_state(model, sign_state + weights):
        model.train(checkpointing)  # HF checkpoints only in training mode
        for module in model.modules():  # ...but the targets are deterministic: no dropout layers
            if isinstance(module, nn.Dropout):
                module.eval()
        if checkpointing:
            _checkpointing_switch(model)(True)
        try:
            return _train("end-to-end", sign_state + weights, _param_groups(sign_state, weights, cfg),
                          train_batches, held_batches, loss_fn, cfg.e2e_epochs, cfg,
                          torch.Generator().manual_seed(seed), on_epoch, progress)
        finally:
            if checkpointing:
                _checkpointing_switch(model)(False)
            model.eval()


def _checkpointing_switch(model: nn.Module) -> Callable[[bool], None] | None:
    """Turn a transformers model's activation checkpointing on/off (None if it has none).

    transformers 5 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``; both work."""
    for prefix, kwargs_name in (("activation", "activation_checkpointing_kwargs"),
                                ("gradient", "gradient_checkpointing_kwargs")):
        enable = getattr(model, f"{prefix}_checkpointing_enable", None)
        disable = getattr(model, f"{prefix}_checkpointing_disable", None)
        if enable is not None and disable is not None:
            def switch(on: bool, _enable: Any = enable, _disable: Any = disable, _kw: str = kwargs_name) -> None:
                if on:
                    _enable(**{_kw: {"use_reentrant": False}})
                else:
                    _disable()
            return switch
    return None
