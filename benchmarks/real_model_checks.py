"""Issue 15's paths on a real model (SmolLM2-135M-Instruct quantized to 2 bits), with what they measure.

1. ``autoload``: plain transformers refuses the directory without quipsharp; with
   ``trust_remote_code=True`` (no ``import quipsharp`` in that process) it loads, and its logits on a
   WikiText window equal ``quipsharp.load_quantized``'s bit for bit.
2. ``lora``: ``examples/lora_finetune.py`` trains a LoRA adapter (r 8 on q/k/v/o) on C4 text; the
   held-out loss (other C4 windows) before and after, seconds per step, then the adapter reloads.
3. ``onnx``: ``torch.onnx.export`` of the quantized model is refused; ``dense_copy`` exports, and
   onnxruntime's logits on a 64-token prompt match the torch model's.

    python benchmarks/real_model_checks.py QUANTIZED_DIR --work DIR --json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine_info, today

REPO = Path(__file__).resolve().parents[1]
WINDOW = 256
HELDOUT_WINDOWS = 8
LORA_STEPS, LORA_BATCH, LORA_LR = 30, 2, 2e-4
ONNX_PROMPT = 64


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)


def check_autoload(qdir: Path, work: Path, wiki_ids: Any) -> dict[str, Any]:
    import torch

    import quipsharp

    env = {**os.environ, "HF_MODULES_CACHE": str(work / "hf-modules")}
    plain = run([sys.executable, "-c", f"from transformers import AutoModelForCausalLM\n"
                                       f"AutoModelForCausalLM.from_pretrained({str(qdir)!r})"], env=env)
    torch.save({"ids": wiki_ids, "logits": _logits(quipsharp.load_quantized(qdir), wiki_ids)}, work / "expected.pt")
    trusted = run([sys.executable, "-c", (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(qdir)!r}, trust_remote_code=True)\n"
        f"e = torch.load({str(work / 'expected.pt')!r})\n"
        "with torch.no_grad():\n    got = m(input_ids=e['ids']).logits\n"
        "print('SAME', torch.equal(got, e['logits']), 'shim imported quipsharp:', 'quipsharp' in sys.modules)\n")],
        env=env)
    last = plain.stderr.strip().splitlines()[-1] if plain.stderr.strip() else ""
    return {"plain_refused": plain.returncode != 0, "plain_error": last[:300],
            "trusted_ok": trusted.returncode == 0, "trusted_output": trusted.stdout.strip()[-200:],
            "trusted_error": trusted.stderr.strip()[-300:] if trusted.returncode else ""}


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def check_lora(qdir: Path, work: Path, c4: Path, heldout: Any) -> dict[str, Any]:
    import torch

    import quipsharp
    from quipsharp.lora import load_adapter

    def loss(model: Any) -> float:
        with torch.no_grad():
            return float(sum(model(input_ids=w[None], labels=w[None]).loss for w in heldout) / len(heldout))

    before = loss(quipsharp.load_quantized(qdir))
    adapter = work / "adapter"
    if adapter.exists():
        import shutil

        shutil.rmtree(adapter)
    start = time.perf_counter()
    result = run([sys.executable, str(REPO / "examples" / "lora_finetune.py"), str(qdir), str(c4), "--out",
                  str(adapter), "--steps", str(LORA_STEPS), "--ctx", str(WINDOW), "--batch-size", str(LORA_BATCH),
                  "--lr", str(LORA_LR), "--seed", "1", "--json"])
    if result.returncode != 0:
        return {"error": result.stderr[-1000:]}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    after = loss(load_adapter(quipsharp.load_quantized(qdir), adapter))
    return {"heldout_loss_before": before, "heldout_loss_after": after, "train_first_loss": report["first_loss"],
            "train_last_loss": report["last_loss"], "steps": report["steps"],
            "seconds_per_step": report["seconds"] / report["steps"], "wall_seconds": time.perf_counter() - start}


def check_onnx(qdir: Path, work: Path, ids: Any) -> dict[str, Any]:
    import torch

    import quipsharp
    from quipsharp.errors import ExportError
    from quipsharp.export import dense_copy

    model = quipsharp.load_quantized(qdir)
    model.config.use_cache = False
    refused = ""
    try:
        torch.onnx.export(model, (ids,), str(work / "quantized.onnx"), dynamo=False)
    except ExportError as err:
        refused = str(err)[:120]
    dense = dense_copy(model)
    dense.config.use_cache = False
    start = time.perf_counter()
    out = work / "dense.onnx"

    class Logits(torch.nn.Module):  # input ids -> logits: a plain graph signature for onnxruntime
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    torch.onnx.export(Logits(dense).eval(), (ids,), str(out), dynamo=True, external_data=True)
    export_seconds = time.perf_counter() - start
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    want = _logits(dense, ids)
    quantized = _logits(model, ids)
    err = float((torch.from_numpy(got) - want).abs().max() / want.abs().max())
    err_q = float((torch.from_numpy(got) - quantized).abs().max() / quantized.abs().max())
    same_argmax = float((torch.from_numpy(got).argmax(-1) == quantized.argmax(-1)).float().mean())
    size = sum(p.stat().st_size for p in work.glob("dense.onnx*"))
    return {"quantized_export_refused": refused, "export_seconds": export_seconds, "onnx_bytes": size,
            "max_rel_err_vs_dense_torch": err, "max_rel_err_vs_quantized_model": err_q,
            "argmax_agreement_vs_quantized": same_argmax}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantized_dir", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--checks", nargs="+", default=["autoload", "lora", "onnx"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from quipsharp.data import calibration_windows, evaluation_windows, read_documents
    from quipsharp.resources import shared_data_dir

    data = shared_data_dir()
    if data is None:
        raise SystemExit("needs ../shared/data")
    args.work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(args.quantized_dir))
    wiki = evaluation_windows(data / "wikitext-2-raw" / "wiki.test.raw", tok, WINDOW)
    c4 = data / "c4-sample" / "c4_validation_2k.jsonl"
    heldout = calibration_windows(read_documents(c4), tok, HELDOUT_WINDOWS, WINDOW, seed=99)
    row: dict[str, Any] = {"date": today(), "model": str(args.quantized_dir), "machine": machine_info()}
    if "autoload" in args.checks:
        row["autoload"] = check_autoload(args.quantized_dir, args.work, wiki[:1])
    if "lora" in args.checks:
        row["lora"] = check_lora(args.quantized_dir, args.work, c4, heldout)
    if "onnx" in args.checks:
        row["onnx"] = check_onnx(args.quantized_dir, args.work, wiki[:1, :ONNX_PROMPT])
    text = json.dumps(row, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
