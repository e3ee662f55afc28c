"""The ``quipsharp`` command line: quantize, finetune, eval ppl, eval tasks, generate, bench, report, inspect.

Every expected failure (missing file, unknown architecture, bad option) is printed as one line
``quipsharp: error: …`` with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from quipsharp.bench import DEFAULT_NEW_TOKENS as DEFAULT_BENCH_NEW_TOKENS
from quipsharp.bench import DEFAULT_PROMPT_TOKENS as DEFAULT_BENCH_PROMPT_TOKENS
from quipsharp.bench import DEFAULT_RUNS as DEFAULT_BENCH_RUNS
from quipsharp.config import CODEBOOK_FAMILIES, DEFAULT_CTX, DEFAULT_NSAMPLES, FINETUNE_MODES
from quipsharp.workflows import WORK_SUFFIX

EXIT_USAGE = 2
DEFAULT_BITS = 2
EXIT_UNEXPECTED = 1
DEFAULT_EVAL_CTX = 2048
DEFAULT_NEW_TOKENS = 64
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
ENGINES = ("auto", "lean", "transformers")
HEAD_DTYPES = ("auto", "model", "bfloat16", "int8")

logger = logging.getLogger("quipsharp")


class CliError(Exception):
    """A user-facing error: printed as one line."""


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """An argparse type: a finite ``kind`` within ``[low, high]`` (``(low, high]`` if ``low_open``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '≥'} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be ≤ {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)
WINDOW = _number(int, 2)
FINITE_NON_NEGATIVE = _number(float, 0.0)
FINITE_POSITIVE = _number(float, 0.0, low_open=True)


SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}


def _size(text: str) -> int:
    """A memory size: a number with an optional unit (B, KB, MB, GB, TB; KiB, MiB, GiB, TiB)."""
    number = text.strip().rstrip("bBkKmMgGtTiI")
    unit = text.strip()[len(number):].upper()
    try:
        value = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 3GB or 1500MB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(value)


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    """--nsamples, --ctx and --batch-size: how the calibration text becomes token windows."""
    parser.add_argument("--nsamples", type=POSITIVE, default=DEFAULT_NSAMPLES,
                        help="calibration windows (default: %(default)s)")
    parser.add_argument("--ctx", type=WINDOW, default=DEFAULT_CTX,
                        help="tokens per calibration window (default: %(default)s)")
    parser.add_argument("--batch-size", type=POSITIVE, default=8,
                        help="calibration windows per forward pass (default: %(default)s)")


