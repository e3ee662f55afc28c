"""The golden fixture: a tiny model quantized once and checked in (``tests/data/golden``).

The fixture pins down everything that decides a quantized model bit for bit — seeding, Hadamard
transforms, BlockLDLQ, codebook search and tie-breaking, packing — and keeps the oldest format
version loading in every later version:

* ``float/``: the float source (a tiny Llama, stored so that a transformers upgrade that changes
  random initialisation does not change the fixture);
* ``calibration.safetensors``: the calibration tokens ``[4, 32]``;
* ``q-v1/``: the quantized directory as format version 1 wrote it (2-bit attention, 3-bit
  ``o_proj``, 4-bit MLP, so every codebook is covered);
* ``logits.safetensors``: input ids and the logits of ``q-v1`` computed with dequantized weights.

Quantization runs torch's vectorized kernels (RMSNorm, softmax, SiLU) and BLAS on the calibration
stream, and those round differently on AVX-512 and AVX2 CPUs (measured: 0.2–2% of the code bytes
of a layer differ). So the fixture is made, and checked, in a subprocess pinned to one numerical
path that every x86-64 machine here has: ATen's AVX2 kernels, MKL's AVX2 results (``MKL_CBWR``),
oneDNN capped at AVX2, one thread (:data:`DETERMINISTIC_ENV`).

MKL honours ``MKL_CBWR=AVX2`` only on Intel CPUs; on AMD it falls back to its ``AUTO`` branch. The
fixture was made on an AMD EPYC. On an Intel Xeon (Sapphire Rapids class), plain ``AVX2`` gave 9 of
the 70 compared tensors different; ``AVX2,STRICT`` (alignment-independent results) gives the AMD
results. Checked by running the requantization under ``qemu-x86_64 -cpu EPYC-Milan`` on that Xeon:
``AuthenticAMD``, so MKL's AMD path, with or without ``STRICT``, bit for bit equal to the Xeon's
``AVX2,STRICT`` run. One scale still differs by one unit in the last place from the fixture in both:
:data:`SCALE_ULPS` says why.

Regenerate (only when a change of results is intended, and say so in the commit) with
``python -m tests.golden --write --force``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

GOLDEN_DIR = Path(__file__).parent / "data" / "golden"
FLOAT_DIR = GOLDEN_DIR / "float"
QUANT_DIR = GOLDEN_DIR / "q-v1"
CALIBRATION_FILE = GOLDEN_DIR / "calibration.safetensors"
LOGITS_FILE = GOLDEN_DIR / "logits.safetensors"
NSAMPLES, CTX, SEED = 4, 32, 0
PROMPT_TOKENS = 24
BITS_MAP = ((r"o_proj", 3), (r"mlp\.", 4))
#: One numerical path on every x86-64 machine here (see the module docstring).
DETERMINISTIC_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2",
                     "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REPO_ROOT = Path(__file__).resolve().parents[1]
#: How far (in units in the last place of float32) a requantized ``wscale`` may lie from the fixture's.
#: ``wscale = RMS(W̃) / ρ`` is a float32 square root of a float32 mean. The fixture's
#: ``model.layers.1.self_attn.q_proj.wscale`` is ``0x1.38c6d6p-6``, from ``RMS = 0x1.44316cp-6``, on the
#: AMD EPYC that made it. On an Intel Xeon, natively and under qemu's EPYC emulation, the same ``W̃``
#: (bit for bit) gives ``RMS = 0x1.44316ap-6``, the correctly rounded root, so ``0x1.38c6d4p-6``. The
#: codes of every layer come out equal either way. Codes, signs and codebook ids are compared exactly.
SCALE_ULPS = 1


def requantize_in_subprocess(out_file: Path) -> None:
    """Quantize the fixture's float model again under :data:`DETERMINISTIC_ENV`; the state dict goes
    to ``out_file`` (safetensors)."""
    env = {**os.environ, **DETERMINISTIC_ENV, "PYTHONPATH": os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-m", "tests.golden", "--requantize", str(out_file)], env=env, check=True,
                   cwd=REPO_ROOT, capture_output=True)


def golden_config():
    from quipsharp.config import ModelQuantConfig, QuIPSharpConfig

    return ModelQuantConfig(layer=QuIPSharpConfig(bits=2), bits_map=BITS_MAP, nsamples=NSAMPLES, ctx=CTX, seed=SEED,
                            batch_size=2)


def quantize_golden(float_dir: Path, calibration: torch.Tensor):
    """Quantize the fixture's float model exactly as the fixture was made; returns (model, reports)."""
    from quipsharp.hf import load_model
    from quipsharp.pipeline import quantize_model

    torch.manual_seed(SEED)
    model, _ = load_model(float_dir)
    return quantize_model(model, golden_config(), calibration, progress=False)


def dequantized_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[1, T, vocab]`` with every quantized layer replaced by its dequantized float weight
    (exact decode; no kernel-dependent activation rounding)."""
    import copy

    from quipsharp.models.walker import set_submodule
    from quipsharp.nn import QuantizedLinear

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.dequantize())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            set_submodule(model, name, dense)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _requantize(out_file: Path) -> int:
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    model, _ = quantize_golden(FLOAT_DIR, load_file(str(CALIBRATION_FILE))["tokens"])
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out_file))
    return 0


def write(force: bool) -> int:
    import tempfile

    from safetensors.torch import load_file, save_file

    from quipsharp.hf import load_quantized, save_quantized
    from tests.tiny_models import TEXT, tiny_model, tiny_tokenizer

    if GOLDEN_DIR.exists() and not force:
        print(f"{GOLDEN_DIR} exists; add --force to regenerate it", file=sys.stderr)
        return 2
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", seed=SEED)
    model.save_pretrained(str(FLOAT_DIR))
    tokenizer.save_pretrained(str(FLOAT_DIR))
    from quipsharp.data import calibration_windows

    calibration = calibration_windows([TEXT], tokenizer, NSAMPLES, CTX, SEED)
    save_file({"tokens": calibration}, str(CALIBRATION_FILE))
    quantized, reports = quantize_golden(FLOAT_DIR, calibration)  # for the reports and the module layout
    with tempfile.TemporaryDirectory() as tmp:  # ... and the tensors from the pinned numerical path
        requantize_in_subprocess(Path(tmp) / "state.safetensors")
        quantized.load_state_dict(load_file(str(Path(tmp) / "state.safetensors")))
    save_quantized(quantized, QUANT_DIR, tokenizer, golden_config(), reports, overwrite=True)
    ids = calibration[:1, :PROMPT_TOKENS]
    save_file({"ids": ids, "logits": dequantized_logits(load_quantized(QUANT_DIR), ids)}, str(LOGITS_FILE))
    print(f"wrote {GOLDEN_DIR}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="make the fixture")
    mode.add_argument("--requantize", type=Path, metavar="FILE", help="(internal) quantize again into FILE")
    parser.add_argument("--force", action="store_true", help="regenerate an existing fixture")
    args = parser.parse_args()
    sys.exit(_requantize(args.requantize) if args.requantize else write(args.force))
