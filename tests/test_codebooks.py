"""Specification tests of the codebooks: exact search vs brute force, bijective codes, lattice
membership, packing, registry, and the numerically derived scales and MSEs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quipsharp.codebooks import (
    E8P12,
    E8P12RVQ3B,
    E8P12RVQ4B,
    E81B,
    Codebook,
    E8Lattice,
    ScalarCodebook,
    available_codebooks,
    codebook_for_bits,
    codebook_id,
    codebook_name,
    e8_points_with_norm_at_most,
    get_codebook,
    nearest_d8,
    pack_codes,
    unpack_codes,
)
from quipsharp.codebooks.calibration import (
    codebook_mse,
    gaussian_samples,
    golden_section_minimize,
    optimal_scale,
    scaled_mse,
)
from quipsharp.codebooks.e8 import e8_doubled_points_with_norm_at_most, is_e8_doubled
from quipsharp.codebooks.scalar import lloyd_max_gaussian
from quipsharp.errors import NumericalError

DIM = 8
#: Input scales of the brute-force comparisons, from tiny to far outside the codebook.
SCALES = (0.05, 0.3, 0.7, 1.0, 1.4, 2.0, 3.0, 10.0, 1000.0)
#: Rows per scale in the brute-force comparisons (9 scales × 480 > 4,000 vectors).
ROWS_PER_SCALE = 480
#: Relative slack when comparing float32 search distances to float64 brute force.
F32_REL_TOL = 1e-5
F64_REL_TOL = 1e-12
#: Gaussian vectors for scale re-derivation (2**16 vectors = 524k scalar samples; with 2**15 the
#: re-derived 4-bit ρ scattered by up to 1.1% over seeds, with 2**16 by about half that).
SCALE_SAMPLES_LOG2 = 16
SCALE_REL_TOL = 0.01
#: The re-derivation searches ρ (or s) in [1 − w, 1 + w] × the constant, to relative tolerance:
SCALE_BRACKET = 0.1
SCALE_SEARCH_RTOL = 2e-3


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Run this module with one intra-op thread, restored afterwards.

    The searches are many small tensor ops; when the cores are oversubscribed (other jobs running),
    every multi-threaded op can wait a scheduler tick for its second thread, which was measured to
    slow the E8P12 search ~20× (0.4M -> 0.02M vectors/s). One thread keeps the runtime predictable.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _test_vectors(seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gaussian rows at every scale in SCALES, plus adversarial rows on the ¼-grid (many ties,
    zeros of ``x ∓ ¼``) and codewords plus tiny noise. ``[n, 8]``."""
    g = _gen(seed)
    scale = torch.tensor(SCALES, dtype=torch.float64).repeat_interleave(ROWS_PER_SCALE).unsqueeze(1)
    gauss = torch.randn(scale.shape[0], DIM, generator=g, dtype=torch.float64) * scale
    grid = torch.randint(-10, 11, (400, DIM), generator=g).to(torch.float64) / 4
    cw = E8P12().decode(torch.randint(0, 1 << 16, (200,), generator=g)).to(torch.float64)
    near = cw + 1e-3 * torch.randn(cw.shape, generator=g, dtype=torch.float64)
    special = torch.tensor([[0.0] * DIM, [0.25] * DIM, [-0.25] * DIM, [0.5] * DIM, [1e-30] * DIM])
    return torch.cat([gauss, grid, cw, near, special.to(torch.float64)]).to(dtype)


