"""Whole jobs as library calls: quantize a model into a directory, fine-tune a saved one.

The command line (:mod:`quipsharp.cli`) only parses options and prints; what a job does, in which
order, and what it may touch on disk is decided here:

* every output is checked before any work starts (:func:`quipsharp.outputs.check_output`: never a
  file, an input, or a directory that is not an earlier quipsharp output; replacing one needs
  ``overwrite``) and locked for the whole job, so two jobs never write the same place;
* the work directory of a quantization is locked too; quipsharp removes it after success only if it
  created it, and otherwise removes only the files it wrote there;
* with end-to-end fine-tuning the quantized model is saved before that stage starts, so a failed or
  interrupted stage loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quipsharp import faults
from quipsharp.config import SUPPORTED_BITS, FinetuneConfig, ModelQuantConfig
from quipsharp.errors import QuipSharpError
from quipsharp.outputs import STAGING_INFIX, WorkDir, check_output, locked, overlaps

if TYPE_CHECKING:
    import torch

    from quipsharp.distributed import RayOptions

logger = logging.getLogger(__name__)

WORK_SUFFIX = ".quipsharp-work"
DTYPES = ("float32", "bfloat16", "float16")


class WorkflowError(QuipSharpError, ValueError):
    """A job cannot start with the options given; the message names the problem."""


@dataclass
class JobResult:
    """What a job produced: the saved directory, the model in memory and its layer reports."""

    out: Path
    model: Any
    reports: list[Any] | None
    seconds: float


def add_note(err: BaseException, note: str) -> None:
    """Attach ``note`` to an exception (``BaseException.add_note`` where Python has it); the CLI
    prints notes under its one-line error."""
    notes = getattr(err, "__notes__", None)
    if notes is None:
        notes = []
        err.__notes__ = notes
    notes.append(note)


def source_name(model: str | os.PathLike) -> str:
    """How a model argument is recorded in a saved directory: local paths absolute, hub ids as given."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else str(model)


def default_work_dir(out: str | os.PathLike) -> Path:
    """``OUT.quipsharp-work`` beside the output directory."""
    out = Path(out)
    return out.with_name(out.name + WORK_SUFFIX)


def check_holdout(nsamples: int, ft: FinetuneConfig) -> None:
    """Refuse fine-tuning settings that leave fewer than 2 windows on either side of the split."""
    from quipsharp.finetune import split_holdout

    try:
        split_holdout(nsamples, ft.holdout)
    except ValueError as err:
        raise WorkflowError(f"fine-tuning holds out {ft.holdout:g} of the calibration windows and needs at least 2: "
                            f"--nsamples {nsamples} is too few") from err


def finetune_e2e(model: Any, teacher_source: str, dtype: str, calibration: torch.Tensor, ft: FinetuneConfig,
                 progress: bool = True) -> None:
    """End-to-end fine-tuning of ``model`` against the float model at ``teacher_source``; the teacher
    is freed (all but its LM head) once its final hidden states are computed, where that suffices."""
    from quipsharp.finetune import finetune_model, teacher_targets
    from quipsharp.hf import load_model

    teacher, _ = load_model(teacher_source, dtype=dtype)
    if teacher.get_input_embeddings().weight.shape[0] != model.get_input_embeddings().weight.shape[0]:
        raise WorkflowError(f"teacher {teacher_source} has a different vocabulary from the quantized model")
    targets = teacher_targets(teacher, calibration, ft.batch_size)
    source = teacher if targets is None else targets
    del teacher, targets
    gc.collect()
    finetune_model(model, source, calibration, ft, progress=progress)


