"""``quipsharp report DIR``: an HTML page and PNG figures describing a quantized directory.

Figures (matplotlib, ``pip install quipsharp[report]``):

* ``proxy_loss.png``: each layer's proxy loss ``tr((Ŵ−W) H (Ŵ−W)ᵀ) / tr(W H Wᵀ)`` (QuIP# §2), blocks
  by layer type, on a log colour scale;
* ``bits.png``: bits per weight of every quantized layer, coloured by codebook;
* ``size.png``: the weights file by kind (codes, the layers' float state, embeddings and head, other);
* ``ppl_bits.png`` (when perplexities are recorded: ``quipsharp eval ppl DIR --record``): perplexity
  against bits per weight for this directory and any ``--compare`` directories, with the float
  model's perplexity as a line when given.

The page (``index.html``) shows them with the summary, the evaluation results and the per-layer
table. It is written to ``DIR/report`` by default (a subfolder: the directory's checksums cover its
top-level files only); an existing folder is replaced only when quipsharp wrote it.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from quipsharp.card import eval_row, layer_reports, model_summary, read_eval, tensor_bytes_by_kind
from quipsharp.errors import QuipSharpError

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX_FILE = "index.html"
#: Marks a folder quipsharp's report wrote (only such a folder is replaced).
MARKER_FILE = ".quipsharp-report"
FIGURE_DPI = 110
LAYER_NAME = re.compile(r"^(?P<prefix>.*?)(?P<block>\d+)\.(?P<rest>.+)$")
CODEBOOK_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
BYTES_PER_MB = 1e6


class ReportError(QuipSharpError, ValueError):
    """A report cannot be written (matplotlib missing, a foreign output folder); the message says why."""


def build_report(path: str | os.PathLike, out: str | os.PathLike | None = None,
                 compare: tuple[str | os.PathLike, ...] = (), float_ppl: float | None = None) -> Path:
    """Write the report of quantized directory ``path`` and return the page's path.

    Args:
        path: a quipsharp directory.
        out: the report folder (default ``path/report``); an existing one must hold an earlier report.
        compare: other quipsharp directories (e.g. other bit widths of the same model) whose recorded
            perplexities join the perplexity-vs-bits figure.
        float_ppl: the float model's perplexity on the same text, drawn as a reference line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ReportError("the report needs matplotlib: pip install quipsharp[report]") from err
    path = Path(path)
    summary = model_summary(path)
    layers = layer_reports(path)
    results = read_eval(path)
    out = Path(out) if out is not None else path / REPORT_DIR
    _prepare(out)
    figures: list[tuple[str, str]] = []
    if layers:
        figures.append(("proxy_loss.png", "Proxy loss by block and layer type"))
        _proxy_loss_figure(plt, layers, out / figures[-1][0])
        figures.append(("bits.png", "Bits per weight of each quantized layer"))
        _bits_figure(plt, layers, out / figures[-1][0])
    figures.append(("size.png", "Weights file by kind"))
    sizes = tensor_bytes_by_kind(path)
    _size_figure(plt, sizes, out / figures[-1][0])
    points = _ppl_points(path, summary, results, compare)
    if points:
        figures.append(("ppl_bits.png", "Perplexity against bits per weight"))
        _ppl_figure(plt, points, float_ppl, out / figures[-1][0])
    page = out / INDEX_FILE
    page.write_text(_page(path, summary, layers, results, sizes, figures, points, float_ppl), encoding="utf-8")
    (out / MARKER_FILE).write_text(json.dumps({"model": str(path.resolve())}), encoding="utf-8")
    logger.info("report of %s written to %s", path, page)
    return page


def _prepare(out: Path) -> None:
    """Empty ``out`` if it holds an earlier report; refuse anything else that is not empty."""
    if out.exists():
        if not out.is_dir():
            raise ReportError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MARKER_FILE).is_file():
                raise ReportError(f"{out} holds files quipsharp did not write; choose another --out")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _split(name: str) -> tuple[int, str] | None:
    """``(block, layer type)`` of ``model.layers.3.self_attn.q_proj``, or None."""
    match = LAYER_NAME.match(name)
    if match is None:
        return None
    return int(match["block"]), match["rest"].rsplit(".", 1)[-1]


def _proxy_loss_figure(plt: Any, layers: list[dict[str, Any]], file: Path) -> None:
    cells: dict[tuple[int, str], float] = {}
    for layer in layers:
        where = _split(layer["name"])
        if where is not None and layer.get("proxy_loss") is not None and math.isfinite(layer["proxy_loss"]):
            cells[where] = max(float(layer["proxy_loss"]), 1e-12)
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in sorted(cells, key=lambda c: c[0])))
    grid = [[math.log10(cells[(b, k)]) if (b, k) in cells else math.nan for k in kinds] for b in blocks]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(len(kinds), 1), 1.5 + 0.22 * max(len(blocks), 1)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, label="log10 proxy loss")
    ax.set_title("proxy loss (lower is better)")
    fig.tight_layout()
    fig.savefig(file, dpi=FIGURE_DPI)
    plt.close(fig)


