"""Logits -> the final sampling distribution, and the exact speculative acceptance rule, at the speed of the device.

``SamplingParams.distribution`` is the float64 reference (temperature, top-k, top-p, in that order, as HF's and
mlx-lm's samplers apply them); tests compare against it. Decoding uses a ``Sampler``, which computes the same
distributions and applies the acceptance rule without copying a [rows, vocab] array anywhere:

- "mlx" backend (the Metal path): drafts, the target's and drafter's distributions, the acceptance test, the
  residual and the bonus token are all device arrays; a round hands back only [accepted count, next token,
  drafts] in one synchronisation.
- "numpy" backend (MLX's CPU back end, where exp / sort / categorical over a vocabulary are several times slower
  than numpy's; linux-cpu.md): the same rule on zero-copy numpy views of the evaluated logits (CPU memory is the
  device's), one synchronisation per sampled row.
Greedy decoding is an argmax on the device in both (MLX's argmax is fast enough everywhere).

Truncation without a full sort: top-k's threshold comes from a partial selection; top-p works on a candidate set
(the ``CANDIDATES`` largest logits, or on the CPU a logit window around the maximum), widened only when the
candidates do not hold the top-p mass; the normaliser over the whole vocabulary is one reduction. A drafter's
distribution q is never widened: the acceptance rule is exact for whatever distribution the draft was drawn from,
as long as that same q enters min(1, p/q) (Leviathan et al. 2023), so only the target's p must be exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

# Candidate-set sizes the mlx backend tries for top-p before sorting the whole vocabulary; up to PAIRWISE candidates
# are ordered by pairwise comparison (no sort at all), more by a stable sort of the candidates.
CANDIDATES = (256, 4096)
PAIRWISE = 256
# numpy backend: logits within WINDOW * temperature of the maximum are top-p's first candidate set (each id outside
# has under exp(-WINDOW) = 2% of the top id's probability), top-k's within TOPK_WINDOW (ids are only counted while
# the window grows); widened by doubling.
WINDOW = 4.0
TOPK_WINDOW = 0.5
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


def mx_distribution(logits: mx.array, params: SamplingParams, n_cand: int):
    """[N, V] logits -> ([N, V] float32 final probabilities, [N] bool: whether the n_cand candidates held the top-p
    mass, i.e. the result equals the full-sort one). n_cand >= V sorts the whole vocabulary."""
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
    if n_cand >= V:
        cand = mx.broadcast_to(mx.arange(V), x.shape)
    else:
        cand = mx.sort(mx.argpartition(-x, n_cand - 1, axis=-1)[:, :n_cand], axis=-1)  # ascending ids: stable ties
    xc, pc = mx.take_along_axis(x, cand, -1), mx.take_along_axis(p, cand, -1)
    if n_cand <= PAIRWISE:  # mass before each candidate in (logit desc, id asc) order, by pairwise comparison
        before = (xc[:, None, :] > xc[:, :, None]) | ((xc[:, None, :] == xc[:, :, None]) &
                                                     (cand[:, None, :] < cand[:, :, None]))
        mass_before = (before * pc[:, None, :]).sum(-1)
    else:  # MLX's sort is stable: equal logits keep id order
        order = mx.argsort(-xc, axis=-1)
        ps = mx.take_along_axis(pc, order, -1)
        mass_before = mx.put_along_axis(mx.zeros_like(pc), order, mx.cumsum(ps, axis=-1) - ps, -1)
    if n_cand < V:
        vc = xc.min(-1, keepdims=True)  # the candidates hold every id with a larger logit
        inside = mx.where(xc > vc, pc, 0.0).sum(-1) >= params.top_p
        ok = inside if kth is None else inside | (vc < kth)[:, 0]
    keep_c = (mass_before < params.top_p) & (pc > 0)
    keep = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), cand, keep_c, -1)
    p = mx.where(keep, p, 0.0)
    return p / _sum(p), ok


def mx_draw(w: mx.array, key: mx.array) -> mx.array:
    """One draw from each row of unnormalised weights [N, V] (an exponential race: argmax w_i / E_i with
    E_i ~ Exp(1) picks i with probability w_i / sum w, with no cumulative sum to lose precision)."""
    e = -mx.log1p(-mx.random.uniform(shape=w.shape, key=key))
    return mx.argmax(w / e, axis=-1).astype(mx.int32)


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
    """A row's final distribution: probabilities ``w`` (float64, normalised) on ids ``ids`` (None: every id)."""

    __slots__ = ("ids", "w")

    def __init__(self, ids, w):
        self.ids, self.w = ids, w

    def at(self, tokens: np.ndarray) -> np.ndarray:
        if self.ids is None:
            return self.w[tokens]
        pos = np.searchsorted(self.ids, tokens)
        pos = np.minimum(pos, len(self.ids) - 1)
        return np.where(self.ids[pos] == tokens, self.w[pos], 0.0)