def quantize_to_dir(
    model_source: str | os.PathLike,
    out: str | os.PathLike,
    config: ModelQuantConfig,
    calib: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    target_bpw: float | None = None,
    sensitivity_file: str | os.PathLike | None = None,
    hessians: list[str | os.PathLike] | None = None,
    max_memory: int | None = None,
    ray: RayOptions | None = None,
) -> JobResult:
    """Load a float model, quantize it (with the fine-tuning ``config.finetune`` asks for) and save it.

    Args:
        model_source: a HF model directory, a ``.gguf`` file or a hub id.
        out: the output directory (see :func:`quipsharp.outputs.check_output`).
        config: the quantization settings.
        calib: calibration text (``.txt``/``.jsonl`` or a dataset name); None quantizes data-free.
        dtype: dtype of the model while quantizing and of the tensors left in float.
        work_dir: per-block progress (default ``OUT.quipsharp-work``).
        resume: continue the interrupted run whose progress ``work_dir`` holds.
        overwrite: replace an existing quipsharp model at ``out``.
        target_bpw: choose each layer's width (2, 3 or 4 bits) for this mean code bits per quantized
            weight from the layers' measured proxy losses (:mod:`quipsharp.allocation`); needs
            calibration text, and replaces ``config.layer.bits`` / ``bits_map`` (which must be unset).
        sensitivity_file: keep (and reuse) that measurement in this JSON file (:func:`layer_sensitivity`).
        hessians: Hessian directories (:func:`hessians_to_dir`; several are added) to quantize with
            instead of calibration text: the "original inputs" mode; checked against the model.
        max_memory: stream the weights (bytes of memory to plan for): the model stays in its
            checkpoint (a local safetensors directory or ``.gguf`` file) and each decoder block is read
            when it is quantized and dropped once saved (:mod:`quipsharp.models.source`), so memory holds
            the embeddings, one block, its Hessians and the calibration stream; refused before any work
            when that does not fit. The files are the same as without it.
        ray: quantize on a Ray cluster (:mod:`quipsharp.distributed`): a cluster address is joined before
            the model loads, so an unreachable one fails fast; a new local cluster starts in the
            background while the model loads. The files are the same as one process's with the
            cluster's threads per task.
    """
    import torch

    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.distributed import ray_cluster
    from quipsharp.hf import load_model, save_quantized
    from quipsharp.limits import check_window
    from quipsharp.pipeline import quantize_model

    if dtype not in DTYPES:
        raise WorkflowError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if target_bpw is not None:
        if calib is None:
            raise WorkflowError("--target-bpw measures each layer's sensitivity on calibration text: give --calib")
        if config.bits_map:
            raise WorkflowError("--target-bpw chooses every layer's width: it cannot be combined with --bits-map")
        if not min(SUPPORTED_BITS) <= target_bpw <= max(SUPPORTED_BITS):
            raise WorkflowError(f"--target-bpw must lie in [{min(SUPPORTED_BITS)}, {max(SUPPORTED_BITS)}], "
                                f"got {target_bpw:g}")
    if ray is not None and config.finetune.block:
        raise WorkflowError(f"--finetune {config.finetune.mode} tunes inside each block, which does not run on Ray "
                            f"yet: use --finetune e2e or no --ray")
    if max_memory is not None:
        for option, given in (("--finetune", config.finetune.mode != "none"), ("--target-bpw", target_bpw)):
            if given:
                raise WorkflowError(f"--max-memory (streaming the weights) cannot be combined with {option} yet")
    source_hessians = None
    if hessians:
        from quipsharp.hessian_dir import open_hessians

        if calib is not None:
            raise WorkflowError("--hessians replaces the calibration text: give --hessians or --calib, not both")
        for option, given in (("--finetune", config.finetune.mode != "none"), ("--target-bpw", target_bpw)):
            if given:
                raise WorkflowError(f"{option} needs calibration text; it cannot be combined with --hessians")
        source_hessians = open_hessians(list(hessians))  # a bad directory fails before the model loads
        if source_hessians.identity["dtype"] != dtype:
            raise WorkflowError(f"the Hessians were computed in {source_hessians.identity['dtype']}, this run uses "
                                f"--dtype {dtype}: give --dtype {source_hessians.identity['dtype']}")
    if config.finetune.mode != "none":
        if calib is None:
            raise WorkflowError(f"fine-tuning mode {config.finetune.mode!r} needs calibration text")
        check_holdout(config.nsamples, config.finetune)
    inputs = (model_source,) + ((calib,) if calib is not None else ()) + tuple(hessians or ())
    out = check_output(out, overwrite=overwrite, inputs=inputs)
    work = Path(work_dir).expanduser().resolve() if work_dir is not None else default_work_dir(out)
    if overlaps(work, out):
        raise WorkflowError(f"the work directory {work} and the output {out} must not contain each other")
    for item in inputs:
        if Path(item).exists() and overlaps(work, Path(item).resolve()):
            raise WorkflowError(f"the work directory {work} overlaps the input {item}")
    start = time.perf_counter()
    with locked(out), locked(work), contextlib.ExitStack() as stack:
        WorkDir(work, resume)  # refuses a foreign directory or unrequested progress before any loading
        docs = read_documents(calib) if calib is not None else None  # bad text fails before the model loads
        cluster = stack.enter_context(ray_cluster(ray))  # an unreachable address fails here
        torch.manual_seed(config.seed)
        streamed, streamed_blocks, spill = None, None, False
        if max_memory is not None:
            from quipsharp.models.walker import find_blocks

            model, tokenizer, streamed = open_streamed_model(model_source, dtype, "quantize")
            spill = check_streaming_memory(model, config, max_memory, calibrated=docs is not None)
            streamed_blocks = (work, find_blocks(model)[0])
        else:
            model, tokenizer = load_model(model_source, dtype=dtype)
        check_window(model.config, config.ctx)
        calibration = None
        if docs is not None:
            calibration = calibration_windows(docs, tokenizer, config.nsamples, config.ctx, config.seed)
        if target_bpw is not None:
            config = allocate_config(model, config, calibration, target_bpw, progress, sensitivity_file)
        if source_hessians is not None:
            source_hessians.check_model(model_identity(model, tokenizer, dtype, source_hessians.identity["ctx"],
                                                       streamed=streamed))
            logger.info("quantizing with %s", source_hessians.describe())
        model, reports = quantize_model(model, config, calibration, work_dir=work, resume=resume, progress=progress,
                                        hessians=source_hessians, streamed=streamed, spill=spill, cluster=cluster)
        if streamed is not None:  # the embeddings and head again, for the save
            streamed.load(model, skip=model.get_submodule(streamed_blocks[1]))
        source = source_name(model_source)
        calibration_name = source_name(calib) if calib is not None else "none (data-free)"
        if source_hessians is not None:
            calibration_name = source_hessians.describe()
        replace = overwrite
        if config.finetune.e2e:  # save first: a failed or interrupted end-to-end stage must not lose the quantization
            untuned = dataclasses.replace(config, finetune=config.finetune.replace(
                mode="block" if config.finetune.block else "none"))
            save_quantized(model, out, tokenizer, untuned, reports, overwrite=replace, source=source,
                           calibration=calibration_name)
            faults.point("e2e:saved-untuned")
            WorkDir(work, resume=True).cleanup()
            replace = True  # from here on `out` holds this job's own output
            try:
                finetune_e2e(model, str(model_source), dtype, calibration, config.finetune, progress)
            except BaseException as err:
                add_note(err, f"end-to-end fine-tuning did not finish; {out} holds the model without it "
                              f"(retry with `quipsharp finetune {out} --calib FILE --out DIR`)")
                raise
        save_quantized(model, out, tokenizer, config, reports, overwrite=replace, source=source,
                       calibration=calibration_name, streamed_blocks=streamed_blocks)
        faults.point("quantize:saved")
        WorkDir(work, resume=True).cleanup()
    return JobResult(out, model, reports, time.perf_counter() - start)


