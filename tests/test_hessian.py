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
    torch.testing.assert_close(left.mean(), one.mean())
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
