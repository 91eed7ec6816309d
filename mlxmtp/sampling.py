"""Logits -> the final sampling distribution, and the exact speculative acceptance rule, at the speed of the device.

``SamplingParams.distribution`` is the float64 reference (temperature, top-k, top-p, in that order, as HF's and
mlx-lm's samplers apply them); tests compare against it. Decoding uses a ``Sampler``, which computes the same
distributions and applies the acceptance rule without copying a [rows, vocab] array anywhere, in one host
synchronisation per round:

- Drafts are drawn on the device from a cheap proposal q: the target's transform restricted to the DRAFT_N largest
  logits (found through block maxima, no pass over the vocabulary but a max). The acceptance rule is exact for
  whatever q a draft was drawn from, as long as that q enters min(1, p/q) and the residual (Leviathan et al. 2023),
  so only the target's p must be exact; q is kept as a sparse (ids, probs) device pair.
- "mlx" backend (the Metal path): the target's distributions, the acceptance test, the residual and the bonus
  token are device arrays too; a round hands back only [accepted count, next token, drafts].
- "numpy" backend (MLX's CPU back end, where exp / sort / topk over a vocabulary are several times slower than
  numpy's; linux-cpu.md): the round's one synchronisation evaluates the verify logits, drafts and q's together;
  the rule then runs on zero-copy numpy views, computing p only for the rows it reaches.
Greedy decoding is an argmax on the device in both (MLX's argmax is fast enough everywhere).

Exact top-p without sorting the nucleus: the nucleus is every id whose probability exceeds the cut value tau (the
n-th largest probability, n = min{n : top-n mass >= top_p}) plus the first of the ids tied at tau, lower ids first
(the reference's stable sort). numpy looks for tau among candidates, each checked exactly: the 64 largest logits
(through strided group maxima) when they may hold the mass, else the ids in a bracket of weights estimated from a
sorted sample of every 16th; when both miss, a mass-weighted quickselect over the vocabulary (np.partition on a
shrinking working set, float64 sums, O(V) expected). A nucleus larger than the 64 largest logits is first left
without its cut: decoding draws from it by rejection (an id drawn from the whole row is kept when the mass before it
is below top_p, one BLAS dot), and decides acceptance tests from bounds on its mass; the cut is found only where a
uniform falls between the bounds. The mlx backend tries the CANDIDATES largest logits first
(ordered pairwise) and otherwise bisects tau over the float32 order (32 fixed steps of a masked sum, no host
synchronisation); with top-k of at most CANDIDATES[0] the candidates always suffice (only ties at the k-th can lie
outside them, and those are kept lower ids first). Residual tolerance: weights are float32 and summed in float32
groups (numpy: strided groups of GROUPS, then float64, and a lazy nucleus's masses before an id by a float32 BLAS
dot; the device: blocks of BLOCK), so an id whose mass before it lies within ~1e-5 of top_p may fall on the other
side of the cut (tests/test_sampling.py near_the_cut).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

# mlx backend: top-p's first candidate set (the largest logits, ordered by pairwise comparison); when it does not
# hold the top-p mass the round is redone with the exact bisection (one more synchronisation, counted in `widened`),
# and the next EXACT_AFTER_WIDENING rounds go to the bisection at once (a flat stretch of text widens round after
# round; both give the same result for the same uniforms, so skipping the candidates changes only the cost).
CANDIDATES = (256,)
EXACT_AFTER_WIDENING = 16
# Drafts: the proposal's support is the DRAFT_N largest logits, found among the DRAFT_N blocks of DRAFT_BLOCK ids
# with the largest maxima (they hold the top DRAFT_N ids).
DRAFT_N = 64
DRAFT_BLOCK = 128
# numpy backend: the quickselect's first split keeps the NP_CANDIDATES largest weights (a trained model's nucleus
# usually fits), later splits halve; working sets of up to NP_SORT are sorted (numpy's vectorised sort: 8,800 float32
# in 15 us here, a third of the quickselect's time on them).
NP_CANDIDATES = 512
NP_SORT = 16384
# ... and sets of up to NP_ORDER ids (a top-k set, the first candidates) are put in the reference's order whole.
NP_ORDER = 512
# ... and sets of up to FEW ids (a top-k set, the largest logits) in Python: numpy's sorts and partitions allocate
# buffers, which cost 0.1-0.3 ms right after a model's evaluation (_group_cumsums), and FEW int64 ids stay under
# glibc's 1,008-byte small requests, which do not.
FEW = 120
# numpy backend at a vocabulary (rows of at least GROUPED ids; sets of up to SMALL ids are handled whole, in float64):
# strided group maxima over GROUPS groups; top-p tries the TOP_P_FIRST largest logits, then a bracket estimated from
# every SAMPLE_STRIDE-th weight.
GROUPED = 16384
GROUPS = 128
SMALL = 4096
TOP_P_FIRST = 64
SAMPLE_STRIDE = 16
# ... and a larger nucleus is drawn from by rejection, its cut found only after this many rejected tries (or where an
# acceptance test needs its exact mass).
LAZY_TRIES = 8
# Rows are sampled by inverse CDF over blocks of this many entries (float64 sums; exact up to rounding).
BLOCK = 128


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise ValueError(f"temperature and top_p must be finite numbers, got {self.temperature}, {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logits: mx.array) -> np.ndarray:
        """Reference: [N, V] logits -> [N, V] float64 probabilities after temperature, top-k and top-p. Greedy ->
        one-hot on the argmax. (Slow at a real vocabulary; decoding uses a Sampler.)"""
        x = np.asarray(logits.astype(mx.float32), dtype=np.float64)
        if self.greedy:
            out = np.zeros_like(x)
            out[np.arange(len(x)), x.argmax(-1)] = 1.0
            return out
        x = x / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = np.partition(x, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, -1)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses the threshold stays)
            drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        return p


def default_backend() -> str:
    """``MLXMTP_SAMPLER`` (mlx or numpy) if set, else mlx where Metal runs MLX and numpy on MLX's CPU back end."""
    forced = os.environ.get("MLXMTP_SAMPLER", "")
    if forced in ("mlx", "numpy"):
        return forced
    return "mlx" if mx.metal.is_available() else "numpy"



# --- the mlx backend: every step a device array --------------------------------------------------------------------

