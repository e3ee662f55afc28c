"""Calibration and evaluation text: local files (plain text or JSON lines) or, online, a HF dataset.

Calibration windows are distinct slots drawn at random (seeded) from the token stream of the
documents joined with the tokenizer's end-of-sequence token, so short documents are used too. Evaluation follows the
protocol of ``../shared/data/README.md``: rows joined with ``"\\n\\n"``, tokenized once, cut into
non-overlapping windows of ``ctx`` tokens, remainder dropped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
JSONL_TEXT_FIELD = "text"
EVAL_JOIN = "\n\n"
MAX_CALIBRATION_DOCS = 100_000
STREAM_OVERSAMPLING = 2  # tokenize twice the tokens the windows need, so slots are a random choice


class DataError(QuipSharpError, ValueError):
    """Calibration or evaluation text cannot be read or is too short."""


def read_text(path: str | os.PathLike) -> str:
    """The contents of a text file; binary files and invalid UTF-8 are refused with the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} is not a text file (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {err.start})") from None


def read_documents(
    source: str | os.PathLike, field: str = JSONL_TEXT_FIELD, limit: int | None = None
) -> list[str]:
    """Documents from a ``.txt`` file (blank-line separated), a JSON-lines file, or a dataset name.

    A name that is not an existing path is tried as a Hugging Face dataset (``name`` or
    ``name:config:split``), which needs the ``datasets`` package and network access.
    """
    path = Path(source)
    if path.is_file():
        text = read_text(path)
        if path.suffix in JSONL_SUFFIXES:
            docs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string field {field!r}")
                docs.append(row[field])
                if limit is not None and len(docs) >= limit:
                    break
        else:
            docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise DataError(f"{path} contains no text")
        return docs[:limit] if limit is not None else docs
    if path.suffix or os.sep in str(source):
        raise DataError(f"calibration/evaluation file not found: {source}")
    return _hub_documents(str(source), field, limit)


def _hub_documents(name: str, field: str, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{name!r} is not a file; to use it as a Hugging Face dataset, `pip install quipsharp[datasets]` "
            "(and be online)"
        ) from err
    parts = name.split(":")
    ds_name = parts[0]
    ds_config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        ds = datasets.load_dataset(ds_name, ds_config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types (network, missing config)
        raise DataError(f"could not load dataset {name!r}: {err}") from err
    docs = []
    for row in ds:
        docs.append(str(row[field]))
        if len(docs) >= (limit or MAX_CALIBRATION_DOCS):
            break
    return docs


def calibration_windows(
    docs: list[str], tokenizer: Any, nsamples: int, ctx: int, seed: int = 0
) -> torch.Tensor:
    """``[nsamples, ctx]`` int64 token windows drawn at random from the joined token stream.

    Documents are tokenized in a seeded random order (each followed by the end-of-sequence token)
    until the stream holds twice the tokens asked for; the stream is cut into slots of ``ctx`` tokens
    at a random phase and ``nsamples`` distinct slots are picked. Windows therefore never share a
    token, so windows held out for fine-tuning are not seen in training. Only when the text is too
    short for ``nsamples`` disjoint windows are they drawn at random offsets (overlapping, with a
    warning).
    """
    if nsamples <= 0 or ctx <= 1:
        raise DataError(f"need nsamples ≥ 1 and ctx ≥ 2, got nsamples={nsamples}, ctx={ctx}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=gen).tolist()
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    needed = nsamples * ctx * STREAM_OVERSAMPLING
    for i in order:
        ids.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    if len(ids) < ctx + 1:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than one window of ctx={ctx}")
    stream = torch.tensor(ids, dtype=torch.int64)
    spare = len(stream) - nsamples * ctx
    if spare >= 0:
        phase = int(torch.randint(0, min(ctx - 1, spare) + 1, (), generator=gen))
        slots = (len(stream) - phase) // ctx
        starts = phase + torch.randperm(slots, generator=gen)[:nsamples] * ctx
    else:
        logger.warning(
            "calibration text has only %d tokens for %d windows of %d: windows overlap", len(ids), nsamples, ctx
        )
        starts = torch.randint(0, len(stream) - ctx + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s : s + ctx] for s in starts.tolist()])


def evaluation_windows(text_source: str | os.PathLike, tokenizer: Any, ctx: int) -> torch.Tensor:
    """``[windows, ctx]`` int64: the whole text tokenized once, cut into non-overlapping windows."""
    path = Path(text_source)
    if not path.is_file():
        raise DataError(f"evaluation file not found: {text_source}")
    if path.suffix in JSONL_SUFFIXES:
        text = EVAL_JOIN.join(read_documents(path))
    else:
        # The raw WikiText layout: one dataset row per line, rows joined with "\n\n" (protocol).
        text = EVAL_JOIN.join(read_text(path).splitlines())
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    windows = ids.numel() // ctx
    if windows == 0:
        raise DataError(f"{path} has {ids.numel()} tokens, fewer than one window of ctx={ctx}")
    return ids[: windows * ctx].reshape(windows, ctx)
