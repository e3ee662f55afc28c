"""Native CPU kernels against the torch reference (exact for decode, tolerances for matmul)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import zlib

import pytest
import torch

from quipsharp import kernels
from quipsharp.codebooks import get_codebook
from quipsharp.config import QuIPSharpConfig
from quipsharp.hadamard import factor_dim, hadamard_transform, orthonormal_factor
from quipsharp.kernels import native as native_mod
from quipsharp.nn import QuantizedLinear

CODEBOOKS = ["E8P12", "E8P12RVQ3B", "E8P12RVQ4B"]
#: Every native level the library knows; each test runs on those this CPU has and skips the others.
ALL_LEVELS = list(kernels.LEVELS)
#: Relative error of the int8-activation path against float on Gaussian activations (measured ≈ 0.7%).
INT8_REL_TOL = 0.03
#: Sizes the model walker meets (K·2^k with K from Paley / Kronecker constructions, and powers of two).
HADAMARD_SIZES = [8, 192, 576, 1536, 2048, 4096, 11008, 1280, 960, 3072]

native = pytest.mark.skipif(not kernels.supported_levels(), reason="native kernels not built")


def level_kernel(level: str) -> kernels.Kernel:
    """The kernel of ``level``, or skip the test on a CPU without it."""
    if level not in kernels.supported_levels():
        pytest.skip(f"CPU lacks {level}")
    return kernels.select(level)


def random_codes(name: str, m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cb = get_codebook(name)
    codes = torch.randint(0, cb.num_codes, (m, n // 8), generator=gen)
    return codes, cb.pack(codes)


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", [*ALL_LEVELS, kernels.REFERENCE])
def test_decode_is_bitwise_reference(name, level, gen):
    kernel = kernels.select(level) if level == kernels.REFERENCE else level_kernel(level)
    m, n = 29, 136
    codes, packed = random_codes(name, m, n, gen)
    ref = get_codebook(name).decode(codes).reshape(m, n)
    assert torch.equal(kernel.decode(packed, m, n, name), ref)


@native
def test_decode_covers_every_code():
    # all 65,536 stage-1 codes, each once
    cb = get_codebook("E8P12")
    codes = torch.arange(cb.num_codes).reshape(256, 256)
    assert torch.equal(kernels.decode(cb.pack(codes), 256, 2048, "E8P12"), cb.decode(codes).reshape(256, 2048))


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("batch", [1, 2, 7, 8, 9, 33])
@pytest.mark.parametrize(("m", "n"), [(1, 8), (13, 72), (67, 200)])
def test_float_matmul_matches_reference(name, level, batch, m, n, gen):
    kernel = level_kernel(level)
    codes, packed = random_codes(name, m, n, gen)
    W = get_codebook(name).decode(codes).reshape(m, n)
    x = torch.randn(batch, n, generator=gen)
    torch.testing.assert_close(kernel.matmul(x, packed, m, name, allow_int8=False), x @ W.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 16, 33])
@pytest.mark.parametrize(("m", "n"), [(5, 8), (31, 136), (64, 576), (40, 1032), (37, 4360)])
def test_int8_path_equals_its_scalar_reference(name, level, batch, m, n, gen):
    kernel = level_kernel(level)
    if not kernel.int8_activations:
        pytest.skip(f"{level} has no int8 kernel")
    codes, packed = random_codes(name, m, n, gen)
    x = torch.randn(batch, n, generator=gen)
    got = kernel.matmul(x, packed, m, name)
    assert torch.equal(got, kernels.matmul(x, packed, m, name, int8_reference=True))
    exact = x @ get_codebook(name).decode(codes).reshape(m, n).T
    assert float((got - exact).norm() / exact.norm()) < INT8_REL_TOL


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prefill_never_decodes_the_float_weight(level, bits, gen, monkeypatch):
    # a batch above FUSED_MAX_BATCH behind the Hadamard transform: int8 GEMM tiles in C, one call
    kernel = level_kernel(level)
    q = QuantizedLinear(576, 192, QuIPSharpConfig(bits=bits), bias=True)
    q.load_state_dict(_quantized_state(bits, 576, 192))
    q.use_kernel(level)

    def no_decode(*args, **kwargs):
        raise AssertionError("prefill decoded the float32 weight")

    monkeypatch.setattr(kernels.NativeKernel, "decode", no_decode)
    x = torch.randn(64, 576, generator=gen)
    with torch.no_grad():
        got = q(x)
    ref = q.reference_forward(x)
    assert kernel.int8_activations
    assert float((got - ref).norm() / ref.norm()) < INT8_REL_TOL
    # per-row (per-token) scales: each row is what it would be alone in a decoding step
    with torch.no_grad():
        assert torch.equal(got[5:6], q(x[5:6]))


@native
@pytest.mark.parametrize("name", CODEBOOKS)
def test_int8_reference_is_close_to_float(name, gen):
    m, n = 40, 256
    codes, packed = random_codes(name, m, n, gen)
    x = torch.randn(4, n, generator=gen)
    exact = x @ get_codebook(name).decode(codes).reshape(m, n).T
    got = kernels.matmul(x, packed, m, name, int8_reference=True)
    assert float((got - exact).norm() / exact.norm()) < INT8_REL_TOL
    # zero activations give exact zeros (no division by a zero scale)
    assert torch.equal(kernels.matmul(torch.zeros(1, n), packed, m, name, int8_reference=True), torch.zeros(1, m))


@native
@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("allow_int8", [False, True])
def test_levels_agree_and_threads_do_not_change_results(name, allow_int8, gen):
    m, n = 1100, 576  # 79,200 codewords: above the kernels' threshold for going parallel
    _, packed = random_codes(name, m, n, gen)
    outs = {}
    for batch in (3, 20):
        x = torch.randn(batch, n, generator=gen)
        int8_ref = kernels.matmul(x, packed, m, name, int8_reference=True)
        for level in kernels.supported_levels():
            kernel = kernels.select(level)
            one = kernel.matmul(x, packed, m, name, threads=1, allow_int8=allow_int8)
            assert torch.equal(one, kernel.matmul(x, packed, m, name, threads=2, allow_int8=allow_int8))
            assert torch.equal(one, kernel.matmul(x, packed, m, name, threads=3, allow_int8=allow_int8))
            if allow_int8 and kernel.int8_activations:  # integer sums: every int8 level gives the reference's bits
                assert torch.equal(one, int8_ref), level
            else:
                outs.setdefault(batch, one)
                torch.testing.assert_close(one, outs[batch], rtol=1e-5, atol=1e-4, msg=level)


@pytest.mark.parametrize("level", [*ALL_LEVELS, kernels.REFERENCE])
@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard_matches_torch(n, level, gen):
    kernel = kernels.select(level) if level == kernels.REFERENCE else level_kernel(level)
    K, _, kind = factor_dim(n)
    M = orthonormal_factor(K, kind).to(torch.float32)
    x = torch.randn(3, n, generator=gen)
    pre, post = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    got = kernel.hadamard(x.clone(), M.contiguous(), pre=pre)
    torch.testing.assert_close(got, hadamard_transform(x * pre), rtol=1e-5, atol=1e-5)
    got_t = kernel.hadamard(x.clone(), M.T.contiguous(), post=post, alpha=0.5)
    torch.testing.assert_close(got_t, hadamard_transform(x, transpose=True) * 0.5 * post, rtol=1e-5, atol=1e-5)


@native
def test_bad_inputs_raise_clear_errors(gen):
    m, n = 8, 64
    _, packed = random_codes("E8P12", m, n, gen)
    x = torch.randn(2, n)
    with pytest.raises(TypeError, match=r"x must be torch\.float32"):
        kernels.matmul(x.double(), packed, m, "E8P12")
    with pytest.raises(ValueError, match="x must be contiguous"):
        kernels.matmul(torch.randn(n, 2).T, packed, m, "E8P12")
    with pytest.raises(ValueError, match="codes must have shape"):
        kernels.matmul(x, packed[:, :-2], m, "E8P12")
    with pytest.raises(ValueError, match="codes must have shape"):
        kernels.matmul(x, packed, m + 1, "E8P12")
    with pytest.raises(TypeError, match=r"codes must be torch\.uint8"):
        kernels.decode(packed.to(torch.int16), m, n, "E8P12")
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.decode(packed, m, 60, "E8P12")
    with pytest.raises(ValueError, match="no native kernel"):
        kernels.matmul(x, packed, m, "E8")
    with pytest.raises(ValueError, match="does not split"):
        kernels.hadamard(torch.randn(2, 24), torch.eye(5))


@functools.cache
def _quantized_state(bits: int, n: int, m: int) -> dict[str, torch.Tensor]:
    """A quantized layer's state, built once per shape (quantizing costs seconds)."""
    lin = torch.nn.Linear(n, m, bias=True)
    return QuantizedLinear.from_linear(lin, None, QuIPSharpConfig(bits=bits), seed=3).state_dict()