def _sum(e: mx.array) -> mx.array:
    """Row sums [N, 1] in two levels (blocks of BLOCK, then the block sums): float32 error ~(BLOCK + V / BLOCK) eps
    rather than V eps."""
    N, V = e.shape
    if V <= 4 * BLOCK:
        return e.sum(-1, keepdims=True)
    pad = -V % BLOCK
    if pad:
        e = mx.concatenate([e, mx.zeros((N, pad), dtype=e.dtype)], axis=-1)
    return e.reshape(N, -1, BLOCK).sum(-1).sum(-1, keepdims=True)


def _order_key(x: mx.array) -> mx.array:
    """int32 keys ordered as the float32 values (IEEE bits, negatives' magnitude bits flipped; -0 made +0)."""
    b = (x + 0.0).view(mx.int32)
    return mx.where(b < 0, b ^ 0x7FFFFFFF, b)


def _top_p_bisect(x: mx.array, p: mx.array, top_p: float) -> mx.array:
    """The top-p keep mask of [N, V] probabilities p (logits x) without a sort: bisect the cut's key, the largest s
    with mass(key >= s) >= top_p (32 steps cover every int32), then keep the ids above it and the first ties."""
    key = _order_key(x)
    lo, hi = key.min(-1, keepdims=True), key.max(-1, keepdims=True)
    for _ in range(32):
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2) without overflow
        reach = _sum(mx.where(key >= mid, p, 0.0)) >= top_p
        lo, hi = mx.where(reach, mid, lo), mx.where(reach, hi, mid - 1)
    above = (key > lo) & (p > 0)
    return above | _first_ties((key == lo) & (p > 0), p, _sum(mx.where(above, p, 0.0)), top_p, at_least=1)


def _first_ties(tie: mx.array, p: mx.array, above: mx.array, top_p: float, at_least: int = 0) -> mx.array:
    """Of the ids tied at a cut value (mask ``tie``, equal p), those top-p keeps when the ids before them hold the
    mass ``above`` [N, 1]: lower ids first (the reference's stable sort), while the mass before one is below top_p
    (and at least ``at_least``)."""
    p_tie = mx.where(tie, p, 0.0).max(-1, keepdims=True)
    need = mx.ceil((top_p - above) / mx.maximum(p_tie, 1e-38))
    rank = mx.cumsum(tie.astype(mx.int32), axis=-1) - tie
    return tie & (rank < mx.maximum(need, at_least))


def mx_distribution(logits: mx.array, params: SamplingParams, n_cand: int):
    """[N, V] logits -> ([N, V] float32 final probabilities, [N] bool: whether the n_cand candidates held the top-p
    mass, i.e. the result is exact). n_cand >= V: exact (every id ordered pairwise up to CANDIDATES[0] ids, else
    the bisection). With top-k of at most CANDIDATES[0] the result is exact whatever n_cand: every id above the
    k-th largest logit is among the CANDIDATES[0] largest, so only ties at the k-th can lie outside them, and those
    come last in the reference's order."""
    x = logits.astype(mx.float32)
    V = x.shape[-1]
    z = x / params.temperature
    e = mx.exp(z - z.max(-1, keepdims=True))
    kth = None
    if 0 < params.top_k < V:
        kth = mx.topk(x, params.top_k, axis=-1).min(-1, keepdims=True)  # the k-th largest; ties with it stay
        e = mx.where(x >= kth, e, 0.0)
    p = e / _sum(e)  # the one reduction over the vocabulary
    ok = mx.ones((x.shape[0],), dtype=mx.bool_)
    if params.top_p >= 1:
        return p, ok
    top_k_set = kth is not None and params.top_k <= CANDIDATES[0] < V
    if top_k_set:
        n_cand = CANDIDATES[0]
    elif n_cand >= V > CANDIDATES[0]:
        p = mx.where(_top_p_bisect(x, p, params.top_p), p, 0.0)
        return p / _sum(p), ok
    if n_cand >= V:  # a small vocabulary: every id is a candidate
        cand = mx.broadcast_to(mx.arange(V, dtype=mx.uint32), x.shape)
    else:
        cand = mx.argpartition(-x, n_cand - 1, axis=-1)[:, :n_cand]
    xc, pc = mx.take_along_axis(x, cand, -1), mx.take_along_axis(p, cand, -1)
    keep_c, ties = _pairwise_keep(xc, cand, pc, params.top_p), None
    if top_k_set:  # the pairwise rule is exact for the candidates above the k-th (nothing outside precedes them)
        above = xc > kth
        keep_c = keep_c & above
        ties = _first_ties((x == kth) & (p > 0), p, mx.where(above, pc, 0.0).sum(-1, keepdims=True), params.top_p)
    elif n_cand < V:
        vc = xc.min(-1, keepdims=True)  # the candidates hold every id with a larger logit
        ok = mx.where(xc > vc, pc, 0.0).sum(-1) >= params.top_p
        if kth is not None:
            ok = ok | (vc < kth)[:, 0]
    keep = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), cand, keep_c, -1)
    p = mx.where(keep if ties is None else keep | ties, p, 0.0)
    return p / _sum(p), ok


def _pairwise_keep(xc: mx.array, ids: mx.array, pc: mx.array, top_p: float) -> mx.array:
    """Top-p on a candidate set [N, n]: the mass before each candidate in (logit desc, id asc) order by pairwise
    comparison (no sort), kept while below top_p."""
    before = (xc[:, None, :] > xc[:, :, None]) | ((xc[:, None, :] == xc[:, :, None]) &
                                                 (ids[:, None, :] < ids[:, :, None]))
    return ((before * pc[:, None, :]).sum(-1) < top_p) & (pc > 0)


def mx_draw(w: mx.array, key: mx.array) -> mx.array:
    """One draw from each row of unnormalised weights [N, V] (an exponential race: argmax w_i / E_i with
    E_i ~ Exp(1) picks i with probability w_i / sum w, with no cumulative sum to lose precision)."""
    e = -mx.log1p(-mx.random.uniform(shape=w.shape, key=key))
    return mx.argmax(w / e, axis=-1).astype(mx.int32)


