"""Fine-tuning (issue 5): gradients reach the continuous state only, losses go down, best state restored,
fine-tuned values save and load, ``--finetune none`` changes nothing, the CLI stages run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from quipsharp import kernels
from quipsharp.cli import main
from quipsharp.config import FinetuneConfig, ModelQuantConfig, QuIPSharpConfig
from quipsharp.finetune import finetune_block, finetune_model, split_holdout
from quipsharp.hf import load_quantized, read_quantization_config, save_quantized
from quipsharp.models.walker import block_output, find_blocks
from quipsharp.nn import QuantizedLinear
from quipsharp.pipeline import capture_block_inputs, quantize_linears, quantize_model, run_block
from tests.tiny_models import TEXT, calibration_tokens, save_tiny_model_dir, tiny_model

TWO_BIT = QuIPSharpConfig(bits=2)


def quantized_layer(seed: int = 0, bias: bool = True) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(64, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(48, generator=gen))
    return QuantizedLinear.from_linear(linear, config=TWO_BIT, seed=seed)


def real_valued_signs(layer: QuantizedLinear, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.su.mul_(torch.rand(layer.su.shape, generator=gen) + 0.5)
        layer.sv.mul_(torch.rand(layer.sv.shape, generator=gen) + 0.5)


def test_training_forward_matches_inference_and_gradients_skip_codes():
    layer = quantized_layer()
    real_valued_signs(layer)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer.reference_forward(x)
    codes = layer.codes.clone()
    layer.enable_training()
    x.requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    for t in (layer.su, layer.sv, layer.bias, x):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert layer.wscale.grad is None
    assert layer.codes.grad is None and not layer.codes.requires_grad and torch.equal(layer.codes, codes)
    layer.disable_training()
    assert layer._core is None and not layer.su.requires_grad


def test_split_holdout():
    assert split_holdout(16, 0.125) == (list(range(14)), [14, 15])
    assert split_holdout(2, 0.01) == ([0], [1])
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(1, 0.5)


def _block_setup(quantize: tuple[str, ...] = ("mlp.down_proj",), layer: QuIPSharpConfig = TWO_BIT):
    """Block 0 of a tiny Llama, its calibration stream and float targets, ``quantize`` data-free with ``layer``."""
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    stream, calls = capture_block_inputs(model, blocks, list(calibration_tokens(32, 32).split(8)))
    block = blocks[0]
    targets = run_block(block, stream, calls[0])
    quantize_linears(block, "b", list(quantize), None, ModelQuantConfig(layer=layer))
    return block, stream, calls[0], targets


def test_block_finetuning_trains_the_trellis_table():
    """A HYB layer's code table learns (at the sign vectors' rate): halving it is repaired, the bits stay."""
    block, stream, calls, targets = _block_setup(layer=QuIPSharpConfig(bits=2, codebook="qtiphyb"))
    layer = block.mlp.down_proj
    original, codes = layer.lut.clone(), layer.codes.clone()
    with torch.no_grad():
        layer.lut.mul_(0.5)
    cfg = FinetuneConfig(mode="block", block_epochs=4, lr=1e-6, sign_lr=1e-2, batch_size=4)
    report = finetune_block(block, stream, targets, calls, cfg)
    assert report.best_epoch > 0 and report.gain > 0.5, report.losses
    ratio = float((layer.lut * original).sum() / original.square().sum())
    assert 0.55 < ratio < 1.0, ratio  # from 0.5 back towards the table (the sign vectors share the repair)
    assert torch.equal(layer.codes, codes) and not layer.lut.requires_grad and layer._states is None


def test_block_finetuning_recovers_a_damaged_scale():
    """Halving a quantized layer's S_V is an error fine-tuning of the sign vectors can undo."""
    block, stream, calls, targets = _block_setup()
    with torch.no_grad():
        block.mlp.down_proj.sv.mul_(0.5)
    cfg = FinetuneConfig(mode="block", block_epochs=4, lr=1e-6, sign_lr=1e-2, batch_size=4)
    report = finetune_block(block, stream, targets, calls, cfg)
    assert report.best_epoch > 0 and report.gain > 0.5, report.losses
    assert block.mlp.down_proj._core is None and not block.mlp.down_proj.sv.requires_grad