@pytest.mark.parametrize("level", [*ALL_LEVELS, kernels.REFERENCE])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("batch", [1, 5, 20])
def test_module_forward_on_each_level_matches_reference(level, bits, batch, gen):
    if level != kernels.REFERENCE:
        level_kernel(level)
    n, m = 576, 192
    q = QuantizedLinear(n, m, QuIPSharpConfig(bits=bits), bias=True)
    q.load_state_dict(_quantized_state(bits, n, m))
    q.use_kernel(level)
    assert q._kernel.name == level
    x = torch.randn(batch, n, generator=gen)
    ref = q.reference_forward(x)
    with torch.no_grad():
        got = q(x)
    tol = INT8_REL_TOL if q._kernel.int8_activations else 1e-5  # int8 activations at every batch size
    assert float((got - ref).norm() / ref.norm()) < tol
    # the same layer through the kernel signature directly
    torch.testing.assert_close(kernels.linear(x, q.codes, q.su, q.sv, q.wscale, q.bias, q._m_in, q._m_out_t,
                                              q.codebook.name, True, level=level) if q._native else ref, got,
                               rtol=0, atol=0)
    # bf16 activations come back as bf16
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_module_training_uses_the_differentiable_reference(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    x = torch.randn(2, 64, generator=gen, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_custom_op_traces_with_fake_tensors(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), None, QuIPSharpConfig(bits=2), seed=0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = torch.ops.quipsharp.e8p_linear(
            torch.empty(3, 5, 64), q.codes, q.su, q.sv, q.wscale, None, q._m_in, q._m_out_t, "E8P12", True,
            q._kernel.name,
        )
        assert out.shape == (3, 5, 24)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (kernels.ENV_KERNEL, kernels.ENV_CPU_CAP)}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          check=False)


