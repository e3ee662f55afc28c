"""Corrupt-file fuzz over every tensor and every config field of a saved tiny model (issue 13 item 7).

Each corruption must end in one of: a clear error at load (:class:`ValueError` family, one line in the
CLI), a model whose logits are unchanged, a model that loads with a warning naming the edited config
field, or — for damage only checksums can see (a flipped bit inside the codes) — a model that
``inspect --verify`` reports as damaged. Never NaN logits, never a changed model without a word, never
a raw ``KeyError``/``TypeError``/``IndexError``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.format import CONFIG_FILE, WEIGHTS_FILE, check_dir
from quipsharp.hf import load_quantized, save_quantized
from quipsharp.pipeline import quantize_model
from tests.tiny_models import tiny_model

SEED = 2026
#: Fields that choose the shape of a forward's return value, not what the model computes (transformers 5
#: itself cannot run a Llama whose config says return_dict=false).
OUTPUT_FORMAT_FIELDS = {("return_dict",)}
IDS = torch.arange(3, 27).unsqueeze(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    cfg = ModelQuantConfig(layer=QuIPSharpConfig(bits=2), bits_map=((r"mlp\.down", 3), (r"o_proj", 4)))
    model, reports = quantize_model(tiny_model("llama"), cfg, progress=False)
    path = save_quantized(model, tmp_path_factory.mktemp("fuzz") / "q", reports=reports)
    return path, logits_of(load_quantized(path))


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, return_dict=True).logits


def header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = (path / WEIGHTS_FILE).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entries = json.loads(raw[8: 8 + length])
    entries.pop("__metadata__", None)
    return 8 + length, entries


def outcome(path: Path, reference: torch.Tensor, caplog) -> str:
    """Load a corrupted directory and classify what happened (see the module docstring)."""
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            model = load_quantized(path)
    except ValueError:  # ModelLoadError and the config readers' errors: one clear line in the CLI
        return "refused"
    logits = logits_of(model)
    assert torch.isfinite(logits).all(), f"{path}: loaded, and the logits are not finite"
    if torch.equal(logits, reference):
        return "unchanged"
    if "differs from the model config saved with the weights" in caplog.text:
        return "warned"
    _, _, problems = check_dir(path, verify=True)
    assert problems, f"{path}: loaded a changed model without a word, and inspect --verify finds nothing"
    return "caught by verify"


def fresh(saved_path: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(saved_path, tmp_path / name))


def test_bit_flips_truncations_dtypes_and_shapes_of_every_tensor(saved, tmp_path, caplog):
    saved_path, reference = saved
    start, entries = header(saved_path)
    rng = random.Random(SEED)
    counts: Counter = Counter()
    for case, (name, entry) in enumerate(sorted(entries.items())):
        begin, end = entry["data_offsets"]
        path = fresh(saved_path, tmp_path, f"flip{case}")
        data = bytearray((path / WEIGHTS_FILE).read_bytes())
        data[start + rng.randrange(begin, end)] ^= 1 << rng.randrange(8)
        (path / WEIGHTS_FILE).write_bytes(bytes(data))
        counts[f"bit flip: {outcome(path, reference, caplog)}"] += 1

        path = fresh(saved_path, tmp_path, f"cut{case}")
        (path / WEIGHTS_FILE).write_bytes((saved_path / WEIGHTS_FILE).read_bytes()[: start + rng.randrange(begin, end)])
        assert outcome(path, reference, caplog) == "refused", f"truncated inside {name}: loaded"
        counts["truncation: refused"] += 1

        for change in ("dtype", "shape"):
            path = fresh(saved_path, tmp_path, f"{change}{case}")
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
                metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            t = state[name]
            if change == "dtype":
                state[name] = t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)
            else:
                state[name] = t.reshape(-1)[:-1].clone() if t.numel() > 1 else t.reshape(1).repeat(2)
            save_file(state, str(path / WEIGHTS_FILE), metadata=metadata)
            result = outcome(path, reference, caplog)
            assert result == "refused", f"{change} of {name} changed: {result}"
            counts[f"{change}: refused"] += 1
    print(dict(counts))
    assert sum(counts.values()) == 4 * len(entries)


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    return [path]


def _mutate(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1e-3
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [1]
    return 1  # None


def test_every_config_field_edited(saved, tmp_path, caplog):
    saved_path, reference = saved
    config = json.loads((saved_path / CONFIG_FILE).read_text())
    counts: Counter = Counter()
    fields = [f for f in _leaves(config) if f not in OUTPUT_FORMAT_FIELDS]
    for case, field in enumerate(fields):
        path = fresh(saved_path, tmp_path, f"cfg{case}")
        edited = json.loads(json.dumps(config))
        target = edited
        for key in field[:-1]:
            target = target[key]
        target[field[-1]] = _mutate(target[field[-1]])
        (path / CONFIG_FILE).write_text(json.dumps(edited))
        try:
            counts[outcome(path, reference, caplog)] += 1
        except AssertionError as err:
            raise AssertionError(f"config field {'.'.join(map(str, field))}: {err}") from None
        shutil.rmtree(path)
    print(dict(counts), "of", sum(counts.values()), "config fields")
    assert sum(counts.values()) == len(fields) > 50
