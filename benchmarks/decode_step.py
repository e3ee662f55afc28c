"""The native decoding step (issue 12): its speed against the Python step, and what it and the int8 LM
head do to the model's predictions.

Usage (``DIR`` a quipsharp directory, e.g. ``out/smollm2-135m-2bit`` from ``make demo``)::

    python benchmarks/decode_step.py DIR [--threads 2] [--tokens 400] [--json]

Parts (``--parts``, default all):

* ``speed``: milliseconds per token of the lean loop's step (64-token prompt, position 64–127,
  medians of ``--runs`` runs of 64 steps): the Python step (``native_step=False``) with the int8
  head, the native step with the int8 head in the same call, and the native step's blocks alone
  (``DecodeStep`` without logits) at 1 and ``--threads`` threads.
* ``nll``: teacher-forced mean NLL (nats/token) of ``--tokens`` WikiText-2 test tokens (from
  character 5,000 of ``wiki.test.raw``), decoded one token at a time through the cache: Python step
  with the exact head, with the int8 head; native step with the exact head, with the int8 head; and
  the noise floor of float rounding — the Python step with every embedding scaled by ``1 + 1e-7``.
* ``head``: the LM head's quantization alone on the final hidden states of one prefill of
  ``--tokens`` tokens (mean NLL growth over the exact head): int8 rows with float32 activations and
  with int8 activations, each without and with the Hadamard rotation of the hidden size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import machine_info, today
from quipsharp.fastdecode import INT8_MAX, LeanDecoder, int8_rows
from quipsharp.hadamard import hadamard_transform
from quipsharp.hf import load_quantized
from quipsharp.resources import shared_data_dir

PROMPT = 64
STEPS = 64
TEXT_START = 5000  # characters into wiki.test.raw: past the first headings
NUDGE = 1e-7


def _speed(model, threads: int, runs: int) -> dict[str, float]:
    ids = torch.randint(0, 1000, (PROMPT,), generator=torch.Generator().manual_seed(0))
    out: dict[str, float] = {}

    def per_token(dec: LeanDecoder, step) -> float:
        times = []
        for _ in range(runs + 1):  # the first run warms up
            dec.reset()
            dec.prefill(ids)
            start = time.perf_counter()
            for i in range(STEPS):
                step(dec, PROMPT + i)
            times.append((time.perf_counter() - start) / STEPS * 1e3)
        return statistics.median(times[1:])

    def full(dec: LeanDecoder, pos: int) -> None:
        dec.step(5)

    python = LeanDecoder(model, PROMPT + STEPS + 1, head_dtype=torch.int8, threads=threads, native_step=False)
    out["python_step_int8_head_ms"] = per_token(python, full)
    del python
    for t in sorted({1, threads}):
        native = LeanDecoder(model, PROMPT + STEPS + 1, head_dtype=torch.int8, threads=t, native_step=True)
        x = torch.zeros(native.hidden)

        def blocks(dec: LeanDecoder, pos: int, x=x) -> None:
            x.copy_(dec._embed(5))
            dec.native_step(x, pos)
        out[f"native_step_int8_head_ms_{t}t"] = per_token(native, full)
        out[f"native_blocks_ms_{t}t"] = per_token(native, blocks)
        del native
    return out


def _wikitext_ids(tok, tokens: int) -> torch.Tensor:
    data = shared_data_dir()
    if data is None:
        raise SystemExit("needs ../shared/data (WikiText-2)")
    text = (data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[TEXT_START:]
    ids = tok(text[: 30 * tokens], return_tensors="pt").input_ids[0][:tokens]
    if ids.numel() < tokens:
        raise SystemExit(f"only {ids.numel()} tokens of text")
    return ids


def _teacher_forced(dec: LeanDecoder, ids: torch.Tensor) -> float:
    logits = dec.prefill(ids[:1])
    total = 0.0
    for t in range(1, ids.numel()):
        total += float(F.cross_entropy(logits[None], ids[t:t + 1]))
        logits = dec.step(int(ids[t]))
    return total / (ids.numel() - 1)


def _nll(model, ids: torch.Tensor, threads: int) -> dict[str, float]:
    n = ids.numel() + 1
    out = {}
    for native in (False, True):
        for head in (None, torch.int8):
            dec = LeanDecoder(model, n, head_dtype=head, threads=threads, native_step=native)
            key = f"{'native' if native else 'python'}_{'int8' if head else 'exact'}_head"
            out[key] = _teacher_forced(dec, ids)
    nudged = LeanDecoder(model, n, threads=threads, native_step=False)
    nudged.embed = nudged.embed * (1 + NUDGE)
    out["python_exact_head_nudged"] = _teacher_forced(nudged, ids)
    return out


@torch.inference_mode()
def _head(model, ids: torch.Tensor) -> dict[str, float]:
    dec = LeanDecoder(model, ids.numel() + 1, native_step=False)
    x = dec._embed(ids)
    dec._blocks(x, 0, dec._buffers(ids.numel()))
    h = dec._rms(x, dec.final_norm)  # [T, hidden]
    weight = model.get_output_embeddings().weight.detach().float()
    target = ids[1:]

    def nll(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:-1], target))

    def int8_act(a: torch.Tensor) -> torch.Tensor:
        scale = a.abs().amax(dim=1, keepdim=True) / INT8_MAX
        return torch.round(a / scale).clamp(-INT8_MAX, INT8_MAX) * scale

    exact = nll(h @ weight.T)
    out = {"exact_head_nll": exact}
    for rotated in (False, True):
        w, a = (hadamard_transform(weight), hadamard_transform(h)) if rotated else (weight, h)
        q, scales = int8_rows(w)
        wq = q.float() * scales.float()[:, None]
        tag = "rotated" if rotated else "plain"
        out[f"int8_rows_{tag}_float_act_growth"] = nll(a @ wq.T) - exact
        out[f"int8_rows_{tag}_int8_act_growth"] = nll(int8_act(a) @ wq.T) - exact
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--parts", nargs="+", default=["speed", "nll", "head"], choices=["speed", "nll", "head"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model = load_quantized(args.dir)
    report: dict[str, Any] = {"date": today(), "machine": machine_info(), "model": str(args.dir),
                              "threads": args.threads, "tokens": args.tokens}
    if "speed" in args.parts:
        report["speed"] = _speed(model, args.threads, args.runs)
    if "nll" in args.parts or "head" in args.parts:
        ids = _wikitext_ids(AutoTokenizer.from_pretrained(args.dir), args.tokens)
        if "nll" in args.parts:
            report["nll"] = _nll(model, ids, args.threads)
        if "head" in args.parts:
            report["head"] = _head(model, ids)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for part in ("speed", "nll", "head"):
            for key, value in report.get(part, {}).items():
                print(f"{part:6s} {key:40s} {value:.4f}")


if __name__ == "__main__":
    main()
