"""Tests of quipsharp.hadamard: FWHT, Hadamard constructions, factorisation of model dims, the RHT."""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quipsharp import hadamard
from quipsharp.hadamard import (
    KIND_HADAMARD,
    KIND_HARTLEY,
    HadamardTransform,
    factor_dim,
    fwht,
    hadamard_construction,
    hadamard_matrix,
    hadamard_transform,
    is_prime_power,
    orthonormal_factor,
    random_signs,
)

F64_TOL = 1e-10
MAX_CHECKED_ORDER = 200

# Multiples of 4 up to 200 that Sylvester, Paley I/II and Kronecker products do not reach:
# 92 = 4·23, 116 = 4·29, 156 = 4·39, 172 = 4·43, 184 = 8·23, 188 = 4·47 (neither q = order − 1 ≡ 3 mod 4
# nor q = order/2 − 1 ≡ 1 mod 4 is a prime power, and no factorisation into constructible orders exists).
UNCOVERED_UP_TO_200 = [92, 116, 156, 172, 184, 188]

# Orders the real models need (156 and 172 are impossible here; 312 and 344 replace them), plus a few more.
REQUIRED_ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 40, 52, 60, 76, 84, 108, 140, 148, 312, 344, 924]

MODEL_DIMS = {
    "Llama-2": [4096, 11008, 5120, 13824, 8192, 28672, 1024],
    "Llama-3": [14336, 53248],
    "Mistral": [4096, 14336, 1024],
    "Qwen2/2.5": [896, 4864, 128, 1536, 8960, 256, 2048, 11008, 3584, 18944, 512, 5120, 13824, 27648,
                  8192, 29568],
    "Gemma-2": [2304, 9216, 2048, 1024, 3584, 14336, 4096, 4608, 36864],
    "Gemma-3": [1152, 6912, 1024, 256, 2560, 10240, 3840, 15360, 5376, 21504],
    "SmolLM2": [576, 1536, 192, 960, 2560, 320, 2048, 8192],
    "Phi-3": [3072, 8192, 9216, 5120, 17920, 7680],
    "OPT": [768, 3072, 1024, 4096, 2048, 8192, 2560, 10240, 5120, 20480, 7168, 28672, 9216, 36864, 12288,
            49152],
}


@functools.cache
def sylvester_reference(n: int) -> torch.Tensor:
    """H_n[i, j] = (-1)^popcount(i & j), built from the bit formula, not from the module."""
    idx = torch.arange(n)
    anded = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(anded)
    while bool(anded.any()):
        parity ^= anded & 1
        anded = anded >> 1
    return (1 - 2 * parity).to(torch.float64)


def explicit_u(n: int) -> torch.Tensor:
    """U as a dense float64 matrix from the fast transform: hadamard_transform(I) has rows U e_i."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).T


def identity(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------- fwht
@pytest.mark.parametrize("n", [2**k for k in range(11)])
@pytest.mark.parametrize("batch", [(3,), (2, 5)])
def test_fwht_matches_explicit_sylvester(n: int, batch: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*batch, n, dtype=torch.float64, generator=gen)
    x_before = x.clone()
    H = sylvester_reference(n)
    torch.testing.assert_close(fwht(x, normalize=False), x @ H.T, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(fwht(x), x @ H.T / math.sqrt(n), atol=F64_TOL, rtol=0)
    assert torch.equal(x, x_before)
    torch.testing.assert_close(fwht(fwht(x)), x, atol=F64_TOL, rtol=0)  # normalized H is an involution


def test_fwht_size_one_returns_a_copy() -> None:
    x = torch.tensor([[3.0], [-2.0]])
    for y in (fwht(x), fwht(x, normalize=False)):
        assert torch.equal(y, x)
        y.add_(1.0)
    assert torch.equal(x, torch.tensor([[3.0], [-2.0]]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_fwht_low_precision_dtypes(dtype: torch.dtype, tol: float) -> None:
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    y = fwht(x.to(dtype))
    assert y.dtype == dtype
    expected = x.double() @ sylvester_reference(256).T / 16.0
    assert (y.double() - expected).abs().max().item() < tol * expected.abs().max().item()


@pytest.mark.parametrize("n", [12, 64, 92])
def test_transform_is_differentiable(n: int) -> None:
    """Fine-tuning trains sign vectors through the transform: autograd path == fast path, grad = Uᵀ g."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(3, n, dtype=torch.float64, generator=gen)
    y = hadamard_transform(x)
    with torch.no_grad():
        torch.testing.assert_close(y, hadamard_transform(x), atol=0, rtol=0)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, hadamard_transform(g, transpose=True), atol=F64_TOL, rtol=0)


