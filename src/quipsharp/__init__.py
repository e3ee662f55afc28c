"""quipsharp: QuIP# quantization of large language models to 2, 3 and 4 bits per weight.

Paper: Tseng, Chee, Sun, Kuleshov, De Sa, "QuIP#: Even Better LLM Quantization with Hadamard
Incoherence and Lattice Codebooks", ICML 2024.

Importing the package needs only torch, numpy and safetensors; the Hugging Face integration
(:func:`load_quantized`, :func:`save_quantized`) imports transformers when called. Importing it also
makes ``transformers.AutoModelForCausalLM.from_pretrained`` load quipsharp directories: the quantizer is
registered with transformers as soon as transformers loads its quantizer registry
(:mod:`quipsharp.hf_quantizer`).
"""

from quipsharp.codebooks import E8P12, E8P12RVQ3B, E8P12RVQ4B, E8Lattice, get_codebook
from quipsharp.config import FinetuneConfig, ModelQuantConfig, QuIPSharpConfig
from quipsharp.errors import HessianNotPositiveDefiniteError, NumericalError, QuipSharpError
from quipsharp.finetune import TeacherTargets, finetune_block, finetune_model, teacher_targets
from quipsharp.hadamard import HadamardTransform
from quipsharp.hessian import HessianAccumulator
from quipsharp.hf import load_model, load_quantized, save_quantized
from quipsharp.hf_quantizer import register_when_transformers_loads, register_with_transformers
from quipsharp.nn import QuantizedLinear, QuIPSharpLinear
from quipsharp.pipeline import QuIPSharpQuantizer, quantize_model
from quipsharp.quantize import QuantizedWeight, dequantize, quantize_weight

__version__ = "0.1.0"

register_when_transformers_loads()

__all__ = [
    "E8P12",
    "E8P12RVQ3B",
    "E8P12RVQ4B",
    "E8Lattice",
    "FinetuneConfig",
    "HadamardTransform",
    "HessianAccumulator",
    "HessianNotPositiveDefiniteError",
    "ModelQuantConfig",
    "NumericalError",
    "QuIPSharpConfig",
    "QuIPSharpLinear",
    "QuIPSharpQuantizer",
    "QuantizedLinear",
    "QuantizedWeight",
    "QuipSharpError",
    "TeacherTargets",
    "__version__",
    "dequantize",
    "finetune_block",
    "finetune_model",
    "get_codebook",
    "load_model",
    "load_quantized",
    "quantize_model",
    "quantize_weight",
    "register_with_transformers",
    "save_quantized",
    "teacher_targets",
]