def open_streamed_model(model_source: str | os.PathLike, dtype: str, verb: str) -> tuple[Any, Any, Any]:
    """``(skeleton, tokenizer, StreamedWeights)`` of a checkpoint to stream (``--max-memory``); refuses
    one that lacks tensors of its architecture (they would be random). ``verb``: what is refused."""
    import torch

    from quipsharp.models.source import StreamedWeights, open_streamed

    model, tokenizer, weights = open_streamed(model_source, getattr(torch, dtype))
    streamed = StreamedWeights(model, weights, getattr(torch, dtype))
    missing = streamed.missing()
    if missing:
        raise WorkflowError(f"{model_source} lacks {len(missing)} tensors of its architecture (e.g. "
                            f"{missing[0]}): they would be random; refusing to {verb} it")
    return model, tokenizer, streamed


#: The process's own memory when it cannot be read (/proc): torch, transformers, the tokenizer, the
#: model's skeleton (measured here: 0.45 GB for SmolLM2 from its GGUF).
RUNTIME_BYTES = 450 * 2**20
#: Float64 [n, n] copies of a Hessian alive at once: its exact sums' bins while accumulating (every
#: group of the block at once), and while one layer is quantized the means of the groups not yet done
#: plus LDLQ_COPIES working copies of its own (the rotated matrix, damped in place, its factor, and the
#: transform's and factorisation's temporaries: 3.6 measured at n = 4096).
BIN_COPIES = 3
LDLQ_COPIES = 4
WEIGHT_COPIES = 6