def test_fwht_non_contiguous_input() -> None:
    base = torch.randn(8, 64, dtype=torch.float64)
    x = base[:, ::2]
    torch.testing.assert_close(fwht(x), fwht(x.contiguous()), atol=0, rtol=0)


@pytest.mark.parametrize("n", [0, 3, 12, 1000])
def test_fwht_rejects_non_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, n))


# ------------------------------------------------------------------------- Hadamard matrices
@pytest.mark.parametrize("q, expected", [(343, (7, 3)), (25, (5, 2)), (2, (2, 1)), (461, (461, 1)),
                                         (1024, (2, 10)), (1, None), (0, None), (12, None), (91, None)])
def test_is_prime_power(q: int, expected: tuple[int, int] | None) -> None:
    assert is_prime_power(q) == expected


def constructible_orders() -> list[int]:
    small = [o for o in [1, 2, *range(4, MAX_CHECKED_ORDER + 1, 4)] if hadamard_construction(o) is not None]
    return sorted(set(small) | set(REQUIRED_ORDERS))


@pytest.mark.parametrize("order", constructible_orders())
def test_hadamard_matrix_is_exact(order: int) -> None:
    H = hadamard_matrix(order)
    assert H.shape == (order, order) and H.dtype == torch.float64
    assert bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, order * identity(order))


def test_uncovered_orders_up_to_200() -> None:
    uncovered = [o for o in range(4, MAX_CHECKED_ORDER + 1, 4) if hadamard_construction(o) is None]
    assert uncovered == UNCOVERED_UP_TO_200
    for order in uncovered:
        with pytest.raises(ValueError, match=f"order {order}"):
            hadamard_matrix(order)


@pytest.mark.parametrize("order, name", [
    (1, "sylvester"), (2, "sylvester"), (64, "sylvester"), (12, "paley1(q=11)"), (28, "paley1(q=27)"),
    (36, "paley2(q=17)"), (52, "paley2(q=25)"), (40, "kron(20,2)"), (88, "kron(44,2)"),
    (312, "paley1(q=311)"), (344, "paley1(q=343)"), (924, "paley2(q=461)"),
    (0, None), (6, None), (10, None), (156, None), (172, None),
])
def test_construction_names(order: int, name: str | None) -> None:
    assert hadamard_construction(order) == name


# Paley over every kind of field: prime fields and GF(p^k) for k = 2, 3, 4, 5.
@pytest.mark.parametrize("q", [3, 7, 11, 27, 243, 343, 5, 9, 13, 25, 49, 81, 121, 125, 169])
def test_paley_constructions_over_finite_fields(q: int) -> None:
    build = hadamard._paley1 if q % 4 == 3 else hadamard._paley2
    H = build(q)
    order = H.shape[0]
    assert order == (q + 1 if q % 4 == 3 else 2 * (q + 1))
    assert bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, order * identity(order))


def test_jacobsthal_is_a_quadratic_character_table() -> None:
    Q = hadamard._jacobsthal(27)  # GF(3^3): Q Qᵀ = q I − J, rows sum to 0, Q antisymmetric (q ≡ 3 mod 4)
    q = 27
    torch.testing.assert_close(Q @ Q.T, q * identity(q) - torch.ones(q, q, dtype=torch.float64))
    assert torch.equal(Q.sum(dim=1), torch.zeros(q, dtype=torch.float64))
    assert torch.equal(Q, -Q.T)


def test_hadamard_matrix_returns_independent_copies() -> None:
    H = hadamard_matrix(12)
    H.zero_()
    assert bool((hadamard_matrix(12).abs() == 1).all())
    M = orthonormal_factor(12, KIND_HADAMARD)
    M.zero_()
    assert orthonormal_factor(12, KIND_HADAMARD).abs().max().item() > 0