def _brute_min_dist(x: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 min squared distance from each row of ``x`` to ``codewords`` ``[K, 8]``."""
    xd, cd = x.to(torch.float64), codewords.to(torch.float64)
    c_sq = cd.square().sum(dim=1)
    out = []
    for chunk in xd.split(512):
        d = chunk.square().sum(dim=1, keepdim=True) - 2 * chunk @ cd.T + c_sq
        out.append(d.min(dim=1).values)
    return torch.cat(out).clamp(min=0)


def _assert_nearest(x: torch.Tensor, xhat: torch.Tensor, codewords: torch.Tensor, rel_tol: float) -> None:
    """``xhat`` is at (or within rounding of) the brute-force minimum distance for every row."""
    xd = x.to(torch.float64)
    got = (xd - xhat.to(torch.float64)).square().sum(dim=1)
    best = _brute_min_dist(x, codewords)
    slack = rel_tol * (1.0 + xd.square().sum(dim=1))
    worst = int((got - best - slack).argmax())
    assert bool((got <= best + slack).all()), (
        f"row {worst}: x={x[worst].tolist()} got {got[worst].item()} > best {best[worst].item()}"
    )


# --------------------------------------------------------------------------------------- E8 lattice
def test_e8_enumeration_counts_and_membership() -> None:
    expected = {0: 1, 2: 241, 4: 2401, 6: 9121, 8: 26641}  # theta series of E8: 1, 240, 2160, 6720, 17520
    for bound, count in expected.items():
        pts = e8_doubled_points_with_norm_at_most(bound)
        assert pts.shape == (count, DIM)
        assert bool(is_e8_doubled(pts).all())
        assert int(pts.square().sum(dim=1).max()) <= 4 * bound
        assert torch.unique(pts, dim=0).shape[0] == count
    pts = e8_points_with_norm_at_most(2)
    assert pts.dtype == torch.float32
    norms = pts.square().sum(dim=1)
    assert bool((norms[1:] >= norms[:-1]).all())  # sorted by norm


def test_e8_nearest_beats_local_neighbourhood() -> None:
    lattice = E8Lattice()
    offsets = e8_points_with_norm_at_most(8).to(torch.float64)  # all E8 points within distance 2√2
    x = _test_vectors(1)[::4]
    points, _ = lattice.quantize(x)
    assert points.dtype == x.dtype
    assert bool(is_e8_doubled(torch.round(points * 2).to(torch.int64)).all())
    # ‖x − (p + o)‖² = ‖r‖² − 2⟨r, o⟩ + ‖o‖² with r = x − p: p is nearest iff no o improves on 0.
    r = x - points
    gain = (2 * r @ offsets.T - offsets.square().sum(dim=1)).max(dim=1).values
    assert bool((gain <= 1e-9).all())


def test_nearest_d8_beats_local_neighbourhood() -> None:
    d8 = e8_doubled_points_with_norm_at_most(8)
    offsets = (d8[(d8 % 2 == 0).all(dim=1)] // 2).to(torch.float64)  # D8 points, ‖v‖² ≤ 8
    x = torch.randn(2000, DIM, generator=_gen(2), dtype=torch.float64) * 3
    p = nearest_d8(x)
    assert bool((p == torch.round(p)).all()) and bool((p.sum(dim=1) % 2 == 0).all())
    r = x - p
    gain = (2 * r @ offsets.T - offsets.square().sum(dim=1)).max(dim=1).values
    assert bool((gain <= 1e-9).all())


def test_e8_indices_round_trip_and_validation() -> None:
    lattice = E8Lattice()
    x = torch.randn(1000, DIM, generator=_gen(3)) * 5
    points, idx = lattice.quantize(x)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.round(points * 2).to(torch.int64))
    assert torch.equal(lattice.dequantize(idx), points.to(torch.float32))
    p2, idx2 = lattice.quantize(points)  # lattice points are fixed points
    assert torch.equal(p2, points) and torch.equal(idx2, idx)
    with pytest.raises(ValueError):
        lattice.dequantize(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]))  # odd sum
    with pytest.raises(ValueError):
        lattice.dequantize(torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0]]))  # mixed parity
    with pytest.raises(ValueError):
        lattice.quantize(torch.zeros(3, 7))
    with pytest.raises(NumericalError):
        lattice.quantize(torch.full((1, DIM), float("nan")))


# ------------------------------------------------------------------------------------------ E8P12
def test_e8p_sources_and_norm_counts() -> None:
    cb = E8P12()
    src = cb.sources.to(torch.float64)
    assert src.shape == (256, DIM)
    doubled = torch.round(src * 2).to(torch.int64)
    assert bool((doubled % 2 == 1).all())  # half-integers
    assert bool((src.sum(dim=1) % 2 == 0).all())  # in D̂8: even coordinate sum
    assert torch.equal(src.abs(), cb.source_patterns.to(torch.float64))
    assert torch.unique(src.abs(), dim=0).shape[0] == 256
    norms = src.square().sum(dim=1).round().to(torch.int64)
    counts = {int(n): int(c) for n, c in zip(*torch.unique(norms, return_counts=True), strict=True)}
    assert counts == {2: 1, 4: 8, 6: 28, 8: 64, 10: 126, 12: 29}
    # The norm-12 sources are five 3/2 and three ½, with ½-positions of even sum, plus {0, 1, 2}.
    halves = [tuple(int(i) for i in (row == 0.5).nonzero().flatten()) for row in src[norms == 12].abs()]
    assert all(len(t) == 3 for t in halves)
    assert sorted(halves) == sorted(
        [t for t in itertools.combinations(range(DIM), 3) if sum(t) % 2 == 0] + [(0, 1, 2)]
    )
    # Stored sources: the pattern itself if Σa is even, else coordinate 7 negated.
    neg = src < 0
    assert bool((neg[:, :7] == 0).all())


def test_e8p_codewords_distinct_and_in_shifted_e8() -> None:
    cw = E8P12().codewords()
    assert cw.shape == (1 << 16, DIM) and cw.dtype == torch.float32
    assert torch.unique(cw, dim=0).shape[0] == 1 << 16
    doubled = 2 * (cw.to(torch.float64) - 0.25)
    assert bool((doubled == torch.round(doubled)).all())
    assert bool(is_e8_doubled(doubled.to(torch.int64)).all())


def test_e8p_encode_decode_identity() -> None:
    cb = E8P12()
    codes = torch.arange(1 << 16)
    cw = cb.decode(codes)
    assert torch.equal(cb.encode(cw), codes)
    # Decoding rule spelled out for one code: source 0 = all ½, sign bits 0b1 (odd) -> toggle bit 7.
    assert cb.decode(torch.tensor(1 << 8)).tolist() == [-0.5 - 0.25] + [0.5 - 0.25] * 6 + [-0.5 - 0.25]
    assert cb.decode(torch.tensor(0)).tolist() == [0.75] * DIM
    with pytest.raises(ValueError):
        cb.encode(torch.zeros(1, DIM))
    with pytest.raises(ValueError):
        cb.decode(torch.tensor([1 << 16]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_e8p_exact_search_matches_brute_force(dtype: torch.dtype) -> None:
    cb = E8P12()
    x = _test_vectors(10 if dtype == torch.float64 else 11, dtype)
    assert x.shape[0] >= 4000
    xhat, codes = cb.quantize(x)
    assert xhat.dtype == dtype and codes.dtype == torch.int64 and codes.shape == (x.shape[0],)
    assert torch.equal(cb.decode(codes), xhat.to(torch.float32))
    _assert_nearest(x, xhat, cb.codewords(), F64_REL_TOL if dtype == torch.float64 else F32_REL_TOL)
    cw = cb.codewords()[:: 1 << 6]  # codewords are their own nearest point
    assert torch.equal(cb.quantize(cw)[0], cw)


def test_e8p_batch_shapes_and_errors() -> None:
    cb = E8P12()
    x = torch.randn(3, 5, DIM, generator=_gen(4))
    xhat, codes = cb.quantize(x)
    assert xhat.shape == x.shape and codes.shape == (3, 5)
    _, flat_codes = cb.quantize(x.reshape(-1, DIM))
    assert torch.equal(flat_codes.reshape(3, 5), codes)
    empty_hat, empty_codes = cb.quantize(torch.zeros(0, DIM))
    assert empty_hat.shape == (0, DIM) and empty_codes.shape == (0,)
    with pytest.raises(ValueError):
        cb.quantize(torch.zeros(4, 4))
    with pytest.raises(ValueError):
        cb.quantize(torch.zeros(4, DIM, dtype=torch.int64))
    with pytest.raises(NumericalError):
        cb.quantize(torch.tensor([[float("inf")] + [0.0] * 7]))


# ------------------------------------------------------------------------------------ E81B and RVQ
def test_e81b_points() -> None:
    pts = E81B().codewords()
    assert pts.shape == (256, DIM)
    assert torch.unique(pts, dim=0).shape[0] == 256
    doubled = torch.round(pts * 2).to(torch.int64)
    assert bool(is_e8_doubled(doubled).all())
    norms = pts.square().sum(dim=1)
    assert int((norms <= 2).sum()) == 241
    axis = pts[norms > 2]
    assert axis.shape[0] == 15
    assert bool(((axis != 0).sum(dim=1) == 1).all()) and bool((axis.abs().sum(dim=1) == 2).all())
    missing = torch.zeros(DIM)
    missing[7] = -2
    assert not bool((pts == missing).all(dim=1).any())


@pytest.mark.parametrize("cls", [E8P12RVQ3B, E8P12RVQ4B])
def test_rvq_is_greedy_composition_of_exact_stages(cls: type) -> None:
    cb = cls()
    x = _test_vectors(20)[::2] * cb.opt_scale
    xhat, codes = cb.quantize(x)
    assert xhat.dtype == x.dtype
    assert bool((codes >= 0).all()) and bool((codes < 1 << (8 * cb.code_bytes)).all())
    c1, c2 = cb.split_codes(codes)
    x1, ref_c1 = cb.stage1.quantize(x)
    assert torch.equal(c1, ref_c1)
    residual = (x - x1) * cb.residual_scale
    x2, ref_c2 = cb.stage2.quantize(residual)
    assert torch.equal(c2, ref_c2)
    _assert_nearest(residual, x2, cb.stage2.codewords(), F64_REL_TOL)  # stage 2 is exact
    assert torch.equal(cb.decode(codes), xhat.to(torch.float32))  # decode ∘ quantize == xhat
    expected = x1.to(torch.float32) + x2.to(torch.float32) / cb.residual_scale
    assert torch.equal(xhat.to(torch.float32), expected)


def test_rvq_decode_matches_float32_quantize() -> None:
    for cb in (E8P12RVQ3B(), E8P12RVQ4B()):
        x = torch.randn(2000, DIM, generator=_gen(5)) * cb.opt_scale
        xhat, codes = cb.quantize(x)
        assert torch.equal(cb.decode(codes), xhat)


# ----------------------------------------------------------------------------------------- scalar
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scalar_codebook_round_trip_and_brute_force(bits: int) -> None:
    cb = ScalarCodebook(bits)
    assert cb.name == f"scalar{bits}" and cb.code_bytes == bits
    levels = cb.levels.to(torch.float64)
    assert levels.numel() == 1 << bits and bool((levels[1:] > levels[:-1]).all())
    assert torch.allclose(levels, -levels.flip(0), atol=1e-6)
    x = _test_vectors(30, torch.float32)
    xhat, codes = cb.quantize(x)
    assert torch.equal(cb.decode(codes), xhat)
    dist_all = (x.to(torch.float64).unsqueeze(-1) - levels).abs()  # brute force over the levels
    got = (x.to(torch.float64) - xhat.to(torch.float64)).abs()
    assert bool((got <= dist_all.min(dim=-1).values + 1e-12).all())
    assert bool((codes < 1 << (8 * cb.code_bytes)).all())
    with pytest.raises(ValueError):
        ScalarCodebook(0)


def test_lloyd_max_levels_satisfy_optimality_conditions() -> None:
    """Lloyd–Max: every level is the Gaussian centroid of its cell (checked by quadrature)."""
    n_cells, half_width = 2_000_000, 10.0
    step = 2 * half_width / n_cells
    grid = -half_width + step * (torch.arange(n_cells, dtype=torch.float64) + 0.5)  # midpoint rule
    pdf = torch.exp(-grid.square() / 2)
    known_mse = {1: 0.36338, 2: 0.11748, 3: 0.034548, 4: 0.0095010}
    for bits, mse_ref in known_mse.items():
        levels, thresholds, mse = lloyd_max_gaussian(bits)
        cell = torch.bucketize(grid, torch.tensor(thresholds, dtype=torch.float64))
        mass = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, cell, pdf)
        moment = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, cell, pdf * grid)
        assert torch.allclose(moment / mass, torch.tensor(levels, dtype=torch.float64), atol=1e-7)
        assert mse == pytest.approx(mse_ref, rel=1e-4)


# ---------------------------------------------------------------------------------------- packing
ALL_CODEBOOKS = ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B", "scalar2", "scalar3", "scalar4")


@settings(max_examples=60, deadline=None)
@given(
    code_bytes=st.integers(min_value=1, max_value=7),
    shape=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_pack_unpack_round_trip(code_bytes: int, shape: list[int], seed: int) -> None:
    high = 1 << (8 * code_bytes)
    codes = torch.randint(0, high, tuple(shape), generator=_gen(seed), dtype=torch.int64)
    codes.view(-1)[:1] = high - 1  # include the largest code
    packed = pack_codes(codes, code_bytes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] * code_bytes)
    assert torch.equal(unpack_codes(packed, code_bytes), codes)


@pytest.mark.parametrize("name", ALL_CODEBOOKS)
def test_codebook_pack_sizes(name: str) -> None:
    cb = get_codebook(name)
    x = torch.randn(4, 6, DIM, generator=_gen(6))
    _, codes = cb.quantize(x)
    packed = cb.pack(codes)
    assert packed.shape == (4, 6 * cb.code_bytes)
    assert packed.numel() * 8 == x.numel() * cb.bits_per_weight
    assert torch.equal(cb.unpack(packed), codes)


def test_packing_is_little_endian_and_validates() -> None:
    assert pack_codes(torch.tensor([0x0102, 0xA0B0]), 2).tolist() == [0x02, 0x01, 0xB0, 0xA0]
    assert pack_codes(torch.tensor([0x030201]), 3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([1 << 16]), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([-1]), 2)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(4, dtype=torch.int64), 2)


def test_bits_per_weight() -> None:
    expected = {"E8P12": 2, "E8P12RVQ3B": 3, "E8P12RVQ4B": 4, "scalar2": 2, "scalar3": 3, "scalar4": 4}
    for name, bits in expected.items():
        cb = get_codebook(name)
        assert cb.bits_per_weight == bits
        assert cb.dim == DIM
        assert isinstance(cb, Codebook)
    assert E81B().bits_per_weight == 1


# --------------------------------------------------------------------------------------- registry
def test_registry_ids_names_and_errors() -> None:
    ids = {"E8P12": 0, "E8P12RVQ3B": 1, "E8P12RVQ4B": 2, "scalar2": 16, "scalar3": 17, "scalar4": 18,
           "QTIP1MAD2": 32, "QTIP1MAD3": 33, "QTIP1MAD4": 34, "QTIP3INST2": 35, "QTIP3INST3": 36, "QTIP3INST4": 37,
           "QTIPHYB2": 38, "QTIPHYB3": 39, "QTIPHYB4": 40}
    assert available_codebooks() == list(ids)  # ids are on disk: never renumbered
    for name, cid in ids.items():
        assert codebook_id(name) == cid and codebook_name(cid) == name
        assert get_codebook(name) is get_codebook(cid)
        assert get_codebook(name).name == name
    assert type(get_codebook("E8P12")) is E8P12
    assert codebook_for_bits(2) is get_codebook("E8P12")
    assert codebook_for_bits(3).name == "E8P12RVQ3B" and codebook_for_bits(4).name == "E8P12RVQ4B"
    for bits in (2, 3, 4):
        assert codebook_for_bits(bits, use_e8_lattice=False).name == f"scalar{bits}"
        assert codebook_for_bits(bits, family="qtip1mad").name == f"QTIP1MAD{bits}"
        assert codebook_for_bits(bits, family="qtip3inst").name == f"QTIP3INST{bits}"
        assert codebook_for_bits(bits, family="qtiphyb").name == f"QTIPHYB{bits}"
    with pytest.raises(ValueError, match="unknown codebook family"):
        codebook_for_bits(2, family="qtip")
    with pytest.raises(ValueError, match="E8P12RVQ3B"):
        get_codebook("E8P13")
    with pytest.raises(ValueError, match="valid ids"):
        get_codebook(3)
    with pytest.raises(ValueError):
        codebook_name(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[2, 3, 4\]"):
        codebook_for_bits(5)
    with pytest.raises(ValueError):
        codebook_for_bits(1, use_e8_lattice=False)


# ------------------------------------------------------------------- scales and Gaussian MSE figures
@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return gaussian_samples(1 << SCALE_SAMPLES_LOG2, DIM, seed=1234)


@pytest.mark.parametrize("name", ["E8P12", "E8P12RVQ3B", "E8P12RVQ4B", "scalar2", "scalar4"])
def test_opt_scale_is_mse_optimal(name: str, gauss: torch.Tensor) -> None:
    cb = get_codebook(name)
    lo, hi = (1 - SCALE_BRACKET) * cb.opt_scale, (1 + SCALE_BRACKET) * cb.opt_scale
    rho, _ = optimal_scale(lambda v: cb.quantize(v)[0], gauss, lo, hi, SCALE_SEARCH_RTOL)
    assert rho == pytest.approx(cb.opt_scale, rel=SCALE_REL_TOL)


@pytest.mark.parametrize("cls", [E8P12RVQ3B, E8P12RVQ4B])
def test_residual_scale_is_mse_optimal(cls: type, gauss: torch.Tensor) -> None:
    cb = cls()
    x = gauss * cb.opt_scale
    x1, _ = cb.stage1.quantize(x)

    def mse(s: float) -> float:
        x2, _ = cb.stage2.quantize((x - x1) * s)
        return float((x - x1 - x2 / s).square().mean())

    lo, hi = (1 - SCALE_BRACKET) * cb.residual_scale, (1 + SCALE_BRACKET) * cb.residual_scale
    s_opt, _ = golden_section_minimize(mse, lo, hi, SCALE_SEARCH_RTOL)
    assert s_opt == pytest.approx(cb.residual_scale, rel=SCALE_REL_TOL)


def test_gaussian_mse_figures(gauss: torch.Tensor) -> None:
    mse = {name: codebook_mse(get_codebook(name), gauss) for name in ALL_CODEBOOKS}
    assert 0.088 <= mse["E8P12"] <= 0.092
    assert mse["scalar2"] == pytest.approx(0.1175, abs=0.002)
    assert mse["scalar3"] == pytest.approx(0.03455, rel=0.03)
    assert mse["scalar4"] == pytest.approx(0.00950, rel=0.03)
    # The lattice beats the scalar quantizer at every rate (paper: the point of E8P).
    for bits, lattice in ((2, "E8P12"), (3, "E8P12RVQ3B"), (4, "E8P12RVQ4B")):
        assert mse[lattice] < mse[f"scalar{bits}"]
    # And the rate–distortion bound 2**(-2R) is not beaten.
    for bits, lattice in ((2, "E8P12"), (3, "E8P12RVQ3B"), (4, "E8P12RVQ4B")):
        assert mse[lattice] > 2.0 ** (-2 * bits)
    # The MSE helper itself: the identity "quantizer" has (rounding-level) zero error.
    assert scaled_mse(lambda v: v, gauss, 1.3) < 1e-12