def top_ids(x: mx.array, n: int) -> mx.array:
    """[N, V] float32 -> the ids of n largest values [N, min(n, V)] (order arbitrary). At a vocabulary, through the
    n blocks of DRAFT_BLOCK with the largest maxima (every top-n value lies in one): a max over the vocabulary and
    two small partitions, where MLX's CPU argpartition over the vocabulary costs ~10x an argmax."""
    N, V = x.shape
    if V <= n:
        return mx.broadcast_to(mx.arange(V, dtype=mx.uint32), (N, V))
    if V <= 8 * n * DRAFT_BLOCK:
        return mx.argpartition(-x, n - 1, axis=-1)[:, :n]
    B = DRAFT_BLOCK
    pad = -V % B
    xp = mx.concatenate([x, mx.full((N, pad), -mx.inf)], axis=-1) if pad else x
    blocks = mx.argpartition(-xp.reshape(N, -1, B).max(-1), n - 1, axis=-1)[:, :n]
    cand = (blocks[:, :, None] * B + mx.arange(B, dtype=blocks.dtype)).reshape(N, n * B)
    top = mx.argpartition(-mx.take_along_axis(xp, cand, -1), n - 1, axis=-1)[:, :n]
    return mx.minimum(mx.take_along_axis(cand, top, -1), V - 1)  # a padding id (only if -inf logits) -> V - 1


class Proposal:
    """A draft's distribution q: probabilities ``probs`` [1, n] (float32, summing to 1) on ``ids`` [1, n] (device
    arrays; an id may repeat with probability 0)."""

    __slots__ = ("ids", "probs")

    def __init__(self, ids: mx.array, probs: mx.array):
        self.ids, self.probs = ids, probs

    def dense(self, V: int) -> mx.array:
        return mx.zeros((1, V), dtype=mx.float32).at[mx.zeros_like(self.ids), self.ids].add(self.probs)

    def host(self) -> "Dist":
        """The evaluated q as a Dist with sorted ids (zero-copy reads; repeated ids merged). Sorted as Python lists
        (64 entries): numpy's sorts allocate buffers, and here the first allocation of 1 KiB or more after a model's
        evaluation costs 0.1-0.3 ms (_group_cumsums)."""
        ids = np.asarray(memoryview(self.ids))[0].tolist()
        probs = np.asarray(memoryview(self.probs))[0].tolist()
        out_ids, out_w = [], []
        for j in sorted(range(len(ids)), key=ids.__getitem__):
            if out_ids and ids[j] == out_ids[-1]:  # a padding id (top_ids), repeated with probability 0
                out_w[-1] += probs[j]
            else:
                out_ids.append(ids[j])
                out_w.append(probs[j])
        w = np.array(out_w)
        return Dist(np.array(out_ids, dtype=np.int64), w / w.sum())


def mx_propose(logits: mx.array, params: SamplingParams, n: int, key: mx.array):
    """[1, V] logits -> (draft token int32 [1], its Proposal): temperature, top-k and top-p applied to the n largest
    logits only, and a draw from that, all on the device."""
    x = logits.astype(mx.float32)
    ids = top_ids(x, n)
    xc = mx.take_along_axis(x, ids, -1)
    z = xc / params.temperature
    e = mx.exp(z - z.max(-1, keepdims=True))
    if 0 < params.top_k < xc.shape[-1]:
        e = mx.where(xc >= mx.topk(xc, params.top_k, axis=-1).min(-1, keepdims=True), e, 0.0)
    q = e / e.sum(-1, keepdims=True)
    if params.top_p < 1:
        q = mx.where(_pairwise_keep(xc, ids, q, params.top_p), q, 0.0)
        q = q / q.sum(-1, keepdims=True)
    tok = mx.take_along_axis(ids, mx_draw(q, key)[:, None], -1)[:, 0].astype(mx.int32)
    return tok, Proposal(ids.astype(mx.int32), q)


@functools.lru_cache(maxsize=16)
def compiled_proposer(params: SamplingParams, n: int):
    """mx_propose for one setting under mx.compile: (logits, key) -> (token, ids, probs). Compiled drafts are ~1.5x
    faster on MLX's CPU back end at V = 151,936 (paired: ``benchmarks/bench_overhead.py --sampler-ops``)."""
    def propose(logits, key):
        tok, q = mx_propose(logits, params, n, key)
        return tok, q.ids, q.probs
    return mx.compile(propose)


@functools.lru_cache(maxsize=64)
def compiled_acceptor(params: SamplingParams, n_cand: int, k: int):
    """One attempt of the mlx backend's round at candidate-set size n_cand and depth k under mx.compile: (logits
    [k+1, V], key_u, key_r[, drafts [k], q [k, V]]) -> int32 [3 + k]: accepted count, next token, whether the
    candidates held the top-p mass, the drafts (k = 0: the next token of a plain round drawn from the last row).
    Compiled, a top-p round builds one graph call instead of the bisection's ~200 ops: the host's share of a plain
    round with Qwen3's settings fell 4.4 -> 1.6 ms and its time 26 -> 16 ms on MLX's CPU back end at V = 151,936
    (median of 30), and without the bisection (top-k 20: the candidates suffice) to 0.3 ms and 9 ms (issue 8's
    notes)."""
    def attempt(logits, key_u, key_r, *drafted):
        p, ok = mx_distribution(logits, params, n_cand)
        held = ok.all().astype(mx.int32)[None]
        if k == 0:
            return mx.concatenate([mx.zeros((1,), dtype=mx.int32), mx_draw(p[-1:], key_r), held])
        drafts, q = drafted
        n, nxt = mx_accept(drafts, q, p, mx.random.uniform(shape=(k,), key=key_u), key_r)
        return mx.concatenate([n[None], nxt[None], held, drafts])
    return mx.compile(attempt)


def mx_accept(drafts: mx.array, q: mx.array, p: mx.array, u: mx.array, key: mx.array):
    """The acceptance rule on the device. drafts [k] int32, q [k, V], p [k+1, V], u [k] uniforms.
    Returns (accepted count, next token) as int32 scalars: the first rejection by a cumulative product (no Python
    loop), the residual norm(max(0, p - q)) at that row, or the bonus from p[k] when every draft passed."""
    k = drafts.shape[0]
    rows = mx.arange(k)
    pd, qd = p[rows, drafts], q[rows, drafts]
    n = mx.cumprod((u * qd < pd).astype(mx.int32)).sum()  # accept with probability min(1, p/q)
    q_pad = mx.concatenate([q, mx.zeros_like(p[:1])], axis=0)  # row k: nothing to subtract (the bonus)
    pn, qn = mx.take(p, n, axis=0), mx.take(q_pad, n, axis=0)
    r = mx.maximum(pn - qn, 0.0)
    r = mx.where(r.sum() > 0, r, pn)
    return n.astype(mx.int32), mx_draw(r[None], key)[0]


