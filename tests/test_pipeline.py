"""End to end on tiny random models: quantize → save → load → identical logits → perplexity."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.eval import compression_report, perplexity
from quipsharp.hf import FORMAT_VERSION, ModelLoadError, load_quantized, save_quantized
from quipsharp.models.walker import UnsupportedModelError, block_linears, find_blocks
from quipsharp.nn import QuantizedLinear
from quipsharp.pipeline import capture_block_inputs, quantize_linears, quantize_model, shared_input_groups
from tests.tiny_models import calibration_tokens, tiny_model

ARCHS = ["llama", "qwen2", "gpt2", "gemma3", "gemma2", "phi3", "opt", "mistral"]


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_identical_logits(arch, tmp_path):
    model = tiny_model(arch)
    tokens = calibration_tokens(8, 32)
    with torch.no_grad():
        float_logits = model(input_ids=tokens[:2]).logits
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=4), nsamples=8, ctx=32, batch_size=4)
    model, reports = quantize_model(model, config, tokens, progress=False)
    names = quantized_names(model)
    assert len(names) == len(reports) > 0
    assert all(r.proxy_loss < 0.05 for r in reports), [(r.name, r.proxy_loss) for r in reports]
    with torch.no_grad():
        q_logits = model(input_ids=tokens[:2]).logits
    # 4 bits on a random model: logits stay close to the float model's
    assert (q_logits - float_logits).square().mean() < 0.05 * float_logits.var()
    out = save_quantized(model, tmp_path / "q", config=config, reports=reports)
    loaded = load_quantized(out)
    assert quantized_names(loaded) == names
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens[:2]).logits, q_logits)


def test_llama_groups_follow_shared_inputs():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    stream, calls = capture_block_inputs(model, blocks, [calibration_tokens(2, 16)])
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    groups = shared_input_groups(blocks[0], names, stream[0], calls[0][0])
    assert groups == [names[:3], [names[3]], names[4:6], [names[6]]]


def test_bits_map_and_skip():
    model = tiny_model("llama")
    config = ModelQuantConfig(
        layer=QuIPSharpConfig(bits=2), bits_map=((r"mlp\.down_proj", 4), (r"self_attn", 3)),
        skip=(r"layers\.1\.mlp\.gate_proj",), nsamples=4, ctx=16, batch_size=2,
    )
    model, reports = quantize_model(model, config, calibration_tokens(4, 16), progress=False)
    bits = {r.name: r.bits for r in reports}
    assert bits["model.layers.0.mlp.down_proj"] == 4
    assert bits["model.layers.0.self_attn.q_proj"] == 3
    assert bits["model.layers.0.mlp.up_proj"] == 2
    assert "model.layers.1.mlp.gate_proj" not in bits
    assert isinstance(model.model.layers[1].mlp.gate_proj, torch.nn.Linear)
    assert model.model.layers[0].mlp.down_proj.codebook.name == "E8P12RVQ4B"


def test_data_free_and_sequential_vs_original_modes():
    tokens = calibration_tokens(4, 16)
    data_free, _ = quantize_model(tiny_model("qwen2"), ModelQuantConfig(), None, progress=False)
    assert len(quantized_names(data_free)) == 14
    seq, seq_r = quantize_model(tiny_model("qwen2"), ModelQuantConfig(nsamples=4, ctx=16), tokens, progress=False)
    _, orig_r = quantize_model(tiny_model("qwen2"), ModelQuantConfig(nsamples=4, ctx=16, hessian_inputs="original"),
                                  tokens, progress=False)
    # block 0 sees the same inputs in both modes; later blocks differ
    assert seq_r[0].proxy_loss == orig_r[0].proxy_loss
    assert [r.proxy_loss for r in seq_r] != [r.proxy_loss for r in orig_r]
    # Qwen2's q/k/v biases are kept
    assert seq.model.layers[0].self_attn.q_proj.bias is not None


def test_end_to_end_perplexity(tmp_path):
    model = tiny_model("llama", seed=1)
    windows = calibration_tokens(6, 64, seed=9)
    float_ppl = perplexity(model, windows)["ppl"]
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=4), nsamples=8, ctx=32)
    model, _ = quantize_model(model, config, calibration_tokens(8, 32), progress=False)
    out = save_quantized(model, tmp_path / "q4", config=config)
    loaded = load_quantized(out)
    result = perplexity(loaded, windows)
    assert result["windows"] == 6 and result["tokens"] == 6 * 63 and result["ctx"] == 64
    assert abs(result["ppl"] / float_ppl - 1) < 0.02
    # the generation path (KV cache, a few tokens per call: the decoding kernels) agrees
    stepped = perplexity(loaded, windows[:2], step=5)
    assert stepped["tokens"] == 2 * 63
    assert abs(stepped["ppl"] / perplexity(loaded, windows[:2])["ppl"] - 1) < 0.01
    with pytest.raises(ValueError, match="step must be positive"):
        perplexity(loaded, windows, step=0)
    report = compression_report(model, out)
    assert report["codes_bits_per_weight"] == 4.0
    assert report["disk_bytes"] > 0


def test_no_linear_layers_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match=r"no list of decoder blocks"):
        quantize_model(torch.nn.Sequential(torch.nn.ReLU()), ModelQuantConfig(), None, progress=False)
    with pytest.raises(UnsupportedModelError, match="no linear layer to quantize"):
        quantize_model(tiny_model("llama"), ModelQuantConfig(skip=(".",)), None, progress=False)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    model, _ = quantize_model(tiny_model("llama"), ModelQuantConfig(), None, progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("saved") / "q")


def _rewrite_config(src, dst, mutate):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    mutate(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_load_rejects_newer_format(saved_dir, tmp_path):
    def newer(cfg):
        cfg["quantization_config"]["format_version"] = FORMAT_VERSION + 1

    with pytest.raises(ModelLoadError, match="format version"):
        load_quantized(_rewrite_config(saved_dir, tmp_path / "newer", newer))


def test_load_rejects_shape_mismatch_and_missing_tensor(saved_dir, tmp_path):
    def wider(cfg):
        cfg["intermediate_size"] = 2 * cfg["intermediate_size"]

    with pytest.raises(ModelLoadError, match=r"module .* is .* in the model config"):
        load_quantized(_rewrite_config(saved_dir, tmp_path / "wider", wider))

    from safetensors.torch import load_file, save_file

    missing = _rewrite_config(saved_dir, tmp_path / "missing", lambda cfg: None)
    state = load_file(str(missing / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.codes"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors.*down_proj\.codes"):
        load_quantized(missing)


def test_not_a_quantized_dir(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a quipsharp model"):
        load_quantized(tmp_path)


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    import quipsharp.hf as hf

    model, _ = quantize_model(tiny_model("llama"), ModelQuantConfig(), None, progress=False)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "atomic_write_text", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_layer_callback_sees_every_layer_as_it_is_done():
    _, blocks = find_blocks(tiny_model("llama", seed=0))
    names = list(block_linears(blocks[0]))
    seen = []
    reports = quantize_linears(blocks[0], "model.layers.0", names, None, ModelQuantConfig(), seen.append)
    assert len(seen) == len(names) == 7
    assert [r.name for r in seen] == [r.name for r in reports] == [f"model.layers.0.{n}" for n in names]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", "gpt2", "opt"])
def test_the_pass_through_capture_equals_a_full_forward(arch, monkeypatch):
    """capture_stream skips the blocks' forward; what it records equals a real forward's capture, and a
    model whose first batch differs there falls back to the real capture."""
    from quipsharp import pipeline

    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    batches = list(calibration_tokens(6, 16).split(2))
    real_stream, real_calls = capture_block_inputs(model, blocks, batches)
    stream, calls = pipeline.capture_stream(model, blocks, batches)
    assert all(torch.equal(a, b) for a, b in zip(real_stream, stream, strict=True)) and len(stream) == 3
    assert all(pipeline._same_call(a, b) for ra, ga in zip(real_calls, calls, strict=True)
               for a, b in zip(ra, ga, strict=True))
    full_passes = []
    real_capture = pipeline.capture_block_inputs
    monkeypatch.setattr(pipeline, "capture_block_inputs",
                        lambda *a: full_passes.append([len(b) for b in a[2]]) or real_capture(*a))
    monkeypatch.setattr(pipeline, "_same_call", lambda a, b: False)  # as if the arguments depended on outputs
    stream, calls = pipeline.capture_stream(model, blocks, batches)
    assert full_passes == [[1], [2, 2, 2]]  # the check on the first sequence, then the whole set
    assert all(torch.equal(a, b) for a, b in zip(real_stream, stream, strict=True)) and len(calls[0]) == 3


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_hessians_stop_each_forward_once_every_group_has_its_input(arch):
    """Without the block's outputs, a batch's forward stops after the last group's hook: the same sums as
    a forward run to the end, and the block's last linear runs on the first batch only (one group: the
    rest of the block never runs after the first batch)."""
    from quipsharp.pipeline import capture_stream, collect_hessians

    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    stream, calls = capture_stream(model, blocks, list(calibration_tokens(6, 16).split(2)))
    block = blocks[0]
    names = list(block_linears(block))
    groups = shared_input_groups(block, names, stream[0], calls[0][0])
    last = block.get_submodule(names[-1])
    runs = []
    handle = last.register_forward_hook(lambda *_: runs.append(1))  # after its product
    try:
        full, outputs = collect_hessians(block, groups, stream, calls[0], keep_outputs=True)
        assert len(runs) == len(stream) and len(outputs) == len(stream)
        runs.clear()
        early, none = collect_hessians(block, groups, stream, calls[0], keep_outputs=False)
        assert none is None and len(runs) == 1  # the first batch, run to the end
        for name in full:
            assert torch.equal(full[name].xtx_bins, early[name].xtx_bins) and full[name].count == early[name].count
        runs.clear()
        first, _ = collect_hessians(block, groups[:1], stream, calls[0], keep_outputs=False)
        assert len(runs) == 1 and torch.equal(first[groups[0][0]].xtx_bins, full[groups[0][0]].xtx_bins)
    finally:
        handle.remove()


def test_hessians_of_a_linear_called_twice_run_every_forward_to_the_end():
    """A linear its block calls twice per forward: no early stop (a stop after its first call would
    drop the second call's inputs)."""
    from quipsharp.pipeline import collect_hessians

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, bias=False)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.lin(h)))

    block = Twice()
    gen = torch.Generator().manual_seed(0)
    stream = [torch.randn(2, 4, 8, generator=gen) for _ in range(3)]
    calls = [((), {})] * 3
    accs, _ = collect_hessians(block, [["lin"]], stream, calls, keep_outputs=False)
    assert accs["lin"].count == 2 * 3 * 2 * 4  # both calls of every batch