def test_env_overrides_the_default_choice():
    code = "from quipsharp import kernels; print(kernels.selected())"
    out = _run(code, **{kernels.ENV_KERNEL: "reference"})
    assert out.returncode == 0 and out.stdout.strip() == "reference"
    bad = _run(code, **{kernels.ENV_KERNEL: "sse9"})
    assert bad.returncode != 0 and "QUIPSHARP_KERNEL='sse9'" in bad.stderr


@native
def test_a_level_the_cpu_lacks_falls_back_with_a_warning():
    # a CPU capped to scalar does not have avx512vnni / neon_dotprod: the default falls back, with a warning
    wanted = "neon_dotprod" if "avx2" in kernels.supported_levels() else "avx512vnni"
    code = ("import logging; logging.basicConfig(level=logging.INFO); from quipsharp import kernels; "
            "print(kernels.selected(), kernels.supported_levels())")
    out = _run(code, **{kernels.ENV_KERNEL: wanted, kernels.ENV_CPU_CAP: "scalar"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "scalar"
    assert f"QUIPSHARP_KERNEL={wanted}: this CPU lacks it" in out.stderr
    assert out.stderr.count("quipsharp CPU kernel: scalar") == 1  # logged once


@native
def test_explicit_unsupported_levels_are_refused_not_executed(gen, monkeypatch):
    missing = [lvl for lvl in kernels.LEVELS if lvl not in kernels.supported_levels()]
    assert missing  # x86 CPUs lack the NEON levels and ARM ones the x86 levels
    for level in missing:
        with pytest.raises(kernels.UnsupportedLevelError, match=level):
            kernels.select(level)
    # the C library itself refuses a level the CPU lacks (no illegal instruction even if Python is bypassed)
    _, packed = random_codes("E8P12", 8, 64, gen)
    lacking = next(lvl for lvl in kernels.LEVELS if lvl not in native_mod.cpu_levels())
    with pytest.raises(kernels.UnsupportedLevelError):
        kernels.NativeKernel(lacking).matmul(torch.randn(1, 64), packed, 8, "E8P12")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.select("sse9")


@native
def test_layers_hold_their_own_kernel_and_threads_do_not_interfere(gen):
    levels = kernels.supported_levels()
    layers = []
    for i, level in enumerate(levels):
        q = QuantizedLinear.from_linear(torch.nn.Linear(576, 96), None, QuIPSharpConfig(bits=2), seed=i)
        q.use_kernel(level)
        layers.append(q)
    assert [q._kernel.name for q in layers] == levels
    x = torch.randn(3, 576, generator=gen)
    with torch.no_grad():
        expected = [q(x) for q in layers]
        results: dict[int, list[torch.Tensor]] = {}

        def work(i: int) -> None:
            results[i] = [layers[i](x) for _ in range(20)]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(layers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, outs in results.items():
        assert all(torch.equal(o, expected[i]) for o in outs), levels[i]


def test_module_compiles_without_graph_breaks(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), None, QuIPSharpConfig(bits=3), seed=0)
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)


def test_casting_a_model_keeps_quantized_state_float32(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24, bias=True), None, QuIPSharpConfig(bits=2), seed=0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(64), q)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    x = torch.randn(3, 64, generator=gen).bfloat16()
    assert model(x).dtype == torch.bfloat16


