"""Hadamard transforms of every size and the randomized Hadamard transform (QuIP# §3, DESIGN.md §3).

A dimension ``n`` is factored as ``n = K * 2**k`` and transformed by the orthonormal matrix
``U = M_K ⊗ H_{2^k} / sqrt(2^k)``: a fast Walsh–Hadamard transform (FWHT) on the power-of-two part and a
small dense ``K × K`` orthonormal factor ``M_K``. Index ``i`` of a vector of length ``n`` is
``i = a * 2**k + b`` with ``a`` the index into ``M_K`` and ``b`` the index into ``H_{2^k}``.

``M_K = H_K / sqrt(K)`` with ``H_K`` a ±1 Hadamard matrix built at run time (no tables) by

* Sylvester: orders 1, 2 and powers of two;
* Paley I: order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)``;
* Paley II: order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``;
* Kronecker products of two constructible orders.

Paley constructions need the quadratic character of the finite field GF(p^k): elements are the ints
``0 .. q-1`` whose base-p digits are the coefficients of a polynomial modulo an irreducible monic
polynomial of degree k, found by search.

Fallback: when no Hadamard matrix of any order ``K = odd_part(n) * 2**j`` dividing ``n`` can be built
(e.g. ``n = 92 = 23 * 4``), ``M_K`` is the orthonormal discrete Hartley transform (DHT) with
``K = odd_part(n)``, the smallest admissible K: ``M[a, b] = cas(2π a b / K) / sqrt(K)``,
``cas = cos + sin``. It is symmetric, orthogonal for every K and its entries have magnitude
``≤ sqrt(2 / K)``, so it spreads outliers almost as well as a Hadamard matrix (the paper notes that
randomized FFT-like transforms give incoherence too). A warning is logged once per such ``n``.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

logger = logging.getLogger(__name__)

KIND_HADAMARD = "hadamard"
KIND_HARTLEY = "hartley"

_BINARY = 2  # Sylvester's base: H_{2n} = H_2 ⊗ H_n
_HADAMARD_ORDER_MULTIPLE = 4  # every Hadamard order > 2 is a multiple of 4
_PALEY1_RESIDUE = 3  # Paley I needs q ≡ 3 (mod 4)
_PALEY2_RESIDUE = 1  # Paley II needs q ≡ 1 (mod 4)
_MATRIX_CACHE_SIZE = 64  # distinct K×K factors kept (real models use a handful)

_fallback_warned: set[int] = set()


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def fwht(x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh–Hadamard transform along the last dimension, Sylvester (natural) ordering.

    Args:
        x: ``[..., n]`` floating-point tensor, ``n`` a power of two; not modified.
        normalize: scale by ``1 / sqrt(n)`` so the transform is orthonormal (and its own inverse).

    Returns:
        ``[..., n]`` tensor ``x @ H_n`` in ``x.dtype``, ``H_n`` symmetric with
        ``H_n[i, j] = (-1)^popcount(i & j)``.
        O(n log n): one butterfly pass per bit of the index, each a reshape to ``[B, n / 2h, 2, h]``.
    """
    if x.dim() == 0 or not _is_power_of_two(x.shape[-1]):
        raise ValueError(f"fwht needs a last dimension that is a power of two, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"fwht needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    y = x.reshape(-1, n)
    if n == 1:
        return y.clone().reshape(x.shape)
    differentiable = torch.is_grad_enabled() and x.requires_grad
    # Without autograd, butterflies write into two ping-pong buffers (no temporaries): 2-4x faster.
    buffers = None if differentiable else (torch.empty_like(y), torch.empty_like(y))
    half, step = 1, 0
    while half < n:
        shape = (-1, n // (_BINARY * half), _BINARY, half)
        pairs = y.reshape(shape)
        lo, hi = pairs[:, :, 0, :], pairs[:, :, 1, :]
        if buffers is None:
            y = torch.stack((lo + hi, lo - hi), dim=2)
        else:
            out = buffers[step % _BINARY].view(shape)
            torch.add(lo, hi, out=out[:, :, 0, :])
            torch.sub(lo, hi, out=out[:, :, 1, :])
            y = out
        half, step = half * _BINARY, step + 1
    y = y.reshape(x.shape)
    if normalize:
        return y * (1.0 / math.sqrt(n)) if differentiable else y.mul_(1.0 / math.sqrt(n))
    return y


def is_prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``p`` prime, ``k >= 1`` and ``q == p**k``, or ``None`` (also for ``q < 2``)."""
    if q < _BINARY:
        return None
    p = next((d for d in range(_BINARY, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


# ----------------------------------------------------------------------------------------- GF(p^k)
def _poly_mod(f: list[int], g: list[int], p: int) -> list[int]:
    """Remainder of polynomial ``f`` modulo monic ``g`` over GF(p); coefficients low degree first."""
    r = [c % p for c in f]
    deg_g = len(g) - 1
    for top in range(len(r) - 1, deg_g - 1, -1):
        c = r[top]
        if c:
            for i, gc in enumerate(g):
                r[top - deg_g + i] = (r[top - deg_g + i] - c * gc) % p
    return r[:deg_g]


def _digits(e: int, p: int, k: int) -> list[int]:
    return [(e // p**i) % p for i in range(k)]


def _irreducible_poly(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p) (trial division by lower degrees)."""
    for tail in range(p**k):
        f = [*_digits(tail, p, k), 1]
        reducible = any(
            not any(_poly_mod(f, [*_digits(t, p, d), 1], p))
            for d in range(1, k // _BINARY + 1)
            for t in range(p**d)
        )
        if not reducible:
            return f
    raise ArithmeticError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[a, b] = χ(a − b)`` of GF(q) (χ the quadratic character), float64 ``[q, q]``."""
    pk = is_prime_power(q)
    if pk is None or pk[0] == _BINARY:
        raise ValueError(f"the Jacobsthal matrix needs an odd prime power, got q={q}")
    p, k = pk
    f = _irreducible_poly(p, k)
    squares = set()
    for e in range(1, q):
        a = _digits(e, p, k)
        prod = [0] * (2 * k - 1)
        for i, ai in enumerate(a):
            for j, aj in enumerate(a):
                prod[i + j] += ai * aj
        squares.add(sum(c * p**i for i, c in enumerate(_poly_mod(prod, f, p))))
    if len(squares) != (q - 1) // _BINARY:  # a field has exactly (q-1)/2 nonzero squares
        raise ArithmeticError(f"GF({q}) arithmetic is inconsistent: {len(squares)} nonzero squares")
    chi = -torch.ones(q, dtype=torch.float64)
    chi[0] = 0.0
    chi[torch.tensor(sorted(squares), dtype=torch.long)] = 1.0
    powers = torch.tensor([p**i for i in range(k)], dtype=torch.long)
    digits = (torch.arange(q, dtype=torch.long)[:, None] // powers) % p  # [q, k]
    diff = (((digits[:, None, :] - digits[None, :, :]) % p) * powers).sum(-1)  # [q, q] index of a - b
    return chi[diff]


# ------------------------------------------------------------------------------ Hadamard matrices
def _paley1(q: int) -> torch.Tensor:
    """Paley I: ``H = I + [[0, 1ᵀ], [−1, Q]]`` of order ``q + 1`` for ``q ≡ 3 (mod 4)`` (Q antisymmetric)."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    """Paley II of order ``2 (q + 1)`` for ``q ≡ 1 (mod 4)``, from the symmetric conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]``: ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]``."""
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = _jacobsthal(q)
    on_entry = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, on_entry) + torch.kron(torch.eye(q + 1, dtype=torch.float64), on_zero)


@functools.cache
def _plan(order: int) -> tuple[str, int, int] | None:
    """How to build ``H_order``: ``(method, a, b)`` (a = q for Paley, factors for kron), or None."""
    if order < 1:
        return None
    if _is_power_of_two(order):
        return ("sylvester", order, 0)
    if order % _HADAMARD_ORDER_MULTIPLE:
        return None
    pk = is_prime_power(order - 1)
    if pk is not None and (order - 1) % _HADAMARD_ORDER_MULTIPLE == _PALEY1_RESIDUE:
        return ("paley1", order - 1, 0)
    q = order // _BINARY - 1
    pk = is_prime_power(q)
    if pk is not None and q % _HADAMARD_ORDER_MULTIPLE == _PALEY2_RESIDUE:
        return ("paley2", q, 0)
    for d in range(_BINARY, math.isqrt(order) + 1):  # smallest cofactor first, e.g. 40 = kron(20, 2)
        if order % d == 0 and _plan(d) is not None and _plan(order // d) is not None:
            return ("kron", order // d, d)
    return None


def hadamard_construction(order: int) -> str | None:
    """Name of the construction used for ``H_order``: ``"sylvester"``, ``"paley1(q=11)"``,
    ``"paley2(q=17)"``, ``"kron(12,2)"``; ``None`` when no construction is known for ``order``."""
    plan = _plan(order)
    if plan is None:
        return None
    method, a, b = plan
    if method == "sylvester":
        return method
    if method == "kron":
        return f"kron({a},{b})"
    return f"{method}(q={a})"


@functools.lru_cache(maxsize=_MATRIX_CACHE_SIZE)
def _hadamard_cached(order: int) -> torch.Tensor:
    plan = _plan(order)
    if plan is None:
        raise ValueError(
            f"no Hadamard matrix construction (Sylvester, Paley I/II, Kronecker) for order {order}"
        )
    method, a, b = plan
    if method == "sylvester":
        H = torch.ones(1, 1, dtype=torch.float64)
        h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        while H.shape[0] < order:
            H = torch.kron(h2, H)
    elif method == "paley1":
        H = _paley1(a)
    elif method == "paley2":
        H = _paley2(a)
    else:
        H = torch.kron(_hadamard_cached(a), _hadamard_cached(b))
    logger.debug("built Hadamard matrix of order %d via %s", order, hadamard_construction(order))
    return H


def hadamard_matrix(order: int) -> torch.Tensor:
    """A ±1 Hadamard matrix ``H`` of the given order, float64 ``[order, order]``, ``H Hᵀ = order · I``.

    Raises:
        ValueError: no construction is known for ``order`` (see :func:`hadamard_construction`).
    """
    return _hadamard_cached(order).clone()


# ---------------------------------------------------------------------------- factorisation of n
@functools.cache
def _factorize(n: int) -> tuple[int, int, str]:
    odd = n
    while odd % _BINARY == 0:
        odd //= _BINARY
    K = odd
    while n % K == 0:
        if _plan(K) is not None:
            return K, n // K, KIND_HADAMARD
        K *= _BINARY
    return odd, n // odd, KIND_HARTLEY


def factor_dim(n: int) -> tuple[int, int, str]:
    """Factor ``n = K * 2**k`` for the transform ``U = M_K ⊗ H_{2^k} / sqrt(2^k)``.

    Returns ``(K, 2**k, kind)``: the smallest ``K = odd_part(n) * 2**j`` with a Hadamard construction
    (kind ``"hadamard"``, K = 1 for powers of two); if there is none, the fallback ``K = odd_part(n)``
    with kind ``"hartley"`` (discrete Hartley factor), logging a warning once per ``n``.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"a transform dimension must be >= 1, got {n}")
    K, pow2, kind = _factorize(n)
    if kind == KIND_HARTLEY and n not in _fallback_warned:
        _fallback_warned.add(n)
        logger.warning(
            "no Hadamard matrix for dimension %d = %d * %d: using an orthonormal discrete Hartley "
            "transform of size %d for the odd factor instead",
            n, K, pow2, K,
        )
    return K, pow2, kind


