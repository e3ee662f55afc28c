"""The model card (``README.md``) of a quantized directory, and the evaluation results it shows.

:func:`save_quantized <quipsharp.hf.save_quantized>` writes the card: source model, method, bits
and codebooks, calibration, size, how to load. ``quipsharp eval ppl|tasks DIR --record`` appends the
result to ``quipsharp_eval.json`` and rewrites the card with it, but only while the card is still
the one quipsharp wrote (its bytes match the checksum recorded for it): a card the user edited is
never overwritten.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from quipsharp.eval.report import disk_bytes
from quipsharp.format import (
    CHECKSUMS_FILE,
    REPORT_FILE,
    ModelLoadError,
    file_sha256,
    read_headers,
    read_record,
    weight_files,
)

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
EVAL_FILE = "quipsharp_eval.json"
PAPER = "QuIP# (Tseng, Chee, Sun, Kuleshov, De Sa, ICML 2024)"
TRELLIS_PAPER = "QTIP (Tseng, Sun, Hou, De Sa, NeurIPS 2024)"
BYTES_PER_MB = 1e6


def model_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What a card and a report say about the directory: ``model_type``, ``source_model``,
    ``calibration``, ``config`` (dict), ``layers`` (count), ``bits_per_weight`` (codes, averaged over
    weights), ``codebooks`` (``{name: layers}``), ``disk_bytes`` (safetensors)."""
    path = Path(path)
    raw, record = read_record(path)
    return {
        "model_type": raw.get("model_type"),
        "source_model": record.source_model,
        "calibration": record.raw.get("calibration"),
        "config": record.raw.get("config", {}),
        "format_version": record.format_version,
        "layers": len(record.modules),
        "bits_per_weight": record.bits_per_weight(),
        "codebooks": record.codebook_counts(),
        "disk_bytes": disk_bytes(path),
    }