def streaming_memory(model: Any, config: ModelQuantConfig, calibrated: bool) -> dict[str, int]:
    """Bytes a streamed quantization of ``model`` (a skeleton) needs, by part: the tensors outside
    the blocks, the largest block in float, its Hessians, the calibration stream (the inputs and
    outputs of one block for every window), one batch's activations in a block, and this process's
    resident size now (torch, transformers, the tokenizer; ``RUNTIME_BYTES`` where it cannot be read)."""
    from quipsharp.limits import current_rss_bytes
    from quipsharp.models.walker import block_linears, find_blocks, linear_shape

    _, blocks = find_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    outer = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in inside)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    shapes = [[linear_shape(m) for m in block_linears(b).values()] for b in blocks]
    # Float64 Hessians (layers reading one input share one: counting each layer's overestimates), plus
    # the float32 temporaries: XᵀX of the widest input while summing; while quantizing, the factor in
    # float32 and WEIGHT_COPIES float32 arrays the size of the largest weight (rotated, scaled, rounded,
    # the feedback's working copy and the coordinate descent's).
    summing = max((8 * BIN_COPIES * sum(n * n for _, n in s) + 4 * max(n * n for _, n in s) for s in shapes if s),
                  default=0)
    quantizing = max((8 * (sum(n * n for _, n in s) + LDLQ_COPIES * max(n * n for _, n in s))
                      + 4 * max(n * n for _, n in s) + 4 * WEIGHT_COPIES * max(m * n for m, n in s)
                      for s in shapes if s), default=0)
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    stream = 2 * config.nsamples * config.ctx * hidden * 4 if calibrated else 0
    # one batch through one block: attention scores, the MLP's three products, q/k/v/output (float32)
    batch = min(config.batch_size, config.nsamples)
    activations = 4 * batch * config.ctx * (heads * config.ctx + 3 * inter + 4 * hidden) if calibrated else 0
    runtime = current_rss_bytes() or RUNTIME_BYTES
    return {"outside the blocks": outer, "one block": block, "its Hessians while summed": summing,
            "its Hessians while quantizing": quantizing, "calibration stream": stream,
            "one batch's activations": activations, "this process now": runtime}


def streaming_peak(parts: dict[str, int], stream: int) -> int:
    """The peak of the three phases of a streamed run (:func:`streaming_memory`'s parts, with ``stream``
    bytes of the calibration stream in memory): the calibration pass (embeddings and head, block 0),
    summing a block's Hessians, and quantizing its linears (the batch's activations are gone)."""
    block, activations = parts["one block"], parts["one batch's activations"]
    phases = (parts["outside the blocks"] + block + stream + activations,
              block + parts["its Hessians while summed"] + stream + activations,
              block + parts["its Hessians while quantizing"] + stream)
    return parts["this process now"] + max(phases)