def _clear_selection_caches() -> None:
    native_mod.lib.cache_clear()
    kernels._supported_levels.cache_clear()
    kernels.default_level.cache_clear()


def test_without_the_library_everything_falls_back(monkeypatch, caplog, gen):
    monkeypatch.setattr(native_mod, "library_path", lambda: None)
    _clear_selection_caches()
    try:
        with caplog.at_level("INFO", logger="quipsharp.kernels"):
            assert kernels.selected() == "reference"
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "not built" in warnings[0].getMessage()
        assert "kernel: reference" in caplog.text
        assert kernels.supported_levels() == []
        q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
        assert not q._native and q.bind() is None
        x = torch.randn(2, 64)
        torch.testing.assert_close(q(x), q.reference_forward(x), rtol=0, atol=0)
        # the module functions run the pure-torch kernel
        torch.testing.assert_close(kernels.decode(q.codes, 16, 64, "E8P12"), q.codebook.decode(
            q.codebook.unpack(q.codes)).reshape(16, 64), rtol=0, atol=0)
        with pytest.raises(kernels.UnsupportedLevelError, match="not built"):
            kernels.select("scalar")
    finally:
        monkeypatch.undo()
        _clear_selection_caches()
    assert kernels.selected() != "reference" or not kernels.supported_levels()


def test_reference_kernel_linear_equals_the_module_reference(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(192, 40, bias=True), None, QuIPSharpConfig(bits=4), seed=0)
    ref = kernels.select(kernels.REFERENCE)
    m_in = orthonormal_factor(*factor_dim(192)[::2]).to(torch.float32)
    m_out_t = orthonormal_factor(*factor_dim(40)[::2]).to(torch.float32).T.contiguous()
    x = torch.randn(3, 192, generator=gen)
    got = ref.linear(x, q.codes, q.su, q.sv, q.wscale, q.bias, m_in, m_out_t, q.codebook.name, True)
    torch.testing.assert_close(got, q.reference_forward(x), rtol=1e-5, atol=1e-5)