def test_block_finetuning_restores_the_best_state_when_training_hurts():
    block, stream, calls, targets = _block_setup(("self_attn.q_proj", "mlp.up_proj"))
    before = copy.deepcopy(block.state_dict())
    cfg = FinetuneConfig(mode="block", block_epochs=2, lr=0.5, sign_lr=0.5, batch_size=8)
    report = finetune_block(block, stream, targets, calls, cfg)
    assert report.best_epoch == 0 and min(report.losses[1:]) > report.losses[0]
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_end_to_end_finetuning_lowers_held_out_kl_and_saves(tmp_path):
    teacher = tiny_model("llama")
    tokens = calibration_tokens(16, 32)
    model, reports = quantize_model(copy.deepcopy(teacher), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    cfg = FinetuneConfig(mode="e2e", e2e_epochs=3, lr=1e-4, sign_lr=1e-3, batch_size=4, holdout=0.25)
    codes = {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    head = model.lm_head.weight.detach().clone()
    report = finetune_model(model, teacher, tokens, cfg)
    assert report.best_epoch > 0 and report.losses[report.best_epoch] < 0.95 * report.losses[0], report.losses
    # the best state is the one in the model: its held-out loss is the reported one
    from quipsharp.finetune import split_holdout as split

    _, held = split(16, 0.25)
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=tokens[held]).logits, -1)
        s = torch.log_softmax(model(input_ids=tokens[held]).logits, -1)
        kl = torch.nn.functional.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), log_target=True,
                                        reduction="batchmean")
    assert float(kl) == pytest.approx(report.losses[report.best_epoch], rel=1e-3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert all(torch.equal(layers[n].codes, c) for n, c in codes.items())
    assert not torch.equal(model.lm_head.weight, head)
    assert any(not torch.equal(m.su.abs(), torch.ones_like(m.su)) for m in layers.values())  # real-valued now
    out = save_quantized(model, tmp_path / "ft", reports=reports)
    loaded = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=tokens[:2]).logits, model(input_ids=tokens[:2]).logits)


def test_finetune_none_is_bit_for_bit_the_plain_pipeline():
    tokens = calibration_tokens(8, 32)
    plain, _ = quantize_model(tiny_model("llama"), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    none = ModelQuantConfig(layer=TWO_BIT, finetune=FinetuneConfig(mode="none", lr=0.1, block_epochs=5))
    other, _ = quantize_model(tiny_model("llama"), none, tokens, progress=False)
    a, b = plain.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_block_mode_changes_the_result_and_needs_data():
    tokens = calibration_tokens(16, 32)
    plain, _ = quantize_model(tiny_model("llama"), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    cfg = ModelQuantConfig(layer=TWO_BIT, finetune=FinetuneConfig(mode="block", block_epochs=1, lr=1e-3))
    tuned, reports = quantize_model(tiny_model("llama"), cfg, tokens, progress=False)
    assert len(reports) == 14
    assert not torch.equal(plain.model.layers[1].input_layernorm.weight, tuned.model.layers[1].input_layernorm.weight)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(tiny_model("llama"), cfg, None, progress=False)


def test_config_round_trip_and_validation():
    cfg = ModelQuantConfig(finetune=FinetuneConfig(mode="both", lr=1e-4))
    assert ModelQuantConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["finetune"]
    old["version"] = 1
    assert ModelQuantConfig.from_dict(old).finetune.mode == "none"  # files of version 1 still load
    for bad in ({"mode": "all"}, {"lr": 0}, {"batch_size": 0}, {"holdout": 1.0}, {"block_epochs": -1}):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


def test_cli_quantize_with_finetuning_and_finetune_command(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i * 300: (i + 1) * 300]}) for i in range(10)))
    out = tmp_path / "q"
    common = ["--bits", "2", "--calib", str(calib), "--nsamples", "8", "--ctx", "32", "--quiet",
              "--ft-block-epochs", "1", "--ft-e2e-epochs", "1", "--ft-batch-size", "4"]
    assert main(["quantize", str(model_dir), "--out", str(out), "--finetune", "both", *common]) == 0
    _, qc = read_quantization_config(out)
    assert qc["config"]["finetune"]["mode"] == "both" and qc["source_model"] == str(model_dir.resolve())
    out2 = tmp_path / "q2"
    assert main(["finetune", str(out), "--calib", str(calib), "--out", str(out2), "--ft-e2e-epochs", "2",
                 "--quiet"]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    assert load_quantized(out2) is not None
    # settings not given on the command line are the saved ones: seed, in-block epochs, batch size
    saved, tuned = qc["config"], read_quantization_config(out2)[1]["config"]
    assert tuned["seed"] == saved["seed"] and tuned["finetune"]["e2e_epochs"] == 2
    assert {k: v for k, v in tuned["finetune"].items() if k != "e2e_epochs"} == \
        {k: v for k, v in saved["finetune"].items() if k != "e2e_epochs"}
    assert main(["finetune", str(out), "--calib", str(calib), "--out", str(tmp_path / "z"), "--nsamples", "1",
                 "--quiet"]) == 2
    assert "--nsamples 1 is too few" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "x"), "--data-free", "--finetune", "e2e"]) == 2
    assert "needs calibration" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "y"), "--finetune", "block", "--ft-lr", "2",
                 *common[2:]]) == 2
    assert "learning rate" in capsys.readouterr().err