def _bits_figure(plt: Any, layers: list[dict[str, Any]], file: Path) -> None:
    codebooks = list(dict.fromkeys(layer.get("codebook", "?") for layer in layers))
    colour = {c: CODEBOOK_COLOURS[i % len(CODEBOOK_COLOURS)] for i, c in enumerate(codebooks)}
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar(range(len(layers)), [layer["bits"] for layer in layers],
           color=[colour[layer.get("codebook", "?")] for layer in layers], width=1.0)
    from matplotlib.patches import Patch

    ax.set_xlabel("quantized layer (model order)")
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, max(layer["bits"] for layer in layers) + 1)
    ax.legend(handles=[Patch(color=colour[c], label=c) for c in codebooks], loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(file, dpi=FIGURE_DPI)
    plt.close(fig)


def _size_figure(plt: Any, sizes: dict[str, int], file: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 1.8))
    left = 0.0
    for i, (kind, nbytes) in enumerate(sizes.items()):
        mb = nbytes / BYTES_PER_MB
        ax.barh([0], [mb], left=left, color=CODEBOOK_COLOURS[i], label=f"{kind}: {mb:.{1 if mb >= 10 else 3}f} MB")
        left += mb
    ax.set_yticks([])
    ax.set_xlabel("MB")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(file, dpi=FIGURE_DPI)
    plt.close(fig)


def _ppl_points(path: Path, summary: dict[str, Any], results: list[dict[str, Any]],
                compare: tuple[str | os.PathLike, ...]) -> list[dict[str, Any]]:
    """``[{"label", "bits", "ppl", "data", "ctx"}]``: the latest recorded perplexity of each directory
    for the text and window this directory's latest perplexity used."""
    own = [r for r in results if r.get("kind") == "ppl"]
    if not own:
        return []
    key = (own[-1].get("data"), own[-1].get("ctx"), own[-1].get("windows"))
    points = []
    for directory, s, rs in [(path, summary, results)] + [(Path(c), model_summary(c), read_eval(c)) for c in compare]:
        same = [r for r in rs if r.get("kind") == "ppl" and (r.get("data"), r.get("ctx"), r.get("windows")) == key]
        if not same:
            logger.warning("%s has no recorded perplexity on %s (ctx %s): left out of the figure", directory, *key[:2])
            continue
        family = s["config"].get("layer", {}).get("codebook", "e8p")
        points.append({"label": f"{directory.name} ({family})", "bits": s["bits_per_weight"], "ppl": same[-1]["ppl"],
                       "data": key[0], "ctx": key[1]})
    return points


def _ppl_figure(plt: Any, points: list[dict[str, Any]], float_ppl: float | None, file: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["bits"] for p in points], [p["ppl"] for p in points], "o")
    for p in points:
        ax.annotate(p["label"], (p["bits"], p["ppl"]), textcoords="offset points", xytext=(5, 5), fontsize="small")
    if float_ppl is not None:
        ax.axhline(float_ppl, color="gray", linestyle="--", label=f"float {float_ppl:.2f}")
        ax.legend()
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel(f"perplexity ({points[0]['data']}, ctx {points[0]['ctx']})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=FIGURE_DPI)
    plt.close(fig)


def _page(path: Path, s: dict[str, Any], layers: list[dict[str, Any]], results: list[dict[str, Any]],
          sizes: dict[str, int], figures: list[tuple[str, str]], points: list[dict[str, Any]],
          float_ppl: float | None) -> str:
    e = html.escape
    rows = [("source model", s["source_model"] or "not recorded"), ("architecture", s["model_type"]),
            ("quantized layers", s["layers"]), ("bits per weight (codes)", f"{s['bits_per_weight']:.2f}"),
            ("codebooks", ", ".join(f"{k} ({v})" for k, v in s["codebooks"].items())),
            ("calibration", s["calibration"] or "not recorded"),
            ("weights on disk", f"{s['disk_bytes'] / BYTES_PER_MB:.1f} MB"),
            ("quipsharp format", s["format_version"])]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>quipsharp report: {e(path.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
        "td.num{text-align:right;font-variant-numeric:tabular-nums}</style></head><body>",
        f"<h1>{e(path.name)}</h1>",
        "<table>" + "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in rows) + "</table>",
    ]
    parts.append("<h2>Evaluation</h2>")
    if results:
        parts.append("<table><tr><th>evaluation</th><th>result</th><th>settings</th><th>date</th></tr>")
        for r in results:
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in eval_row(r)) + "</tr>")
        parts.append("</table>")
        if float_ppl is not None:
            parts.append(f"<p>Float model: perplexity {float_ppl:.3f} on the same text.</p>")
    else:
        parts.append(f"<p>No evaluation recorded: <code>quipsharp eval ppl {e(path.name)} --data FILE --record</code>"
                     " adds one.</p>")
    for file, caption in figures:
        parts.append(f"<h2>{e(caption)}</h2><img src='{e(file)}' alt='{e(caption)}'>")
    parts.append("<h2>Weights file</h2><table><tr><th>kind</th><th>MB</th></tr>"
                 + "".join(f"<tr><td>{e(k)}</td><td class='num'>{v / BYTES_PER_MB:.2f}</td></tr>"
                           for k, v in sizes.items()) + "</table>")
    if layers:
        parts.append("<h2>Layers</h2><table><tr><th>layer</th><th>bits</th><th>codebook</th><th>shape</th>"
                     "<th>proxy loss</th><th>seconds</th></tr>")
        for layer in layers:
            shape = "x".join(str(d) for d in layer.get("shape", []))
            parts.append(f"<tr><td>{e(layer['name'])}</td><td class='num'>{layer['bits']}</td>"
                         f"<td>{e(str(layer.get('codebook', '')))}</td><td>{shape}</td>"
                         f"<td class='num'>{layer.get('proxy_loss', math.nan):.4g}</td>"
                         f"<td class='num'>{layer.get('seconds', math.nan):.2f}</td></tr>")
        parts.append("</table>")
    parts.append("<p>Written by <code>quipsharp report</code>.</p></body></html>")
    return "\n".join(parts)
