"""Bitshift-trellis codes (QTIP: Tseng, Sun, Hou, De Sa, NeurIPS 2024, §3–4): computed codes,
tail-biting bitstreams and Viterbi search.

A sequence of ``T`` weights is quantized as ``N = T / V`` steps of ``V`` weights. Step ``t`` is an
``L``-bit state ``s_t``; the next state shifts ``kv = k·V`` new bits in at the bottom:
``s_t = ((s_{t-1} << kv) | b_t) mod 2^L``, so a path is an MSB-first bitstream in which state ``t`` is
the ``L``-bit window starting at bit ``t·kv``. Each state decodes to a ``V``-vector ``code[s]`` that
is *computed* from ``s`` with a few integer operations (no table), so the decoder needs no memory
lookups. *Tail-biting*: the stream is read cyclically (state ``t`` is the window at bit ``t·kv`` of
a cyclic stream of ``N·kv`` bits), so a sequence costs exactly ``k·T`` bits.

Search: Viterbi over the ``2^L`` states (cost ``‖code[s_t] − x_t‖²`` summed over the path), then
QTIP's approximate tail-biting: an unconstrained pass over the sequence rotated by ``N/2`` steps
fixes the top ``L − kv`` bits ``o`` of the state at step 0; a second pass keeps only paths whose
first state starts with ``o`` and whose last state ends with it (a legal cycle). For sequences longer
than ``2·TAIL_BITING_CONTEXT`` steps the first pass sees only that many steps on each side of step 0
(a quarter less work at 256 steps, the same Gaussian MSE: BENCHMARKS.md). Path costs are 16-bit
integers by default (``METRICS``: twice the SIMD lanes of float32, the same Gaussian MSE to four digits;
:func:`viterbi_reference16` is their oracle); a sequence they do not fit takes the float32 search.

Codes (``V = 1``; values divided by their standard deviation over all ``2^L`` states, so the code
has unit variance): ``1mad`` — the byte sum of ``34038481·s + 76625530`` (mod 2^32) minus 510, over
147.8; ``3inst`` — ``x = 89226354·s + 64248484``, ``r = (x & 0x8FFF8FFF) ^ 0x3B603B60``, the sum of
the two float16 halves of ``r``. ``hyb`` (``V = 2``): ``p = s·(s+1) mod 2^16`` picks entry
``p >> 6 & 511`` of a ``[512, 2]`` table stored with each matrix (k-means of a 2-D Gaussian at first,
trainable in fine-tuning), bit 15 of ``p`` negating its first component.

The maths here imports no transformers and does no I/O; the search runs in the native library when
it is built (``qs_viterbi``), else in vectorised torch (:func:`viterbi_reference`, also the test oracle).

:class:`TrellisCodebook` is the codebook BlockLDLQ and the file format use (QTIP §4): a weight matrix
is cut into ``16 × 16`` tiles, each one tail-biting trellis of ``SEQUENCE = 256`` weights read
**column-major** inside the tile (position ``p = 16·c + r`` holds row ``r``, column ``c``), so the 16
consecutive states of a column decode 16 output rows at once (what a CPU kernel accumulates
without horizontal sums). Stored per matrix: int16 ``[m/16, (n/16)·16k]``, row ``i`` the ``n/16``
tiles of output rows ``16i .. 16i+15`` left to right, each ``16k`` words of its packed bitstream.
"""

from __future__ import annotations

import functools

import torch

from quipsharp.codebooks.packing import check_vectors