# --- the numpy backend: the same rule on zero-copy views of evaluated logits ---------------------------------------

class Dist:
    """A row's final distribution: probabilities ``w`` (float64, normalised) on ids ``ids`` (sorted; None: every
    id)."""

    __slots__ = ("ids", "w")

    def __init__(self, ids, w):
        self.ids, self.w = ids, w

    def at(self, tokens: np.ndarray) -> np.ndarray:
        if self.ids is None:
            return self.w[tokens]
        pos, hit = _lookup(self.ids, tokens)
        return self.w[pos] * hit  # (np.where with a scalar allocates a buffer: see Proposal.host)


def _lookup(ids: np.ndarray, tokens: np.ndarray):
    """(positions, found): where each token is, or would be, in the sorted ids, and whether it is there."""
    pos = np.minimum(np.searchsorted(ids, tokens), len(ids) - 1)
    return pos, ids[pos] == tokens


class Workspace:
    """Buffers that the numpy backend reuses from row to row, a row needing several [V] arrays: right after a
    model's evaluation a fresh one costs more than the arithmetic on it (np.exp at V = 151,936 on the development
    machines: 0.35 ms into a new array, 0.16 ms into a reused one)."""

    def __init__(self):
        self._buffers: dict = {}

    def get(self, name: str, like: np.ndarray, dtype=None) -> np.ndarray:
        """A buffer of like's length and dtype (or ``dtype``), its contents undefined."""
        key = (name, np.dtype(dtype or like.dtype))
        b = self._buffers.get(key)
        if b is None or len(b) < len(like):
            b = self._buffers[key] = np.empty(len(like), dtype=key[1])
        return b[: len(like)]


def _buffer(ws: Optional[Workspace], name: str, like: np.ndarray, dtype=None) -> np.ndarray:
    """ws's buffer ``name`` (like's length, dtype or like's), or a new array without a workspace."""
    return np.empty(len(like), dtype=dtype or like.dtype) if ws is None else ws.get(name, like, dtype)


def _copy(a: np.ndarray, ws: Optional[Workspace], name: str) -> np.ndarray:
    """A copy of a that is ours to reorder: in ws's buffer ``name`` when given."""
    out = _buffer(ws, name, a)
    np.copyto(out, a)
    return out


def _cut(e: np.ndarray, t: float, ws: Optional[Workspace] = None, above: float = 0.0):
    """Weights e (1-D, >= 0), target mass t <= above + e.sum() -> (w, A): the cut weight w = max{w : above +
    mass(e >= w) >= t} and A = above + mass(e > w), `above` being the mass of ids outside e that are all larger than
    e's. A mass-weighted quickselect: each partition (in place, on one copy of e, in ws when given) splits the working
    set at a pivot and the side holding the cut is kept, the mass of the ids above it carried in `above`; small sets
    are sorted."""
    a, split = e, max(len(e) - NP_CANDIDATES, 0)
    if len(e) > NP_SORT:
        a = _copy(e, ws, "scratch")
    while len(a) > NP_SORT:
        a.partition(split)
        pivot, up = a[split], a[split:]  # a[:split] <= pivot <= up
        m_up = up.sum(dtype=np.float64)
        if above + m_up - pivot >= t:  # the ids after the pivot already reach t: the cut is among them
            a = up[1:]
        else:
            low = a[:split]
            n_eq = np.count_nonzero(low == pivot)
            if above + m_up + n_eq * float(pivot) >= t:
                return pivot, above + up[up > pivot].sum(dtype=np.float64)
            above += m_up + n_eq * float(pivot)
            a = low[low != pivot] if n_eq else low
        split = len(a) // 2
    # Sorted ascending, the cut is where the cumulative mass passes what top-p leaves out, above + mass - t: the
    # inverse CDF there. Rounding: the largest.
    s = np.sort(a)
    c = np.cumsum(s, dtype=np.float64)
    i = int(np.searchsorted(c, above + c[-1] - t, side="right"))
    w = s[min(i, len(s) - 1)]
    return w, above + s[np.searchsorted(s, w, side="right") :].sum(dtype=np.float64)


def _truncate(e: np.ndarray, x: np.ndarray, t: float, ws: Optional[Workspace] = None, pos=None,
              above: float = 0.0) -> float:
    """Zeroes the weights e outside the top-p nucleus (target mass t), in place, and returns the nucleus's mass.
    x: the logits behind e (equal weights are ordered as the reference's stable sort orders them: logit desc, then
    id). pos: when given, the sorted positions of e holding the cut; every weight above them counts in `above` and
    every one below them is zero already."""
    if pos is None and len(e) <= FEW:  # the reference's own rule, in Python (numpy's sorts allocate buffers)
        xs, es = x.tolist(), e.tolist()
        order = sorted(range(len(xs)), key=lambda j: -xs[j])  # stable: equal logits by id
        c = 0.0
        for n, j in enumerate(order, 1):  # the shortest prefix of that order reaching t (rounding: all)
            c += es[j]
            if c >= t:
                break
        e[order[n:]] = 0
        return c
    if pos is None and len(e) <= NP_ORDER:  # ... in numpy
        order = np.argsort(-x, kind="stable")
        c = np.cumsum(e[order])
        n = min(int(np.searchsorted(c, t)) + 1, len(e))  # rounding: all
        e[order[n:]] = 0
        return float(c[n - 1])
    sub = e if pos is None else e[pos]
    w, A = _cut(sub, t, ws, above)
    ties = np.flatnonzero(sub == w)
    if len(ties) > 1:  # equal weights: reference order is logit desc (float32 exp may merge), then id
        ties = ties[np.lexsort((ties, -x[ties if pos is None else pos[ties]]))]
    n = int(min(max(math.ceil((t - A) / float(w)), 1), len(ties))) if w > 0 else len(ties)
    if pos is None:
        np.multiply(e, e >= w, out=e)
    else:
        e[pos[sub < w]] = 0
    if n < len(ties):
        e[ties[n:] if pos is None else pos[ties[n:]]] = 0
    return A + n * float(w)


