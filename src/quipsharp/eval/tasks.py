"""Zero- and few-shot task accuracy with EleutherAI's lm-evaluation-harness (``pip install quipsharp[eval]``).

:func:`evaluate_tasks` loads a model the quipsharp way (a quantized directory, a float HF directory,
a GGUF file) and hands the loaded model to lm-eval's ``HFLM``, so lm-eval's own request building,
log-likelihood scoring and metrics apply unchanged. Tasks are lm-eval task names, or local task
YAML files found through ``include_path`` (tasks over local ``json`` files run offline).

The ``lm_eval`` command line also works on a quipsharp directory by path:
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` (the directory's autoload
module imports quipsharp).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

#: lm-eval's result keys are ``"<metric>,<filter>"``; the filter of plain scoring is "none".
DEFAULT_FILTER = "none"


class TaskEvalError(QuipSharpError, ValueError):
    """Tasks cannot be evaluated (lm-eval missing, an unknown task); the message says why."""


def evaluate_tasks(
    model_source: str | os.PathLike,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``model_source`` on lm-eval ``tasks``.

    Args:
        model_source: quantized or float model (directory, ``.gguf`` file, hub id).
        tasks: lm-eval task (or group) names.
        limit: evaluate the first ``limit`` documents of each task only.
        num_fewshot: examples in each prompt (default: the task's).
        include_path: a directory of extra task YAML files (local tasks).
        batch_size: requests per forward pass.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise TaskEvalError("task evaluation needs lm-eval: pip install quipsharp[eval]") from err
    from quipsharp.hf import load_model

    if not tasks:
        raise TaskEvalError("name at least one task")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:  # checked before the model loads
        where = f" (and in {include_path})" if include_path is not None else ""
        raise TaskEvalError(f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where}")
    model, tokenizer = load_model(model_source)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:
        raise TaskEvalError("lm-eval returned no results")
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": .., "alias": ..}`` as ``{"acc": .., "acc_stderr": ..}``."""
    out = {}
    for key, value in values.items():
        metric, comma, filt = key.partition(",")
        if not comma or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # "alias", "sample_len": not metrics
        name = metric if filt in ("", DEFAULT_FILTER) else f"{metric},{filt}"
        out[name] = float(value) if math.isfinite(float(value)) else float("nan")
    return out
