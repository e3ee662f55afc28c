"""Learning-rate sweep of end-to-end fine-tuning on SmolLM2-135M-Instruct (issue 5).

Quantizes once without fine-tuning (or loads ``--model-cache``), computes the float teacher's
targets once, then for every point of the grid tunes a fresh copy end to end and records the
held-out KL per epoch, the WikiText-2 perplexity (quick-check protocol) after every epoch and after
the best-state restore, and the wall time.

    python benchmarks/ft_sweep.py --bits 2 --lr 5e-5 2e-4 --sign-lr 5e-4 2e-3 --epochs 3 \
        --model-cache /tmp/qs2-cache --results benchmarks/results/ft_sweep.jsonl

Each point appends one JSON line to ``--results``; points already there for the same settings are
skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine_info, smollm2_and_data, today


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-5])
    parser.add_argument("--sign-lr", type=float, nargs="+", default=[5e-4])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens evaluated")
    parser.add_argument("--eval-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="directory of the quantized model without fine-tuning (written if missing)")
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines file, appended to")
    args = parser.parse_args()

    import torch

    from quipsharp.config import FinetuneConfig, ModelQuantConfig, QuIPSharpConfig
    from quipsharp.data import calibration_windows, evaluation_windows, read_documents
    from quipsharp.eval import perplexity
    from quipsharp.finetune import teacher_targets
    from quipsharp.hf import load_quantized, read_quantization_config, save_quantized
    from quipsharp.pipeline import quantize_model
    from quipsharp.resources import C4_SAMPLE, WIKITEXT_TEST

    data, teacher, tok = smollm2_and_data(args.threads)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=args.bits), nsamples=args.nsamples, ctx=args.ctx)
    calib = calibration_windows(read_documents(data / C4_SAMPLE), tok, config.nsamples, config.ctx, config.seed)
    windows = evaluation_windows(data / WIKITEXT_TEST, tok, args.eval_ctx)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, windows, max_windows=args.max_windows)["ppl"]

    if args.model_cache is not None and (args.model_cache / "config.json").is_file():
        saved = ModelQuantConfig.from_dict(read_quantization_config(args.model_cache)[1]["config"]).to_dict()
        wanted = config.to_dict()
        if any(saved[k] != v for k, v in wanted.items() if k != "finetune"):  # (the cached model is untuned)
            raise SystemExit(f"{args.model_cache} holds a model quantized with other settings: use another directory")
        base = load_quantized(args.model_cache)
    else:
        base, reports = quantize_model(copy.deepcopy(teacher), config, calib, progress=False)
        if args.model_cache is not None:
            save_quantized(base, args.model_cache, tok, config, reports)
    targets = teacher_targets(teacher, calib, args.batch_size)
    del teacher
    settings = {"bits": args.bits, "epochs": args.epochs, "batch_size": args.batch_size, "nsamples": args.nsamples,
                "ctx": args.ctx, "max_windows": args.max_windows, "eval_ctx": args.eval_ctx, "threads": args.threads}
    done = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            entry = json.loads(line)
            if entry["settings"] == settings:
                done.add((entry["lr"], entry["sign_lr"]))
    untuned = ppl(base)
    print(f"untuned {args.bits}-bit ppl {untuned:.3f}", file=sys.stderr)
    for lr, sign_lr in itertools.product(args.lr, args.sign_lr):
        if (lr, sign_lr) in done:
            print(f"lr {lr:g} sign_lr {sign_lr:g}: already in {args.results}", file=sys.stderr)
            continue
        model = copy.deepcopy(base)
        cfg = FinetuneConfig(mode="e2e", e2e_epochs=args.epochs, lr=lr, sign_lr=sign_lr, batch_size=args.batch_size)
        report, epoch_ppl, tuning_seconds = _tune(model, targets, calib, cfg, ppl)
        entry = {"settings": settings, "lr": lr, "sign_lr": sign_lr, "untuned_ppl": untuned,
                 "heldout_kl": report.losses, "best_epoch": report.best_epoch, "epoch_ppl": epoch_ppl,
                 "ppl": ppl(model), "tuning_seconds": tuning_seconds, "measured": today(),
                 "machine": machine_info()}
        print(json.dumps(entry), file=sys.stderr)
        with args.results.open("a") as f:
            f.write(json.dumps(entry) + "\n")


def _tune(model: Any, targets: Any, calib: Any, cfg: Any,
          ppl: Callable[[Any], float]) -> tuple[Any, list[float], float]:
    """End-to-end tuning with the perplexity of the state at the end of every epoch (not yet the best one).

    Returns the report, those perplexities and the tuning time without the evaluations."""
    from quipsharp.finetune import finetune_model

    epoch_ppl: list[float] = []
    evaluating = [0.0]

    def on_epoch(_report: Any) -> None:
        start, training = time.perf_counter(), model.training
        epoch_ppl.append(ppl(model))
        model.train(training)
        evaluating[0] += time.perf_counter() - start

    start = time.perf_counter()
    report = finetune_model(model, targets, calib, cfg, on_epoch=on_epoch)
    return report, epoch_ppl, time.perf_counter() - start - evaluating[0]


if __name__ == "__main__":
    main()
