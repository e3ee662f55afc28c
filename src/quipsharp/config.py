"""Versioned, frozen configuration of a QuIP# quantization run.

A config is a frozen dataclass with a ``VERSION``; :meth:`QuIPSharpConfig.to_dict` writes the version
into the dictionary and :meth:`QuIPSharpConfig.from_dict` accepts any older version, so a file written
today still loads after the config grows. Every field either does what its name says or is refused at
construction with a message naming the problem; none is silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

SUPPORTED_BITS = (2, 3, 4)
# Every codebook in quipsharp quantizes vectors of this many consecutive weights (E8 is 8-dimensional);
# it is the block size g of BlockLDLQ (QuIP# §4.1).
CODEBOOK_DIM = 8
#: Codebook families a config can select (``QuIPSharpConfig.codebook``), in the order the CLI lists them.
CODEBOOK_FAMILIES = ("e8p", "qtip1mad", "qtip3inst", "qtiphyb")
# The trellis codebooks quantize 16 x 16 tiles: BlockLDLQ blocks of 16 columns (QTIP §4).
TRELLIS_BLOCK = 16
DEFAULT_DAMPING = 1e-2
DEFAULT_LAZY_BLOCKSIZE = 128
DEFAULT_HADAMARD_SEED = 0
MAX_DAMPING_RETRIES = 6
DAMPING_GROWTH = 10.0


@dataclass(frozen=True)
class QuIPSharpConfig:
    """How to quantize one linear layer (and, by default, every layer of a model).

    Attributes:
        bits: bits per weight, 2, 3 or 4 (E8P12, E8P12RVQ3B, E8P12RVQ4B; paper §4–5).
        use_e8_lattice: True uses the E8-lattice codebooks; False uses a scalar Lloyd–Max codebook of
            the same bits per weight (an ablation that shows what the lattice buys).
        use_hadamard: True applies the randomized Hadamard transform to weights and Hessians (paper §3);
            False skips it (only the scale is applied), so its benefit can be measured.
        hadamard_seed: seed of the random sign vectors S_U, S_V (paper §3). The pipeline derives one
            seed per layer from it; results reproduce bit for bit.
        damping: relative damping σ added to the Hessian after dividing it by its mean diagonal
            (DESIGN.md §4). If the factorisation fails, it is raised by ``DAMPING_GROWTH`` up to
            ``MAX_DAMPING_RETRIES`` times (logged).
        percdamp: GPTQ's name for the same quantity (fraction of the mean diagonal added). Give either
            ``damping`` or ``percdamp``; giving both with different values is an error.
        group_size: weights per codebook vector, the g of BlockLDLQ. Every quipsharp codebook is
            8-dimensional, so only 8 (or None, meaning 8) is accepted. QuIP# uses one scale per matrix,
            not per group.
        blocksize: columns per lazy-batch chunk of BlockLDLQ feedback (GPTQ-style); a multiple of 8.
        scale_rho: ρ in ``Wscale = RMS(W̃) / ρ`` (DESIGN.md §1). None uses the codebook's MSE-optimal
            scale for a unit Gaussian.
        cd_passes: extra passes of block coordinate descent after BlockLDLQ (0 = the paper's algorithm).
        codebook: the codebook family: ``"e8p"`` (QuIP#'s E8P12 and its residual 3/4-bit versions),
            ``"qtip1mad"`` or ``"qtip3inst"`` (QTIP's bitshift trellis with a computed code: 16 × 16
            tiles, BlockLDLQ blocks of 16 columns, exactly ``bits`` bits per weight), or ``"qtiphyb"``
            (the trellis with QTIP's HYB code: a 512 × 2 table stored and fine-tuned per matrix).

    Version 2 added ``codebook``; version-1 dicts load as ``"e8p"``.
    """

    VERSION: ClassVar[int] = 2

    bits: int = 2
    use_e8_lattice: bool = True
    use_hadamard: bool = True
    hadamard_seed: int = DEFAULT_HADAMARD_SEED
    damping: float | None = None
    percdamp: float | None = None
    group_size: int | None = None
    blocksize: int = DEFAULT_LAZY_BLOCKSIZE
    scale_rho: float | None = None
    cd_passes: int = 0
    codebook: str = "e8p"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        for name in ("use_e8_lattice", "use_hadamard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.hadamard_seed, int) or self.hadamard_seed < 0:
            raise ValueError(f"hadamard_seed must be a non-negative integer, got {self.hadamard_seed!r}")
        for name in ("damping", "percdamp"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1e3):
                raise ValueError(f"{name} must be a number in [0, 1000), got {value!r}")
        if self.damping is not None and self.percdamp is not None and self.damping != self.percdamp:
            raise ValueError(
                f"damping ({self.damping}) and percdamp ({self.percdamp}) are two names for the same "
                "relative damping; give only one"
            )
        if self.codebook not in CODEBOOK_FAMILIES:
            raise ValueError(f"codebook must be one of {list(CODEBOOK_FAMILIES)}, got {self.codebook!r}")
        if self.trellis:
            if not self.use_e8_lattice:
                raise ValueError(f"use_e8_lattice=False is the scalar ablation of the e8p family; codebook "
                                 f"{self.codebook!r} is a trellis")
            if self.group_size is not None:
                raise ValueError(f"group_size does not apply to codebook {self.codebook!r} (one trellis per "
                                 f"{TRELLIS_BLOCK}x{TRELLIS_BLOCK} tile); leave it None")
            if self.cd_passes:
                raise ValueError(f"cd_passes={self.cd_passes}: coordinate descent needs a vector codebook, not "
                                 f"the trellis {self.codebook!r}; use 0")
            if not isinstance(self.blocksize, int) or self.blocksize <= 0 or self.blocksize % TRELLIS_BLOCK:
                raise ValueError(f"blocksize must be a positive multiple of {TRELLIS_BLOCK} with codebook "
                                 f"{self.codebook!r}, got {self.blocksize!r}")
        if self.group_size is not None and self.group_size != CODEBOOK_DIM:
            raise ValueError(
                f"group_size={self.group_size} is not supported: QuIP# codebooks quantize vectors of "
                f"{CODEBOOK_DIM} weights (E8) with one scale per matrix; use group_size=None or {CODEBOOK_DIM}"
            )
        if not isinstance(self.blocksize, int) or self.blocksize <= 0 or self.blocksize % CODEBOOK_DIM:
            raise ValueError(f"blocksize must be a positive multiple of {CODEBOOK_DIM}, got {self.blocksize!r}")
        if self.scale_rho is not None and not (isinstance(self.scale_rho, (int, float)) and self.scale_rho > 0):
            raise ValueError(f"scale_rho must be a positive number or None, got {self.scale_rho!r}")
        if not isinstance(self.cd_passes, int) or self.cd_passes < 0:
            raise ValueError(f"cd_passes must be a non-negative integer, got {self.cd_passes!r}")
        if self.extra:
            raise ValueError(f"unknown config fields: {sorted(self.extra)}")

    @property
    def sigma(self) -> float:
        """The relative damping in force: ``damping``, else ``percdamp``, else the default."""
        if self.damping is not None:
            return float(self.damping)
        if self.percdamp is not None:
            return float(self.percdamp)
        return DEFAULT_DAMPING

    @property
    def trellis(self) -> bool:
        """Whether the codebook is a QTIP trellis (16 × 16 tiles) rather than an 8-dimensional vector codebook."""
        return self.codebook != "e8p"

    @property
    def codebook_name(self) -> str:
        """Registry name of the codebook these settings select."""
        from quipsharp.codebooks import codebook_for_bits

        return codebook_for_bits(self.bits, self.use_e8_lattice, self.codebook).name

    def replace(self, **changes: Any) -> QuIPSharpConfig:
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary including ``"version"``: the lowest version that holds these settings
        (an ``e8p`` config writes version 1 without ``codebook``, so older quipsharp still reads it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.codebook == "e8p":
            del out["codebook"]
            out["version"] = 1
        else:
            out["version"] = self.VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuIPSharpConfig:
        """Inverse of :meth:`to_dict`; refuses dictionaries written by a newer quipsharp."""
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(
                f"config version {version!r} is newer than this quipsharp understands ({cls.VERSION}); "
                "upgrade quipsharp"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=unknown)


FINETUNE_MODES = ("none", "block", "e2e", "both")
# Fine-tuning defaults (DESIGN.md §5). Learning rates: 4x the paper's in-block rates (weights/norms 5e-5,
# sign vectors 10x that), which were made for 7B models and far more data. On SmolLM2-135M at 2 bits
# (BENCHMARKS.md, fine-tuning rows) both stages close 39.6% of the gap to float at the paper's rates and
# 47.9% at these; end to end alone, 1 epoch at these does about what 5 do at the paper's rates.
DEFAULT_FT_LR = 2e-4
DEFAULT_FT_SIGN_LR = 2e-3
DEFAULT_FT_BLOCK_EPOCHS = 2
DEFAULT_FT_E2E_EPOCHS = 3
DEFAULT_FT_BATCH = 4
DEFAULT_FT_HOLDOUT = 0.125


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune what stays continuous after quantization (QuIP# §5, DESIGN.md §5).

    Attributes:
        mode: ``"none"``; ``"block"`` tunes inside each decoder block while it is quantized (after
            each group of linears, the block's remaining float weights, norms and the real-valued
            sign vectors of its quantized layers learn to map the block's inputs to the float model's
            hidden states after the block, MSE);
            ``"e2e"`` tunes sign vectors, norms and the LM head of the finished model to match the
            float model's next-token distribution (KL); ``"both"`` does one then the other.
        block_epochs, e2e_epochs: passes over the training windows per stage.
        lr: Adam learning rate of float weights, norms and the LM head.
        sign_lr: Adam learning rate of the sign vectors S_U, S_V (and biases) of quantized layers.
        batch_size: calibration windows per optimizer micro-batch.
        grad_accum: micro-batches per optimizer step.
        holdout: fraction of the calibration windows held out for early stopping; the state with the
            lowest held-out loss (possibly the untrained one) is restored after each stage.
        gradient_checkpointing: recompute activations in the backward pass of end-to-end tuning
            (less memory, about a third more time).
        patience: stop a stage after this many epochs in a row without a lower held-out loss
            (0: run every epoch). Either way the best state is restored.

    Version 2 added ``patience``; version-1 dicts load with its default.
    """

    VERSION: ClassVar[int] = 2

    mode: str = "none"
    block_epochs: int = DEFAULT_FT_BLOCK_EPOCHS
    e2e_epochs: int = DEFAULT_FT_E2E_EPOCHS
    lr: float = DEFAULT_FT_LR
    sign_lr: float = DEFAULT_FT_SIGN_LR
    batch_size: int = DEFAULT_FT_BATCH
    grad_accum: int = 1
    holdout: float = DEFAULT_FT_HOLDOUT
    gradient_checkpointing: bool = False
    patience: int = 0

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f"finetune mode must be one of {FINETUNE_MODES}, got {self.mode!r}")
        for name in ("block_epochs", "e2e_epochs", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "sign_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a learning rate in (0, 1), got {value!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")

    @property
    def block(self) -> bool:
        """Whether in-block tuning runs during quantization."""
        return self.mode in ("block", "both") and self.block_epochs > 0

    @property
    def e2e(self) -> bool:
        """Whether end-to-end tuning runs after quantization."""
        return self.mode in ("e2e", "both") and self.e2e_epochs > 0

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["version"] = self.VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(f"finetune config version {version!r} is newer than supported ({cls.VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown finetune config fields: {unknown}")
        return cls(**data)


HESSIAN_INPUT_MODES = ("sequential", "original")
# Calibration default, measured on SmolLM2-135M 2-bit (BENCHMARKS.md): 128 x 512 tokens gave perplexity
# 94.8 against 105.4 for 64 x 256 (a gap near the run-to-run spread at 2 bits) in 428 s against 130 s,
# inside the 10-minute budget; `make demo` uses the fast setting below.
DEFAULT_NSAMPLES = 128
DEFAULT_CTX = 512
FAST_NSAMPLES = 64
FAST_CTX = 256
DEFAULT_CALIB_BATCH = 8


@dataclass(frozen=True)
class ModelQuantConfig:
    """How to quantize a whole causal LM (the layers inside its decoder blocks).

    Attributes:
        layer: the per-layer settings; ``layer.bits`` is the default bit width.
        bits_map: ``(regex, bits)`` pairs matched with ``re.search`` against full module names
            (e.g. ``model.layers.3.mlp.down_proj``); the first match wins (mixed precision, paper §6).
        skip: regexes of module names left in full precision. Embeddings and the LM head are outside
            the decoder blocks and are never quantized.
        hessian_inputs: ``"sequential"`` collects each block's Hessians from the activations of the
            already-quantized blocks before it (GPTQ-style); ``"original"`` from the float model's
            activations (the paper's offline Hessians).
        nsamples, ctx: calibration windows and their length in tokens.
        seed: seed of the calibration window sampling.
        batch_size: calibration windows per forward pass.
        finetune: fine-tuning settings (version 2; files of version 1 load with no fine-tuning).
    """

    VERSION: ClassVar[int] = 2

    layer: QuIPSharpConfig = field(default_factory=QuIPSharpConfig)
    bits_map: tuple[tuple[str, int], ...] = ()
    skip: tuple[str, ...] = ()
    hessian_inputs: str = "sequential"
    nsamples: int = DEFAULT_NSAMPLES
    ctx: int = DEFAULT_CTX
    seed: int = 0
    batch_size: int = DEFAULT_CALIB_BATCH
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.finetune, FinetuneConfig):
            raise ValueError(f"finetune must be a FinetuneConfig, got {type(self.finetune).__name__}")
        object.__setattr__(self, "bits_map", tuple((str(p), int(b)) for p, b in self.bits_map))
        object.__setattr__(self, "skip", tuple(str(p) for p in self.skip))
        for pattern, bits in self.bits_map:
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"bits map {pattern!r}={bits}: bits must be one of {SUPPORTED_BITS}")
        for pattern in [p for p, _ in self.bits_map] + list(self.skip):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid regular expression {pattern!r}: {err}") from err
        if self.hessian_inputs not in HESSIAN_INPUT_MODES:
            raise ValueError(f"hessian_inputs must be one of {HESSIAN_INPUT_MODES}, got {self.hessian_inputs!r}")
        for name in ("nsamples", "ctx", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def bits_for(self, module_name: str) -> int:
        """Bit width of a module: the first matching ``bits_map`` entry, else ``layer.bits``."""
        for pattern, bits in self.bits_map:
            if re.search(pattern, module_name):
                return bits
        return self.layer.bits

    def is_skipped(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.skip)

    def layer_config(self, module_name: str) -> QuIPSharpConfig:
        """The per-layer config of a module (its bit width applied)."""
        bits = self.bits_for(module_name)
        return self.layer if bits == self.layer.bits else self.layer.replace(bits=bits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "layer": self.layer.to_dict(),
            "bits_map": [list(p) for p in self.bits_map],
            "skip": list(self.skip),
            "hessian_inputs": self.hessian_inputs,
            "nsamples": self.nsamples,
            "ctx": self.ctx,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "finetune": self.finetune.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelQuantConfig:
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(f"model config version {version!r} is newer than supported ({cls.VERSION})")
        layer = QuIPSharpConfig.from_dict(data.pop("layer", {}))
        finetune = FinetuneConfig.from_dict(data.pop("finetune", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")
        fields = {k: (tuple(map(tuple, v)) if k == "bits_map" else v) for k, v in data.items()}
        return cls(layer=layer, finetune=finetune, **fields)