@functools.lru_cache(maxsize=_MATRIX_CACHE_SIZE)
def _orthonormal_factor_cached(K: int, kind: str) -> torch.Tensor:
    if kind == KIND_HADAMARD:
        return _hadamard_cached(K) / math.sqrt(K)
    if kind == KIND_HARTLEY:
        idx = torch.arange(K, dtype=torch.long)
        theta = (2.0 * math.pi / K) * ((idx[:, None] * idx[None, :]) % K).to(torch.float64)
        return (torch.cos(theta) + torch.sin(theta)) / math.sqrt(K)
    raise ValueError(f"unknown factor kind {kind!r}; expected {KIND_HADAMARD!r} or {KIND_HARTLEY!r}")


def orthonormal_factor(K: int, kind: str) -> torch.Tensor:
    """The ``K × K`` orthonormal float64 factor ``M_K``, a fresh copy.

    ``H_K / sqrt(K)`` for kind ``"hadamard"``; the discrete Hartley matrix ``cas(2π a b / K) / sqrt(K)``
    for kind ``"hartley"``. Raises ValueError for another kind or a K with no Hadamard construction.
    """
    return _orthonormal_factor_cached(K, kind).clone()


@functools.lru_cache(maxsize=_MATRIX_CACHE_SIZE)
def _factor_as(K: int, kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _orthonormal_factor_cached(K, kind).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------ transforms
def hadamard_transform(x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """Apply the orthonormal ``U = M_K ⊗ H_{2^k} / sqrt(2^k)`` of size ``n = x.shape[-1]`` to the last dim.

    Args:
        x: ``[..., n]`` floating-point tensor (any batch shape), not modified.
        transpose: apply ``Uᵀ = U⁻¹`` instead.

    Returns:
        ``[..., n]`` tensor in ``x.dtype``: row vectors ``v`` map to ``U v`` (i.e. ``x @ Uᵀ``).
    """
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs a tensor with at least one dimension")
    n = x.shape[-1]
    K, pow2, kind = factor_dim(n)
    if K == 1:
        return fwht(x)
    z = fwht(x.reshape(*x.shape[:-1], K, pow2))  # [..., K, 2^k]
    M = _factor_as(K, kind, x.dtype, x.device)
    # y[..., a, b] = Σ_c M[a, c] z[..., c, b]: fold the batch into rows for a single GEMM.
    y = z.transpose(-1, -2) @ (M if transpose else M.T)  # [..., 2^k, K]
    return y.transpose(-1, -2).reshape(x.shape)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` float32 vector of independent uniform ±1, drawn only from ``generator``."""
    bits = torch.randint(0, _BINARY, (n,), generator=generator, device=generator.device)
    return (bits * _BINARY - 1).to(torch.float32)


class HadamardTransform:
    """The randomized Hadamard transform (RHT) of QuIP# §3: x -> U S x with S = diag(signs).

    Attributes:
        dim: size n of the transformed (last) dimension.
        K, pow2, kind: the factorisation ``n = K * pow2`` from :func:`factor_dim`.
        signs: ``[dim]`` float32 diagonal of S.
    """

    def __init__(self, dim: int, seed: int | None = 0, *, signs: torch.Tensor | None = None) -> None:
        """Args:
        dim: transform size (>= 1).
        seed: seed of a CPU generator for the ±1 signs; ``None`` (with no ``signs``) gives all-ones
            signs, i.e. the plain orthogonal transform U.
        signs: explicit ``[dim]`` sign vector (±1, or real values when fine-tuned); overrides ``seed``.
        """
        self.dim = dim
        self.K, self.pow2, self.kind = factor_dim(dim)
        _factor_as(self.K, self.kind, torch.float32, torch.device("cpu"))  # build the factor now
        if signs is not None:
            if tuple(signs.shape) != (dim,):
                raise ValueError(f"signs must have shape ({dim},), got {tuple(signs.shape)}")
            self.signs = signs.detach().to(torch.float32).clone()
        elif seed is None:
            self.signs = torch.ones(dim, dtype=torch.float32)
        else:
            self.signs = random_signs(dim, torch.Generator().manual_seed(seed))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"expected a tensor of shape [..., {self.dim}], got {tuple(x.shape)}")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]``: ``U (signs ⊙ x)`` for each vector along the last dim."""
        self._check(x)
        return hadamard_transform(x * self.signs.to(dtype=x.dtype, device=x.device))

    def inverse_transform(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]``: ``signs ⊙ (Uᵀ y)``, the exact inverse when signs are ±1."""
        self._check(y)
        return hadamard_transform(y, transpose=True) * self.signs.to(dtype=y.dtype, device=y.device)

    def matrix(self) -> torch.Tensor:
        """Explicit float64 ``[dim, dim]`` matrix ``U S``, so ``transform(x) == x @ matrix().T``."""
        U_T = hadamard_transform(torch.eye(self.dim, dtype=torch.float64))  # row i = U e_i
        return U_T.T * self.signs.to(torch.float64)[None, :]

    def __repr__(self) -> str:
        return f"HadamardTransform(dim={self.dim}, K={self.K}, pow2={self.pow2}, kind={self.kind!r})"