#: State bits of the trellis (QTIP's L).
STATE_BITS = 16
#: Weights per trellis sequence (QTIP's T = 16 × 16: one 16×16 tile).
SEQUENCE = 256
#: Computed codes with one weight per state (V = 1).
CODES = ("1mad", "3inst")
#: The hybrid code (V = 2): a hash of the state picks one of 2^HYB_LUT_BITS entries of a per-matrix
#: table of 2-vectors and the sign of its first component (QTIP's HYB, Q = 9).
HYB = "hyb"
HYB_LUT_BITS = 9
HYB_V = 2
#: Overall standard deviation of the initial table (QTIP: sqrt(15/16)).
HYB_LUT_STD = (15 / 16) ** 0.5
#: k-means of the initial table: Lloyd iterations on 2^20 samples of a 2-D standard Gaussian, started
#: from 512 standard Gaussian points (seed 0), as QTIP initialises it.
HYB_KMEANS_SAMPLES = 1 << 17  # QTIP uses 2^20; 2^17 gives the same Gaussian MSE here in an eighth of the time
HYB_KMEANS_ITERATIONS = 20
HYB_KMEANS_SEED = 0
_KMEANS_CHUNK = 1 << 16
#: Steps on each side of step 0 that tail-biting's first pass looks at (the whole rotated sequence
#: when it is at most twice as long): as the native ``VITERBI_TB_CONTEXT``.
TAIL_BITING_CONTEXT = 64
#: Path metrics of the search: ``"int16"`` (the default) — inputs and codes in units of 2^-13, squared
#: errors in units of 2^-11, survivors renormalised to their minimum each step (twice the SIMD lanes of
#: float32; a sequence that does not fit falls back to float32) — or ``"float32"``. As the native
#: ``VITERBI16_*`` constants; BENCHMARKS.md compares the two.
METRICS = ("int16", "float32")
VITERBI16_FRAC = 13
VITERBI16_INPUT_MAX = 32767
VITERBI16_SAT = 65535
VITERBI16_RISE_MAX = 16384
#: Rows and columns of a tile (QTIP's Tx = Ty): one trellis per 16 × 16 tile, 16 columns per BlockLDLQ block.
TILE = 16
#: Bits per stored word of a bitstream.
WORD_BITS = 16
#: Input RMS of the normalised weights in units of the code's RMS: QTIP's ``scale_override`` 0.9 (the
#: unit-Gaussian MSE optimum is nearer 1.0, but real weights are heavier-tailed; see BENCHMARKS.md).
TRELLIS_OPT_SCALE = 0.9
_MASK32 = (1 << 32) - 1
_1MAD = (34038481, 76625530, 510.0, 147.800537109375)
_3INST = (89226354, 64248484, 0x8FFF8FFF, 0x3B603B60)


def raw_code(name: str, states: torch.Tensor) -> torch.Tensor:
    """The computed code's raw value of each state (``states`` int64, any shape, values < 2^32) as
    float32 (before normalisation)."""
    s = states.to(torch.int64)
    if name == "1mad":
        a, c, mean, std = _1MAD
        x = (s * a + c) & _MASK32
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)
        return ((total.to(torch.float64) - mean) / std).to(torch.float32)
    if name == "3inst":
        a, c, mask, flip = _3INST
        r = (((s * a + c) & _MASK32) & mask) ^ flip
        hi = (r >> 16).to(torch.int32).to(torch.int16)  # the bit patterns of two float16 values
        lo = (r & 0xFFFF).to(torch.int32).to(torch.int16)
        return hi.view(torch.float16).to(torch.float32) + lo.view(torch.float16).to(torch.float32)
    raise ValueError(f"unknown trellis code {name!r}; expected one of {CODES}")


@functools.lru_cache(maxsize=8)
def _table(name: str, L: int) -> torch.Tensor:
    values = raw_code(name, torch.arange(1 << L, dtype=torch.int64)).to(torch.float64)
    return (values / values.std(correction=0)).to(torch.float32)[:, None].contiguous()


@functools.lru_cache(maxsize=2)
def raw_code_scale(name: str) -> float:
    """The factor from :func:`raw_code`'s values to :func:`code_table`'s (``1 / std`` over all ``2^16``
    states, in float64): the native kernels decode the raw values (3INST's float16 sums are exact in
    float32) and apply it once per output."""
    values = raw_code(name, torch.arange(1 << STATE_BITS, dtype=torch.int64)).to(torch.float64)
    return float(1.0 / values.std(correction=0))