def _bits_map(items: list[str]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise CliError(f"--bits-map expects REGEX=BITS, got {item!r}")
        out.append((pattern, int(bits)))
    return out


def _finetune_config(args: argparse.Namespace, mode: str, base: Any = None) -> Any:
    """The ``--ft-*`` options as a FinetuneConfig; options not given keep ``base``'s values."""
    from quipsharp.config import FinetuneConfig

    base = base if base is not None else FinetuneConfig()
    given = {f.name: getattr(args, "ft_" + FT_OPTION_NAMES.get(f.name, f.name))
             for f in dataclasses.fields(FinetuneConfig) if f.name != "mode"}
    return base.replace(mode=mode, **{k: v for k, v in given.items() if v is not None})


def _ray_options(args: argparse.Namespace) -> Any:
    """``--ray``, ``--ray-workers``, ``--ray-threads`` as RayOptions (None without --ray)."""
    if args.ray is None:
        for option in ("ray_workers", "ray_threads"):
            if getattr(args, option) is not None:
                raise CliError(f"--{option.replace('_', '-')} sets how to run on Ray: give --ray too")
        return None
    from quipsharp.distributed import RayOptions

    return RayOptions(args.ray, workers=args.ray_workers, threads=args.ray_threads or 1)


def cmd_quantize(args: argparse.Namespace) -> int:
    from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
    from quipsharp.eval import compression_report
    from quipsharp.workflows import quantize_to_dir

    if args.calib is None and not args.data_free and not args.hessians:
        raise CliError("give calibration text with --calib FILE, Hessians computed beforehand with --hessians DIR, "
                       "or --data-free to quantize without data")
    if args.hessians and args.data_free:
        raise CliError("--hessians and --data-free exclude each other: give one")
    if args.target_bpw is not None and args.bits is not None:
        raise CliError("--bits and --target-bpw both set the width: give one")
    if args.sensitivity is not None and args.target_bpw is None:
        raise CliError("--sensitivity keeps the measurement --target-bpw makes: give --target-bpw too")
    layer = QuIPSharpConfig(
        bits=args.bits if args.bits is not None else DEFAULT_BITS, use_hadamard=not args.no_hadamard,
        hadamard_seed=args.seed, damping=args.damping,
        scale_rho=args.scale_rho, cd_passes=args.cd_passes, codebook=args.codebook,
    )
    config = ModelQuantConfig(
        layer=layer, bits_map=tuple(_bits_map(args.bits_map)), skip=tuple(args.skip),
        hessian_inputs=args.hessian_inputs, nsamples=args.nsamples, ctx=args.ctx, seed=args.seed,
        batch_size=args.batch_size, finetune=_finetune_config(args, args.finetune),
    )
    result = quantize_to_dir(args.model, args.out, config, args.calib, dtype=DTYPES[args.dtype],
                             work_dir=args.work_dir, resume=args.resume, overwrite=args.overwrite,
                             progress=not (args.quiet or args.json), target_bpw=args.target_bpw,
                             sensitivity_file=args.sensitivity, hessians=args.hessians, max_memory=args.max_memory,
                             ray=_ray_options(args))
    report = compression_report(result.model, result.out)
    if args.json:
        print(json.dumps({"out": str(result.out), "seconds": result.seconds, **report}, default=str))
        return 0
    print(f"quantized {report['quantized_layers']} layers to {report['codes_bits_per_weight']:.2f} bits/weight "
          f"in {result.seconds:.0f}s; {report['disk_bytes'] / 1e6:.1f} MB on disk "
          f"({report['disk_vs_float16']:.1%} of float16); saved to {result.out}")
    return 0


def cmd_hessians(args: argparse.Namespace) -> int:
    from quipsharp.workflows import hessians_to_dir

    result = hessians_to_dir(args.model, args.calib, args.out, nsamples=args.nsamples, ctx=args.ctx, seed=args.seed,
                             batch_size=args.batch_size, dtype=DTYPES[args.dtype], overwrite=args.overwrite,
                             progress=not args.quiet, max_memory=args.max_memory)
    print(f"Hessians of {args.nsamples} windows x {args.ctx} tokens computed in {result.seconds:.0f}s; "
          f"saved to {result.out}")
    return 0


def cmd_merge_hessians(args: argparse.Namespace) -> int:
    from quipsharp.workflows import merge_hessians

    out = merge_hessians(args.dirs, args.out, overwrite=args.overwrite)
    print(f"merged {len(args.dirs)} Hessian directories into {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from quipsharp.config import ModelQuantConfig
    from quipsharp.hf import read_quantization_config
    from quipsharp.workflows import finetune_dir

    _, qc = read_quantization_config(args.dir)
    saved = ModelQuantConfig.from_dict(qc["config"])  # options not given keep the saved (or default) values
    ft = _finetune_config(args, saved.finetune.mode, saved.finetune)
    result = finetune_dir(args.dir, args.out, args.calib, ft, teacher=args.teacher, nsamples=args.nsamples,
                          ctx=args.ctx, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet)
    print(f"fine-tuned {args.dir} end to end in {result.seconds:.0f}s; saved to {result.out}")
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from quipsharp.data import evaluation_windows
    from quipsharp.eval import perplexity
    from quipsharp.hf import load_model
    from quipsharp.limits import check_window

    if not Path(args.data).is_file():
        raise CliError(f"evaluation file not found: {args.data}")
    _check_record(args)
    model, tokenizer = load_model(args.model)
    check_window(model.config, args.ctx)
    windows = evaluation_windows(args.data, tokenizer, args.ctx)
    result = perplexity(model, windows, max_windows=args.max_windows, batch_size=args.batch_size,
                        step=args.step, progress=not args.json)
    if not math.isfinite(result["ppl"]):
        raise CliError(f"perplexity is {result['ppl']}: the model's logits are not finite (a damaged model? "
                       "check it with `quipsharp inspect --verify`)")
    if args.record:
        from quipsharp.card import record_eval

        record_eval(args.model, {"kind": "ppl", "data": Path(args.data).name, "step": args.step,
                                 **{k: result[k] for k in ("ppl", "ctx", "windows", "tokens")}})
    if args.json:
        print(json.dumps({k: result[k] for k in ("ppl", "ctx", "windows", "tokens")}))
    else:
        print(f"perplexity {result['ppl']:.3f} (ctx {result['ctx']}, {result['windows']} windows, "
              f"{result['tokens']} predicted tokens)")
    return 0


def _check_record(args: argparse.Namespace) -> None:
    """``--record`` writes into the model directory: only a quipsharp directory takes it."""
    from quipsharp.format import is_quantized_dir

    if args.record and not is_quantized_dir(args.model):
        raise CliError(f"--record keeps the result in a quipsharp directory; {args.model} is not one")


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from quipsharp.eval.tasks import evaluate_tasks

    _check_record(args)
    results = evaluate_tasks(args.model, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                             include_path=args.include_path, batch_size=args.batch_size, seed=args.seed)
    if args.record:
        from quipsharp.card import record_eval

        for task, metrics in results.items():
            record_eval(args.model, {"kind": "tasks", "task": task, "metrics": metrics, "limit": args.limit,
                                     "num_fewshot": args.num_fewshot})
    if args.json:
        print(json.dumps(results))
        return 0
    for task, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if not k.endswith("_stderr")}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f} ± {metrics.get(k + '_stderr', math.nan):.4f}"
                                       for k, v in shown.items()))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from quipsharp.hf import load_model
    from quipsharp.limits import generation_length

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CliError(f"--prompt is not valid UTF-8 text (byte {err.start} of the argument)") from None
    model, tokenizer = load_model(args.model)
    if args.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        input_ids = ids["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    new_tokens = generation_length(model.config, input_ids.shape[1], args.max_new_tokens)
    streamer = TextStreamer(tokenizer, skip_prompt=not args.echo, skip_special_tokens=True)
    max_len = input_ids.shape[1] + new_tokens
    if _lean_engine(args.engine, model, max_len):
        from quipsharp.fastdecode import LeanDecoder

        decoder = LeanDecoder(model, max_len, head_dtype=_head_dtype(args.head_dtype, model))
        streamer.put(input_ids)
        for token in decoder.generate(input_ids[0], new_tokens, eos_token_id=_stop_ids(model, tokenizer),
                                      temperature=args.temperature,
                                      generator=torch.Generator().manual_seed(args.seed)):
            streamer.put(torch.tensor([token]))
        streamer.end()
        return 0
    torch.manual_seed(args.seed)
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                   max_new_tokens=new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature if args.temperature > 0 else None, top_p=None, top_k=None,
                   streamer=streamer, pad_token_id=tokenizer.eos_token_id)
    return 0


