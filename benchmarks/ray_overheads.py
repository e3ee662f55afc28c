"""Ray's fixed costs in a ``quantize --ray`` run (issue 16), each measured apart on a local cluster of 2 CPUs:
``ray.init``, putting a SmolLM2-sized calibration stream (16 batches of [8, 512, 576] float32, 151 MB) into
the object store as two shards, the first tasks on fresh workers (their imports), and fetching one block's
exact Hessian sums from two shards (per shard three [3, 576, 576] and one [3, 1536, 1536] float64 bins).
The put and the fetch are timed twice: with torch's own pickling of tensors, and as ``quipsharp.distributed``
sends them (raw numpy bytes, ``*_wire_s``).

    .venv/bin/python benchmarks/ray_overheads.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from _common import machine_info, median_time, today

BATCHES, BATCH, CTX, HIDDEN, INTER = 16, 8, 512, 576, 1536


def _bins(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(3, HIDDEN, HIDDEN, dtype=torch.float64, generator=g) for _ in range(3)]
            + [torch.randn(3, INTER, INTER, dtype=torch.float64, generator=g)])


def _bins_wire(seed: int) -> list[torch.Tensor]:
    import ray

    from quipsharp.distributed import use_wire_tensors

    use_wire_tensors(ray)  # the task's results leave the worker as raw bytes
    return _bins(seed)


def _fetch_median_s(ray, make_bins, repeats: int) -> float:
    """Median seconds of fetching two shards' bins once ``make_bins`` has made them in two tasks."""
    make = ray.remote(num_cpus=1)(make_bins)
    fetch = []
    for _ in range(repeats):
        refs = [make.remote(s) for s in range(2)]
        ray.wait(refs, num_returns=2)
        start = time.perf_counter()
        ray.get(refs)
        fetch.append(time.perf_counter() - start)
    return statistics.median(fetch)


def _first(shard: list[torch.Tensor]) -> float:
    return float(sum(b[0, 0, 0] for b in shard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    row: dict[str, float] = {}
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING, include_dashboard=False)
    row["init_s"] = time.perf_counter() - start
    try:
        batches = [torch.randn(BATCH, CTX, HIDDEN) for _ in range(BATCHES)]
        start = time.perf_counter()
        shards = [ray.put(batches[: BATCHES // 2]), ray.put(batches[BATCHES // 2 :])]
        row["put_stream_s"] = time.perf_counter() - start
        first = ray.remote(num_cpus=1)(_first)
        start = time.perf_counter()
        ray.get([first.remote(s) for s in shards])
        row["first_tasks_s"] = time.perf_counter() - start
        row["fetch_block_hessians_s"] = _fetch_median_s(ray, _bins, args.repeats)
        def put_stream() -> None:
            ray.put(batches[: BATCHES // 2])
            ray.put(batches[BATCHES // 2 :])

        row["put_stream_torch_s"] = median_time(put_stream, args.repeats)
        from quipsharp.distributed import drop_wire_tensors, use_wire_tensors

        use_wire_tensors(ray)
        try:
            row["put_stream_wire_s"] = median_time(put_stream, args.repeats)
            row["fetch_block_hessians_wire_s"] = _fetch_median_s(ray, _bins_wire, args.repeats)
        finally:
            drop_wire_tensors(ray)
    finally:
        ray.shutdown()
    for key, value in row.items():
        print(f"{key}: {value:.3f}")
    if args.json:
        print(json.dumps({"date": today(), "machine": machine_info(), "args": vars(args), "row": row}, indent=1))


if __name__ == "__main__":
    main()
