"""The QTIP trellis codebooks inside quipsharp: BlockLDLQ with 16 x 16 tiles, the layer, the file format
(version 2), loading through quipsharp and transformers, fine-tuning, and bad input (issue 14)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from quipsharp.codebooks import get_codebook
from quipsharp.codebooks.trellis import (
    SEQUENCE,
    TILE,
    is_tail_biting,
    states_from_stream,
    states_from_words,
    unpack_stream,
    viterbi,
)
from quipsharp.config import ModelQuantConfig, QuIPSharpConfig
from quipsharp.nn import QuantizedLinear
from quipsharp.quantize import dequantize, quantize_weight, rht_weight
from tests.conftest import decaying_hessian

FAMILIES = ("qtip1mad", "qtip3inst")


def test_block_quantization_is_one_tail_biting_trellis_per_tile_read_column_major() -> None:
    cb = get_codebook("QTIP1MAD3")
    x = torch.randn(48, TILE, generator=torch.Generator().manual_seed(0))
    xhat, words = cb.quantize_block(x)
    assert words.dtype == torch.int16 and words.shape == (3, TILE * 3)  # exactly 3 bits x 256 weights per tile
    states = states_from_words(words, 3)
    assert torch.equal(states, states_from_stream(unpack_stream(words), 16, 3))
    assert is_tail_biting(states, 16, 3)
    # the decoded path is what the block returns, tile t holding rows 16t.., column-major
    values = cb.table[states, 0].reshape(3, TILE, TILE).transpose(1, 2).reshape(48, TILE)
    assert torch.equal(values, xhat)
    # ... and it is the Viterbi path of each tile's column-major sequence
    seq = x.reshape(3, TILE, TILE).transpose(1, 2).reshape(3, SEQUENCE)
    direct, _ = viterbi(seq.contiguous(), cb.table, 3)
    assert torch.equal(direct, states)
    # decoding a stored matrix gives the same weights
    assert torch.equal(cb.decode_matrix(words[:, None], 48, TILE), xhat)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_hessian_rounds_every_tile_on_its_own(family: str) -> None:
    """With H = I there is no feedback: BlockLDLQ's result is each tile's own trellis path."""
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    config = QuIPSharpConfig(bits=2, codebook=family)
    qw = quantize_weight(W, None, config)
    cb = get_codebook(config.codebook_name)
    gen = torch.Generator().manual_seed(config.hadamard_seed)
    from quipsharp.hadamard import random_signs

    su, sv = random_signs(64, gen), random_signs(32, gen)
    Wn = rht_weight(W, su, sv) / qw.scale
    tiles = Wn.reshape(2, TILE, 4, TILE).permute(0, 2, 3, 1).reshape(8, SEQUENCE)  # [i, j] tiles, column-major
    states, _ = viterbi(tiles.contiguous(), cb.table, 2)
    assert torch.equal(states_from_words(qw.codes.reshape(8, -1), 2), states)


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("family", FAMILIES)
def test_trellis_has_lower_proxy_loss_than_e8p(family: str, bits: int) -> None:
    """The point of the family: at the same bits, BlockLDLQ with the trellis beats E8P's codebooks
    (Gaussian MSE 0.069 vs 0.091 at 2 bits; 0.018 vs 0.030; 0.0048 vs 0.0083)."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    H = decaying_hessian(128, seed=bits)
    e8p = quantize_weight(W, H, QuIPSharpConfig(bits=bits)).proxy_loss
    qtip = quantize_weight(W, H, QuIPSharpConfig(bits=bits, codebook=family))
    assert qtip.proxy_loss < 0.85 * e8p, (qtip.proxy_loss, e8p)
    E = (W - dequantize(qtip)).double()
    Hd = H.double()
    direct = float(torch.trace(E @ Hd @ E.T) / torch.trace(W.double() @ Hd @ W.double().T))
    assert direct == pytest.approx(qtip.proxy_loss, rel=1e-3)  # the reported loss is the real one


def test_layer_forward_matches_its_dequantized_weight_and_bad_shapes_are_refused() -> None:
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(96, 48, bias=True)
    q = QuantizedLinear.from_linear(linear, None, QuIPSharpConfig(bits=2, codebook="qtip3inst"))
    assert q.codes.dtype == torch.int16 and q.codes.shape == (3, 6 * 32)
    x = torch.randn(5, 96, generator=gen)
    torch.testing.assert_close(q.reference_forward(x), x @ q.dequantize().T + q.bias, rtol=1e-5, atol=1e-5)
    for m, n in ((40, 96), (48, 72)):
        with pytest.raises(ValueError, match=r"positive multiples of 16 \(QTIP3INST2 quantizes 16x16 tiles\)"):
            QuantizedLinear(n, m, QuIPSharpConfig(codebook="qtip3inst"))
        with pytest.raises(ValueError, match=f"weight of shape {m}x{n}: out_features and in_features must be"):
            quantize_weight(torch.randn(m, n), None, QuIPSharpConfig(codebook="qtip1mad"))


