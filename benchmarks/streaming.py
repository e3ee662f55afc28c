"""Block streaming (issue 16): peak memory and time of ``quipsharp quantize`` with and without
``--max-memory``, and whether both write the same tensors.

Each run is a separate process, measured by ``/usr/bin/time -v`` (peak resident set). ``--cap BYTES``
also runs the streamed quantization inside a cgroup-v1 memory cgroup limited to that many bytes (a hard
limit: the process is killed if it needs more; page cache is reclaimed, not counted against it).

    .venv/bin/python benchmarks/streaming.py --model SmolLM2.gguf --calib c4.jsonl --json
    .venv/bin/python benchmarks/streaming.py --make-random tinyllama --model /tmp/tl --calib c4.jsonl \\
        --nsamples 16 --ctx 256 --dtype bfloat16 --cap 1.5e9 --json
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import emit_result, machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
#: Random-weight models of real shapes (vocabulary: SmolLM2's tokenizer, 49152 tokens).
SHAPES = {
    "tinyllama": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False},
}


def make_random(shape: str, out: Path, dtype: str, seed: int = 0) -> None:
    """A random-weight Llama of a real shape, saved as safetensors with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quipsharp.resources import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPES[shape])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def run(cmd: list[str], cap: int | None, keep: tuple[str, ...] = ()) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` (inside a memory cgroup of ``cap`` bytes when given);
    ``keep``: log messages (substrings) whose lines go into the result's ``log``.

    The time is measured on the monotonic clock, not ``time``'s wall clock: this sandbox's VM can be
    frozen for minutes (seen 2026-12-02), and the wall clock then jumps by the time nothing ran."""
    timed = ["/usr/bin/time", "-v", *cmd]
    group = None
    if cap is not None:
        group = CGROUP_ROOT / f"quipsharp-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(cap)))
        (group / "memory.memsw.limit_in_bytes").write_text(str(int(cap)))  # no swap either
        timed = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *timed]
    try:
        start = time.monotonic()
        proc = subprocess.run(timed, capture_output=True, text=True)
        seconds = time.monotonic() - start
        failcnt = int((group / "memory.failcnt").read_text()) if group else None
        peak_cgroup = int((group / "memory.max_usage_in_bytes").read_text()) if group else None
    finally:
        if group is not None:
            group.rmdir()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("quipsharp:")]
    return {"rc": proc.returncode, "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None, "seconds": seconds,
            "cgroup_peak_mb": peak_cgroup / 2**20 if peak_cgroup else None, "cgroup_failcnt": failcnt,
            "errors": errors[-3:], "log": [line for line in proc.stderr.splitlines() if any(k in line for k in keep)]}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory or .gguf (created with --make-random)")
    ap.add_argument("--make-random", choices=sorted(SHAPES), help="first write a random-weight model to --model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", default="2")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-memory", default=None, help="--max-memory of the streamed run (default: --cap or 64GB)")
    ap.add_argument("--cap", type=float, default=None, help="hard memory limit of the streamed run (bytes)")
    ap.add_argument("--skip-full", action="store_true", help="only the streamed run")
    ap.add_argument("--reference", default=None,
                    help="with --skip-full: an earlier run's output (same settings) to compare the tensors with")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    model = Path(args.model)
    if args.make_random and not model.exists():
        make_random(args.make_random, model, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="qs-stream-"))
    base = [sys.executable, "-m", "quipsharp.cli", "quantize", str(model), "--bits", args.bits, "--calib",
            args.calib, "--nsamples", str(args.nsamples), "--ctx", str(args.ctx), "--dtype", args.dtype, "--quiet",
            *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
    rows = {}
    if not args.skip_full:
        rows["loaded"] = run([*base, "--out", str(work / "loaded")], None)
    budget = args.max_memory or (str(int(args.cap)) if args.cap else "64GB")
    rows["streamed"] = run([*base, "--out", str(work / "streamed"), "--max-memory", budget], args.cap)
    result = {"model": str(model), "shape": args.make_random, "bits": args.bits, "nsamples": args.nsamples,
              "ctx": args.ctx, "batch_size": args.batch_size, "dtype": args.dtype, "cap_bytes": args.cap,
              "max_memory": budget, "runs": rows,
              "model_bytes": sum(f.stat().st_size for f in model.rglob("*.safetensors")) if model.is_dir()
              else model.stat().st_size, "measured": datetime.date.today().isoformat(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(), "machine": machine_info()}
    reference = work / "loaded" if not args.skip_full else Path(args.reference) if args.reference else None
    if reference is not None and (args.skip_full or rows["loaded"]["rc"] == 0) and rows["streamed"]["rc"] == 0:
        result["reference"] = str(reference)
        result["same_tensors"] = same_tensors(reference, work / "streamed")
    emit_result(result, args.json, args.results)


if __name__ == "__main__":
    main()