# ------------------------------------------------------------------------------ factorisation
@pytest.mark.parametrize("n, expected", [
    (1, (1, 1, KIND_HADAMARD)), (4096, (1, 4096, KIND_HADAMARD)), (12, (12, 1, KIND_HADAMARD)),
    (1536, (12, 128, KIND_HADAMARD)), (576, (36, 16, KIND_HADAMARD)), (4864, (76, 64, KIND_HADAMARD)),
    (11008, (344, 32, KIND_HADAMARD)), (29568, (924, 32, KIND_HADAMARD)), (53248, (52, 1024, KIND_HADAMARD)),
    (3, (3, 1, KIND_HARTLEY)), (6, (3, 2, KIND_HARTLEY)), (92, (23, 4, KIND_HARTLEY)),
    (368, (368, 1, KIND_HADAMARD)),
])
def test_factor_dim_examples(n: int, expected: tuple[int, int, str]) -> None:
    assert factor_dim(n) == expected


def test_factor_dim_picks_smallest_constructible_k() -> None:
    for n in range(1, 2049):
        K, pow2, kind = factor_dim(n)
        assert K * pow2 == n and pow2 & (pow2 - 1) == 0
        odd = n // (n & -n)
        candidates = [odd << j for j in range((n // odd).bit_length()) if hadamard_construction(odd << j)]
        if candidates:
            assert (K, kind) == (min(candidates), KIND_HADAMARD)
        else:
            assert (K, kind) == (odd, KIND_HARTLEY)


@pytest.mark.parametrize("n", [0, -4])
def test_factor_dim_rejects_non_positive(n: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        factor_dim(n)


# ---------------------------------------------------------------------------------- transform
def transform_dims() -> list[int]:
    """n = K·2^k for every K that factor_dim picks for multiples of 4 up to 200 (Hadamard and Hartley)."""
    ks = {factor_dim(n)[0] for n in range(4, MAX_CHECKED_ORDER + 1, 4)} | {1, 3, 5, 344, 924}
    return sorted({K << k for K in ks for k in ((0, 2) if K <= MAX_CHECKED_ORDER else (0, 1))})


@pytest.mark.parametrize("n", transform_dims())
def test_transform_fast_equals_explicit_and_inverts(n: int) -> None:
    K, pow2, kind = factor_dim(n)
    U = explicit_u(n)
    expected = torch.kron(orthonormal_factor(K, kind), hadamard_matrix(pow2) / math.sqrt(pow2))
    torch.testing.assert_close(U, expected, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(U @ U.T, identity(n), atol=F64_TOL, rtol=0)
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ U, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x,
                               atol=F64_TOL, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_transform_keeps_dtype(dtype: torch.dtype, tol: float) -> None:
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(2))
    y = hadamard_transform(x.to(dtype))
    assert y.dtype == dtype
    expected = hadamard_transform(x.double())
    assert (y.double() - expected).abs().max().item() < tol * expected.abs().max().item()


def test_transform_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        hadamard_transform(torch.zeros(4, 0))
    with pytest.raises(ValueError):
        hadamard_transform(torch.tensor(1.0))


@pytest.mark.parametrize("model", sorted(MODEL_DIMS))
def test_model_dims_use_hadamard_factors(model: str) -> None:
    for n in MODEL_DIMS[model]:
        K, pow2, kind = factor_dim(n)
        assert kind == KIND_HADAMARD, f"{model}: dim {n} = {K}·{pow2} fell back to {kind}"
        assert hadamard_construction(K) is not None
        x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        y = hadamard_transform(x)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=F64_TOL, rtol=0)
        torch.testing.assert_close(hadamard_transform(y, transpose=True), x, atol=F64_TOL, rtol=0)
        assert (y - x).abs().max().item() > 0.1  # it did something


def test_hartley_fallback(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    n = next(m for m in range(4, 1000, 4) if all(
        hadamard_construction(m >> j) is None for j in range((m & -m).bit_length())))
    assert n == 92  # 23, 46, 92: none constructible
    monkeypatch.setattr(hadamard, "_fallback_warned", set())
    with caplog.at_level(logging.WARNING, logger="quipsharp.hadamard"):
        assert factor_dim(n) == (23, 4, KIND_HARTLEY)
        factor_dim(n)
        HadamardTransform(n)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and str(n) in r.getMessage()]
    assert len(warnings) == 1 and "Hartley" in warnings[0].getMessage()
    M = orthonormal_factor(23, KIND_HARTLEY)
    torch.testing.assert_close(M, M.T, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(M @ M.T, identity(23), atol=F64_TOL, rtol=0)
    assert M.abs().max().item() <= math.sqrt(2 / 23) + F64_TOL
    U = explicit_u(n)
    torch.testing.assert_close(U @ U.T, identity(n), atol=F64_TOL, rtol=0)
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x,
                               atol=F64_TOL, rtol=0)


def test_orthonormal_factor_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown factor kind"):
        orthonormal_factor(12, "fourier")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=1, max_value=700), batch=st.integers(min_value=1, max_value=3))
def test_round_trip_any_dim(n: int, batch: int) -> None:
    x = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=F64_TOL, rtol=0)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, atol=F64_TOL, rtol=0)