@functools.lru_cache(maxsize=2)
def integer_code(name: str) -> tuple[torch.Tensor, float]:
    """``(raw, scale)`` of a code whose raw values are integers (``1mad``: the byte sum minus 510, in
    ``[-510, 510]``): ``raw`` ``[2^16]`` int32 and the float with ``code_table(name) ≈ raw · scale``
    (to float32 rounding). The native kernels decode ``raw`` and apply ``scale`` once per output."""
    if name != "1mad":
        raise ValueError(f"code {name!r} has no integer form (only 1mad)")
    a, c, mean, _ = _1MAD
    s = torch.arange(1 << STATE_BITS, dtype=torch.int64)
    x = (s * a + c) & _MASK32
    raw = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF) - int(mean)
    table = code_table(name)[:, 0].to(torch.float64)
    r = raw.to(torch.float64)
    return raw.to(torch.int32), float((table * r).sum() / (r * r).sum())


def code_table(name: str, L: int = STATE_BITS) -> torch.Tensor:
    """``[2^L, 1]`` float32: the unit-variance code value of every state (read-only, cached)."""
    if not 2 <= L <= 24:
        raise ValueError(f"state bits must be in [2, 24], got {L}")
    return _table(name, L)


def hyb_index(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entry, negate)`` of HYB states (int64, any shape): ``p = s·(s+1) mod 2^16``; the table entry
    is bits ``15 − Q .. 14`` of ``p``, and bit 15 negates the entry's first component."""
    p = (states.to(torch.int64) * (states.to(torch.int64) + 1)) & 0xFFFF
    return (p >> (15 - HYB_LUT_BITS)) & ((1 << HYB_LUT_BITS) - 1), (p >> 15).bool()


@functools.lru_cache(maxsize=1)
def hyb_initial_lut() -> torch.Tensor:
    """``[512, 2]`` float32: k-means centroids of a 2-D standard Gaussian (Lloyd's algorithm, seeded),
    rescaled to overall standard deviation ``HYB_LUT_STD`` (read-only, cached: every matrix starts here)."""
    gen = torch.Generator().manual_seed(HYB_KMEANS_SEED)
    samples = torch.randn(HYB_KMEANS_SAMPLES, HYB_V, generator=gen)
    centroids = torch.randn(1 << HYB_LUT_BITS, HYB_V, generator=gen)
    for _ in range(HYB_KMEANS_ITERATIONS):
        sums = torch.zeros_like(centroids, dtype=torch.float64)
        counts = torch.zeros(centroids.shape[0], dtype=torch.float64)
        sq = centroids.square().sum(dim=1)[None]
        for chunk in samples.split(_KMEANS_CHUNK):
            nearest = torch.addmm(sq, chunk, centroids.T, alpha=-2).argmin(dim=1)  # ‖c‖² − 2 x·c
            sums.index_add_(0, nearest, chunk.to(torch.float64))
            counts.index_add_(0, nearest, torch.ones(chunk.shape[0], dtype=torch.float64))
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = (sums[filled] / counts[filled, None]).to(torch.float32)
    return (centroids * (HYB_LUT_STD / centroids.square().mean().sqrt())).contiguous()


@functools.lru_cache(maxsize=1)
def _hyb_states() -> tuple[torch.Tensor, torch.Tensor]:
    """``(entry, sign)`` of every state (read-only, cached): the table-independent part of :func:`hyb_table`."""
    entry, negate = hyb_index(torch.arange(1 << STATE_BITS))
    return entry, torch.where(negate, -1.0, 1.0)


def hyb_table(lut: torch.Tensor) -> torch.Tensor:
    """``[2^16, 2]``: the HYB code of every state from a table ``lut`` ``[512, 2]`` (differentiable in it)."""
    entry, sign = _hyb_states()
    values = lut[entry.to(lut.device)]
    return torch.stack([values[:, 0] * sign.to(device=lut.device, dtype=values.dtype), values[:, 1]], dim=1)


def states_from_stream(bits: torch.Tensor, L: int, kv: int) -> torch.Tensor:
    """The tail-biting path of cyclic bitstreams ``bits`` ``[B, N·kv]`` (0/1, MSB first) as states
    ``[B, N]`` int64: state ``t`` is the ``L``-bit window starting at bit ``t·kv`` (wrapping)."""
    nbits = bits.shape[1]
    if nbits % kv or nbits < L:
        raise ValueError(f"a stream of {nbits} bits is not N·{kv} bits with N·{kv} >= {L}")
    starts = torch.arange(0, nbits, kv)
    idx = (starts[:, None] + torch.arange(L)[None]) % nbits  # [N, L]
    weights = 1 << torch.arange(L - 1, -1, -1, dtype=torch.int64)
    return (bits.to(torch.int64)[:, idx] * weights).sum(dim=-1)