def test_training_forward_matches_inference_and_codes_stay_frozen() -> None:
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), None, QuIPSharpConfig(bits=2, codebook="qtip1mad"))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = q.reference_forward(x)
    codes = q.codes.clone()
    q.enable_training()
    y = q(x)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    assert q.su.grad is not None and q.su.grad.abs().sum() > 0 and q.sv.grad.abs().sum() > 0
    assert q.codes.grad is None and torch.equal(q.codes, codes)
    q.disable_training()


# --------------------------------------------------------------------------- whole models and the format
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from quipsharp.format import FORMAT_VERSION, ModelLoadError  # noqa: E402
from quipsharp.hf import load_quantized, save_quantized  # noqa: E402
from quipsharp.pipeline import quantize_model  # noqa: E402
from tests.tiny_models import calibration_tokens, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def trellis_dir(tmp_path_factory):
    tokens = calibration_tokens(8, 32)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=2, codebook="qtip1mad"), nsamples=8, ctx=32, batch_size=4)
    model, reports = quantize_model(tiny_model("llama"), config, tokens, progress=False)
    out = save_quantized(model, tmp_path_factory.mktemp("trellis") / "q", config=config, reports=reports)
    with torch.no_grad():
        logits = model(input_ids=tokens[:2]).logits
    return out, tokens, logits, reports


def test_tiny_model_quantizes_saves_and_loads_identically(trellis_dir) -> None:
    out, tokens, logits, reports = trellis_dir
    assert reports and all(r.codebook == "QTIP1MAD2" for r in reports)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION and qc["config"]["layer"]["codebook"] == "qtip1mad"
    loaded = load_quantized(out)
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == len(reports) and all(m.codebook.name == "QTIP1MAD2" for m in layers)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens[:2]).logits, logits)
    import quipsharp  # noqa: F401  (registers the transformers quantizer)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(hf_model(input_ids=tokens[:2]).logits, logits)