# --------------------------------------------------------------------------------------- RHT
def test_random_signs_come_from_generator() -> None:
    a = random_signs(1000, torch.Generator().manual_seed(3))
    b = random_signs(1000, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and a.shape == (1000,)
    assert torch.equal(a, b) and bool((a.abs() == 1).all())
    assert 400 < int((a > 0).sum()) < 600


@pytest.mark.parametrize("dim", [1, 12, 64, 92, 576, 896])
def test_rht_matches_matrix_and_inverts(dim: int) -> None:
    rht = HadamardTransform(dim, seed=11)
    assert bool((rht.signs.abs() == 1).all()) and rht.signs.dtype == torch.float32
    assert rht.K * rht.pow2 == dim and (rht.K, rht.pow2, rht.kind) == factor_dim(dim)
    x = torch.randn(4, 3, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
    A = rht.matrix()
    torch.testing.assert_close(rht.transform(x), x @ A.T, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(A @ A.T, identity(dim), atol=F64_TOL, rtol=0)
    torch.testing.assert_close(rht.inverse_transform(rht.transform(x)), x, atol=F64_TOL, rtol=0)
    torch.testing.assert_close(rht.transform(rht.inverse_transform(x)), x, atol=F64_TOL, rtol=0)


def test_rht_seeds() -> None:
    dim = 1536
    assert torch.equal(HadamardTransform(dim, seed=5).signs, HadamardTransform(dim, seed=5).signs)
    assert not torch.equal(HadamardTransform(dim, seed=5).signs, HadamardTransform(dim, seed=6).signs)
    assert torch.equal(HadamardTransform(dim, seed=None).signs, torch.ones(dim))
    plain = HadamardTransform(dim, seed=None)
    x = torch.randn(2, dim, dtype=torch.float64)
    torch.testing.assert_close(plain.transform(x), hadamard_transform(x), atol=0, rtol=0)


def test_rht_explicit_signs() -> None:
    signs = torch.tensor([1.0, -1.0, 0.5, 2.0] * 3)
    rht = HadamardTransform(12, seed=123, signs=signs)
    assert torch.equal(rht.signs, signs)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(rht.transform(x), hadamard_transform(x * signs.double()), atol=F64_TOL, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        HadamardTransform(12, signs=torch.ones(11))


def test_rht_rejects_wrong_size() -> None:
    rht = HadamardTransform(576)
    with pytest.raises(ValueError, match="576"):
        rht.transform(torch.zeros(2, 575))
    with pytest.raises(ValueError, match="576"):
        rht.inverse_transform(torch.zeros(576, 3))
    with pytest.raises(ValueError):
        HadamardTransform(0)


def incoherence(W: torch.Tensor) -> float:
    """μ = max|W_ij| · sqrt(m n) / ‖W‖_F (QuIP# Definition 2.1)."""
    return W.abs().max().item() * math.sqrt(W.numel()) / W.norm().item()


def test_rht_makes_an_outlier_weight_incoherent() -> None:
    m, n = 576, 1536
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    W[123, 456] = 1000.0  # one outlier holding ~55% of the energy
    V, U = HadamardTransform(m, seed=1), HadamardTransform(n, seed=2)
    W_tilde = V.transform(U.transform(W).T).T  # V S_V W S_U Uᵀ
    torch.testing.assert_close(W_tilde.norm(), W.norm())
    mu_before, mu_after = incoherence(W), incoherence(W_tilde)
    assert mu_before > 500
    # Paper Lemma 3.1 regime: μ of order sqrt(2 log(2 m n / δ)) ≈ 6 for δ = 1e-2.
    assert mu_after < 8
    assert mu_before / mu_after > 80