def read_eval(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluation results recorded in ``path`` (oldest first; empty when none)."""
    file = Path(path) / EVAL_FILE
    if not file.is_file():
        return []
    try:
        results = json.loads(file.read_text(encoding="utf-8"))["results"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ModelLoadError(f"{file} is damaged (not the JSON quipsharp writes)") from None
    if not isinstance(results, list):
        raise ModelLoadError(f"{file} is damaged (no list of results)")
    return results


def model_card(path: str | os.PathLike, summary: dict[str, Any] | None = None,
               results: list[dict[str, Any]] | None = None, name: str | None = None) -> str:
    """The card's Markdown (Hugging Face model card front matter, then the text); ``name``: the
    directory's name in the text (default: ``path``'s)."""
    path = Path(path)
    s = summary if summary is not None else model_summary(path)
    results = results if results is not None else read_eval(path)
    cfg = s["config"]
    layer = cfg.get("layer", {})
    family = layer.get("codebook", "e8p")
    trellis = family != "e8p"
    bits = s["bits_per_weight"]
    name = name or path.name
    source = s["source_model"] or "an unrecorded model"
    front = ["---", "library_name: quipsharp", "tags:", "- quantized", "- quipsharp",
             "- qtip" if trellis else "- quip-sharp", f"- {bits:g}-bit"]
    if s["source_model"] and not _looks_local(s["source_model"]):
        front.append(f"base_model: {s['source_model']}")
    front.append("---")
    method = (f"{TRELLIS_PAPER} trellis codes ({family}) with QuIP#'s incoherence processing and BlockLDLQ"
              if trellis else f"{PAPER}: randomized Hadamard incoherence, E8 lattice codebooks, BlockLDLQ")
    calib = s["calibration"] or "not recorded"
    lines = [
        *front, "", f"# {name}", "",
        f"{source} quantized to **{bits:.2f} bits per weight** with quipsharp: {method}.", "",
        "| | |", "|---|---|",
        f"| source model | {source} |",
        f"| architecture | {s['model_type']} |",
        f"| quantized linear layers | {s['layers']} |",
        f"| codebooks | {', '.join(f'{k} ({v} layers)' for k, v in s['codebooks'].items())} |",
        f"| calibration | {calib}; {cfg.get('nsamples', '?')} windows x {cfg.get('ctx', '?')} tokens, "
        f"seed {cfg.get('seed', '?')} |",
        f"| Hessian inputs | {cfg.get('hessian_inputs', '?')} |",
        f"| fine-tuning | {cfg.get('finetune', {}).get('mode', 'none')} |",
        f"| weights on disk | {s['disk_bytes'] / BYTES_PER_MB:.1f} MB |",
        f"| quipsharp format | {s['format_version']} |",
        "",
        "## Measured",
        "",
    ]
    if results:
        lines += ["| evaluation | result | settings | date |", "|---|---|---|---|"]
        for r in results:
            lines.append("| " + " | ".join(eval_row(r)) + " |")
    else:
        lines.append(f"Not measured yet: `quipsharp eval ppl {name} --data FILE --record` adds the perplexity here.")
    lines += [
        "", "## Load", "",
        "```python",
        "import quipsharp",
        f'model = quipsharp.load_quantized("{name}")',
        "# or, with transformers (pass trust_remote_code=True if quipsharp is not imported):",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        "```", "",
        f"`quipsharp generate {name} --prompt \"...\"` generates text, `quipsharp inspect {name}` describes the "
        f"layers and `quipsharp report {name}` draws them. Needs `pip install quipsharp[hf]`.",
        "",
    ]
    return "\n".join(lines)


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or Path(source).exists()


def eval_row(r: dict[str, Any]) -> tuple[str, str, str, str]:
    """``(evaluation, result, settings, date)`` of a recorded evaluation, as the card and the report show it."""
    if r.get("kind") == "ppl":
        return (f"perplexity, {r.get('data', '?')}", f"{r.get('ppl', float('nan')):.3f}",
                f"ctx {r.get('ctx')}, {r.get('windows')} windows, {r.get('tokens')} tokens", r.get("date", ""))
    value = ", ".join(f"{k} {v:.4f}" for k, v in r.get("metrics", {}).items() if not k.endswith("_stderr"))
    settings = [f"limit {r['limit']}" if r.get("limit") else "all documents"]
    if r.get("num_fewshot") is not None:
        settings.append(f"{r['num_fewshot']}-shot")
    return f"{r.get('task', '?')} (lm-eval)", value, ", ".join(settings), r.get("date", "")


def card_is_ours(path: Path) -> bool:
    """Whether ``path/README.md`` is absent or still the card quipsharp wrote (its recorded checksum)."""
    card = path / CARD_FILE
    if not card.exists():
        return True
    manifest = path / CHECKSUMS_FILE
    try:
        want = json.loads(manifest.read_text(encoding="utf-8"))["files"][CARD_FILE]["sha256"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return False
    return file_sha256(card) == want


def record_eval(path: str | os.PathLike, entry: dict[str, Any]) -> bool:
    """Append an evaluation result to ``path``'s :data:`EVAL_FILE` and rewrite the card with it when
    the card is still quipsharp's. Returns whether the card was rewritten (a warning says why not)."""
    from quipsharp.format import update_checksums
    from quipsharp.io import atomic_write_text
    from quipsharp.outputs import locked

    path = Path(path)
    read_record(path)  # only quipsharp directories
    entry = {**entry, "date": datetime.date.today().isoformat()}
    with locked(path):
        results = [*read_eval(path), entry]
        atomic_write_text(path / EVAL_FILE, json.dumps({"results": results}, indent=1, default=str))
        changed = [EVAL_FILE]
        rewrite = card_is_ours(path)
        if rewrite:
            atomic_write_text(path / CARD_FILE, model_card(path, results=results))
            changed.append(CARD_FILE)
        else:
            logger.warning("%s: %s was edited; not rewriting it (the result is in %s)", path, CARD_FILE, EVAL_FILE)
        update_checksums(path, changed)
    return rewrite


def tensor_bytes_by_kind(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of ``model.safetensors`` by kind: ``codes`` (quantized layers' codes), ``layer state``
    (their signs, scales, biases, tables), ``embeddings and head``, ``other float`` (norms, ...)."""
    path = Path(path)
    _, record = read_record(path)
    tensors, _, _ = read_headers(weight_files(path))
    out = {"codes": 0, "layer state": 0, "embeddings and head": 0, "other float": 0}
    quantized = tuple(f"{name}." for name in record.modules)
    for name, info in tensors.items():
        size = info.dtype.itemsize if info.dtype is not None else 1
        nbytes = size
        for dim in info.shape:
            nbytes *= dim
        if name.startswith(quantized):
            out["codes" if name.endswith(".codes") else "layer state"] += nbytes
        elif "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
            out["embeddings and head"] += nbytes
        else:
            out["other float"] += nbytes
    return out


def layer_reports(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-layer reports saved at quantization (empty when none were saved)."""
    file = Path(path) / REPORT_FILE
    if not file.is_file():
        return []
    try:
        layers = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelLoadError(f"{file} is not valid JSON") from None
    if not isinstance(layers, list):
        raise ModelLoadError(f"{file} is not a list of layer reports")
    return layers