def test_e8p_directories_keep_layer_config_version_1(tmp_path) -> None:
    """The directory is format 3 (guarded config.json), but an E8P run's layer config stays version 1."""
    model, _ = quantize_model(tiny_model("llama"), ModelQuantConfig(), None, progress=False)
    out = save_quantized(model, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION and qc["config"]["layer"]["version"] == 1
    assert "codebook" not in qc["config"]["layer"]


def _copy_with(src, dst, mutate_config=None, mutate_state=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if mutate_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        mutate_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if mutate_state is not None:
        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            metadata = f.metadata()
        state = load_file(str(dst / "model.safetensors"))
        mutate_state(state)
        save_file(state, str(dst / "model.safetensors"), metadata)
    (dst / "quipsharp_checksums.json").unlink(missing_ok=True)
    return dst


def test_a_trellis_stream_of_the_wrong_length_is_refused_at_load(trellis_dir, tmp_path) -> None:
    out = trellis_dir[0]
    name = "model.layers.0.mlp.down_proj.codes"

    def shorter(state):
        state[name] = state[name][:, :-1].contiguous()

    with pytest.raises(ModelLoadError, match=r"down_proj\.codes is int16 \[4, 255\], expected int16 \[4, 256\]"):
        load_quantized(_copy_with(out, tmp_path / "short", mutate_state=shorter))

    def as_bytes(state):
        state[name] = state[name].view(torch.uint8)

    with pytest.raises(ModelLoadError, match=r"down_proj\.codes is uint8"):
        load_quantized(_copy_with(out, tmp_path / "bytes", mutate_state=as_bytes))


def test_a_version_1_record_cannot_hold_trellis_codebooks(trellis_dir, tmp_path) -> None:
    def older(cfg):
        cfg["quantization_config"]["format_version"] = 1

    with pytest.raises(ModelLoadError, match="lists trellis codebooks, which need version 2"):
        load_quantized(_copy_with(trellis_dir[0], tmp_path / "v1", mutate_config=older))


def test_inspect_names_the_codebook(trellis_dir, capsys) -> None:
    from quipsharp.cli import main

    assert main(["inspect", str(trellis_dir[0])]) == 0
    text = capsys.readouterr().out
    assert f"quipsharp format {FORMAT_VERSION}, llama," in text and "codebooks: QTIP1MAD2 (14 layers)" in text
    assert main(["inspect", str(trellis_dir[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["codebooks"] == {"QTIP1MAD2": 14}


# --------------------------------------------------------------------------- the HYB code (per-matrix table)
def test_hyb_code_reaches_every_table_entry_equally_and_negates_half() -> None:
    from quipsharp.codebooks.trellis import HYB_LUT_STD, hyb_index, hyb_initial_lut, hyb_table

    entry, negate = hyb_index(torch.arange(1 << 16))
    assert torch.equal(torch.bincount(entry, minlength=512), torch.full((512,), 128))
    assert int(negate.sum()) == 1 << 15
    lut = hyb_initial_lut()
    assert lut.shape == (512, 2) and float(lut.square().mean().sqrt()) == pytest.approx(HYB_LUT_STD, rel=1e-5)
    table = hyb_table(lut)
    assert torch.equal(table[:, 1], lut[entry, 1])
    assert torch.equal(table[:, 0], torch.where(negate, -lut[entry, 0], lut[entry, 0]))


def test_hyb_layer_stores_its_table_trains_it_and_keeps_the_bits() -> None:
    config = QuIPSharpConfig(bits=2, codebook="qtiphyb")
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 32), None, config)
    assert q.lut is not None and q.lut.shape == (512, 2) and torch.isfinite(q.lut).all()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = q(x)
    torch.testing.assert_close(before, x @ q.dequantize().T + q.bias, rtol=1e-5, atol=1e-5)
    codes = q.codes.clone()
    q.enable_training()
    assert q.trainable_state()[-1] is q.lut and q.lut.requires_grad
    y = q(x)
    torch.testing.assert_close(y.detach(), before, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert q.lut.grad is not None and q.lut.grad.abs().sum() > 0
    with torch.no_grad():
        q.lut.mul_(1.1)  # a changed table changes the layer's output, never its bits
    q.disable_training()
    with torch.no_grad():
        torch.testing.assert_close(q(x) - q.bias, (before - q.bias) * 1.1, rtol=1e-4, atol=1e-5)
    assert torch.equal(q.codes, codes) and not q.lut.requires_grad


def test_hyb_model_round_trip_and_a_damaged_table_is_refused(tmp_path) -> None:
    tokens = calibration_tokens(8, 32)
    config = ModelQuantConfig(layer=QuIPSharpConfig(bits=3, codebook="qtiphyb"), nsamples=8, ctx=32, batch_size=4)
    model, reports = quantize_model(tiny_model("llama"), config, tokens, progress=False)
    assert all(r.codebook == "QTIPHYB3" for r in reports)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lut.mul_(0.9)  # as fine-tuning leaves it: a table of its own
        logits = model(input_ids=tokens[:2]).logits
    out = save_quantized(model, tmp_path / "q", config=config, reports=reports)
    loaded = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens[:2]).logits, logits)

    def nan_table(state):
        state["model.layers.1.self_attn.q_proj.lut"][3, 1] = float("nan")

    with pytest.raises(ModelLoadError, match=r"q_proj\.lut holds non-finite values"):
        load_quantized(_copy_with(out, tmp_path / "nan", mutate_state=nan_table))

    def no_table(state):
        del state["model.layers.1.self_attn.q_proj.lut"]

    with pytest.raises(ModelLoadError, match=r"missing tensors.*q_proj\.lut"):
        load_quantized(_copy_with(out, tmp_path / "missing", mutate_state=no_table))


def test_a_layer_that_is_not_whole_tiles_stays_in_float_with_a_warning_naming_it(caplog) -> None:
    from quipsharp.pipeline import _quantizable

    block = torch.nn.Module()
    block.fits = torch.nn.Linear(64, 32)
    block.narrow = torch.nn.Linear(64, 40)  # 40 outputs: not whole 16 x 16 tiles (fine for E8P: 64 inputs)
    trellis = ModelQuantConfig(layer=QuIPSharpConfig(codebook="qtip1mad"))
    with caplog.at_level("WARNING"):
        assert _quantizable("model.layers.0", block, trellis) == ["fits"]
    assert "model.layers.0.narrow (40x64): out_features and in_features must be positive multiples of 16" in caplog.text
    assert _quantizable("model.layers.0", block, ModelQuantConfig()) == ["fits", "narrow"]


def test_cli_quantizes_with_a_trellis_codebook(model_dir, tmp_path, capsys) -> None:
    from quipsharp.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--data-free", "--bits", "3", "--ctx", "64",
                 "--codebook", "qtip1mad", "--quiet"]) == 0
    assert "to 3.00 bits/weight" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == FORMAT_VERSION and set(info["codebooks"]) == {"QTIP1MAD3"}
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "r"), "--data-free", "--codebook", "qtip"]) == 2
    assert "argument --codebook: invalid choice: 'qtip'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("native_step", [True, False])
def test_lean_decoder_generates_what_transformers_generates(trellis_dir, native_step: bool) -> None:
    """The lean loop runs trellis layers in the fused native step (or, without it, through their bound
    calls): greedy tokens equal transformers' generate."""
    from quipsharp import kernels
    from quipsharp.fastdecode import LeanDecoder

    if native_step and not kernels.available():
        pytest.skip("native kernels not built")
    out, tokens, _, _ = trellis_dir
    model = load_quantized(out)
    decoder = LeanDecoder(model, 64, native_step=native_step)
    assert (decoder.native_step is not None) == native_step
    lean = list(decoder.generate(tokens[0, :8], max_new_tokens=8))
    with torch.no_grad():
        ref = model.generate(tokens[:1, :8], max_new_tokens=8, do_sample=False)[0, 8:].tolist()
    assert lean == ref
