"""Quantization on a local Ray cluster (issue 16): wall time of ``quipsharp quantize --ray local`` with N
single-threaded workers against one single-threaded process, and whether both write the same tensors.

Both runs are separate processes with ``OMP_NUM_THREADS=1`` (the driver's own torch threads) and
``--ray-threads 1`` for the tasks, measured by ``/usr/bin/time -v`` (wall time; the peak resident set
is the driver's only, the workers are other processes). The cluster's start (about 10 s here) is
inside the Ray run's time. Each run's ``-v`` log lines on its time by step (calibration pass, Hessians,
quantizing, next stream, saving; and the Ray driver's own serial work) are kept in the result, with a
probe of how much WORKERS single-threaded processes slow each other down on this machine.

    .venv/bin/python benchmarks/distributed.py --model SmolLM2.gguf --calib c4.jsonl --workers 2 --json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _common import emit_result, machine_info, today
from streaming import run, same_tensors


def concurrency_probe(copies: int, rounds: int = 3) -> dict:
    """Seconds of one worker's share of a SmolLM2 block step, single-threaded (the real Hessian and
    forward tasks on a random-weight block of SmolLM2's shape: ``ray_task_probe.py``), alone and with
    ``copies`` plain processes at once (medians of ``rounds``): how much the workers slow each other
    down on this machine, which bounds what ``copies`` workers can gain."""
    import statistics

    from ray_task_probe import make_data, plain

    def seconds(row: dict) -> float:
        return row["hessians_s"] + row["forward_s"]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.pt"
        make_data(path)
        alone = statistics.median(seconds(plain(path, 1, 1)[0]) for _ in range(rounds))
        together = statistics.median(statistics.mean(map(seconds, plain(path, 1, copies))) for _ in range(rounds))
    return {"copies": copies, "alone_s": alone, "together_s": together, "slowdown": together / alone,
            "best_wall_ratio": together / alone / copies, "workload": "ray_task_probe (Hessian + forward task)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory or .gguf")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", default="2")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-single", action="store_true", help="only the Ray run")
    ap.add_argument("--probe-only", action="store_true",
                    help="only the concurrency probe (one worker's block step alone and WORKERS at once)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's torch threads (the driver's, and one process's)
    probe = concurrency_probe(args.workers)
    if args.probe_only:
        emit_result({"probe": probe, "measured": today(), "machine": machine_info()}, args.json, args.results)
        return
    work = Path(tempfile.mkdtemp(prefix="qs-ray-"))
    base = [sys.executable, "-m", "quipsharp.cli", "quantize", args.model, "--bits", args.bits, "--calib",
            args.calib, "--nsamples", str(args.nsamples), "--ctx", str(args.ctx), "--quiet"]
    rows = {}
    steps = ("time by step", "driver's own time")  # the runs' -v lines on where the time went
    if not args.skip_single:
        rows["one_process"] = run([*base, "-v", "--out", str(work / "single")], None, steps)
    rows["ray"] = run([*base, "-v", "--out", str(work / "ray"), "--ray", "local", "--ray-workers", str(args.workers),
                       "--ray-threads", "1"], None, steps)
    result = {"model": args.model, "bits": args.bits, "nsamples": args.nsamples, "ctx": args.ctx,
              "workers": args.workers, "threads_per_task": 1, "runs": rows, "probe": probe, "measured": today(),
              "machine": machine_info()}
    if "one_process" in rows and rows["one_process"]["rc"] == 0 and rows["ray"]["rc"] == 0:
        result["same_tensors"] = same_tensors(work / "single", work / "ray")
        result["wall_ratio"] = rows["ray"]["seconds"] / rows["one_process"]["seconds"]
    emit_result(result, args.json, args.results)


if __name__ == "__main__":
    main()