def np_distribution(x: np.ndarray, params: SamplingParams, exact: bool = True) -> Dist:
    """One row of float32 logits -> its final Dist. Candidates: the logits within a window of the maximum (first
    WINDOW * temperature), doubled until they hold top_k ids and the top-p mass; only they are sorted. exact=False
    keeps the first window (a proposal q need not be the full-sort one; the tests use it to show the widening)."""
    V = x.shape[0]
    m = np.float32(x.max())
    T = params.temperature
    top_k = params.top_k if 0 < params.top_k < V else 0
    if V <= 4096:
        e = np.exp((x.astype(np.float64) - float(m)) / T)
    else:  # float32 exp over the vocabulary (numpy's is vectorised), float64 sums
        e = np.subtract(x, m, dtype=np.float32)
        e *= np.float32(1 / T)
        np.exp(e, out=e)
    if not top_k and params.top_p >= 1:
        return Dist(None, e / e.sum(dtype=np.float64))
    width = (TOPK_WINDOW if top_k else WINDOW) * T
    while True:  # width grows to inf (every id) at worst
        if top_k and np.count_nonzero(x >= m - width) < top_k:
            width = width * 2 if width < 1e4 * T else np.inf
            continue
        ids = np.flatnonzero(x >= m - width)
        xc = x[ids]
        if top_k:
            kth = np.partition(xc, -top_k)[-top_k]
            sel = xc >= kth  # ties with the k-th stay, as in the reference
            ids, xc = ids[sel], xc[sel]
        w = e[ids].astype(np.float64)
        w /= w.sum() if top_k else e.sum(dtype=np.float64)  # the normaliser: over the top-k set or the vocabulary
        if params.top_p < 1:
            if not (top_k or len(ids) == V or not exact or w.sum() >= params.top_p):
                width = width * 2 if width < 1e4 * T else np.inf
                continue
            order = np.argsort(-xc, kind="stable")  # logit desc, id asc (ids ascend): the reference's order
            ws = w[order]
            keep_sorted = (np.cumsum(ws) - ws) < params.top_p
            keep = np.zeros(len(ids), dtype=bool)
            keep[order] = keep_sorted
            ids, w = ids[keep], w[keep]
        return Dist(ids, w / w.sum())


def np_draw(w: np.ndarray, u: float) -> int:
    """Inverse CDF of unnormalised weights: block sums first, then within the block (float64 throughout)."""
    if len(w) <= 4 * BLOCK:
        c = np.cumsum(w, dtype=np.float64)
        return int(min(np.searchsorted(c, u * c[-1], side="right"), len(w) - 1))
    starts = np.arange(0, len(w), BLOCK)
    c = np.cumsum(np.add.reduceat(w, starts, dtype=np.float64))
    t = u * c[-1]
    b = int(min(np.searchsorted(c, t, side="right"), len(c) - 1))
    block = w[starts[b] : starts[b] + BLOCK]
    cb = np.cumsum(block, dtype=np.float64)
    t -= c[b - 1] if b else 0.0
    i = int(min(np.searchsorted(cb, t, side="right"), len(block) - 1))
    while block[i] <= 0 and i > 0:  # rounding at a block's end: step back to the last id with weight
        i -= 1
    return int(starts[b]) + i


def np_sample(d: Dist, u: float) -> int:
    i = np_draw(d.w, u)
    return i if d.ids is None else int(d.ids[i])


def np_residual(p: Dist, q: Dist) -> Dist:
    """norm(max(0, p - q)) on p's support (p itself if the residual is empty, as the reference does)."""
    if p.ids is not None:
        qw = q.at(p.ids)
    elif q.ids is None:
        qw = q.w
    else:
        qw = np.zeros(len(p.w))
        qw[q.ids] = q.w
    r = np.maximum(p.w - qw, 0.0)
    return Dist(p.ids, r) if r.sum() > 0 else p