def check_streaming_memory(model: Any, config: ModelQuantConfig, max_memory: int, calibrated: bool) -> bool:
    """Whether the calibration stream must go to disk to fit ``--max-memory`` (:func:`streaming_memory`,
    :func:`streaming_peak`); refuses, before any work, a cap too small even then, naming what it needs."""
    parts = streaming_memory(model, config, calibrated)
    need = streaming_peak(parts, parts["calibration stream"])
    described = "the peak of its phases; " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items()) + " GB"
    logger.info("streaming needs about %.2f GB (%s)", need / 1e9, described)
    if need <= max_memory:
        return False
    batches = -(-config.nsamples // config.batch_size)
    spilled = streaming_peak(parts, 2 * parts["calibration stream"] // max(batches, 1))
    if spilled > max_memory:
        raise WorkflowError(f"--max-memory {max_memory / 1e9:.2f} GB is too small: streaming this model needs about "
                            f"{spilled / 1e9:.2f} GB with the calibration stream on disk ({described})")
    logger.info("the calibration stream goes to disk: %.2f GB with it in memory, %.2f GB without", need / 1e9,
                spilled / 1e9)
    return True


def model_identity(model: Any, tokenizer: Any, dtype: str, ctx: int, streamed: Any = None) -> dict[str, Any]:
    """What Hessians computed on ``model`` depend on besides the calibration tokens (the identity a
    Hessian directory records and :meth:`quipsharp.hessian_dir.HessianDir.check_model` compares).
    ``streamed``: the model is a skeleton (:class:`quipsharp.models.source.StreamedWeights`); its
    weights are read one tensor at a time, and the identity is the loaded model's."""
    from quipsharp.hessian_dir import tokenizer_digest
    from quipsharp.models.walker import find_blocks
    from quipsharp.pipeline import run_fingerprint

    digests = run_fingerprint(model, ModelQuantConfig(), None, streamed=streamed)
    return {"blocks_name": find_blocks(model)[0], "structure": digests["structure"], "weights": digests["weights"],
            "tokenizer": tokenizer_digest(tokenizer), "dtype": dtype, "ctx": ctx}


def hessians_to_dir(
    model_source: str | os.PathLike,
    calib: str | os.PathLike,
    out: str | os.PathLike,
    *,
    nsamples: int,
    ctx: int,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    max_memory: int | None = None,
) -> JobResult:
    """Compute every decoder block's input Hessians of a float model on calibration text (the float
    model's own inputs to each block: "original inputs") and write them to the directory ``out``
    (:mod:`quipsharp.hessian_dir`), block by block; ``quantize --hessians`` uses them, and
    directories computed on other shards of text add up exactly (:func:`merge_hessians`).

    ``max_memory``: stream the weights as ``quantize --max-memory`` does (each block read from the
    checkpoint while its Hessians are summed; the calibration stream on disk, in a folder of its own
    beside ``out``, when it does not fit); refused before any work when that does not fit. The
    directory is the same as without it."""
    import tempfile

    import torch

    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.hessian_dir import is_hessian_dir, write_hessians
    from quipsharp.hf import load_model
    from quipsharp.limits import check_window
    from quipsharp.pipeline import calibration_digest, collect_model_hessians

    if dtype not in DTYPES:
        raise WorkflowError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise WorkflowError(f"--batch-size must be at least 1, got {batch_size}")
    out = check_output(out, overwrite=overwrite, inputs=(model_source, calib), replaceable=is_hessian_dir,
                       kind="quipsharp Hessian directory")
    start = time.perf_counter()
    with locked(out), contextlib.ExitStack() as stack:
        docs = read_documents(calib)  # bad text fails before the model loads
        torch.manual_seed(seed)
        streamed, spill = None, None
        if max_memory is not None:
            model, tokenizer, streamed = open_streamed_model(model_source, dtype, "compute Hessians of")
            plan = ModelQuantConfig(nsamples=nsamples, ctx=ctx, batch_size=batch_size)
            if check_streaming_memory(model, plan, max_memory, calibrated=True):
                # a new staging-named folder beside out: removed after, or by the next run on out when killed
                out.parent.mkdir(parents=True, exist_ok=True)
                spill = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=f".{out.name}{STAGING_INFIX}stream-", dir=out.parent)))
        else:
            model, tokenizer = load_model(model_source, dtype=dtype)
        check_window(model.config, ctx)
        calibration = calibration_windows(docs, tokenizer, nsamples, ctx, seed)
        shard = {"calibration": calibration_digest(calibration), "windows": nsamples, "source": source_name(calib),
                 "seed": seed, "model": source_name(model_source)}
        identity = model_identity(model, tokenizer, dtype, ctx, streamed=streamed)

        def produce(add_block: Any) -> None:
            collect_model_hessians(model, calibration, batch_size, add_block, progress=progress, streamed=streamed,
                                   spill=spill)

        write_hessians(out, identity, [shard], produce)
    return JobResult(out, model, None, time.perf_counter() - start)


