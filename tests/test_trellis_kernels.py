"""Native trellis decode-matvec (qs_trellis_matmul[_int8], qs_trellis_decode) against exact references,
on every ISA level this CPU has (the others skipped with the reason; NEON runs in make test-arm)."""

from __future__ import annotations

import pytest
import torch

from quipsharp import kernels
from quipsharp.codebooks import get_codebook
from quipsharp.codebooks.trellis import integer_code, states_from_words
from quipsharp.config import QuIPSharpConfig
from quipsharp.nn import QuantizedLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels not built")
X86_LEVELS = ("scalar", "avx2", "avx512", "avx512vnni")


def _level(level: str):
    if level not in kernels.supported_levels():
        pytest.skip(f"CPU lacks {level}")
    return kernels.select(level)


def _codes(m: int, n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << 15), 1 << 15, (m // 16, n // 16 * 16 * k), generator=gen, dtype=torch.int32
                         ).to(torch.int16)


def _raw_matrix(codes: torch.Tensor, m: int, n: int, k: int) -> torch.Tensor:
    """The raw 1MAD integers [m, n] (int64) from the Python decode of the same layout."""
    raw, _ = integer_code("1mad")
    states = states_from_words(codes.reshape(-1, 16 * k), k)  # [tiles, 256], column-major in the tile
    return raw.to(torch.int64)[states].reshape(m // 16, n // 16, 16, 16).permute(0, 3, 1, 2).reshape(m, n)


@pytest.mark.parametrize("k", (2, 3, 4))
def test_decode_equals_the_python_decode_of_the_layout(k: int) -> None:
    m, n = 48, 80
    codes = _codes(m, n, k, k)
    raw = kernels.select("scalar").trellis_decode(codes, m, n, k)
    assert torch.equal(raw, _raw_matrix(codes, m, n, k).to(torch.float32))
    cb = get_codebook(f"QTIP1MAD{k}")
    scaled = kernels.select("scalar").decode(codes, m, n, cb.name)
    torch.testing.assert_close(scaled, cb.decode_matrix(cb.unpack_matrix(codes, m, n), m, n), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("k", (2, 3, 4))
def test_decode_on_every_level_equals_the_layout_and_its_transpose(level: str, k: int) -> None:
    """The level's tile decoder (the prefill GEMM's weights) writes the exact integers of the layout,
    as W [m, n] and as Wᵀ [n, m]; several slabs, so the threads' split is covered too."""
    kernel = _level(level)
    m, n = 80, 112
    codes = _codes(m, n, k, 40 + k)
    raw = _raw_matrix(codes, m, n, k).to(torch.float32)
    assert torch.equal(kernel.trellis_decode(codes, m, n, k, threads=2), raw)
    out = torch.full((n, m), float("nan"))
    assert kernel.trellis_decode(codes, m, n, k, threads=2, out=out, transposed=True) is out
    assert torch.equal(out, raw.T)
    with pytest.raises(ValueError, match="out"):
        kernel.trellis_decode(codes, m, n, k, out=torch.empty(m, n), transposed=True)


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("k", (2, 3, 4))
@pytest.mark.parametrize("B", (1, 3, 9))
def test_float_matmul_is_the_same_bits_on_every_level_and_close_to_exact(level: str, k: int, B: int) -> None:
    kernel = _level(level)
    m, n = 64, 96
    codes = _codes(m, n, k, 10 * k + B)
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(B))
    got = kernel.trellis_matmul(x, codes, m, k)
    assert torch.equal(got, kernels.select("scalar").trellis_matmul(x, codes, m, k))
    exact = x.double() @ _raw_matrix(codes, m, n, k).double().T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("k", (2, 3, 4))
@pytest.mark.parametrize("B", (1, 2, 9))
@pytest.mark.parametrize("n", (160, 1072))  # 10 and 67 tiles: the VNNI step copies the tiles in chunks of 32
def test_int8_matmul_equals_exact_integer_sums(level: str, k: int, B: int, n: int) -> None:
    kernel = _level(level)
    m = 32
    codes = _codes(m, n, k, 7 * k + B)
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(100 + B)) * 3
    x[0, 5] = 200.0  # one outlier: it sets the row's scale, its int8 value is 127
    scale = x.abs().amax(dim=1) / 127  # float32, as the kernel
    xq = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int64)
    sums = xq @ _raw_matrix(codes, m, n, k).T  # exact integers
    want = sums.to(torch.float32) * scale[:, None]
    got = kernel.trellis_matmul(x, codes, m, k, int8=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("level", X86_LEVELS)
def test_int8_rows_with_nan_or_inf_give_nan_and_zero_rows_give_zero(level: str) -> None:
    kernel = _level(level)
    codes = _codes(32, 64, 2, 0)
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0
    y = kernel.trellis_matmul(x, codes, 32, 2, int8=True)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.equal(y[3], torch.zeros(32))


def test_bad_arguments_are_refused_before_c() -> None:
    kernel = kernels.select("scalar")
    codes = _codes(32, 64, 2, 0)
    with pytest.raises(ValueError, match="codes"):
        kernel.trellis_matmul(torch.randn(1, 64), codes[:, :-1], 32, 2)
    with pytest.raises(ValueError, match="not whole 16x16 tiles"):
        kernel.trellis_matmul(torch.randn(1, 64), codes, 40, 2)
    with pytest.raises(ValueError, match="int8 activations need n <= 16384"):
        kernel.trellis_matmul(torch.randn(1, 16400), _codes(16, 16400 // 16 * 16, 2, 1), 16, 2, int8=True)


@pytest.mark.parametrize("level", X86_LEVELS)
# 1, 4: int8 decoding steps; 12: the float32 slabs; 200: the decoded weight through torch's GEMM
@pytest.mark.parametrize("batch", (1, 4, 12, kernels.native.TRELLIS_SLAB_MAX_BATCH + 72))
def test_layer_on_the_native_kernel_matches_the_reference(level: str, batch: int) -> None:
    _level(level)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(128, 64, bias=True), None,
                                        QuIPSharpConfig(bits=3, codebook="qtip1mad"))
    x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(batch))
    ref = layer.reference_forward(x)
    layer.use_kernel(level)
    assert layer._native
    got = layer(x)
    # a decoding step (batch <= 8) uses int8 activations: about 1% of the output's scale
    tol = 0.02 * float(ref.abs().max()) if batch <= kernels.FUSED_MAX_BATCH else 1e-4
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    bound = layer.bind()  # a decoding loop's bound call: the forward's bits
    if batch <= kernels.FUSED_MAX_BATCH:
        assert torch.equal(bound(x, torch.empty(batch, 64)), got)


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("use_hadamard", (True, False))
@pytest.mark.parametrize("batch", (1, 3))
def test_one_call_layer_is_the_same_bits_as_its_passes_one_by_one(level: str, use_hadamard: bool, batch: int) -> None:
    """qs_trellis_linear (a decoding step's layer in one native call) against the transform, decode-matvec and
    output passes called one at a time."""
    kernel = _level(level)
    m, n, k = 48, 96, 2
    gen = torch.Generator().manual_seed(5)
    codes = _codes(m, n, k, 11)
    su, sv = torch.randint(0, 2, (n,), generator=gen) * 2.0 - 1, torch.randint(0, 2, (m,), generator=gen) * 2.0 - 1
    bias = torch.randn(m, generator=gen)
    m_in, m_out_t = torch.eye(3), torch.eye(3)  # 96 = 3 · 32, 48 = 3 · 16
    scale = float(torch.tensor(0.0123))  # the layer keeps wscale in float32
    x = torch.randn(batch, n, generator=gen)
    x_before = x.clone()
    got = kernel.linear(x, codes, su, sv, torch.tensor(scale), bias, m_in, m_out_t, "QTIP1MAD2", use_hadamard)
    assert torch.equal(x, x_before)  # the input is copied, not transformed in place
    h = x.clone()
    kernel.hadamard(h, m_in, pre=su) if use_hadamard else h.mul_(su)
    y = kernel.trellis_matmul(h, codes, m, k, int8=use_hadamard and kernel._trellis_int8(n))
    want = kernel._output(x, y, m_out_t, scale * kernels.native.trellis_scale(), sv, bias, use_hadamard)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- HYB and 3INST: decoded tile by tile
TILE_CODES = ("QTIPHYB", "QTIP3INST")


def _tile_case(family: str, k: int, m: int, n: int, seed: int
               ) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random words, a random table for HYB (not the initial one: the kernels must read the layer's own)
    and the Python decode of the pair."""
    codes = _codes(m, n, k, seed)
    cb = get_codebook(f"{family}{k}")
    lut = torch.randn(512, 2, generator=torch.Generator().manual_seed(seed + 1)) if cb.lut_shape else None
    return cb.name, codes, lut, cb.decode_matrix(cb.unpack_matrix(codes, m, n), m, n, lut)


def _native_values(name: str, W: torch.Tensor) -> torch.Tensor:
    """The native kernels' values of a decoded matrix: HYB's own, 3INST's raw float16 sums (exact)."""
    return W if "HYB" in name else (W.double() / kernels.native.tile_code_scale(name)).float()


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("family", TILE_CODES)
@pytest.mark.parametrize("k", (2, 3, 4))
def test_tile_decode_on_every_level_is_the_python_decode_and_its_transpose(level: str, family: str, k: int) -> None:
    kernel = _level(level)
    m, n = 80, 112  # 5 slabs of 7 tiles: the threads' split and a tile-row's last pairs
    name, codes, lut, W = _tile_case(family, k, m, n, 60 + k)
    raw = kernel.tile_decode(codes, m, n, name, lut, threads=2)
    if lut is None:  # 3INST: raw values (exact float16 sums) times the code's scale
        torch.testing.assert_close(kernel.decode(codes, m, n, name, threads=2), W, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(kernel.decode(codes, m, n, name, threads=2, lut=lut), W)
    torch.testing.assert_close(raw, _native_values(name, W), rtol=1e-6, atol=1e-6)
    out = torch.full((n, m), float("nan"))
    assert kernel.tile_decode(codes, m, n, name, lut, threads=2, out=out, transposed=True) is out
    assert torch.equal(out, raw.T)


def test_3inst_raw_values_equal_the_python_raw_code() -> None:
    """3INST's native raw values are the Python raw code (float16 halves summed in float32) bit for bit."""
    from quipsharp.codebooks.trellis import raw_code

    m, n, k = 32, 48, 2
    codes = _codes(m, n, k, 3)
    states = states_from_words(codes.reshape(-1, 16 * k), k)
    want = raw_code("3inst", states).reshape(m // 16, n // 16, 16, 16).permute(0, 3, 1, 2).reshape(m, n)
    for level in kernels.supported_levels():
        assert torch.equal(kernels.select(level).tile_decode(codes, m, n, "QTIP3INST2"), want), level


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("family", TILE_CODES)
@pytest.mark.parametrize("k", (2, 3, 4))
@pytest.mark.parametrize("B", (1, 3, 9))
def test_tile_matmul_is_the_same_bits_on_every_level_and_close_to_exact(level: str, family: str, k: int,
                                                                         B: int) -> None:
    kernel = _level(level)
    m, n = 64, 96
    name, codes, lut, W = _tile_case(family, k, m, n, 70 + k + B)
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(B))
    got = kernel.tile_matmul(x, codes, m, name, lut, threads=2)
    assert torch.equal(got, kernels.select("scalar").tile_matmul(x, codes, m, name, lut))
    torch.testing.assert_close(got.double(), x.double() @ _native_values(name, W).double().T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernel.matmul(x, codes, m, name, lut=lut).double(), x.double() @ W.double().T,
                               rtol=1e-5, atol=1e-4)


def test_hyb_kernels_refuse_a_missing_or_misshapen_table() -> None:
    _, codes, lut, _ = _tile_case("QTIPHYB", 2, 32, 64, 0)
    for kernel in (kernels.select("scalar"), kernels.select("reference")):
        with pytest.raises(ValueError, match="per-matrix table"):
            kernel.decode(codes, 32, 64, "QTIPHYB2")
    scalar = kernels.select("scalar")
    with pytest.raises(ValueError, match="lut must have shape"):
        scalar.tile_matmul(torch.randn(1, 64), codes, 32, "QTIPHYB2", lut[:256])
    with pytest.raises(TypeError, match=r"lut must be torch\.float32"):
        scalar.tile_matmul(torch.randn(1, 64), codes, 32, "QTIPHYB2", lut.double())
    with pytest.raises(ValueError, match="codes"):
        scalar.tile_matmul(torch.randn(1, 64), codes[:, :-1], 32, "QTIPHYB2", lut)


@pytest.mark.parametrize("level", X86_LEVELS)
@pytest.mark.parametrize("family", ("qtiphyb", "qtip3inst"))
# 1, 12: one native call (qs_trellis_tile_linear); 136: the decoded weight through torch's GEMM
@pytest.mark.parametrize("batch", (1, 12, kernels.native.TRELLIS_SLAB_MAX_BATCH + 72))
@pytest.mark.parametrize("use_hadamard", (True, False))
def test_tile_layer_on_the_native_kernel_matches_the_reference(level: str, family: str, batch: int,
                                                               use_hadamard: bool) -> None:
    """A HYB layer (with a table changed from the initial one, as fine-tuning leaves it) and a 3INST layer
    run natively, float32 throughout: the reference's output to float rounding, and its core weight."""
    _level(level)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(128, 64, bias=True), None,
                                        QuIPSharpConfig(bits=2, codebook=family, use_hadamard=use_hadamard))
    if layer.lut is not None:
        with torch.no_grad():
            layer.lut.mul_(1.5).add_(0.01)
    x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(batch))
    layer.use_kernel("reference")
    ref = layer(x)
    W_ref = layer.core_weight()
    layer.use_kernel(level)
    assert layer._native
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.core_weight(), W_ref, rtol=1e-6, atol=1e-6)
    if batch <= kernels.FUSED_MAX_BATCH:  # the decoding loop's bound call: the forward's bits
        assert torch.equal(layer.bind()(x, torch.empty(batch, 64)), layer(x))