# --- one interface -------------------------------------------------------------------------------------------------

class Sampler:
    """Samples the first token, draws drafts and runs the acceptance rule for one generation.

    ``draft(logits)`` -> (draft token as an int32 [1] device array, its distribution q or None when greedy);
    ``accept(drafts, qs, logits)`` -> (accepted count, next token, the drafts as ints), with drafts an int32 [k]
    device array and logits the target's [k+1, V]. ``lazy_next(logits)`` -> the next token of a plain round as a
    device array with no synchronisation (where ``pipelined``). ``syncs`` / ``host_bytes`` count what crossed to
    the host. Seeded samplers are reproducible (per backend: the mlx backend draws from mx.random keys).
    """

    def __init__(self, params: SamplingParams, seed: Optional[int] = None, backend: Optional[str] = None):
        self.params = params
        self.backend = backend or default_backend()
        if self.backend not in ("mlx", "numpy"):
            raise ValueError(f"sampler backend must be mlx or numpy, got {self.backend!r}")
        seed = int(np.random.SeedSequence().entropy % 2**63) if seed is None else seed
        self.rng = np.random.default_rng(seed)
        self.key = mx.random.key(seed % 2**63)
        # Plain rounds can be queued ahead (no data-dependent widening): greedy, or top-p off on the device.
        self.pipelined = params.greedy or (self.backend == "mlx" and params.top_p >= 1)
        self.syncs = 0
        self.host_bytes = 0
        self.widened = 0  # rounds whose top-p candidates were widened (one more synchronisation each)
        self._host_drafts: list = []  # numpy backend: this round's drafts, drawn on the host

    def _split(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def fetch(self, a: mx.array) -> list:
        """The one synchronisation of a round: a small int array to host ints."""
        self.syncs += 1
        self.host_bytes += a.nbytes
        return a.tolist()

    def _view(self, logits: mx.array) -> np.ndarray:
        """Zero-copy float32 numpy view of evaluated logits (the numpy backend on MLX's CPU back end)."""
        x = logits.astype(mx.float32)
        mx.eval(x)
        self.syncs += 1
        return np.asarray(memoryview(x))

    def draft(self, logits: mx.array):
        """logits [1, V] -> (token int32 [1], q)."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        if self.backend == "mlx":
            q, _ = mx_distribution(logits, self.params, CANDIDATES[0])  # never widened: q is what was drawn from
            return mx_draw(q, self._split()), q
        d = np_distribution(self._view(logits)[0], self.params, exact=False)
        tok = np_sample(d, self.rng.random())
        self._host_drafts.append(tok)
        return mx.array([tok], dtype=mx.int32), d

    def lazy_next(self, logits: mx.array) -> mx.array:
        """Next token of a plain round ([1, V] logits) as an int32 [1] device array (pipelined samplers only)."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        p, _ = mx_distribution(logits, self.params, CANDIDATES[0])
        return mx_draw(p, self._split())

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
        for n_cand in CANDIDATES + (V,):
            p, ok = mx_distribution(logits, self.params, n_cand)
            if k == 0:
                n, nxt = mx.array(0, dtype=mx.int32), mx_draw(p[-1:], key_r)[0]
                parts = [n[None], nxt[None], ok.all().astype(mx.int32)[None]]
            else:
                u = mx.random.uniform(shape=(k,), key=key_u)
                n, nxt = mx_accept(drafts, mx.concatenate(qs, axis=0), p, u, key_r)
                parts = [n[None], nxt[None], ok.all().astype(mx.int32)[None], drafts]
            out = self.fetch(mx.concatenate(parts))
            if out[2] or n_cand >= V:  # same uniforms on a wider candidate set: the full-sort result
                return out[0], out[1], out[3:]
            self.widened += 1
        raise AssertionError("unreachable")

    def _accept_numpy(self, drafts, qs, logits):
        k = 0 if drafts is None else drafts.shape[0]
        x = self._view(logits)
        d, self._host_drafts = self._host_drafts[:k], []
        for i in range(k):
            p = np_distribution(x[i], self.params)
            tok = np.array([d[i]])
            if self.rng.random() * qs[i].at(tok)[0] < p.at(tok)[0]:  # accept with probability min(1, p/q)
                continue
            return i, np_sample(np_residual(p, qs[i]), self.rng.random()), d
        return k, np_sample(np_distribution(x[k], self.params), self.rng.random()), d