def _head_dtype(name: str, model: Any) -> Any:
    import torch

    from quipsharp.fastdecode import default_head_dtype

    if name == "auto":
        return default_head_dtype(model)
    return None if name == "model" else getattr(torch, name)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="decoding loop: quipsharp's lean loop (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3; "
                        "static cache), transformers' generate, or auto (lean when the model is supported; -v "
                        "logs why not) (default: %(default)s)")
    p.add_argument("--head-dtype", choices=HEAD_DTYPES, default="auto",
                   help="lean loop: LM head matmul in the model's dtype, bfloat16, or int8 per-row weights "
                        "(faster; logits approximate); auto: int8 for quantized models, else the model's "
                        "(default: %(default)s)")


#: generation_config settings that change greedy/temperature decoding; the lean loop has none of them.
LOGITS_PROCESSOR_DEFAULTS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                             "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None}


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids as ``model.generate`` uses them: the generation config's (one or a list)
    and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _lean_engine(engine: str, model: Any, max_len: int) -> bool:
    """Whether to decode with the lean loop: ``--engine lean`` (an error when unsupported) or ``auto``
    (when the model is supported and its generation config asks for nothing the loop lacks)."""
    from quipsharp.fastdecode import supports

    if engine == "lean":
        return True  # LeanDecoder raises UnsupportedModelError naming what it cannot run
    gen = getattr(model, "generation_config", None)
    plain = all(getattr(gen, k, v) in (v, None) for k, v in LOGITS_PROCESSOR_DEFAULTS.items())
    return engine == "auto" and plain and supports(model, max_len)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from quipsharp import kernels
    from quipsharp.bench import benchmark_generation
    from quipsharp.hf import load_model

    model, _ = load_model(args.model)
    if args.dtype != "float32":
        model.to(getattr(torch, DTYPES[args.dtype]))  # QuantizedLinear keeps its float32 state
    result = benchmark_generation(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                  runs=args.runs, threads=args.threads,
                                  cache=None if args.cache == "dynamic" else args.cache,
                                  engine=args.engine, head_dtype=_head_dtype(args.head_dtype, model))
    result["kernel"] = kernels.selected()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"decode {result['decode_tok_s']:.1f} tok/s, prefill {result['prefill_tok_s']:.1f} tok/s "
              f"({result['threads']} threads, batch 1, median of {result['runs']} runs, kernel "
              f"{result['kernel']}, {result['engine']} loop), peak RSS {result['peak_rss_mb']:.0f} MB")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from quipsharp.report import build_report

    page = build_report(args.dir, args.out, tuple(args.compare), args.float_ppl)
    print(f"report written to {page}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from quipsharp.card import layer_reports
    from quipsharp.eval.report import disk_bytes
    from quipsharp.format import CHECKSUMS_FILE, check_dir

    path = Path(args.dir)
    raw, record, problems = check_dir(path, verify=args.verify)
    modules = record.modules
    codebooks = record.codebook_counts()
    bits = record.bits_per_weight()
    disk = disk_bytes(path)
    layers = layer_reports(path)
    info: dict[str, Any] = {
        "format_version": record.format_version,
        "model_type": raw.get("model_type"),
        "quantized_layers": len(modules),
        "bits_per_weight": bits,
        "codebooks": codebooks,
        "disk_bytes": disk,
        "config": record.raw.get("config"),
        "layers": layers,
        "verified": bool(args.verify) and not problems,
        "problems": problems,
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{path}: quipsharp format {info['format_version']}, {info['model_type']}, "
              f"{len(modules)} quantized layers, {bits:.2f} bits/weight, {disk / 1e6:.1f} MB on disk")
        print("  codebooks: " + ", ".join(f"{name} ({count} layers)" for name, count in codebooks.items()))
        for layer in layers:
            print(f"  {layer['name']:50s} {layer['bits']}b {layer['shape'][0]:6d}x{layer['shape'][1]:<6d} "
                  f"proxy {layer['proxy_loss']:.4g}  {layer['seconds']:.2f}s")
        for problem in problems:
            print(f"  problem: {problem}")
        if args.verify and not problems:
            sums = "every file matches its checksum" if (path / CHECKSUMS_FILE).is_file() else \
                "no checksums recorded (saved by transformers)"
            print(f"  verified: {sums}; every scale, sign and float tensor is finite")
    if problems:
        raise CliError(f"{path} is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                                                               if len(problems) > 1 else ""))
    return 0


#: FinetuneConfig fields whose ``--ft-*`` option is not ``--ft-<field>`` (every other field's is).
FT_OPTION_NAMES = {"gradient_checkpointing": "checkpointing"}


def _add_finetune_options(p: argparse.ArgumentParser, defaults_from: str | None = None) -> None:
    """The ``--ft-*`` options; unset ones are None and take their value from FinetuneConfig (or a saved one)."""
    from quipsharp.config import FinetuneConfig

    d = FinetuneConfig()

    def default(value: Any) -> str:
        return f" (default: {defaults_from or value})"

    p.add_argument("--ft-block-epochs", type=NON_NEGATIVE,
                   help="in-block tuning epochs per group" + default(d.block_epochs))
    p.add_argument("--ft-e2e-epochs", type=NON_NEGATIVE, help="end-to-end tuning epochs" + default(d.e2e_epochs))
    p.add_argument("--ft-lr", type=FINITE_POSITIVE,
                   help="learning rate of norms, float weights, LM head" + default(d.lr))
    p.add_argument("--ft-sign-lr", type=FINITE_POSITIVE, help="learning rate of the sign vectors" + default(d.sign_lr))
    p.add_argument("--ft-batch-size", type=POSITIVE, help="windows per micro-batch" + default(d.batch_size))
    p.add_argument("--ft-grad-accum", type=POSITIVE, help="micro-batches per optimizer step" + default(d.grad_accum))
    p.add_argument("--ft-holdout", type=FINITE_POSITIVE, help="fraction of windows held out" + default(d.holdout))
    p.add_argument("--ft-patience", type=NON_NEGATIVE,
                   help="stop a stage after this many epochs without held-out improvement, 0: never"
                        + default(d.patience))
    p.add_argument("--ft-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (end-to-end)" + default(d.gradient_checkpointing))


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log details, and show the traceback of an unexpected error")
    parser = _Parser(prog="quipsharp", description="QuIP# 2/3/4-bit quantization of causal LMs", parents=[common])
    parser.add_argument("--version", action="version", version=f"quipsharp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", parents=[common], help="quantize a model and save it")
    q.add_argument("model", help="HF model directory, .gguf file, or hub id")
    q.add_argument("--out", required=True,
                   help="output directory: new, empty, or an earlier quipsharp model with --overwrite")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the quipsharp model already at --out (swapped in only once complete)")
    q.add_argument("--bits", type=int, choices=(2, 3, 4), default=None, help="bits per weight (default: 2)")
    q.add_argument("--target-bpw", type=_number(float, 2.0, 4.0), default=None, metavar="BPW",
                   help="choose each layer's width (2/3/4 bits) for this mean bits per quantized weight from "
                        "measured per-layer sensitivity (needs --calib; costs one extra quantization per width)")
    q.add_argument("--sensitivity", metavar="FILE",
                   help="with --target-bpw: keep the measured sensitivity in FILE and reuse it when it matches "
                        "(same model, calibration and settings): several sizes for one measurement")
    q.add_argument("--codebook", choices=CODEBOOK_FAMILIES, default="e8p",
                   help="codebook family: e8p (QuIP#'s E8 lattice codes) or a QTIP bitshift trellis with the "
                        "1MAD or 3INST computed code (lower error, slower to quantize; default: %(default)s)")
    q.add_argument("--calib", help="calibration text: .txt, .jsonl (field 'text') or a HF dataset name")
    q.add_argument("--data-free", action="store_true", help="quantize without calibration data (H = I)")
    q.add_argument("--hessians", nargs="+", metavar="HDIR",
                   help="quantize with Hessians computed beforehand by `quipsharp hessians` instead of --calib "
                        "(several are added): each block's from the float model's inputs (--hessian-inputs "
                        "original); checked against the model")
    _add_calibration_options(q)
    q.add_argument("--seed", type=NON_NEGATIVE, default=0,
                   help="seed of the sign vectors and the calibration draw (default: %(default)s)")
    q.add_argument("--skip", action="append", default=[], metavar="REGEX", help="leave matching modules in float")
    q.add_argument("--bits-map", action="append", default=[], metavar="REGEX=BITS",
                   help="per-module bit width, first match wins (repeatable)")
    q.add_argument("--hessian-inputs", choices=("sequential", "original"), default="sequential",
                   help="each block's Hessians from the outputs of the already quantized blocks (sequential) or "
                        "of the float blocks (original) (default: %(default)s)")
    q.add_argument("--cd-passes", type=NON_NEGATIVE, default=0,
                   help="block coordinate-descent passes after BlockLDLQ (default: %(default)s)")
    q.add_argument("--scale-rho", type=FINITE_POSITIVE, default=None,
                   help="codebook scale ρ (default: the codebook's tuned value)")
    q.add_argument("--damping", type=FINITE_NON_NEGATIVE, default=None,
                   help="relative Hessian damping σ (default: the config's)")
    q.add_argument("--no-hadamard", action="store_true", help="skip the randomized Hadamard transform")
    q.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the model while quantizing and of the tensors left unquantized "
                        "(embeddings, norms, LM head): bfloat16 halves their size on disk (default: %(default)s)")
    q.add_argument("--finetune", choices=FINETUNE_MODES, default="none",
                   help="fine-tune inside each block while quantizing (block), the whole model after (e2e), or both "
                        "(default: %(default)s)")
    _add_finetune_options(q)
    q.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="stream the weights: read each decoder block from the checkpoint (a local safetensors "
                        "directory or .gguf file) only while it is quantized, planning for SIZE (e.g. 3GB) of "
                        "memory; refused up front when that is too small. Same files as without it "
                        "(default: load the whole model)")
    q.add_argument("--ray", metavar="ADDRESS",
                   help="quantize on a Ray cluster (pip install 'quipsharp[ray]'): the calibration stream split "
                        "across its workers, the linears quantized in parallel; same files as one process with "
                        "--ray-threads threads. ADDRESS: HOST:PORT of the head (or ray://HOST:PORT), auto (the "
                        "cluster of RAY_ADDRESS or `ray start` here, else a local one) or local")
    q.add_argument("--ray-workers", type=POSITIVE, default=None, metavar="N",
                   help="shards of the calibration stream (default: the cluster's CPUs / --ray-threads); with "
                        "--ray local also the local cluster's CPUs")
    q.add_argument("--ray-threads", type=POSITIVE, default=None, metavar="N",
                   help="torch threads of each Ray task (default: 1)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run")
    q.add_argument("--work-dir", help=f"per-block progress (default: OUT{WORK_SUFFIX})")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object (implies --quiet)")
    q.set_defaults(func=cmd_quantize)

    h = sub.add_parser("hessians", parents=[common],
                       help="compute every block's input Hessians on calibration text, for quantize --hessians")
    h.add_argument("model", help="HF model directory, .gguf file, or hub id")
    h.add_argument("--calib", required=True, help="calibration text: .txt, .jsonl (field 'text') or a HF dataset")
    h.add_argument("--out", required=True,
                   help="output directory: new, empty, or an earlier Hessian directory with --overwrite")
    h.add_argument("--overwrite", action="store_true", help="replace the Hessian directory already at --out")
    _add_calibration_options(h)
    h.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the calibration draw (default: %(default)s)")
    h.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the model's forward passes; quantize --hessians must use the same "
                        "(default: %(default)s)")
    h.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="stream the weights as quantize --max-memory does: each block read from the checkpoint "
                        "(a local safetensors directory or .gguf file) while its Hessians are summed, the "
                        "calibration stream on disk when it does not fit SIZE; refused up front when that is "
                        "too small. Same directory as without it (default: load the whole model)")
    h.add_argument("--quiet", action="store_true", help="no progress bars")
    h.set_defaults(func=cmd_hessians)

    mh = sub.add_parser("merge-hessians", parents=[common],
                        help="add Hessian directories computed on different calibration shards (exact sums)")
    mh.add_argument("dirs", nargs="+", metavar="HDIR", help="Hessian directories of the same model and settings")
    mh.add_argument("--out", required=True,
                    help="output directory: new, empty, or an earlier Hessian directory with --overwrite")
    mh.add_argument("--overwrite", action="store_true", help="replace the Hessian directory already at --out")
    mh.set_defaults(func=cmd_merge_hessians)

    f = sub.add_parser("finetune", parents=[common],
                       help="fine-tune a quantized model end to end against its float model")
    f.add_argument("dir", help="quantized model directory")
    f.add_argument("--calib", required=True, help="calibration text: .txt, .jsonl (field 'text') or a HF dataset")
    f.add_argument("--out", required=True,
                   help="output directory: new, empty, or an earlier quipsharp model with --overwrite")
    f.add_argument("--overwrite", action="store_true", help="replace the quipsharp model already at --out")
    f.add_argument("--teacher", help="the float model (default: the source recorded at quantization)")
    f.add_argument("--nsamples", type=POSITIVE, default=None, help="calibration windows (default: as quantized)")
    f.add_argument("--ctx", type=WINDOW, default=None, help="window length (default: as quantized)")
    f.add_argument("--seed", type=NON_NEGATIVE, default=None, help="calibration seed (default: as quantized)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_finetune_options(f, defaults_from="the saved model's settings")
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("eval", parents=[common], help="evaluate a model")
    esub = e.add_subparsers(dest="metric", required=True)
    p = esub.add_parser("ppl", parents=[common], help="perplexity on a text file")
    p.add_argument("model", help="quantized or float model: directory, .gguf file, or hub id")
    p.add_argument("--data", required=True, help="text file (e.g. WikiText-2's wiki.test.raw)")
    p.add_argument("--ctx", type=WINDOW, default=DEFAULT_EVAL_CTX, help="tokens per window (default: %(default)s)")
    p.add_argument("--max-windows", type=POSITIVE, default=None, help="evaluate the first N windows only")
    p.add_argument("--batch-size", type=POSITIVE, default=1, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--step", type=POSITIVE, default=None,
                   help="feed each window STEP tokens at a time through the KV cache (as generation does)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--record", action="store_true",
                   help="keep the result in the quipsharp directory (quipsharp_eval.json, its model card, report)")
    p.set_defaults(func=cmd_eval_ppl)

    t = esub.add_parser("tasks", parents=[common], help="lm-eval task accuracy (needs quipsharp[eval])")
    t.add_argument("model", help="quantized or float model: directory, .gguf file, or hub id")
    t.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (e.g. arc_easy hellaswag)")
    t.add_argument("--limit", type=POSITIVE, default=None, help="evaluate the first N documents of each task only")
    t.add_argument("--num-fewshot", type=NON_NEGATIVE, default=None,
                   help="examples in each prompt (default: the task's)")
    t.add_argument("--include-path", help="directory of extra task YAML files (local tasks run offline)")
    t.add_argument("--batch-size", type=POSITIVE, default=1, help="requests per forward pass (default: %(default)s)")
    t.add_argument("--seed", type=NON_NEGATIVE, default=0, help="lm-eval's seeds (default: %(default)s)")
    t.add_argument("--json", action="store_true", help="print {task: {metric: value}} as JSON")
    t.add_argument("--record", action="store_true",
                   help="keep the results in the quipsharp directory (quipsharp_eval.json, its model card, report)")
    t.set_defaults(func=cmd_eval_tasks)

    g = sub.add_parser("generate", parents=[common], help="generate text (streams tokens)")
    g.add_argument("model", help="quantized or float model: directory, .gguf file, or hub id")
    g.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user's message)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=DEFAULT_NEW_TOKENS,
                   help="at most this many tokens, capped by the model's positions (default: %(default)s)")
    g.add_argument("--temperature", type=FINITE_NON_NEGATIVE, default=0.0,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="sampling seed (default: %(default)s)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--echo", action="store_true", help="print the prompt too")
    _add_engine_options(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", parents=[common], help="decoding speed: prefill and generation tokens/s at batch 1")
    b.add_argument("model", help="quantized or float model: directory, .gguf file, or hub id")
    b.add_argument("--threads", type=POSITIVE, default=None, help="torch and kernel threads (default: torch's)")
    b.add_argument("--new-tokens", type=POSITIVE, default=DEFAULT_BENCH_NEW_TOKENS,
                   help="generated tokens per run (default: %(default)s)")
    b.add_argument("--prompt-tokens", type=POSITIVE, default=DEFAULT_BENCH_PROMPT_TOKENS,
                   help="prompt length (default: %(default)s)")
    b.add_argument("--runs", type=POSITIVE, default=DEFAULT_BENCH_RUNS,
                   help="runs; medians are reported (default: %(default)s)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the unquantized tensors (embeddings, norms, LM head) (default: %(default)s)")
    b.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="KV cache of transformers' generate (cache_implementation) (default: %(default)s)")
    _add_engine_options(b)
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", parents=[common], help="an HTML page and PNG figures of a quantized directory")
    r.add_argument("dir", help="quantized model directory")
    r.add_argument("--out", help="report folder (default: DIR/report; an earlier report there is replaced)")
    r.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                   help="other quipsharp directories whose recorded perplexities join the perplexity figure")
    r.add_argument("--float-ppl", type=FINITE_POSITIVE, default=None,
                   help="the float model's perplexity on the same text, drawn as a line")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", parents=[common], help="describe a quantized directory")
    i.add_argument("dir", help="quantized model directory")
    i.add_argument("--verify", action="store_true",
                   help="also check every file against its saved checksum and every stored value for NaN/inf")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("quipsharp")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``quipsharp: error: …``, exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = "" if self.prog == "quipsharp" else f"{self.prog.removeprefix('quipsharp ')}: "
        print(f"quipsharp: error: {where}{message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a one-line option error: its exit code
        return int(done.code or 0)
    args.verbose = getattr(args, "verbose", False)  # -v may come before or after the subcommand
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from quipsharp.errors import QuipSharpError

    try:
        return args.func(args)
    except (CliError, QuipSharpError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"quipsharp: error: {err}", file=sys.stderr)
        _print_notes(err)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        print("quipsharp: interrupted", file=sys.stderr)
        _print_notes(err)
        return 130
    except BrokenPipeError:  # e.g. `quipsharp inspect DIR | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # keep the interpreter's final flush quiet
        return 0
    except Exception as err:
        if args.verbose:
            raise
        print(f"quipsharp: error: unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              "(run with -v for the traceback)", file=sys.stderr)
        _print_notes(err)
        return EXIT_UNEXPECTED


def _print_notes(err: BaseException) -> None:
    for note in getattr(err, "__notes__", ()):
        print(f"quipsharp: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