@native
def test_int8_activations_only_after_the_hadamard_transform(gen):
    # without the RHT, activations keep their outlier channels: the layer must stay in float32
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2, use_hadamard=False), seed=0)
    x = torch.randn(1, 64, generator=gen)
    x[0, 5] = 100.0
    for level in kernels.supported_levels():
        q.use_kernel(level)
        with torch.no_grad():
            torch.testing.assert_close(q(x), q.reference_forward(x), rtol=1e-5, atol=1e-4, msg=level)


@pytest.mark.parametrize("level", [*ALL_LEVELS, "int8_reference"])
@pytest.mark.parametrize("allow_int8", [False, True])
@pytest.mark.parametrize("batch", [2, 12])
def test_non_finite_activations_give_nan_not_garbage(level, allow_int8, batch, gen):
    _, packed = random_codes("E8P12", 8, 64, gen)
    x = torch.randn(batch, 64, generator=gen)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[batch - 1, 0] = float("-inf")
    if level == "int8_reference":
        out = kernels.matmul(x, packed, 8, "E8P12", int8_reference=True)
    else:
        out = level_kernel(level).matmul(x, packed, 8, "E8P12", allow_int8=allow_int8)
    assert torch.isnan(out[[0, 1, batch - 1]]).all()
    assert torch.isfinite(out[2: batch - 1]).all()


@native
def test_empty_inputs_give_empty_outputs(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    assert q(torch.empty(0, 64)).shape == (0, 16)
    assert q(torch.empty(2, 0, 64)).shape == (2, 0, 16)
    assert kernels.matmul(torch.empty(0, 64), q.codes, 16, "E8P12").shape == (0, 16)


@native
def test_layer_state_on_another_device_is_refused(gen):
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), None, QuIPSharpConfig(bits=2), seed=0)
    args = [torch.randn(1, 64), q.codes, q.su, q.sv, q.wscale, None, q._m_in, q._m_out_t, "E8P12", True]
    args[2] = q.su.to("meta")
    with pytest.raises(ValueError, match="su must be on the CPU"):
        kernels.linear(*args)


FUZZ_CASES = 24  # seeded random shapes per codebook and level


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("level", ALL_LEVELS)
def test_kernel_fuzz_random_codes_shapes_batches_and_threads(name, level):
    """Seeded fuzz (issue 13 item 7): random packed bytes (any byte pattern is a code), odd shapes,
    batches 1-40 and 1-2 threads; integer sums bitwise equal to the int8 reference, float mode close to
    the exact decode, outputs finite."""
    kernel = level_kernel(level)
    rng = torch.Generator().manual_seed(zlib.crc32(f"{name}/{level}".encode()))  # (str hash() is salted)
    code_bytes = get_codebook(name).code_bytes
    for case in range(FUZZ_CASES):
        m = int(torch.randint(1, 97, (), generator=rng))
        n = 8 * int(torch.randint(1, 160, (), generator=rng))
        batch = int(torch.randint(1, 41, (), generator=rng))
        threads = 1 + case % 2
        packed = torch.randint(0, 256, (m, n // 8 * code_bytes), dtype=torch.uint8, generator=rng)
        x = torch.randn(batch, n, generator=rng) * float(torch.rand((), generator=rng) * 10 + 1e-3)
        exact = x @ kernels.select(kernels.REFERENCE).decode(packed, m, n, name).T
        floats = kernel.matmul(x, packed, m, name, threads=threads, allow_int8=False)
        assert torch.isfinite(floats).all(), (case, m, n, batch)
        torch.testing.assert_close(floats, exact, rtol=1e-4, atol=1e-3 * float(exact.abs().max()) + 1e-5)
        if kernel.int8_activations:
            got = kernel.matmul(x, packed, m, name, threads=threads)
            assert torch.equal(got, kernels.matmul(x, packed, m, name, int8_reference=True)), (case, m, n, batch)
