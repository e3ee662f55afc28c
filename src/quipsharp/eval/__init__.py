"""Evaluation: perplexity (protocol of ``../shared/data/README.md``), generation, size reports."""

from quipsharp.eval.ppl import perplexity
from quipsharp.eval.report import compression_report

__all__ = ["compression_report", "perplexity"]