def stream_from_states(states: torch.Tensor, L: int, kv: int) -> torch.Tensor:
    """The cyclic bitstream ``[B, N·kv]`` (0/1 uint8, MSB first) of tail-biting paths ``states``
    ``[B, N]``: block ``t`` of ``kv`` bits is the top of state ``t`` (the window at bit ``t·kv``), the
    inverse of :func:`states_from_stream`.

    Raises:
        ValueError: a path that is not a legal tail-biting path (a state that is not its
            predecessor shifted by ``kv`` bits, cyclically).
    """
    states = states.to(torch.int64)
    if not is_tail_biting(states, L, kv):
        raise ValueError("not a tail-biting trellis path: some state is not its predecessor shifted by "
                         f"{kv} bits (cyclically)")
    B, N = states.shape
    top = states >> (L - kv)  # [B, N]: the first kv bits of each window
    shifts = torch.arange(kv - 1, -1, -1, dtype=torch.int64)
    return ((top[:, :, None] >> shifts) & 1).reshape(B, N * kv).to(torch.uint8)


def is_tail_biting(states: torch.Tensor, L: int, kv: int) -> bool:
    """Whether every state ``[B, N]`` is its predecessor shifted by ``kv`` bits, cyclically."""
    states = states.to(torch.int64)
    mask = (1 << L) - 1
    prev = torch.roll(states, 1, dims=1)
    ok = (((prev << kv) & mask) >> kv) == (states >> kv)
    in_range = (states >= 0) & (states <= mask)
    return bool(ok.all() and in_range.all())


