from __future__ import annotations

import pytest
import torch

from quipsharp.errors import NumericalError
from quipsharp.hessian import HessianAccumulator, normalize, regularize
from quipsharp.io import load_hessian, save_hessian


def test_accumulator_matches_explicit_second_moment(gen):
    n = 24
    batches = [
        torch.randn(3, 7, n, generator=gen),
        torch.randn(5000, n, generator=gen),
        torch.randn(1, n, generator=gen),
    ]
    acc = HessianAccumulator(n)
    for b in batches:
        acc.add_batch(b)
    X = torch.cat([b.reshape(-1, n) for b in batches]).double()
    assert acc.count == X.shape[0]
    torch.testing.assert_close(acc.mean(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.mean_input(), X.mean(0), rtol=1e-5, atol=1e-6)
    assert acc.xtx.dtype == torch.float64


def test_merge_equals_single_stream(gen):
    n = 16
    a, b = torch.randn(100, n, generator=gen), torch.randn(50, n, generator=gen)
    one = HessianAccumulator(n)
    one.add_batch(a)
    one.add_batch(b)
    left, right = HessianAccumulator(n), HessianAccumulator(n)
    left.add_batch(a)
    right.add_batch(b)
    left.merge(right)
    assert torch.equal(left.xtx, one.xtx) and torch.equal(left.xsum, one.xsum)
    assert left.count == 150
    with pytest.raises(ValueError, match="merge"):
        left.merge(HessianAccumulator(n + 8))


def test_bad_inputs():
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="last dim 8"):
        acc.add_batch(torch.zeros(4, 9))
    with pytest.raises(NumericalError, match="no inputs"):
        acc.mean()
    with pytest.raises(NumericalError, match="non-finite"):
        acc.add_batch(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(NumericalError, match="not positive"):
        normalize(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="square"):
        normalize(torch.zeros(8, 4))


def test_regularize_normalises_and_damps(gen):
    X = torch.randn(200, 16, generator=gen, dtype=torch.float64) * 7.0
    H = X.T @ X
    R = regularize(H, 0.01)
    assert torch.allclose(torch.diagonal(R).mean(), torch.tensor(1.01, dtype=torch.float64))
    torch.testing.assert_close(R - 0.01 * torch.eye(16, dtype=torch.float64), H / torch.diagonal(H).mean())


def test_save_load_round_trip(tmp_path, gen):
    acc = HessianAccumulator(32)
    acc.add_batch(torch.randn(64, 32, generator=gen))
    path = tmp_path / "h" / "layer.safetensors"
    save_hessian(acc, path)
    back = load_hessian(path)
    assert back.count == acc.count
    assert torch.equal(back.xtx, acc.xtx) and torch.equal(back.xsum, acc.xsum)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Hessian file"):
        load_hessian(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_hessian(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a quipsharp Hessian"):
        load_hessian(other)


@pytest.mark.parametrize("seed", range(4))
def test_sums_are_exact_so_any_split_and_order_gives_the_same_bits(seed):
    """Batches of wildly different scales (where plain float64 addition depends on the order): every
    order of adding them, and every split into merged shards, gives the same bits."""
    gen = torch.Generator().manual_seed(seed)
    n = 12
    scales = [1e-3, 1.0, 3e3, 1e-1, 40.0, 7e2]
    batches = [torch.randn(int(torch.randint(1, 90, (1,), generator=gen)), n, generator=gen) * s for s in scales]
    one = HessianAccumulator(n)
    for b in batches:
        one.add_batch(b)
    for trial in range(6):
        order = torch.randperm(len(batches), generator=gen).tolist()
        cut = 1 + trial % (len(batches) - 1)
        shards = [HessianAccumulator(n), HessianAccumulator(n)]
        for pos, i in enumerate(order):
            shards[pos >= cut].add_batch(batches[i])
        merged = HessianAccumulator(n)
        for shard in (shards[1], shards[0]):
            merged.merge(shard)
        assert torch.equal(merged.xtx_bins, one.xtx_bins) and torch.equal(merged.xsum_bins, one.xsum_bins)
        assert torch.equal(merged.mean(), one.mean()) and merged.count == one.count and merged.terms == one.terms
    # and the value is the float32 products' sum to float64 accuracy
    terms = sum((b.T @ b).double() for b in batches)
    torch.testing.assert_close(one.xtx, terms, rtol=1e-12, atol=1e-9)


def test_plain_float64_addition_would_depend_on_the_order():
    """Why the bins exist: the same three float32 products added in two orders differ in float64."""
    t = [torch.tensor([[2.0**40]]), torch.tensor([[1.0 + 2.0**-20]]), torch.tensor([[-(2.0**40)]])]
    a = (t[0].double() + t[1].double()) + t[2].double()
    b = (t[0].double() + t[2].double()) + t[1].double()
    assert not torch.equal(a, b)
    acc1, acc2 = HessianAccumulator(1), HessianAccumulator(1)
    for x in (t[0], t[1], t[2]):
        acc1._add_terms(x, x[0], 1)
    for x in (t[0], t[2], t[1]):
        acc2._add_terms(x, x[0], 1)
    assert torch.equal(acc1.xtx, acc2.xtx) and acc1.xtx.item() == 1.0 + 2.0**-20


def test_too_large_activations_are_refused():
    acc = HessianAccumulator(2)
    with pytest.raises(NumericalError, match="too large"):
        acc.add_batch(torch.full((4, 2), 3e7))


def test_damaged_and_version_1_files(tmp_path, gen):
    from safetensors.torch import save_file

    acc = HessianAccumulator(8)
    acc.add_batch(torch.randn(20, 8, generator=gen))
    state = {k: v.clone() for k, v in acc.state_dict().items()}
    state["xtx_bins"][0, 0, 0] += 1.0  # not a multiple of the top grid
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"format": "quipsharp-hessian", "version": "2"})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*off its grid"):
        load_hessian(tmp_path / "bad.safetensors")
    old = {"xtx": acc.xtx, "xsum": acc.xsum, "count": torch.tensor([acc.count])}
    save_file(old, str(tmp_path / "v1.safetensors"), metadata={"format": "quipsharp-hessian", "version": "1"})
    back = load_hessian(tmp_path / "v1.safetensors")
    assert torch.equal(back.xtx, acc.xtx) and back.count == acc.count
