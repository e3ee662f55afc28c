"""``QuantizedLinear``: a drop-in ``nn.Linear`` replacement holding a QuIP# weight.

The module is built from its shape and config alone (so it can be created on the ``meta`` device
and filled from a state dict); every piece of state is a registered buffer with a stable name; and
``forward`` is pure. It computes (DESIGN.md §1, step 4)::

    y = S_V Vᵀ (Wscale · decode(codes)) U S_U x + bias

applying the Hadamard transforms to the activations, never materialising them.

Buffers (the file format of one layer):
    codes      uint8   [out_features, in_features // 8 * code_bytes]  packed codes (little-endian), or
               int16   [out_features/16, in_features/16 * 16·bits] tile bitstreams (trellis codebooks)
    su         float32 [in_features]   input sign vector S_U
    sv         float32 [out_features]  output sign vector S_V
    wscale     float32 []              Wscale
    codebook_id int64  []              registry id of the codebook
    bias       float32 [out_features]  (only when bias=True)
    lut        float32 [512, 2]        the per-matrix code table (only for the trellis HYB code)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quipsharp import kernels
from quipsharp.codebooks import codebook_id, get_codebook
from quipsharp.config import QuIPSharpConfig
from quipsharp.errors import ExportError
from quipsharp.hadamard import factor_dim, hadamard_transform, orthonormal_factor
from quipsharp.quantize import QuantizedWeight, dequantize, quantize_weight


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as QuIP# codes.

    Args:
        in_features: n, a multiple of 8 (of 16 for a trellis codebook).
        out_features: m (a multiple of 16 for a trellis codebook).
        config: quantization settings (selects the codebook and whether the RHT is used).
        bias: whether the layer has a bias.
        device: where to allocate the (empty) buffers, e.g. ``"meta"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: QuIPSharpConfig | None = None,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config or QuIPSharpConfig()
        self.codebook = get_codebook(self.config.codebook_name)
        problem = self.codebook.shape_problem(out_features, in_features)
        if problem:
            raise ValueError(f"QuantizedLinear({in_features}, {out_features}): {problem}")
        self.in_features = in_features
        self.out_features = out_features
        codes_dtype, codes_shape = self.codebook.packed_spec(out_features, in_features)
        self.register_buffer("codes", torch.zeros(codes_shape, dtype=codes_dtype, device=device))
        self.register_buffer("su", torch.ones(in_features, device=device))
        self.register_buffer("sv", torch.ones(out_features, device=device))
        # NaN until quantized or loaded, so an unfilled layer can never pass for a real one.
        self.register_buffer("wscale", torch.full((), math.nan, device=device))
        self.register_buffer(
            "codebook_id", torch.tensor(codebook_id(self.codebook.name), dtype=torch.int64, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        if self.codebook.lut_shape:  # the per-matrix table of the trellis HYB code (NaN until filled)
            self.register_buffer("lut", torch.full(self.codebook.lut_shape, math.nan, device=device))
        else:
            self.lut = None
        # codes of another codebook must never be decoded with this one: checked on every load
        self.register_load_state_dict_post_hook(lambda module, _keys: module._check_loaded_codebook())
        # The CPU kernel serving inference (kernels.select; the reference for codebooks without a
        # native kernel), chosen here, never inside forward; use_kernel() changes it.
        self._kernel: kernels.Kernel = kernels.select(kernels.REFERENCE)
        self._m_in = self._m_out_t = _NO_FACTOR
        self.use_kernel(None)
        # Fine-tuning caches, built by enable_training(), never by forward: the frozen part of the weight,
        # or (a layer with a trainable table) its frozen trellis states.
        self._core: torch.Tensor | None = None
        self._states: torch.Tensor | None = None

    @property
    def _native(self) -> bool:
        """Whether a native kernel serves this layer's CPU inference."""
        return self._kernel.native

    def use_kernel(self, level: str | None) -> None:
        """Serve CPU inference with :func:`quipsharp.kernels.select` ``(level)`` (None: the default;
        ``"reference"``: the torch path). Codebooks without a native kernel always use the reference."""
        native = self.codebook.name in kernels.NATIVE_CODEBOOKS
        kernel = kernels.select(level) if native else kernels.select(kernels.REFERENCE)
        if kernel.native and self.config.use_hadamard:
            # Hadamard factors for the native kernel (constants of the shape, not state: built here,
            # never inside forward, and not saved)
            self._m_in = _kernel_factor(self.in_features, transpose=False)
            self._m_out_t = _kernel_factor(self.out_features, transpose=True)
        self._kernel = kernel

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(dtype)``/``.half()`` move the layer but keep its float32 state (signs, scale, bias)
        exact: a ``model.to(torch.bfloat16)`` casts embeddings and norms, not the quantized layers."""
        keep = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        H: torch.Tensor | None = None,
        config: QuIPSharpConfig | None = None,
        seed: int | None = None,
    ) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (weight ``[m, n]``) with Hessian ``H`` ``[n, n]`` or data-free."""
        layer = cls(
            linear.in_features, linear.out_features, config, bias=linear.bias is not None,
            device=linear.weight.device,
        )
        layer.quantize_weight(linear.weight, H, seed=seed)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    @torch.no_grad()
    def quantize_weight(
        self, W: torch.Tensor, H: torch.Tensor | None = None, seed: int | None = None
    ) -> QuantizedWeight:
        """Quantize ``W`` ``[out_features, in_features]`` into this layer's buffers; returns the result."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(W.shape)} does not match layer ({self.out_features}, {self.in_features})"
            )
        qw = quantize_weight(W, H, self.config, seed=seed)
        self.load_quantized_weight(qw)
        return qw

    @torch.no_grad()
    def load_quantized_weight(self, qw: QuantizedWeight) -> None:
        """Copy a :class:`QuantizedWeight` into the buffers."""
        if qw.codebook != self.codebook.name or qw.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight ({qw.codebook}, {qw.shape}) does not fit layer "
                f"({self.codebook.name}, {(self.out_features, self.in_features)})"
            )
        self.codes.copy_(self.codebook.pack_matrix(qw.codes))
        self.su.copy_(qw.su)
        self.sv.copy_(qw.sv)
        self.wscale.fill_(qw.scale)
        if self.lut is not None:
            if qw.lut is None or tuple(qw.lut.shape) != tuple(self.lut.shape):
                raise ValueError(f"{self.codebook.name} needs its table {list(self.lut.shape)} with the weight")
            self.lut.copy_(qw.lut)

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's state as a :class:`QuantizedWeight` (proxy loss and damping unknown: NaN)."""
        return QuantizedWeight(
            codes=self.codebook.unpack_matrix(self.codes, self.out_features, self.in_features),
            su=self.su,
            sv=self.sv,
            scale=float(self.wscale),
            codebook=self.codebook.name,
            use_hadamard=self.config.use_hadamard,
            proxy_loss=math.nan,
            damping=math.nan,
            lut=self.lut,
        )

    def dequantize(self) -> torch.Tensor:
        """The effective weight ``[out_features, in_features]`` float32 (for tests and export)."""
        return dequantize(self.quantized_weight())

    # ------------------------------------------------------------------ fine-tuning
    @torch.no_grad()
    def enable_training(self) -> None:
        """Make the continuous state trainable, codes frozen (QuIP# §5, DESIGN.md §5).

        Decodes the frozen core ``C = Vᵀ decode(codes) U`` ``[out_features, in_features]`` float32
        once, so that the forward becomes the differentiable dense product
        ``y = x (wscale · S_V C S_U)ᵀ + bias`` with ``S_U``, ``S_V`` real-valued: gradients reach
        ``su``, ``sv``, ``bias`` and the input, never the codes (``wscale`` stays fixed: a real-valued
        ``S_V`` already scales every row). The same function as the
        inference paths up to float rounding. Undo with :meth:`disable_training`.
        """
        qw = self.quantized_weight()
        if self.lut is not None:  # the weight depends on the trainable table: keep the frozen states instead
            self._states = self.codebook.matrix_states(qw.codes)
            self.lut.requires_grad_(True)
        else:
            ones_in = torch.ones_like(self.su)
            ones_out = torch.ones_like(self.sv)
            core = QuantizedWeight(qw.codes, ones_in, ones_out, 1.0, qw.codebook, qw.use_hadamard, math.nan,
                                   math.nan)
            self._core = dequantize(core).to(self.su.device)
        for name in TRAINABLE_BUFFERS:
            buf = getattr(self, name)
            if buf is not None:
                buf.requires_grad_(True)

    def disable_training(self) -> None:
        """Drop the training cache and freeze the state again (inference uses the native kernel)."""
        self._core = None
        self._states = None
        for name in (*TRAINABLE_BUFFERS, "lut"):
            buf = getattr(self, name)
            if buf is not None:
                buf.requires_grad_(False)

    def trainable_state(self) -> list[torch.Tensor]:
        """The tensors :meth:`enable_training` makes trainable (all at the sign vectors' rate): ``su``,
        ``sv`` (and ``bias``, and the trellis HYB code's table ``lut``)."""
        return [getattr(self, n) for n in (*TRAINABLE_BUFFERS, "lut") if getattr(self, n) is not None]

    # ------------------------------------------------------------------ inference
    def _check_loaded_codebook(self) -> None:
        if int(self.codebook_id) != codebook_id(self.codebook.name):
            raise ValueError(
                f"layer holds codes of codebook id {int(self.codebook_id)} but its config selects "
                f"{self.codebook.name} (id {codebook_id(self.codebook.name)})"
            )

    def _use_native(self, x: torch.Tensor) -> bool:
        """The native CPU kernel serves CPU tensors while the layer's own state is frozen (inference,
        and adapters trained around the layer: :class:`_FrozenLayerLinear` gives ``x`` its gradient);
        training the layer's state uses the reference path."""
        if not self._native or x.device.type != "cpu" or self.codes.device.type != "cpu":
            return False
        state = (self.su, self.sv, self.wscale, self.bias)
        if torch.is_grad_enabled() and any(b is not None and b.requires_grad for b in state):
            return False
        return not (torch.is_grad_enabled() and x.requires_grad and torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype.

        On CPU the layer's kernel (:meth:`use_kernel`; by default ``quipsharp.kernels.select()``)
        runs when it is native; the torch reference below runs otherwise
        (``use_kernel("reference")`` or ``QUIPSHARP_KERNEL=reference`` forces it).
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dim {self.in_features}, got {tuple(x.shape)}")
        if torch.onnx.is_in_onnx_export():  # a traced graph would hold the kernel's output as a constant
            raise ExportError(ONNX_EXPORT_MESSAGE)
        if self._states is not None:  # fine-tuning a layer with a trainable table: the reference path
            return self.reference_forward(x)
        if self._core is not None:  # fine-tuning (enable_training): scales applied to activations,
            # so the backward pass keeps activation-sized tensors, not extra [m, n] copies
            y = F.linear(x.to(torch.float32) * self.su, self._core) * (self.wscale * self.sv)
            return (y if self.bias is None else y + self.bias).to(x.dtype)
        if self._use_native(x):
            if torch.is_grad_enabled() and x.requires_grad:  # e.g. LoRA adapters in earlier layers
                return _FrozenLayerLinear.apply(x, self)
            return self._native_forward(x)
        if not torch.compiler.is_compiling():  # data-dependent checks: eager mode only
            self._check_loaded_codebook()
            if torch.isnan(self.wscale):
                raise RuntimeError(kernels.UNFILLED_MESSAGE)
        return self.reference_forward(x)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (peft looks for a quantized layer's storage, e.g. its device, under this name)."""
        return self.codes

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.codes, self.su, self.sv, self.wscale, self.bias, self._m_in, self._m_out_t,
                self.codebook.name, self.config.use_hadamard)
        if torch.compiler.is_compiling():
            return torch.ops.quipsharp.e8p_linear(*args, self._kernel.name, self.lut)
        return self._kernel.linear(*args, self.lut)  # same code without the dispatcher's per-call cost

    def core_weight(self) -> torch.Tensor:
        """The decoded codes ``Ŵ`` ``[out_features, in_features]`` float32, before scale, signs and
        Hadamard transforms (the native decode where the layer has one)."""
        m, n = self.out_features, self.in_features
        if self._native and self.codebook.name in kernels.NATIVE_CODEBOOKS and self.codes.device.type == "cpu":
            return self._kernel.decode(self.codes, m, n, self.codebook.name, lut=self.lut)
        return self.codebook.decode_matrix(self.codebook.unpack_matrix(self.codes, m, n), m, n, self.lut)

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """The gradient to the input of this (frozen) layer: the transpose of :meth:`reference_forward`'s
        map, ``g ↦ S_U Uᵀ (s·Ŵᵀ) V S_V g`` for ``g`` ``[..., out_features]`` -> ``[..., in_features]``
        float32 (QuIP# §3's ``W = V Ŵ Uᵀ`` read backwards; each Hadamard transform's adjoint is its
        transpose)."""
        g = grad_y.to(torch.float32) * self.sv
        if self.config.use_hadamard:
            g = hadamard_transform(g)  # the adjoint of the forward's transpose=True
        g = (g @ self.core_weight()) * self.wscale
        if self.config.use_hadamard:
            g = hadamard_transform(g, transpose=True)
        return g * self.su

    def bind(self, threads: int | None = None) -> kernels.BoundLinear | None:
        """This layer's native call with its state checked once (for decoding loops), or None when
        the native kernel does not serve it (not built, not selected, not on CPU, in training)."""
        if not self._native or self._core is not None or self._states is not None or self.codes.device.type != "cpu":
            return None
        if self.codebook.name not in kernels.NATIVE_CODEBOOKS:
            return None
        return kernels.BoundLinear(self.codes, self.su, self.sv, self.wscale, self.bias, self._m_in, self._m_out_t,
                                   self.codebook.name, self.config.use_hadamard, threads, level=self._kernel.name,
                                   lut=self.lut)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch path (any device, differentiable in ``x``, ``su``, ``sv``, ``wscale``, ``bias``
        and a HYB table ``lut``)."""
        m, n = self.out_features, self.in_features
        if self._states is not None:
            W = self.codebook.matrix_from_states(self._states, m, n, self.lut)
        else:
            W = self.codebook.decode_matrix(self.codebook.unpack_matrix(self.codes, m, n), m, n, self.lut)
        W = W.to(self.su.device)
        h = x.to(torch.float32) * self.su
        if self.config.use_hadamard:
            h = hadamard_transform(h)
        y = (h @ W.T) * self.wscale
        if self.config.use_hadamard:
            y = hadamard_transform(y, transpose=True)
        y = y * self.sv
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"codebook={self.codebook.name}, hadamard={self.config.use_hadamard}, bias={self.bias is not None}"
        )


class _FrozenLayerLinear(torch.autograd.Function):
    """A frozen :class:`QuantizedLinear` on the native kernel with a gradient to its input (adapters
    such as LoRA trained around quantized layers): forward is the kernel's output, backward
    :meth:`QuantizedLinear.input_grad` (a decode of the codes and one matrix product)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.dtype = x.dtype
        return layer._native_forward(x)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.layer.input_grad(grad_y).to(ctx.dtype), None


#: Why torch.onnx.export refuses a model with quantized layers, and what to do instead.
ONNX_EXPORT_MESSAGE = (
    "quipsharp's quantized layers have no ONNX form (their decode runs in quipsharp's kernels; traced, "
    "the graph would hold one input's outputs as constants). Export quipsharp.export.dense_copy(model) "
    "instead: the same function with float weights (the file is float-sized), or use torch.export, which "
    "keeps the quipsharp custom op")
_NO_FACTOR = torch.ones(1, 1)
# The continuous state fine-tuning trains (the codes stay frozen).
TRAINABLE_BUFFERS = ("su", "sv", "bias")  # wscale stays: a real-valued S_V already scales every row


@functools.cache
def _kernel_factor(dim: int, transpose: bool) -> torch.Tensor:
    """The ``[K, K]`` float32 factor of ``dim``'s Hadamard transform as the C kernel wants it
    (read-only, shared by every layer of that size)."""
    K, _, kind = factor_dim(dim)
    M = orthonormal_factor(K, kind).to(torch.float32)
    return (M.T if transpose else M).contiguous()


# The seed API's name for the same layer.
QuIPSharpLinear = QuantizedLinear