def merge_hessians(dirs: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Add Hessian directories computed on different calibration shards into ``out`` (exact sums)."""
    from quipsharp.hessian_dir import merge_hessian_dirs

    return merge_hessian_dirs(dirs, out, overwrite=overwrite)


def allocate_config(model: Any, config: ModelQuantConfig, calibration: torch.Tensor, target_bpw: float,
                    progress: bool = True, sensitivity_file: str | os.PathLike | None = None) -> ModelQuantConfig:
    """``config`` with a ``bits_map`` giving every quantizable layer the width that
    :func:`quipsharp.allocation.allocate_bits` chooses for ``target_bpw`` from the layers' proxy
    losses at 2, 3 and 4 bits (:func:`quipsharp.pipeline.measure_sensitivity`).

    ``sensitivity_file``: where the measurement is kept (JSON) and reused by later runs with the same
    weights, calibration tokens and settings, so that several sizes cost one measurement; a file
    measured for anything else is refused."""
    import re

    from quipsharp.allocation import allocate_bits, bits_per_weight, total_loss

    layers = layer_sensitivity(model, config, calibration, progress, sensitivity_file)
    bits = allocate_bits(layers, target_bpw)
    counts = {b: sum(1 for v in bits.values() if v == b) for b in SUPPORTED_BITS}
    logger.info("--target-bpw %g: %s layers at 2/3/4 bits, %.4f bits per weight, summed proxy loss %.4g "
                "(uniform %d bits: %.4g)", target_bpw, "/".join(str(counts[b]) for b in SUPPORTED_BITS),
                bits_per_weight(layers, bits), total_loss(layers, bits), math.floor(target_bpw),
                total_loss(layers, {la.name: math.floor(target_bpw) for la in layers}))
    bits_map = tuple((f"^{re.escape(name)}$", b) for name, b in bits.items())
    return dataclasses.replace(config, bits_map=bits_map)


SENSITIVITY_FORMAT = "quipsharp-sensitivity"


def layer_sensitivity(model: Any, config: ModelQuantConfig, calibration: torch.Tensor, progress: bool = True,
                      cache: str | os.PathLike | None = None) -> list[Any]:
    """:func:`quipsharp.pipeline.measure_sensitivity`, read from or written to ``cache`` when given."""
    import json

    from quipsharp.allocation import LayerSensitivity
    from quipsharp.io import atomic_write_text
    from quipsharp.pipeline import measure_sensitivity, run_fingerprint

    if cache is None:
        return measure_sensitivity(model, config, calibration, progress=progress)
    # what the measurement depends on: weights, calibration, and the settings other than the widths
    neutral = dataclasses.replace(config, layer=config.layer.replace(bits=min(SUPPORTED_BITS)), bits_map=(),
                                  finetune=FinetuneConfig())
    fingerprint = run_fingerprint(model, neutral, calibration)
    path = Path(cache)
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["format"] != SENSITIVITY_FORMAT:
                raise ValueError(saved["format"])
            layers = [LayerSensitivity(r["name"], int(r["weights"]), {int(b): float(v) for b, v in r["losses"].items()})
                      for r in saved["layers"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise WorkflowError(f"{path} is not a quipsharp sensitivity file") from None
        differs = [k for k, v in fingerprint.items() if saved.get("fingerprint", {}).get(k) != v]
        if differs:
            raise WorkflowError(f"{path} was measured with other {' and '.join(differs)}: give another file")
        logger.info("layer sensitivity read from %s", path)
        return layers
    layers = measure_sensitivity(model, config, calibration, progress=progress)
    atomic_write_text(path, json.dumps({"format": SENSITIVITY_FORMAT, "fingerprint": fingerprint, "layers": [
        {"name": la.name, "weights": la.weights, "losses": la.losses} for la in layers]}, indent=1))
    return layers


def finetune_dir(
    src: str | os.PathLike,
    out: str | os.PathLike,
    calib: str | os.PathLike,
    ft: FinetuneConfig,
    *,
    teacher: str | None = None,
    nsamples: int | None = None,
    ctx: int | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> JobResult:
    """Fine-tune a saved quantized model end to end against its float model and save the result.

    ``nsamples``/``ctx``/``seed``/``teacher`` default to what the saved model records. ``ft`` gives
    the end-to-end settings; the saved in-block settings stay on record (that stage is not re-run).
    """
    import json

    from quipsharp.data import calibration_windows, read_documents
    from quipsharp.hf import REPORT_FILE, load_model, read_quantization_config, save_quantized
    from quipsharp.limits import check_window
    from quipsharp.pipeline import LayerReport

    src = Path(src)
    _, qc = read_quantization_config(src)
    teacher = teacher or qc.get("source_model")
    if not teacher:
        raise WorkflowError(f"{src} does not record the float model it came from: give it with --teacher MODEL")
    saved = ModelQuantConfig.from_dict(qc["config"])
    nsamples = nsamples or saved.nsamples
    ctx = ctx or saved.ctx
    seed = saved.seed if seed is None else seed
    ft = ft.replace(mode="both" if saved.finetune.block else "e2e", block_epochs=saved.finetune.block_epochs)
    if saved.finetune.block and (nsamples, ctx, seed) != (saved.nsamples, saved.ctx, saved.seed):
        logger.warning("calibration windows differ from the in-block stage's: the end-to-end held-out windows "
                       "may include text the in-block stage trained on")
    if not ft.e2e:
        raise WorkflowError("--ft-e2e-epochs is 0: nothing to fine-tune")
    check_holdout(nsamples, ft)
    out = check_output(out, overwrite=overwrite, inputs=(src, teacher, calib))
    config = dataclasses.replace(saved, finetune=ft, nsamples=nsamples, ctx=ctx, seed=seed)
    start = time.perf_counter()
    with locked(out):
        docs = read_documents(calib)
        model, tokenizer = load_model(src)
        check_window(model.config, ctx)
        calibration = calibration_windows(docs, tokenizer, nsamples, ctx, seed)
        finetune_e2e(model, teacher, "float32", calibration, ft, progress)
        report_path = src / REPORT_FILE
        reports = ([LayerReport.from_dict(r) for r in json.loads(report_path.read_text())]
                   if report_path.is_file() else None)
        calibration_name = f"{qc.get('calibration') or 'unrecorded'} (quantized); {source_name(calib)} (end to end)"
        save_quantized(model, out, tokenizer, config, reports, overwrite=overwrite, source=source_name(teacher),
                       calibration=calibration_name)
    return JobResult(out, model, reports, time.perf_counter() - start)