INT8_REL_TOL = 2e-2  # int8 activations (one scale per vector): error relative to the largest output


def test_a_failed_end_to_end_stage_keeps_the_quantized_model(tmp_path, capsys, monkeypatch):
    import quipsharp.finetune
    from quipsharp.errors import NumericalError

    def fail(*args, **kwargs):
        raise NumericalError("end-to-end: held-out fine-tuning loss is not finite (nan)")

    monkeypatch.setattr(quipsharp.finetune, "finetune_model", fail)
    model_dir = save_tiny_model_dir(tmp_path / "model")
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": TEXT[i * 300: (i + 1) * 300]}) for i in range(10)))
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--out", str(out), "--bits", "2", "--calib", str(calib),
                 "--nsamples", "8", "--ctx", "32", "--quiet", "--finetune", "e2e"]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and f"{out} holds the model without it" in err
    assert read_quantization_config(out)[1]["config"]["finetune"]["mode"] == "none"
    assert load_quantized(out) is not None and not (tmp_path / "q.quipsharp-work").exists()


@pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
def test_native_kernel_serves_real_valued_signs_after_training():
    layer = quantized_layer(3)
    real_valued_signs(layer, 4)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = layer.reference_forward(x)
        for level in kernels.supported_levels():
            layer.use_kernel(level)
            tol = INT8_REL_TOL * float(expected.abs().max()) if kernels.select(level).int8_activations else 1e-4
            torch.testing.assert_close(layer(x), expected, rtol=0, atol=tol, msg=level)


def test_resume_with_block_finetuning_gives_the_same_model(tmp_path):
    """Progress is saved per block with its tuned norms: resuming after block 0 reproduces the full run."""
    from quipsharp.pipeline import PROGRESS_FILE

    tokens = calibration_tokens(16, 32)
    cfg = ModelQuantConfig(layer=TWO_BIT, finetune=FinetuneConfig(mode="block", block_epochs=1, lr=1e-3))
    work = tmp_path / "work"
    full, _ = quantize_model(tiny_model("llama"), cfg, tokens, work_dir=work, progress=False)
    progress = json.loads((work / PROGRESS_FILE).read_text())
    progress["blocks"] = progress["blocks"][:1]  # as if killed after block 0
    (work / PROGRESS_FILE).write_text(json.dumps(progress))
    resumed, reports = quantize_model(tiny_model("llama"), cfg, tokens, work_dir=work, resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    assert len(reports) == 14 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_end_to_end_finetuning_of_a_bfloat16_model_trains_in_float32_and_casts_back():
    teacher = tiny_model("llama")
    tokens = calibration_tokens(16, 32)
    model, _ = quantize_model(copy.deepcopy(teacher), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    model.to(torch.bfloat16)
    rotary = model.model.rotary_emb  # as from_pretrained(dtype=bfloat16) leaves it: float32 frequencies
    rotary.register_buffer("inv_freq", rotary.inv_freq.float(), persistent=False)
    cfg = FinetuneConfig(mode="e2e", e2e_epochs=2, lr=1e-4, sign_lr=1e-3, batch_size=4, holdout=0.25)
    report = finetune_model(model, teacher, tokens, cfg)
    assert report.best_epoch > 0 and report.losses[report.best_epoch] < report.losses[0]
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert rotary.inv_freq.dtype == torch.float32  # only parameters went through float32 and back
    assert all(m.su.dtype == torch.float32 for m in model.modules() if isinstance(m, QuantizedLinear))
    # the loss after rounding back to bf16 is measured, is the model's, and still beats the untrained one
    _, held = split_holdout(16, 0.25)
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=tokens[held]).logits.float(), -1)
        s = torch.log_softmax(model(input_ids=tokens[held]).logits.float(), -1)
        kl = torch.nn.functional.kl_div(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), log_target=True,
                                        reduction="batchmean")
    assert report.after_cast == pytest.approx(float(kl), rel=1e-3) and report.after_cast < report.losses[0]


