"""Are a Ray run's block tasks slower because they run inside Ray, or because two run at once? (issue 16)

One worker's share of a SmolLM2 block step, single-threaded: the Hessian task and the forward task of
``quipsharp.distributed`` on a random-weight block of SmolLM2's shape (576 / 1536, 9 heads, 3 KV heads)
over a shard of 8 batches of [8, 512] tokens (half of the benchmark's 128 × 512 calibration set). Timed
inside the task (medians of ``--reps``), four ways per round: one plain process alone, two plain
processes at once, one Ray task alone, two Ray tasks at once (a local cluster of 2 CPUs). The block and
shard come from one file, so every way computes the same thing.

    .venv/bin/python benchmarks/ray_task_probe.py [--rounds 2] [--reps 3] [--json] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import emit_result, machine_info, today

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 576, 1536, 9, 3, 49152
SEQUENCES, CTX, BATCH = 64, 512, 8
SEED = 0


def make_data(path: Path) -> None:
    """A seeded SmolLM2-shaped block, its linears' names, a 64 × 512 shard's hidden states and calls."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quipsharp.pipeline import capture_stream

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, num_hidden_layers=2, vocab_size=VOCAB,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, VOCAB, (SEQUENCES, CTX), generator=torch.Generator().manual_seed(SEED + 1))
    stream, calls = capture_stream(model, model.model.layers, list(tokens.split(BATCH)))
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    torch.save({"block": block, "names": names, "stream": list(stream), "calls": calls}, path)


def work(path: str, reps: int) -> dict:
    """Seconds of the Hessian and the forward task on the shard in ``path`` (medians of ``reps``)."""
    import torch

    from quipsharp.distributed import _forward_task, _hessians_task

    torch.set_num_threads(1)
    d = torch.load(path, weights_only=False)
    times: dict[str, list[float]] = {"hessians_s": [], "forward_s": []}
    for _ in range(reps):
        start = time.perf_counter()
        _hessians_task(d["block"], d["names"], d["stream"], d["calls"], 0, False, 1)
        times["hessians_s"].append(time.perf_counter() - start)
        start = time.perf_counter()
        _forward_task(d["block"], d["stream"], d["calls"], 0, 1)
        times["forward_s"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def plain(path: Path, reps: int, copies: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--work", str(path), "--reps", str(reps)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(copies)]
    return [json.loads(p.communicate()[0]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)  # a child: time the tasks on this file
    args = ap.parse_args()
    if args.work:
        print(json.dumps(work(args.work, args.reps)))
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        make_data(path)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            task = ray.remote(num_cpus=1)(work)
            ray.get([task.remote(str(path), 1), task.remote(str(path), 1)])  # the workers' imports
            rows: dict[str, list[dict]] = {"plain_alone": [], "plain_pair": [], "ray_alone": [], "ray_pair": []}
            for _ in range(args.rounds):
                rows["plain_alone"] += plain(path, args.reps, 1)
                rows["plain_pair"] += plain(path, args.reps, 2)
                rows["ray_alone"].append(ray.get(task.remote(str(path), args.reps)))
                rows["ray_pair"] += ray.get([task.remote(str(path), args.reps) for _ in range(2)])
        finally:
            ray.shutdown()
    summary = {way: {k: statistics.median(r[k] for r in runs) for k in ("hessians_s", "forward_s")}
               for way, runs in rows.items()}
    base = summary["plain_alone"]
    slowdown = {way: {k: v / base[k] for k, v in s.items()} for way, s in summary.items()}
    result = {"benchmark": "ray_task_probe", "measured": today(), "machine": machine_info(),
              "rounds": args.rounds, "reps": args.reps, "runs": rows, "medians": summary,
              "slowdown_vs_plain_alone": slowdown}
    emit_result(result, args.json, args.results)
    if not args.json:
        for way, s in summary.items():
            print(f"{way:12s} Hessians {s['hessians_s']:.2f} s ({slowdown[way]['hessians_s']:.2f}x)  "
                  f"forward {s['forward_s']:.2f} s ({slowdown[way]['forward_s']:.2f}x)")


if __name__ == "__main__":
    main()