def pack_stream(bits: torch.Tensor) -> torch.Tensor:
    """Bitstreams ``[B, nbits]`` (0/1, nbits a multiple of 16) -> uint16 words ``[B, nbits/16]``
    stored as int16 (MSB first), the on-disk form of a trellis."""
    B, nbits = bits.shape
    if nbits % 16:
        raise ValueError(f"a stream of {nbits} bits does not fill 16-bit words")
    w = (bits.to(torch.int64).reshape(B, nbits // 16, 16) << torch.arange(15, -1, -1)).sum(dim=-1)
    return w.to(torch.int32).to(torch.int16)  # two's-complement view of the uint16 words


def unpack_stream(words: torch.Tensor) -> torch.Tensor:
    """int16 words ``[B, W]`` (from :func:`pack_stream`) -> bits ``[B, 16·W]`` uint8."""
    w = words.to(torch.int64) & 0xFFFF
    return ((w[:, :, None] >> torch.arange(15, -1, -1)) & 1).reshape(words.shape[0], -1).to(torch.uint8)


def viterbi_reference(x: torch.Tensor, code: torch.Tensor, L: int, kv: int, constraint: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Viterbi pass in vectorised torch (float64): ``x`` ``[B, N·V]``, ``code`` ``[2^L, V]`` ->
    ``(states int64 [B, N], costs float64 [B])``, the minimum-cost path. ``constraint`` ``[B]`` int64
    (``-1``: none): paths whose first state's top ``L - kv`` bits and last state's low ``L - kv``
    bits equal it (tail-biting). Ties go to the smallest predecessor prefix ``j``, as the native pass."""
    S, V = code.shape
    B = x.shape[0]
    N = x.shape[1] // V
    P, J = 1 << (L - kv), 1 << kv
    xs = x.to(torch.float64).reshape(B, N, V)
    c = code.to(torch.float64)
    states_all = torch.arange(S)

    def dist(t: int) -> torch.Tensor:  # [B, S]
        return ((c[None] - xs[:, t, None, :]) ** 2).sum(dim=-1)

    inf = torch.tensor(float("inf"), dtype=torch.float64)
    cost = dist(0)
    if constraint is not None:
        allowed = (constraint[:, None] < 0) | ((states_all[None] >> kv) == constraint[:, None])
        cost = torch.where(allowed, cost, inf)
    back = []
    for t in range(1, N):
        grouped = cost.reshape(B, J, P)  # [B, j, p]: predecessor (j << (L-kv)) | p
        best, arg = grouped.min(dim=1)  # first minimum on ties
        back.append(arg)
        cost = best.repeat_interleave(J, dim=1) + dist(t)  # state s = p·J + b
    end_ok = torch.ones(B, S, dtype=torch.bool) if constraint is None else (
        (constraint[:, None] < 0) | ((states_all[None] & (P - 1)) == constraint[:, None]))
    total, last = torch.where(end_ok, cost, inf).min(dim=1)
    states = torch.empty(B, N, dtype=torch.int64)
    states[:, N - 1] = last
    s = last
    for t in range(N - 1, 0, -1):
        p = s >> kv
        j = back[t - 1].gather(1, p[:, None])[:, 0]
        s = p | (j << (L - kv))
        states[:, t - 1] = s
    return states, total


def fixed_point(values: torch.Tensor) -> torch.Tensor | None:
    """``values`` (float) in the 16-bit metric's units (``round(v·2^13)``, int64, same shape), or None if
    some ``|v|·2^13`` exceeds ``VITERBI16_INPUT_MAX`` (or is NaN): such inputs take the float32 search."""
    scaled = values.to(torch.float32) * float(1 << VITERBI16_FRAC)
    if not bool((scaled.abs() <= VITERBI16_INPUT_MAX).all()):
        return None
    return torch.round(scaled).to(torch.int64)


def squared_error16(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 16-bit metric's squared error of integer codes and inputs (units 2^-13) in units of 2^-11:
    ``e = clamp(code − x)`` to int16, ``(e·e + 2^14) >> 15`` (``vpmulhrsw``)."""
    e = (code - x).clamp(-32768, 32767)
    return (e * e + (1 << 14)) >> 15


def viterbi_reference16(xq: torch.Tensor, cq: torch.Tensor, L: int, kv: int,
                        constraint: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass with the 16-bit metric, as the native one does it, in torch: ``xq`` int64 ``[B, N·V]``
    and ``cq`` int64 ``[2^L, V]`` from :func:`fixed_point` -> ``(states int64 [B, N], fits bool [B])``.

    A state's cost is ``min(best_{t-1}[s >> kv] + Σ_v squared_error16, 65535)``; ``best_t`` is the
    minimum over the ``J`` states of a prefix minus ``best_{t-1}``'s minimum. ``fits`` is False where a
    step's minimum rose by more than ``VITERBI16_RISE_MAX`` or the path left its ``constraint`` (those
    sequences take the float32 search; their states are meaningless). Ties: the smallest ``j``; the
    end state: the smallest of the least cost."""
    S, V = cq.shape
    B = xq.shape[0]
    N = xq.shape[1] // V
    P, J = 1 << (L - kv), 1 << kv
    xs = xq.reshape(B, N, V)
    prefix_of = torch.arange(S) >> kv
    if constraint is None:
        best = torch.zeros(B, P, dtype=torch.int64)
    else:
        allowed = (constraint[:, None] < 0) | (torch.arange(P)[None] == constraint[:, None])
        best = torch.where(allowed, 0, VITERBI16_SAT)
    norm = torch.zeros(B, dtype=torch.int64)
    fits = torch.ones(B, dtype=torch.bool)
    back = []
    for t in range(N):
        cost = best[:, prefix_of]
        for v in range(V):
            cost = cost + squared_error16(cq[None, :, v], xs[:, t, v, None])
        cost = cost.clamp(max=VITERBI16_SAT)
        best, arg = cost.reshape(B, J, P).min(dim=1)  # first minimum on ties
        back.append(arg)
        best = (best - norm[:, None]).clamp(min=0)
        norm = best.min(dim=1).values
        fits &= norm <= VITERBI16_RISE_MAX
    candidates = best if constraint is None else torch.where(
        (constraint[:, None] < 0) | (torch.arange(P)[None] == constraint[:, None]), best, VITERBI16_SAT + 1)
    end_states = back[-1] * P + torch.arange(P)[None]
    key = candidates * S + end_states  # least cost, then the smallest state
    last = key.min(dim=1).values % S
    states = torch.empty(B, N, dtype=torch.int64)
    states[:, N - 1] = last
    s = last
    for t in range(N - 1, 0, -1):
        p = s >> kv
        s = p + back[t - 1].gather(1, p[:, None])[:, 0] * P
        states[:, t - 1] = s
    if constraint is not None:
        fits &= (constraint < 0) | ((states[:, 0] >> kv) == constraint)
    return states, fits


def _tail_biting_window(N: int) -> tuple[torch.Tensor, int]:
    """Tail-biting's first pass: the window's original steps and the window step of original step 0."""
    steps = min(N, 2 * TAIL_BITING_CONTEXT)
    before = N - N // 2 if steps == N else TAIL_BITING_CONTEXT
    return (torch.arange(steps) + N - before) % N, before % steps


def _viterbi_torch(x: torch.Tensor, code: torch.Tensor, L: int, kv: int, tail_biting: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 search in torch (both passes): ``(states, costs float64)``."""
    V = code.shape[1]
    N = x.shape[1] // V
    constraint = None
    if tail_biting:
        window, zero = _tail_biting_window(N)
        first, _ = viterbi_reference(x.reshape(x.shape[0], N, V)[:, window].reshape(x.shape[0], -1), code, L, kv)
        constraint = first[:, zero] >> kv
    return viterbi_reference(x, code, L, kv, constraint)


def _viterbi_torch16(x: torch.Tensor, code: torch.Tensor, L: int, kv: int, tail_biting: bool) -> torch.Tensor:
    """The 16-bit search in torch, per sequence as the native one (the float64 search where one does not
    fit): states int64 ``[B, N]``."""
    V = code.shape[1]
    B, N = x.shape[0], x.shape[1] // V
    states = torch.empty(B, N, dtype=torch.int64)
    cq = fixed_point(code)
    for b in range(B):
        xq = None if cq is None else fixed_point(x[b:b + 1])
        fits = xq is not None
        if fits:
            constraint = None
            if tail_biting:
                window, zero = _tail_biting_window(N)
                first, fits_first = viterbi_reference16(xq.reshape(1, N, V)[:, window].reshape(1, -1), cq, L, kv)
                constraint = first[:, zero] >> kv
                fits = bool(fits_first[0])
            if fits:
                path, fits_second = viterbi_reference16(xq, cq, L, kv, constraint)
                fits = bool(fits_second[0])
        states[b] = path[0] if fits else _viterbi_torch(x[b:b + 1], code, L, kv, tail_biting)[0][0]
    return states


def viterbi(x: torch.Tensor, code: torch.Tensor, k: int, *, L: int = STATE_BITS, tail_biting: bool = True,
            threads: int | None = None, backend: str = "auto", metric: str = "int16",
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize sequences ``x`` ``[B, N·V]`` (float) to trellis paths of ``k`` bits per weight.

    Returns ``(states int64 [B, N], costs float32 [B])``: the path (decoded values
    ``code[states]``) and its squared error. ``tail_biting``: QTIP's two-pass approximate
    tail-biting (a legal cyclic path, exactly ``k`` bits per weight); else the unconstrained optimum
    (which also spends the first state's ``L - k·V`` extra bits). ``backend``: ``"native"`` (the C
    library), ``"torch"`` (:func:`viterbi_reference`: slow, for tests and small ``L``) or ``"auto"``
    (native when built). ``metric``: one of :data:`METRICS` (``"int16"``: 16-bit path costs where a
    sequence fits them). Both backends give the same paths (with float32: float32 vs float64 costs aside).
    """
    S, V = code.shape
    kv = k * V
    if S != 1 << L or not 1 <= kv < L:
        raise ValueError(f"code of {S} states for L = {L}, or k·V = {kv} outside [1, {L})")
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = x.to(torch.float32).contiguous()
    from quipsharp import kernels

    native = backend == "native" or (backend == "auto" and kernels.available() and kv <= 8)
    if native:
        from quipsharp.kernels.native import viterbi as native_viterbi

        states, costs = native_viterbi(x, code.to(torch.float32).contiguous(), L, kv, tail_biting, threads,
                                       metric=metric)
        return states.to(torch.int64), costs
    if metric == "float32":
        states, costs = _viterbi_torch(x, code, L, kv, tail_biting)
        return states, costs.to(torch.float32)
    states = _viterbi_torch16(x, code, L, kv, tail_biting)
    return states, path_cost(x, states, code)


def path_cost(x: torch.Tensor, states: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``Σ_t ‖code[s_t] − x_t‖²`` per sequence, float32 ``[B]``: ``x`` ``[B, N·V]``, ``states`` ``[B, N]``."""
    return ((decode(states, code).to(torch.float64) - x.to(torch.float64)) ** 2).sum(dim=1).to(torch.float32)


def release_workspace() -> None:
    """Free the native search's scratch, kept from one :func:`viterbi` call to the next (call it when a
    matrix is done)."""
    from quipsharp import kernels

    if kernels.available():
        from quipsharp.kernels.native import release_workspace as native_release

        native_release()


def decode(states: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Values of paths ``states`` ``[..., N]`` -> ``[..., N·V]`` float32."""
    V = code.shape[1]
    return code[states.to(torch.int64)].reshape(*states.shape[:-1], states.shape[-1] * V)


def states_from_words(words: torch.Tensor, kv: int, L: int = STATE_BITS) -> torch.Tensor:
    """The tail-biting paths of packed streams ``words`` ``[B, W]`` (int16, from :func:`pack_stream`)
    as states ``[B, 16·W / kv]`` int64: state ``t`` is the ``L``-bit window at bit ``t·kv`` (wrapping);
    the same as ``states_from_stream(unpack_stream(words), L, kv)`` without the bit-per-byte detour."""
    if L != WORD_BITS:
        return states_from_stream(unpack_stream(words), L, kv)
    w = words.to(torch.int64) & 0xFFFF
    pair = (w << WORD_BITS) | torch.roll(w, -1, dims=1)  # words i and i+1 (cyclically) as 32 bits
    start = torch.arange(w.shape[1] * WORD_BITS // kv, device=w.device) * kv
    shift = WORD_BITS - (start % WORD_BITS)
    return (pair[:, start // WORD_BITS] >> shift) & 0xFFFF


class TrellisCodebook:
    """A bitshift-trellis codebook of ``bits`` bits per weight (QTIP §3–4): a computed code (``1mad``,
    ``3inst``, one weight per state) or ``hyb`` (two weights per state from a per-matrix table).

    Works on whole ``16 × 16`` tiles (see the module docstring): BlockLDLQ hands it column blocks of
    ``dim = 16`` columns and any multiple of 16 rows. Codes of a matrix are the packed bitstreams,
    int16 ``[m/16, n/16, 16·bits]``; the stored form is the same words as ``[m/16, (n/16)·16·bits]``.
    """

    dim = TILE
    tile_rows = TILE
    opt_scale = TRELLIS_OPT_SCALE

    def __init__(self, code: str, bits: int) -> None:
        if code not in (*CODES, HYB):
            raise ValueError(f"unknown trellis code {code!r}; expected one of {(*CODES, HYB)}")
        if isinstance(bits, bool) or bits not in (2, 3, 4):
            raise ValueError(f"trellis bits must be 2, 3 or 4, got {bits!r}")
        self.code = code
        self.bits = bits
        self.name = f"QTIP{code.upper()}{bits}"
        self.words_per_tile = SEQUENCE * bits // WORD_BITS
        self.V = HYB_V if code == HYB else 1
        self.kv = bits * self.V
        #: ``(entries, V)`` of the per-matrix table of a HYB code (stored with each layer), else None.
        self.lut_shape: tuple[int, int] | None = (1 << HYB_LUT_BITS, HYB_V) if code == HYB else None

    @property
    def bits_per_weight(self) -> float:
        """Exactly ``bits``: a tail-biting tile stores ``256·bits`` bits."""
        return float(self.bits)

    def initial_lut(self) -> torch.Tensor | None:
        """The table every HYB matrix starts from (:func:`hyb_initial_lut`; a copy), else None."""
        return hyb_initial_lut().clone() if self.lut_shape else None

    def code_values(self, lut: torch.Tensor | None = None) -> torch.Tensor:
        """``[2^16, V]`` float32: the code of every state (HYB: from ``lut``, default the initial table)."""
        if not self.lut_shape:
            return code_table(self.code)
        return hyb_table(hyb_initial_lut() if lut is None else lut)

    @property
    def table(self) -> torch.Tensor:
        """``[2^16, V]`` float32: the code of every state that quantization uses."""
        return self.code_values()

    def shape_problem(self, m: int, n: int) -> str | None:
        """Why an ``[m, n]`` weight cannot use this codebook (not whole 16 × 16 tiles), or None."""
        if m <= 0 or n <= 0 or m % TILE or n % TILE:
            return (f"out_features and in_features must be positive multiples of {TILE} ({self.name} "
                    f"quantizes {TILE}x{TILE} tiles)")
        return None

    def packed_spec(self, m: int, n: int) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of an ``[m, n]`` matrix's stored codes: int16 ``[m/16, (n/16)·16·bits]``."""
        return torch.int16, (m // TILE, n // TILE * self.words_per_tile)

    def quantize_block(self, x: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a column block: ``x`` ``[m, 16]`` (m a multiple of 16, codebook units) ->
        ``(xhat [m, 16] dtype of x, words int16 [m/16, 16·bits])``, one tail-biting trellis per tile."""
        check_vectors(x, TILE, self.name)
        m = x.shape[0]
        if x.dim() != 2 or m % TILE:
            raise ValueError(f"{self.name}: a block must be [m, {TILE}] with m a multiple of {TILE}, got "
                             f"{tuple(x.shape)}")
        tiles = x.detach().to(torch.float32).reshape(m // TILE, TILE, TILE).transpose(1, 2).reshape(-1, SEQUENCE)
        table = self.table
        states, _ = viterbi(tiles.contiguous(), table, self.bits, threads=threads)
        words = pack_stream(stream_from_states(states, STATE_BITS, self.kv))
        values = table[states].reshape(-1, TILE, TILE).transpose(1, 2).reshape(m, TILE)
        return values.to(x.dtype), words

    def pack_matrix(self, codes: torch.Tensor) -> torch.Tensor:
        """Words ``[m/16, n/16, 16·bits]`` -> the stored form ``[m/16, (n/16)·16·bits]`` int16."""
        if codes.dim() != 3 or codes.shape[2] != self.words_per_tile:
            raise ValueError(f"{self.name}: codes must be [m/16, n/16, {self.words_per_tile}], got "
                             f"{tuple(codes.shape)}")
        return codes.to(torch.int16).reshape(codes.shape[0], -1).contiguous()

    def unpack_matrix(self, packed: torch.Tensor, m: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack_matrix` (checks the stored shape: a stream of the wrong length is refused)."""
        dtype, shape = self.packed_spec(m, n)
        if packed.dtype != dtype or tuple(packed.shape) != shape:
            raise ValueError(f"{self.name}: stored codes of a {m}x{n} weight must be {str(dtype)[6:]} "
                             f"{list(shape)}, got {str(packed.dtype)[6:]} {list(packed.shape)}")
        return packed.reshape(m // TILE, n // TILE, self.words_per_tile)

    def matrix_states(self, codes: torch.Tensor) -> torch.Tensor:
        """Words ``[m/16, n/16, 16·bits]`` -> the tiles' states ``[(m/16)(n/16), 256 / V]`` int64."""
        return states_from_words(codes.reshape(-1, self.words_per_tile), self.kv)

    def matrix_from_states(self, states: torch.Tensor, m: int, n: int, lut: torch.Tensor | None = None
                           ) -> torch.Tensor:
        """The unscaled weight ``[m, n]`` of the tiles' states (differentiable in a HYB ``lut``)."""
        values = self.code_values(lut).to(states.device)[states]  # [tiles, 256 / V, V]: column-major runs
        return values.reshape(m // TILE, n // TILE, TILE, TILE).permute(0, 3, 1, 2).reshape(m, n)

    def decode_matrix(self, codes: torch.Tensor, m: int, n: int, lut: torch.Tensor | None = None) -> torch.Tensor:
        """Words ``[m/16, n/16, 16·bits]`` -> the unscaled weight ``[m, n]`` float32 (HYB: with ``lut``,
        default the initial table)."""
        return self.matrix_from_states(self.matrix_states(codes), m, n, lut)

    def __repr__(self) -> str:
        return f"TrellisCodebook(name={self.name!r}, code={self.code!r}, bits={self.bits}, L={STATE_BITS})"