@pytest.mark.parametrize("tuned,kept", [(1.5, True), (1.001, False)])
def test_tuning_lost_in_the_cast_back_to_bfloat16_is_undone(tuned, kept):
    """bf16 cannot hold 1.001: that tuning rounds back to 1.0, loses its gain, and the untrained state returns."""
    from quipsharp.finetune import FinetuneReport, _in_float32

    module = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    sign = torch.full((1,), 2.0)  # stands for a float32 sign vector, trained alongside
    with torch.no_grad():
        module.weight.fill_(1.0)

    def run() -> FinetuneReport:
        assert module.weight.dtype == torch.float32
        with torch.no_grad():
            module.weight.fill_(tuned)
            sign.fill_(3.0)
        return FinetuneReport("toy", losses=[1.0, 0.5], best_epoch=1)

    def held_out_loss() -> float:
        return 1.0 - float(module.weight.detach().float() - 1.0)

    report = _in_float32(module, [module.weight, sign], run, held_out_loss)
    assert module.weight.dtype == torch.bfloat16
    if kept:
        assert report.best_epoch == 1 and report.after_cast == pytest.approx(0.5)
        assert float(module.weight) == tuned and float(sign) == 3.0
    else:
        assert report.best_epoch == 0 and report.after_cast == 1.0
        assert float(module.weight) == 1.0 and float(sign) == 2.0


def test_patience_stops_a_stage_that_stopped_improving():
    block, stream, calls, targets = _block_setup(("self_attn.q_proj", "mlp.up_proj"))
    cfg = FinetuneConfig(mode="block", block_epochs=5, lr=0.5, sign_lr=0.5, batch_size=8, patience=2)
    report = finetune_block(block, stream, targets, calls, cfg)
    assert report.best_epoch == 0 and len(report.losses) == 1 + 2  # epochs 1 and 2 worse: stop


def test_gradient_checkpointing_gives_the_same_training():
    teacher = tiny_model("llama")
    tokens = calibration_tokens(16, 32)
    base, _ = quantize_model(copy.deepcopy(teacher), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    losses, calls = [], []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        mlp, count = model.model.layers[0].mlp, [0]

        def counted(x, _forward=mlp.forward, _count=count):  # module hooks do not fire in the recomputation
            _count[0] += 1
            return _forward(x)

        mlp.forward = counted
        cfg = FinetuneConfig(mode="e2e", e2e_epochs=2, lr=1e-4, sign_lr=1e-3, gradient_checkpointing=checkpointing)
        losses.append(finetune_model(model, teacher, tokens, cfg).losses)
        calls.append(count[0])
        assert not model.training and not getattr(model.model, "gradient_checkpointing", False)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert calls[1] > calls[0]  # the checkpointed run recomputed the block in the backward pass


def test_finetune_command_without_a_recorded_teacher_is_a_clear_error(tmp_path, capsys):
    tokens = calibration_tokens(8, 32)
    model, reports = quantize_model(tiny_model("llama"), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    out = save_quantized(model, tmp_path / "q", reports=reports)  # no source recorded
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    assert main(["finetune", str(out), "--calib", str(calib), "--out", str(tmp_path / "o")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_block_finetuning_with_a_short_last_batch_on_gemma2():
    """Gemma2's block arguments carry a per-batch mask: micro-batches from the short last batch still fit."""
    tokens = calibration_tokens(20, 32)  # batches of 8, 8 and 4
    cfg = ModelQuantConfig(layer=TWO_BIT, batch_size=8,
                           finetune=FinetuneConfig(mode="block", block_epochs=1, lr=1e-4, batch_size=8))
    model, reports = quantize_model(tiny_model("gemma2"), cfg, tokens, progress=False)
    assert len(reports) == 14
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens[:2]).logits).all()


def test_finetuning_under_no_grad_still_trains():
    block, stream, calls, targets = _block_setup()
    with torch.no_grad():
        block.mlp.down_proj.sv.mul_(0.5)
        report = finetune_block(block, stream, targets, calls,
                                FinetuneConfig(mode="block", block_epochs=1, lr=1e-6, sign_lr=1e-2, batch_size=4))
    assert report.best_epoch == 1


def _full_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    return torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1).reshape(-1, vocab),
                                      torch.log_softmax(target_logits.float(), -1).reshape(-1, vocab),
                                      log_target=True, reduction="batchmean")


def test_chunked_kl_equals_the_full_logits_loss_and_its_gradients():
    from quipsharp.finetune import chunked_kl

    gen = torch.Generator().manual_seed(0)
    head, teacher_head = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 10, 16, generator=gen, requires_grad=True)
    target = torch.randn(3, 10, 16, generator=gen)
    full = _full_kl(head(hidden), teacher_head(target).detach())
    full.backward()
    expected = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    chunked = chunked_kl(head, hidden, teacher_head, target, chunk=7)  # 30 positions: chunks of 7,7,7,7,2
    chunked.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(hidden.grad, expected[0])
    torch.testing.assert_close(head.weight.grad, expected[1])
    assert teacher_head.weight.grad is None
    with pytest.raises(ValueError, match="different positions"):
        chunked_kl(head, hidden, teacher_head, target[:, :9])