def test_captured_arguments_compare_by_value():
    from quipsharp.pipeline import _same_call

    t = torch.arange(4.0)
    assert _same_call(((t, None), {"m": [t, 1]}), ((t.clone(), None), {"m": [t.clone(), 1]}))
    assert not _same_call((t,), (t + 1,))
    assert not _same_call((t,), (t.double(),))
    assert not _same_call({"a": t}, {"b": t})
    assert not _same_call((t, 1), [t, 1])
    assert not _same_call(object(), object())


def test_a_run_logs_its_time_by_step(caplog):
    """The -v line benchmarks/distributed.py reads: every step of the block loop, with its seconds."""
    import re

    from tests.tiny_models import calibration_tokens, tiny_model

    config = ModelQuantConfig(nsamples=4, ctx=16, batch_size=2)
    with caplog.at_level(logging.INFO, logger="quipsharp.pipeline"):
        quantize_model(tiny_model("llama"), config, calibration_tokens(nsamples=4, ctx=16), progress=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("time by step:"))
    steps = {k.strip(): float(v) for k, v in re.findall(r"([a-zA-Z ]+) (\d+\.\d)s", line.split(":", 1)[1])}
    assert set(steps) == {"calibration pass", "Hessians", "quantizing", "next stream"}
    assert steps["quantizing"] > 0