def _group_max(x: np.ndarray, ws: Optional[Workspace] = None) -> np.ndarray:
    """Maxima of the GROUPS strided groups of x's first GROUPS * (len(x) // GROUPS) entries: gm[c] = max(x[c::L]),
    L = len(gm). One vectorised pass (a max over rows; contiguous blocks' maxima cost ~6x more in numpy)."""
    L = len(x) // GROUPS
    return np.maximum.reduce(x[: GROUPS * L].reshape(GROUPS, L), axis=0, out=_buffer(ws, "group maxima", x[:L]))


def _group_cumsums(e: np.ndarray, ws: Optional[Workspace] = None) -> np.ndarray:
    """float64 running sums of the float32 sums of _group_max's GROUPS strided groups, the tail's (0 when there is
    none) last, so that the last is e's total: one vectorised pass, a quarter of a float64 sum's time (each sum adds
    GROUPS float32 values: error <= GROUPS eps of it, as the mlx backend's blocks of BLOCK). In ws's buffers nothing
    is allocated: here the first allocation of 1 KiB or more after a model's evaluation costs 0.1-0.3 ms (glibc
    then consolidates the small blocks the freed graph left), so the decoding path allocates none."""
    L = len(e) // GROUPS
    gs = _buffer(ws, "group sums", e[: L + 1])
    np.add.reduce(e[: GROUPS * L].reshape(GROUPS, L), axis=0, out=gs[:L])
    gs[L] = e[GROUPS * L :].sum()
    c = _buffer(ws, "group cumsums", gs, np.float64)
    np.copyto(c, gs)
    return np.cumsum(c, out=c)