def test_precomputed_teacher_targets_give_the_same_training_as_the_teacher():
    from quipsharp.finetune import teacher_targets

    teacher = tiny_model("llama")
    tokens = calibration_tokens(16, 32)
    base, _ = quantize_model(copy.deepcopy(teacher), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    cfg = FinetuneConfig(mode="e2e", e2e_epochs=2, lr=1e-4, sign_lr=1e-3, batch_size=4, holdout=0.25)
    targets = teacher_targets(teacher, tokens, cfg.batch_size)
    assert targets is not None and targets.hidden.shape == (16, 32, teacher.config.hidden_size)
    runs = [finetune_model(copy.deepcopy(base), t, tokens, cfg).losses for t in (teacher, targets)]
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)
    with pytest.raises(ValueError, match="teacher targets cover"):
        finetune_model(copy.deepcopy(base), targets, tokens[:8], cfg)


def test_a_teacher_whose_logits_are_not_its_head_output_runs_whole():
    """Scaled (or soft-capped) logits: the split path would be wrong, so the full logits are compared."""
    from quipsharp.finetune import teacher_targets

    teacher = tiny_model("llama")
    tokens = calibration_tokens(16, 32)
    model, _ = quantize_model(copy.deepcopy(teacher), ModelQuantConfig(layer=TWO_BIT), tokens, progress=False)
    plain = teacher.forward

    def scaled(*args, **kwargs):
        out = plain(*args, **kwargs)
        out.logits = out.logits * 2
        return out

    teacher.forward = scaled
    assert teacher_targets(teacher, tokens, 4) is None
    cfg = FinetuneConfig(mode="e2e", e2e_epochs=1, batch_size=4, holdout=0.25)
    _, held = split_holdout(16, 0.25)
    with torch.no_grad():  # float32 like fine-tuning's loss (native prefill has int8 activations)
        kernels.use(model, kernels.REFERENCE)
        expected = _full_kl(model(input_ids=tokens[held]).logits, teacher(input_ids=tokens[held]).logits)
        kernels.use(model, None)
    report = finetune_model(model, teacher, tokens, cfg)
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-4)


def test_gemma2_soft_capped_logits_are_detected():
    from quipsharp.finetune import teacher_targets

    teacher = tiny_model("gemma2")
    assert teacher.config.final_logit_softcapping  # logits = cap · tanh(head(h) / cap)
    assert teacher_targets(teacher, calibration_tokens(4, 16), 2) is None
    assert teacher_targets(tiny_model("qwen2"), calibration_tokens(4, 16), 2) is not None


def test_in_block_targets_are_the_float_models_hidden_states(monkeypatch):
    """Block i learns to produce the float model's hidden states after block i, from the quantized
    model's hidden states before it (so it also corrects upstream error)."""
    import quipsharp.pipeline

    tokens = calibration_tokens(8, 32)
    float_model = tiny_model("llama")
    expected = [None] * 3  # the embeddings, then each block's output (the last one before the final norm)
    float_model.model.layers[0].register_forward_pre_hook(lambda m, args: expected.__setitem__(0, args[0]))
    for i, layer in enumerate(float_model.model.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: expected.__setitem__(i + 1, block_output(out)))
    with torch.no_grad():
        float_model(input_ids=tokens)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = quipsharp.pipeline.finetune_block

    def spy(block, inputs, targets, *args, **kwargs):
        seen.append((torch.cat(inputs), torch.cat(targets)))
        return real(block, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(quipsharp.pipeline, "finetune_block", spy)
    cfg = ModelQuantConfig(layer=TWO_BIT, finetune=FinetuneConfig(mode="block", block_epochs=1, lr=1e-3))
    quantize_model(tiny_model("llama"), cfg, tokens, progress=False)
    groups = len(seen) // 2  # two blocks, the same targets after every group of a block
    first, second = seen[0], seen[groups]
    torch.testing.assert_close(first[0], expected[0])  # block 0 sees the embeddings
    torch.testing.assert_close(first[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[1], expected[2], rtol=1e-5, atol=1e-5)  # the float model's, not the block's
    assert not torch.allclose(second[0], expected[1], atol=1e-3)  # ...from the quantized model's states