def _group_top(x: np.ndarray, k: int, ws: Optional[Workspace] = None) -> np.ndarray:
    """The sorted ids of x's k largest values and of every value tied with the k-th, without a numpy sort or
    partition (they allocate buffers: _group_cumsums). Through the strided group maxima: k groups whose maxima are
    >= v hold k values >= v, so x's k-th largest is >= v, and every value that large lies in a group whose maximum
    is >= v. A bisection over the maxima finds such a v with few groups above it, one compare over the row gathers
    the values >= v (the tail past the groups included), and the k-th largest among them is x's."""
    v = _key_value(_at_least(_order_keys(_group_max(x, ws), ws), k, k + k // 4 + 1, ws))
    ids = np.flatnonzero(np.greater_equal(x, v, out=_buffer(ws, "mask", x, bool)))
    vals = x[ids]
    kth = sorted(vals.tolist())[-k] if len(ids) <= FEW else np.partition(vals, len(vals) - k)[len(vals) - k]
    return ids[vals >= kth]


def _order_keys(a: np.ndarray, ws: Optional[Workspace] = None) -> np.ndarray:
    """int32 keys ordered as a's float32 values, in ws: the device's _order_key on numpy buffers (its mx.where
    becomes a sign mask, since np.where and a ufunc's where= allocate)."""
    keys, flip = _buffer(ws, "keys", a, np.int32), _buffer(ws, "key flips", a, np.int32)
    np.add(a, np.float32(0), out=keys.view(np.float32))
    np.right_shift(keys, 31, out=flip)  # -1 where negative, else 0
    np.bitwise_and(flip, 0x7FFFFFFF, out=flip)
    return np.bitwise_xor(keys, flip, out=keys)


def _key_value(s: int) -> np.float32:
    """The float32 value whose _order_keys key is s."""
    return np.int32(s ^ 0x7FFFFFFF if s < 0 else s).view(np.float32)


def _at_least(keys: np.ndarray, k: int, few: int, ws: Optional[Workspace] = None) -> int:
    """A key s with at least k keys >= s (len(keys) >= k), and at most ``few`` where ties allow: bisection between
    the smallest and the largest key (each step one compare and one count; at most 32 steps)."""
    mask = _buffer(ws, "bisection", keys, bool)
    lo, hi, n_lo = int(keys.min()), int(keys.max()), len(keys)
    if np.count_nonzero(np.greater_equal(keys, hi, out=mask)) >= k:
        return hi
    while n_lo > few and hi - lo > 1:  # count(>= lo) = n_lo >= k > count(>= hi)
        mid = (lo + hi) // 2
        n = int(np.count_nonzero(np.greater_equal(keys, mid, out=mask)))
        if n >= k:
            lo, n_lo = mid, n
        else:
            hi = mid
    return lo


class Row:
    """One row of float32 logits -> its final distribution: weights ``e`` (exp((x - max) / T), float32 over the
    vocabulary, numpy's exp being vectorised; float64 on a small set) on ids ``ids`` (sorted; None: every id), zero
    outside the top-p nucleus, and their sum ``mass`` (float64). ``at(tokens)`` reads probabilities, ``sample(u)``
    draws, ``dist()`` materialises the support. With a Workspace ``ws`` the row lives in its buffers: it is valid
    until the next Row built on them.

    At a vocabulary nothing is sorted or copied whole: top-k's set comes through strided group maxima (one pass),
    sums and draws go through strided group sums (one float32 pass), and top-p looks for its cut among candidates
    first: the TOP_P_FIRST largest logits (found like top-k) when they may hold the mass, else a bracket of weights
    estimated from a sorted strided sample; each is checked exactly, and the full quickselect runs when both miss.

    A nucleus of GROUPED or more ids that the first candidates do not hold is left lazy (``lazy``: e whole, the cut
    not found): ``draw(rng)``, ``accepts(d, q(d), u)`` and ``draw_residual(q, rng)``, what decoding calls, decide
    without the cut where they can (see _lazy_draw); ``at``, ``sample``, ``residual`` and ``dist`` find it first."""

    def __init__(self, x: np.ndarray, params: SamplingParams, ws: Optional[Workspace] = None):
        V, T, k = x.shape[0], params.temperature, params.top_k
        self.ws, self.ids = ws, None
        if 0 < k < V:
            if V >= GROUPED and k * GROUPS * 8 <= V:  # through the group maxima
                self.ids = _group_top(x, k, ws)
            else:
                part = _copy(x, ws, "scratch")
                part.partition(V - k)
                self.ids = np.flatnonzero(x >= part[V - k])  # ties with the k-th stay, as in the reference
            x = x[self.ids]
        m = np.float32(x.max())
        self.e = e = self._weights(x, m, T)
        # the running sums of e's strided groups while they are current (sets of GROUPED or more; None: to be redone)
        self._gc = _group_cumsums(e, ws) if len(e) >= GROUPED else None
        Z = float(e.sum(dtype=np.float64) if self._gc is None else self._gc[-1])
        self.mass, self.nucleus, self.lazy = Z, params.top_p < 1, False
        if not self.nucleus:
            return
        t = params.top_p * Z
        if len(e) <= SMALL:
            self.mass = _truncate(e, x, t)
            return
        in_above = np.inf  # every logit above it is in the nucleus
        if self.ids is None and V >= GROUPED and t <= TOP_P_FIRST:  # weights are <= 1: a larger t needs more ids
            ids = _group_top(x, TOP_P_FIRST, ws)
            ec = e[ids].astype(np.float64)
            if ec.sum() >= t:  # the cut is among them (and any id tied with their smallest comes after them)
                self.ids, self.e, self._gc = ids, ec, None
                self.mass = _truncate(ec, x[ids], t)
                return
            # they hold less than t, ties with their smallest logit included: all of them are in the nucleus
            in_above = np.nextafter(x[ids].min(), np.float32(-np.inf))
        if self._gc is not None:  # the cut waits until something needs it (_find_cut); e and its group sums stay whole
            self.x, self.m, self.T, self.t, self.lazy = x, m, T, t, True
            self._in_above, self._out_below = in_above, -np.inf  # what _member has learnt: logits in and out
            return
        self.mass = self._truncated_mass(x, m, T, t)

    def _truncated_mass(self, x: np.ndarray, m: np.float32, T: float, t: float) -> float:
        """Zeroes e outside the nucleus (target mass t) and returns the nucleus's mass: through the bracket, else the
        full quickselect on fresh weights."""
        mass = self._bracketed(x, t)
        if mass is None:  # the estimate missed
            self.e = self._weights(x, m, T)
            mass = _truncate(self.e, x, t, self.ws)
        return mass

    def _find_cut(self) -> None:
        """A lazy nucleus's cut, found now: e is zeroed outside the nucleus and ``mass`` becomes its mass."""
        if self.lazy:
            self.lazy, self._gc = False, None
            self.mass = self._truncated_mass(self.x, self.m, self.T, self.t)

    def _member(self, i: int) -> bool:
        """Whether index i of a lazy nucleus's e is in the nucleus: whether the mass before it in the reference's
        order (logit desc, then id) is below t. One compare over the row (its mask copied into a float32 buffer) and
        one BLAS dot (the mass at or above its logit); ties with it are counted only when they decide. The mass before an id grows with its logit
        falling, so an answer also settles every larger logit (in) or smaller one (out)."""
        x, e, xi, t, ws = self.x, self.e, self.x[i], self.t, self.ws
        if xi > self._in_above or xi < self._out_below:
            return xi > self._in_above
        mask = np.greater_equal(x, xi, out=_buffer(ws, "mask", x, bool))
        ge = _buffer(ws, "mask as weights", e)
        np.copyto(ge, mask)
        s, ei = float(np.dot(e, ge)), float(e[i])  # the mass at or above x[i]
        inside = s - ei < t  # even with every id tied with it before it
        if not inside:
            eq = np.equal(x, xi, out=mask)
            n_eq = int(np.count_nonzero(eq))
            inside = n_eq > 1 and s - (n_eq - int(np.count_nonzero(eq[:i]))) * ei < t
        if inside:
            self._in_above = min(self._in_above, xi)
        else:
            self._out_below = max(self._out_below, xi)
        return inside

    def _lazy_draw(self, rng, q: Optional[Dist] = None) -> Optional[int]:
        """Rejection sampling (exact) for a lazy nucleus, its cut not needed: ids drawn from the whole row's weights
        (its group sums are current) are kept when in the nucleus, and then, with a proposal q given, with
        probability max(0, 1 - q(i) N / e[i]), so that the result follows norm(max(0, p - q)) (Leviathan et al.
        2023). N, the nucleus's mass, lies in [t, t + e[i]) for i in the nucleus (the shortest prefix reaching t
        overshoots it by less than its last weight, at most e[i]); a uniform between the two bounds is decided with
        the cut. The index into e, or None after LAZY_TRIES rejected tries (or one decided with the cut): the caller
        then draws afresh from the exact distribution, which leaves the result's distribution as it is."""
        for _ in range(LAZY_TRIES):
            i = _grouped_draw(self.e, self._gc, rng.random(), self.ws)
            if not self._member(i):
                continue
            qi = 0.0 if q is None else float(q.at(np.array([self._id(i)]))[0])
            if qi == 0.0:
                return i
            ei, v = float(self.e[i]), rng.random()
            if v < 1 - qi * (self.t + ei) / ei:
                return i
            if v < 1 - qi * self.t / ei:  # between the bounds
                self._find_cut()
                ei = float(self.e[i])  # (0 if the cut's sums put i just outside)
                return i if ei > 0 and v < 1 - qi * self.mass / ei else None
        return None

    def _id(self, i: int) -> int:
        return i if self.ids is None else int(self.ids[i])

    def accepts(self, d: int, qd: float, u: float) -> bool:
        """The acceptance test u q(d) < p(d) for draft d (Leviathan et al. 2023). A lazy nucleus decides it without
        its cut unless u q(d) falls between p(d)'s bounds e[d] / (t + e[d]) and e[d] / t (see _lazy_draw)."""
        if self.lazy:
            i = d
            if self.ids is not None:
                pos, hit = _lookup(self.ids, np.array([d]))
                i = int(pos[0]) if hit[0] else -1
            ei, v = (float(self.e[i]) if i >= 0 else 0.0), u * qd
            if v >= ei / self.t:  # above p(d)'s upper bound, whether d is in the nucleus or not
                return False
            if not self._member(i):
                return False  # p(d) = 0
            if v < ei / (self.t + ei):
                return True
        return u * qd < self.at([d])[0]

    def draw(self, rng) -> int:
        """A token from the row's distribution, uniforms from rng (np.random.Generator)."""
        i = self._lazy_draw(rng) if self.lazy else None
        return self.sample(rng.random()) if i is None else self._id(i)

    def draw_residual(self, q: Dist, rng) -> int:
        """A token from norm(max(0, p - q)), p this row's distribution, after a rejected draft drawn from q."""
        i = self._lazy_draw(rng, q) if self.lazy else None
        return self.residual(q).sample(rng.random()) if i is None else self._id(i)

    def _weights(self, x: np.ndarray, m: np.float32, T: float) -> np.ndarray:
        """exp((x - m) / T): float64 on a small set, else float32 (in the workspace's buffer when there is one)."""
        if len(x) <= SMALL:
            return np.exp((x.astype(np.float64) - float(m)) / T)
        e = np.subtract(x, m, dtype=np.float32, out=None if self.ws is None else self.ws.get("e", x))
        e *= np.float32(1 / T)
        return np.exp(e, out=e)

    def _bracketed(self, x: np.ndarray, t: float) -> Optional[float]:
        """Top-p on the vocabulary through a bracket [lo, hi] of weights around the cut, read off a sorted sample of
        every SAMPLE_STRIDE-th weight: its running sums x SAMPLE_STRIDE estimate the mass at or below each weight,
        and where they reach the mass top-p leaves out (many small weights: a far steadier estimate than the mass
        above, which a few large weights dominate) the bracket spans 4 standard deviations of the estimate either
        side. Weights below lo are zeroed, the mass above hi is the rest's total minus the bracket's, and the
        quickselect runs on the bracket alone. None (weights partly zeroed) when the bracket does not hold the cut."""
        e, S, ws = self.e, SAMPLE_STRIDE, self.ws
        a = np.sort(e[::S])
        c = S * np.cumsum(a)  # float32: an estimate, which only places the bracket
        out = self.mass - t
        j = int(np.searchsorted(c, out))
        if j >= len(a):
            return None
        sd = S * math.sqrt(float(np.dot(a[:j], a[:j])))  # sampling len(e) / S ids: Var <= S^2 sum(a^2) below
        jl, jh = int(np.searchsorted(c, out - 4 * sd)) - 1, int(np.searchsorted(c, out + 4 * sd)) + 1
        lo, hi = (a[jl] if jl > 0 else 0), (a[jh] if jh < len(a) else np.inf)
        inside = np.greater_equal(e, lo, out=_buffer(ws, "inside", e, bool))
        if lo > 0:
            np.multiply(e, inside, out=e)
        total = float(_group_cumsums(e, ws)[-1])  # mass(e >= lo)
        band = np.less_equal(e, hi, out=_buffer(ws, "band", e, bool))
        mid = np.flatnonzero(np.logical_and(band, inside, out=band))
        above = total - e[mid].sum(dtype=np.float64)  # mass(e > hi)
        if not above < t <= total:
            return None
        return _truncate(e, x, t, ws, mid, above)

    def at(self, tokens) -> np.ndarray:
        self._find_cut()
        tokens = np.asarray(tokens)
        if self.ids is None:
            return self.e[tokens] / self.mass
        pos, hit = _lookup(self.ids, tokens)
        return self.e[pos] / self.mass * hit

    def sample(self, u: float) -> int:
        """The id at u of the distribution's inverse CDF (ids in order; sets of GROUPED or more in _grouped_draw's
        order)."""
        self._find_cut()
        if len(self.e) >= GROUPED:
            if self._gc is None:
                self._gc = _group_cumsums(self.e, self.ws)
            i = _grouped_draw(self.e, self._gc, u, self.ws)
        else:
            i = np_draw(self.e, u)
        return i if self.ids is None else int(self.ids[i])

    def residual(self, q: Dist) -> "Row":
        """This row, turned in place into norm(max(0, p - q)) (p itself when that is empty, as the reference
        implementations do): q is sparse (a Proposal's few ids), so only its entries change; the weights stay
        unnormalised, for sample()."""
        self._find_cut()
        pos, qw = q.ids, q.w
        if self.ids is not None:
            pos, hit = _lookup(self.ids, q.ids)
            pos, qw = pos[hit], qw[hit]
        old = self.e[pos].astype(np.float64)
        r = np.maximum(old - self.mass * qw, 0.0)
        rest = self.mass - old.sum()  # p's mass off q's ids (exactly 0 only if every weight there is 0)
        if not r.any() and rest <= 1e-9 * self.mass and np.count_nonzero(self.e) == np.count_nonzero(old):
            return self
        self.e[pos] = r.astype(self.e.dtype)  # (a scatter that casts allocates a buffer: see Proposal.host)
        self.mass = rest + r.sum()
        self._gc = None
        return self

    def dist(self) -> Dist:
        self._find_cut()
        if not self.nucleus:
            return Dist(self.ids, self.e / self.mass)
        pos = np.flatnonzero(self.e)
        w = self.e[pos].astype(np.float64)
        return Dist(pos if self.ids is None else self.ids[pos], w / w.sum())


def np_distribution(x: np.ndarray, params: SamplingParams) -> Dist:
    """One row of float32 logits -> its final Dist."""
    return Row(x, params).dist()


def _search(c: np.ndarray, u: float) -> int:
    """The first index whose cumulative sum c exceeds u * c[-1]; at u * c[-1] >= c[-1] (rounding) the first that
    reaches c[-1], so an entry with weight."""
    i = int(np.searchsorted(c, u * c[-1], side="right"))
    return i if i < len(c) else int(np.searchsorted(c, c[-1]))


def _draw_two_level(c: np.ndarray, members, u: float, ws: Optional[Workspace] = None) -> tuple:
    """(group, index in it) at u of an inverse CDF over groups of weights: the group through the cumulative group
    sums c (float64), then within its weights ``members(group)`` (float64 sums, in ws when given). Rounding never
    lands on an entry without weight (zero weights may lie anywhere, e.g. outside a nucleus)."""
    g = _search(c, u)
    w = members(g)
    cw = _buffer(ws, "group members", w, np.float64)
    np.copyto(cw, w)
    np.cumsum(cw, out=cw)
    i = int(min(np.searchsorted(cw, u * c[-1] - (c[g - 1] if g else 0.0), side="right"), len(w) - 1))
    while w[i] <= 0 and i > 0:  # rounding at a group's end: step back to the last entry with weight
        i -= 1
    return g, i


def np_draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF of unnormalised weights (ids in order): block sums first, then within the block."""
    if len(w) <= 4 * BLOCK:
        return _search(np.cumsum(w, dtype=np.float64), u)
    starts = np.arange(0, len(w), BLOCK)
    c = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    b, i = _draw_two_level(c, lambda b: w[starts[b] : starts[b] + BLOCK], u)
    return int(starts[b]) + i


def _grouped_draw(e: np.ndarray, gc: np.ndarray, u: float, ws: Optional[Workspace] = None) -> int:
    """Inverse CDF of weights e through their strided groups' running sums gc (_group_cumsums): a group, then an id
    among its members g, g + L, ..., g + (GROUPS - 1) L (the tail last). The ids come in that order rather than
    their own, which changes which id a given u picks, not the distribution."""
    L = len(gc) - 1
    g, i = _draw_two_level(gc, lambda g: e[g : GROUPS * L : L] if g < L else e[GROUPS * L :], u, ws)
    return g + i * L if g < L else GROUPS * L + i


def np_sample(d: Dist, u: float) -> int:
    i = np_draw(d.w, u)
    return i if d.ids is None else int(d.ids[i])


# --- one interface -------------------------------------------------------------------------------------------------

class Sampler:
    """Samples the first token, draws drafts and runs the acceptance rule for one generation.

    ``draft(logits)`` -> (draft token as an int32 [1] device array, its Proposal q or None when greedy);
    ``accept(drafts, qs, logits)`` -> (accepted count, next token, the drafts as ints), with drafts an int32 [k]
    device array and logits the target's [k+1, V]: the round's one synchronisation. ``lazy_next(logits)`` -> the
    next token of a plain round as a device array with no synchronisation (where ``pipelined``). ``syncs`` /
    ``host_bytes`` count what crossed to the host. Seeded samplers are reproducible (per backend: the mlx backend
    draws from mx.random keys). ``draft_n``: the proposals' support size (default DRAFT_N).
    """

    def __init__(self, params: SamplingParams, seed: Optional[int] = None, backend: Optional[str] = None,
                 draft_n: Optional[int] = None):
        self.params = params
        self.backend = backend or default_backend()
        if self.backend not in ("mlx", "numpy"):
            raise ValueError(f"sampler backend must be mlx or numpy, got {self.backend!r}")
        seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else seed
        self.rng = np.random.default_rng(seed)
        self.key = mx.random.key(seed % 2**63)
        self.draft_n = draft_n or DRAFT_N
        # Plain rounds can be queued ahead: greedy, or on the device (exact at once: no widening in a queued round).
        self.pipelined = params.greedy or self.backend == "mlx"
        self.syncs = 0
        self.host_bytes = 0
        self.widened = 0  # mlx: rounds whose top-p candidates were widened (one more synchronisation each)
        self._exact_rounds = 0  # mlx: rounds left that skip the candidates (EXACT_AFTER_WIDENING)
        self._pending: list = []  # numpy backend: this round's (draft token, Proposal), evaluated by _view
        self._host_drafts: list = []  # ... and the drafts as ints once evaluated
        self._ws = Workspace()  # numpy backend: the buffers its rows live in, one row at a time

    def _split(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def fetch(self, a: mx.array) -> list:
        """The one synchronisation of a round: a small int array to host ints."""
        self.syncs += 1
        self.host_bytes += a.nbytes
        return a.tolist()

    def _view(self, logits: mx.array) -> np.ndarray:
        """The numpy backend's one synchronisation of a round: evaluates the logits with this round's drafts and
        q's; returns a zero-copy float32 numpy view of the logits (CPU memory is the device's) and leaves the
        drafts as ints in ``_host_drafts``."""
        x = logits.astype(mx.float32)
        pending, self._pending = self._pending, []
        mx.eval(x, *[a for tok, q in pending for a in (tok, q.ids, q.probs)])
        self.syncs += 1
        self._host_drafts = [int(np.asarray(memoryview(tok))[0]) for tok, _ in pending]
        return np.asarray(memoryview(x))

    def draft(self, logits: mx.array):
        """logits [1, V] -> (token int32 [1], q)."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        tok, ids, probs = compiled_proposer(self.params, self.draft_n)(logits, self._split())
        q = Proposal(ids, probs)
        if self.backend == "numpy":
            self._pending.append((tok, q))
        return tok, q

    def lazy_next(self, logits: mx.array) -> mx.array:
        """Next token of a plain round ([1, V] logits) as an int32 [1] device array (pipelined samplers only)."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        out = compiled_acceptor(self.params, logits.shape[-1], 0)(logits, self._split(), self._split())
        return out[1:2]

    def accept(self, drafts: Optional[mx.array], qs: list, logits: mx.array) -> tuple[int, int, list]:
        k = 0 if drafts is None else drafts.shape[0]
        if self.params.greedy:
            target = mx.argmax(logits, axis=-1).astype(mx.int32)
            if k == 0:
                return 0, self.fetch(target)[0], []
            n = mx.cumprod((drafts == target[:k]).astype(mx.int32)).sum().astype(mx.int32)
            out = self.fetch(mx.concatenate([n[None], mx.take(target, n)[None], drafts]))
            return out[0], out[1], out[2:]
        if self.backend == "mlx":
            return self._accept_mlx(drafts, qs, logits)
        return self._accept_numpy(drafts, qs, logits)

    def _accept_mlx(self, drafts, qs, logits):
        k = 0 if drafts is None else drafts.shape[0]
        key_u, key_r = self._split(), self._split()
        V = logits.shape[-1]
        drafted = (drafts, mx.concatenate([qi.dense(V) for qi in qs], axis=0)) if k else ()
        sets = (V,) if self._exact_rounds else CANDIDATES + (V,)
        self._exact_rounds = max(0, self._exact_rounds - 1)
        for n_cand in sets:
            out = self.fetch(compiled_acceptor(self.params, n_cand, k)(logits, key_u, key_r, *drafted))
            if out[2] or n_cand >= V:  # same uniforms on the exact set: the result as if it had run first
                return out[0], out[1], out[3:]
            self.widened += 1
            self._exact_rounds = EXACT_AFTER_WIDENING
        raise AssertionError("unreachable")

    def _accept_numpy(self, drafts, qs, logits):
        k = 0 if drafts is None else drafts.shape[0]
        x = self._view(logits)
        d, self._host_drafts = self._host_drafts[:k], []
        for i in range(k):  # p is computed only for the rows the rule reaches
            p, q = Row(x[i], self.params, self._ws), qs[i].host()
            if p.accepts(d[i], q.at(np.array([d[i]]))[0], self.rng.random()):  # w.p. min(1, p/q)
                continue
            return i, p.draw_residual(q, self.rng), d
        return k, Row(x[k], self.params, self._ws).draw(self.rng), d
