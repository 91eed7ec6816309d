"""The device sampler (mlxmtp/sampling.py): both back ends' final distributions equal the float64 reference
(temperature, top-k, top-p, their combinations, ties, top-p = 1, top-k >= vocab, a flat 152K-vocabulary nucleus),
the numpy backend's candidates at a vocabulary (top-k through group maxima, top-p's largest logits, its sampled
bracket and the fallback when that misses), the in-place residual, the quickselect and the candidate widening, the
truncated draft proposals, the draws, the acceptance rule's output distribution (with truncated proposals too),
and what crosses to the host while decoding. Float32 throughout."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats as sps

from mlxmtp import sampling
from mlxmtp.sampling import CANDIDATES, Sampler, SamplingParams, mx_distribution
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import chi_square_p, exact_joint, sampled_counts, sampling_model, take  # noqa: F401
from tests.toy_model import ToyModel

GRID = [SamplingParams(t, p, k) for t, p, k in itertools.product((0.5, 1.0, 1.7), (1.0, 0.9, 0.3), (0, 1, 3))]


def dense(d: sampling.Dist, V: int) -> np.ndarray:
    if d.ids is None:
        return d.w
    out = np.zeros(V)
    out[d.ids] = d.w
    return out


def logits_cases(V: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yield rng.standard_normal((3, V)).astype(np.float32) * 3  # distinct values
    yield np.round(rng.standard_normal((3, V)) * 1.5).astype(np.float32)  # many ties, at the top-k and top-p cuts


def near_the_cut(x: np.ndarray, params: SamplingParams, tol: float = 1e-5) -> np.ndarray:
    """Ids whose cumulative mass before them (reference order) is within tol of top_p: float32 masses (device sums,
    float32 exp weights) may put the top-p cut one id earlier or later there."""
    if params.top_p >= 1:
        return np.zeros(x.shape, dtype=bool)
    p = SamplingParams(params.temperature, 1.0, params.top_k).distribution(mx.array(x))
    order = np.argsort(-p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, -1)
    out = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(out, order, np.abs(np.cumsum(ps, -1) - ps - params.top_p) < tol, -1)
    return out


def check_backends(x: np.ndarray, params: SamplingParams, atol=2e-6, rtol=1e-4):  # float32 sums over V
    ref = params.distribution(mx.array(x))
    V = x.shape[-1]
    cut = near_the_cut(x, params)
    # (the ids at such a cut are left out; moving one of them changes the row's normaliser by < 1e-3 here)
    r = np.where(cut.any(-1, keepdims=True), 1e-3, rtol)
    for n_cand in CANDIDATES + (V,):  # the candidate set (where it holds the top-p mass), then the bisection
        p, ok = mx_distribution(mx.array(x), params, n_cand)
        p, ok = np.array(p), np.array(ok)
        # top-k sets of at most CANDIDATES[0] are exact at once (no widening)
        assert ok.all() or (n_cand < V and not 0 < params.top_k <= CANDIDATES[0] < V)
        bad = (np.abs(p - ref) > atol + r * ref) & ~cut & ok[:, None]
        assert not bad.any(), f"mlx, {params}, {n_cand} candidates: {np.argwhere(bad)[:3]}"
    ws = sampling.Workspace()
    for i in range(len(x)):
        row = sampling.Row(x[i], params)
        d = dense(row.dist(), V)
        bad = (np.abs(d - ref[i]) > atol + r[i] * ref[i]) & ~cut[i]
        assert not bad.any(), f"numpy, {params}: {np.argwhere(bad)[:3]}"
        # the lazy rule's p (its normaliser adds float32 group sums at a vocabulary, dist() renormalises in float64)
        np.testing.assert_allclose(row.at(np.arange(V)), d, rtol=1e-5, atol=1e-12)
        in_ws = sampling.Row(x[i], params, ws)  # in the buffers the previous row used
        np.testing.assert_array_equal(dense(in_ws.dist(), V), d)
        check_inverse_cdf(in_ws, d)


def draw_order(n: int) -> np.ndarray:
    """The order of ids in which Row.sample inverts the CDF of a row of n entries: their own, or from GROUPED on,
    strided group by strided group (ids g, g + L, g + 2L, ..., for g < L = n // GROUPS), then the tail."""
    if n < sampling.GROUPED:
        return np.arange(n)
    L = n // sampling.GROUPS
    return np.r_[np.arange(sampling.GROUPS * L).reshape(sampling.GROUPS, L).T.ravel(), sampling.GROUPS * L:n]


def check_inverse_cdf(row: sampling.Row, d: np.ndarray, n: int = 200):
    """Row.sample(u) is the inverse CDF of the row's distribution d (in draw_order over the row's set): u in the
    middle of an id's interval gives that id (for up to n ids of the support, its ends included, those of
    probability > 1e-9: a narrower interval is within the sums' rounding), and u next to 1 an id with weight."""
    ids = np.flatnonzero(d > 1e-9)
    support = np.arange(len(d)) if row.ids is None else row.ids
    order = support[draw_order(len(support))]
    c = np.zeros(len(d))
    c[order] = np.cumsum(d[order])
    pick = np.unique(np.concatenate([ids[[0, -1]], np.random.default_rng(1).choice(ids, min(n, len(ids)))]))
    for i in pick:
        assert row.sample(c[i] - d[i] / 2) == i
    assert d[row.sample(np.nextafter(1.0, 0.0))] > 0


@pytest.mark.parametrize("V", [40, 300, 3000])  # a nucleus ordered in Python (<= FEW ids), by argsort, by quickselect
def test_distributions_equal_reference(V):
    for x in logits_cases(V):
        for params in GRID:
            check_backends(x, params)
        for params in (SamplingParams(1.0, top_k=V), SamplingParams(0.8, 0.9, V + 5), SamplingParams(1.0, 1.0, V - 1)):
            check_backends(x, params)


def test_flat_vocabulary_nucleus():
    """A random stand-in's flat logits at a real vocabulary: the top-p 0.95 nucleus at temperature 0.6 holds ~74k
    of 151,936 ids (the numpy quickselect's working set shrinks past its first candidates; the mlx backend
    bisects), and with heavy ties the cut falls inside a tie group of thousands of ids."""
    V = 151_936
    rng = np.random.default_rng(4)
    flat = rng.standard_normal((1, V)).astype(np.float32)
    ties = np.round(rng.standard_normal((1, V)) * 2).astype(np.float32)
    for x in (flat, ties):
        for params in (SamplingParams(0.6, 0.95), SamplingParams(1.0, 0.5, 100_000)):
            check_backends(x, params)
    assert 70_000 < len(sampling.Row(flat[0], SamplingParams(0.6, 0.95)).dist().ids) < 80_000


@pytest.fixture
def brackets(monkeypatch):
    """The results of Row._bracketed (None: the bracket missed and the full quickselect ran) in the order called."""
    seen, real = [], sampling.Row._bracketed

    def spy(self, x, t):
        seen.append(real(self, x, t))
        return seen[-1]

    monkeypatch.setattr(sampling.Row, "_bracketed", spy)
    return seen


def test_top_k_through_group_maxima():
    """At a vocabulary top-k's set comes from the strided groups with the largest maxima: the top values spread over
    many groups, all in one group, and heavy ties at the k-th value spanning groups all give the reference's set."""
    V, L = 151_936, 151_936 // sampling.GROUPS
    rng = np.random.default_rng(5)
    one_group = rng.standard_normal(V).astype(np.float32)
    one_group[7 + L * np.arange(30)] += 10  # the 30 largest logits share group 7
    ties = np.round(rng.standard_normal(V) * 1.5).astype(np.float32)
    for x in (rng.standard_normal(V).astype(np.float32) * 3, one_group, ties):
        for k in (1, 20, 64):
            row = sampling.Row(x, SamplingParams(1.0, 1.0, k))
            kth = np.sort(x)[-k]
            np.testing.assert_array_equal(row.ids, np.flatnonzero(x >= kth))
        check_backends(x[None], SamplingParams(0.7, 0.8, 20))


def test_top_k_selection_without_a_sort():
    """_group_top (bisection over the group maxima, no numpy sort) gives the ids of the k largest logits and their
    ties: rows with -inf logits, signed zeros, heavy ties, the largest values in the tail past the groups or in one
    group, vocabularies with and without a tail, and a k whose candidates exceed FEW (numpy's partition then)."""
    rng = np.random.default_rng(12)
    for V in (16_384, 16_384 + 77, 151_936):
        L = V // sampling.GROUPS
        base = rng.standard_normal(V).astype(np.float32) * 2
        masked = base.copy()
        masked[rng.choice(V, V // 2, replace=False)] = -np.inf
        zeros = np.zeros(V, dtype=np.float32)
        zeros[rng.choice(V, 50, replace=False)] = -0.0
        zeros[rng.choice(V, 10, replace=False)] = 1.0
        tail = base.copy()
        tail[sampling.GROUPS * L :] += 20  # (no tail at 16,384 and 151,936: then the last group's ids)
        one_group = base.copy()
        one_group[3 + L * np.arange(40)] += 10
        for x in (base, masked, zeros, np.round(base), tail, one_group, -np.abs(base) - 1):
            for k in (1, 7, 20, 64, V // (8 * sampling.GROUPS)):
                want = np.flatnonzero(x >= np.sort(x)[-k])
                for ws in (None, sampling.Workspace()):
                    np.testing.assert_array_equal(sampling._group_top(x, k, ws), want)


def test_order_keys_and_bisection():
    """_order_keys orders as the float32 values (negatives, signed zeros, infinities); _at_least finds a key with at
    least k keys above it and at most `few` (distinct keys), or the k-th largest when ties hold more."""
    rng = np.random.default_rng(13)
    a = np.r_[rng.standard_normal(2000) * 50, -np.inf, np.inf, 0.0, -0.0, 1e-42, -1e-42].astype(np.float32)
    keys = sampling._order_keys(a).copy()
    np.testing.assert_array_equal(np.argsort(keys, kind="stable"), np.argsort(a + 0.0, kind="stable"))
    assert [sampling._key_value(int(s)) for s in keys[:5]] == list(a[:5])
    for k, few in ((1, 1), (10, 12), (300, 400)):
        n = np.count_nonzero(keys >= sampling._at_least(keys, k, few))
        assert k <= n <= few
    ties = sampling._order_keys(np.round(a / 50))
    s = sampling._at_least(ties, 10, 12)
    assert s == np.sort(ties)[-10]


@pytest.mark.parametrize("n", [3, 300])  # ordered in Python (<= FEW ids), by argsort
def test_truncate_keeps_the_shortest_prefix_reaching_top_p(n):
    """_truncate's small sets: the reference's rule on exact binary weights, where the mass reaches top_p exactly
    (the prefix that reaches it stops there) and ties are ordered by id."""
    e, x = np.zeros(n), np.full(n, -10.0, dtype=np.float32)  # zero weights after the first three
    e[:3], x[:3] = (0.25, 0.5, 0.25), (1.0, 2.0, 1.0)
    assert sampling._truncate(e, x, 0.75) == 0.75
    np.testing.assert_array_equal(e[:3], [0.25, 0.5, 0.0])


def test_top_p_candidates_and_brackets(brackets):
    """Top-p at a vocabulary: a peaked row's cut lies among the TOP_P_FIRST largest logits (no bracket); when those
    do not hold the mass the sampled bracket takes over; a row whose every SAMPLE_STRIDE-th logit is unlike the rest
    misleads the estimate, and the full quickselect gives the same distribution."""
    V = 151_936
    rng = np.random.default_rng(6)
    base = rng.standard_normal(V).astype(np.float32)
    peaked = base.copy()
    peaked[rng.choice(V, 3, replace=False)] += 14.0
    check_backends(peaked[None], SamplingParams(0.6, 0.95))
    assert brackets == []
    shoulder = base.copy()  # one top logit, 200 near 0.6 of its weight: top-p 0.5 needs ~100 of them
    shoulder[rng.choice(V, 201, replace=False)] = np.r_[12.0, 12.0 + np.log(0.6) - np.linspace(0, 0.01, 200)]
    check_backends(shoulder[None], SamplingParams(1.0, 0.5))
    assert len(brackets) == 2 and brackets[0] is not None  # (check_backends builds the row twice)
    misleading = base.copy()
    misleading[:: sampling.SAMPLE_STRIDE] += 1.0
    check_backends(misleading[None], SamplingParams(0.6, 0.95))
    assert len(brackets) == 4 and brackets[2] is None


def test_residual_in_place():
    """Row.residual is norm(max(0, p - q)) over the vocabulary (dense, and on a top-k set), and p itself when q
    covers p; draws from it follow its inverse CDF."""
    V = 151_936
    rng = np.random.default_rng(7)
    x = rng.standard_normal(V).astype(np.float32)
    x[:40] += 4.0
    for params in (SamplingParams(0.6, 0.95), SamplingParams(0.7, 0.8, 20), SamplingParams(1.0)):
        p = params.distribution(mx.array(x[None]))[0]
        top = np.argsort(-p)[:50]
        q = sampling.Dist(np.sort(top), p[np.sort(top)] * 0.5 + 0.5 / 50)  # overlaps p's largest entries
        r = np.maximum(p - dense(q, V), 0.0)
        r /= r.sum()
        row = sampling.Row(x, params, sampling.Workspace()).residual(q)
        np.testing.assert_allclose(dense(row.dist(), V), r, atol=2e-6, rtol=1e-4)
        check_inverse_cdf(row, dense(row.dist(), V))
    params = SamplingParams(1.0, 1.0, 3)
    p = params.distribution(mx.array(x[None]))[0]
    ids = np.flatnonzero(p)
    row = sampling.Row(x, params).residual(sampling.Dist(ids, p[ids]))
    np.testing.assert_allclose(dense(row.dist(), V), p, rtol=1e-6)


class Uniforms:
    """A stand-in for the sampler's np.random.Generator: the given uniforms, then seeded ones."""

    def __init__(self, us, seed=0):
        self.us, self.rng = list(us), np.random.default_rng(seed)

    def random(self):
        return self.us.pop(0) if self.us else self.rng.random()


def lazy_rows():
    """Rows whose top-p nucleus is too large for the first candidates, so Row leaves it lazy: flat logits and heavy
    ties (the cut inside a tie group), on the vocabulary and on a large top-k set; and a peaked row whose nucleus of
    ~85 ids the TOP_P_FIRST largest logits do not hold (those are then known to be in it)."""
    V = 151_936
    rng = np.random.default_rng(8)
    for x in (rng.standard_normal(V).astype(np.float32), np.round(rng.standard_normal(V) * 2).astype(np.float32)):
        for params in (SamplingParams(0.6, 0.95), SamplingParams(1.0, 0.5, 100_000)):
            yield x, params, params.distribution(mx.array(x[None]))[0], near_the_cut(x[None], params)[0]
    x = rng.standard_normal(V).astype(np.float32)
    top = rng.choice(V, 90, replace=False)
    x[top] = np.r_[np.full(30, 9.0), 8.7 - np.linspace(0, 0.01, 60)]  # weights 1 and ~0.61 at T = 0.6
    params = SamplingParams(0.6, 0.95)
    yield x, params, params.distribution(mx.array(x[None]))[0], near_the_cut(x[None], params)[0]


def test_lazy_nucleus_membership():
    """A lazy nucleus's membership test (mass before an id in the reference order below t) agrees with the
    reference at ids across the row and at the ids tied with the cut's logit around where the cut falls among them
    (lower ids first), except within float32 sums of the cut; none of it finds the cut."""
    rng = np.random.default_rng(9)
    for x, params, ref, cut in lazy_rows():
        row = sampling.Row(x, params)
        assert row.lazy
        support = np.arange(len(x)) if row.ids is None else row.ids
        tied = np.flatnonzero(x[support] == x[ref > 0].min())
        n_in = np.count_nonzero(ref[support[tied]] > 0)
        largest = np.argsort(x[support])[-100:]
        pick = np.unique(np.r_[rng.choice(len(support), 300, replace=False), tied[max(n_in - 40, 0) : n_in + 40],
                               largest])
        checked = [i for i in pick if not cut[support[i]]]
        assert [row._member(i) for i in checked] == [bool(ref[support[i]] > 0) for i in checked]
        assert 0 < sum(ref[support[checked]] > 0) < len(checked)
        assert row.lazy


def test_lazy_draws_reject_outside_the_nucleus():
    """Row.draw on a lazy nucleus is rejection sampling from the whole row: a uniform whose id (the whole row's
    inverse CDF, as an untruncated row draws it) lies outside the nucleus is passed over for the next; after
    LAZY_TRIES such the cut is found and the exact inverse CDF draws."""
    for x, params, ref, cut in lazy_rows():
        whole = sampling.Row(x, SamplingParams(params.temperature, 1.0, params.top_k))
        us = np.random.default_rng(10).random(400)
        ids = np.array([whole.sample(u) for u in us])
        inside, outside = us[(ref[ids] > 0) & ~cut[ids]], us[(ref[ids] == 0) & ~cut[ids]]
        assert len(inside) and len(outside) >= 2
        row = sampling.Row(x, params)
        assert row.draw(Uniforms([outside[0], outside[1], inside[0]])) == whole.sample(inside[0]) and row.lazy
        row = sampling.Row(x, params)
        assert row.draw(Uniforms([outside[0]] * sampling.LAZY_TRIES + [0.3])) == sampling.Row(x, params).sample(0.3)
        assert not row.lazy


def test_lazy_acceptance_decisions():
    """Row.accepts on a lazy nucleus: u q(d) < p(d) decided from p(d)'s bounds without the cut, and with it where
    u q(d) lies between them, equal to the exact rule in both cases."""
    rng = np.random.default_rng(11)
    for x, params, ref, cut in lazy_rows():
        exact = sampling.Row(x, params)
        members = np.flatnonzero((ref > 0) & ~cut)
        others = np.flatnonzero((ref == 0) & ~cut)
        for d in np.r_[rng.choice(members, 3), others[:1]]:
            p = float(exact.at([d])[0])
            for qd in (0.5 * ref[d], 2 * ref[d], 1e-3):
                for u in rng.random(5):
                    row = sampling.Row(x, params)
                    assert row.accepts(int(d), qd, u) == (u * qd < p) and row.lazy
            if p > 0:  # u q(d) just below p(d): between the bounds, decided with the cut
                row = sampling.Row(x, params)
                assert row.accepts(int(d), p, 1 - 1e-9) and not row.lazy


def test_lazy_residual_decisions():
    """Row.draw_residual on a lazy nucleus: a draw i from the nucleus on q's support is kept with probability
    1 - q(i) / p(i), decided from p(i)'s bounds, or with the cut when the uniform lies between them; a rejected try
    is followed by the next."""
    x, params, ref, cut = next(lazy_rows())
    whole = sampling.Row(x, SamplingParams(params.temperature))
    us = np.random.default_rng(13).random(50)
    ids = np.array([whole.sample(u) for u in us])
    (ui, i), (uj, j) = [(u, d) for u, d in zip(us, ids) if ref[d] > 0 and not cut[d]][:2]
    p_i = float(sampling.Row(x, params).at([i])[0])
    q = sampling.Dist(np.array([i]), np.array([0.5 * p_i]))  # keeps i with probability 1/2
    for v, out, lazy in ((0.2, i, True), (0.8, j, True), (0.5 - 1e-9, i, False), (0.5 + 1e-9, None, False)):
        row = sampling.Row(x, params)
        drawn = row.draw_residual(q, Uniforms([ui, v, uj, 0.3]))
        assert row.lazy == lazy
        # rejected between the bounds: the exact residual draws afresh (the next uniform)
        assert drawn == (out if out is not None else sampling.Row(x, params).residual(q).sample(uj))


def test_acceptance_rule_on_a_lazy_nucleus(monkeypatch):
    """The acceptance rule's output distribution (as in test_acceptance_rule_emits_the_target_distribution) at a
    vocabulary where the numpy backend keeps both rows' nuclei lazy: the test, the residual's rejection sampling
    and the bonus draw, with p and q overlapping on a head of 200 ids; counts in 20 bins of equal mass."""
    V, runs = sampling.GROUPED, 2000
    rng = np.random.default_rng(12)
    p_logits = rng.standard_normal((2, V)).astype(np.float32)
    p_logits[:, :200] += 6.0
    q_logits = mx.array(p_logits[:1] + 0.3 * rng.standard_normal((1, V)).astype(np.float32))
    params = SamplingParams(1.0, 0.9)
    ref = params.distribution(mx.array(p_logits))
    cuts, real = [], sampling.Row._find_cut

    def spy(self):
        cuts.append(self.lazy)
        real(self)

    monkeypatch.setattr(sampling.Row, "_find_cut", spy)
    sampler = Sampler(params, seed=0, backend="numpy")
    first, second, accepted = [], [], 0
    for _ in range(runs):
        tok, q = sampler.draft(q_logits)
        n, nxt, d = sampler.accept(tok, [q], mx.array(p_logits))
        first.append(d[0] if n else nxt)
        if n:
            second.append(nxt)
        accepted += n
    assert 0.1 * runs < accepted < 0.9 * runs
    assert sum(cuts) < 0.05 * runs  # the cut was rarely needed
    for drawn, p in ((first, ref[0]), (second, ref[1])):
        assert binned_chi2_p(drawn, p, 20) > 1e-3


def binned_chi2_p(samples, probs, bins):
    """chi2_p over bins of about equal mass (ids by probability, descending)."""
    order = np.argsort(-probs, kind="stable")
    of = np.empty(len(probs), dtype=np.int64)
    of[order] = np.minimum((np.cumsum(probs[order]) - probs[order]) * bins, bins - 1).astype(np.int64)
    of[probs == 0] = bins  # a bin of its own, of probability 0
    mass = np.bincount(of, weights=probs, minlength=bins + 1)
    return chi2_p(of[np.asarray(samples)], mass)


@pytest.mark.parametrize("n", [900, 5000, 60_000])
def test_quickselect_cut(n):
    """_cut against a full sort: the cut inside the first candidates, past them, and on ties spanning a pivot."""
    rng = np.random.default_rng(n)
    cases = [np.exp(rng.standard_normal(n) * 3).astype(np.float32),  # peaked: the cut among the largest
             rng.uniform(0.9, 1.0, n).astype(np.float32),  # flat: far past the first candidates
             np.exp(np.round(rng.standard_normal(n) * 1.5)).astype(np.float32),  # a few values, huge tie groups
             np.where(rng.random(n) < 0.5, 0.0, 1.0).astype(np.float32)]  # zeros and one tie group
    ws = sampling.Workspace()
    for e in cases:
        e_before = e.tolist()
        s = np.sort(e)[::-1]
        c = np.cumsum(s, dtype=np.float64)
        for top_p in (0.05, 0.5, 0.9, 0.999):
            t = top_p * c[-1]
            w = s[np.searchsorted(c, t)]
            expected = (w, pytest.approx(s[s > w].sum(dtype=np.float64), rel=1e-12))
            assert sampling._cut(e, t) == expected
            assert sampling._cut(e, t, ws) == expected and e.tolist() == e_before  # e itself untouched
    big = np.zeros(n, dtype=np.float32)
    big[[3, n - 1]] = 1.0  # the first candidates hold everything
    assert sampling._cut(big, 1.5) == (1.0, 0.0)


def test_top_k_ties_past_the_candidates():
    """mlx backend, top-k of at most CANDIDATES[0]: 600 ids tied at the k-th largest logit, most of them outside the
    candidates, are kept lower ids first as the reference keeps them, exactly, without widening or the bisection."""
    V = 3000
    rng = np.random.default_rng(8)
    x = rng.uniform(-3, 0, (2, V)).astype(np.float32)
    x[:, rng.choice(V, 600, replace=False)] = 1.0
    x[0, :5] = 2.0 + np.arange(5)  # row 0: five ids above the tie group
    for params in (SamplingParams(1.0, 0.4537, 20), SamplingParams(0.7, 0.9, 256), SamplingParams(1.0, 0.999, 3)):
        assert np.array(mx_distribution(mx.array(x), params, CANDIDATES[0])[1]).all()
        check_backends(x, params)
    sampler = Sampler(SamplingParams(1.0, 0.4537, 20), seed=0, backend="mlx")
    sampler.accept(None, [], mx.array(x[1:]))
    assert (sampler.syncs, sampler.widened) == (1, 0)


def test_candidate_widening():
    """Flat logits: the mlx backend's first candidates hold ~4% of the mass, so top-p 0.5 is redone by the exact
    bisection, in the same round and with the same uniforms."""
    V = 6000
    x = np.random.default_rng(1).uniform(0, 0.1, (2, V)).astype(np.float32)
    params = SamplingParams(1.0, top_p=0.5)
    assert not np.array(mx_distribution(mx.array(x), params, CANDIDATES[0])[1]).any()
    check_backends(x, params)
    sampler = Sampler(params, seed=0, backend="mlx")
    n, tok, _ = sampler.accept(None, [], mx.array(x[:1]))
    assert sampler.widened == 1 and sampler.syncs == 2
    assert params.distribution(mx.array(x[:1]))[0, tok] > 0
    # the next EXACT_AFTER_WIDENING rounds go to the bisection at once: one synchronisation, the same token as
    # trying the candidates first
    tries_first = Sampler(params, seed=0, backend="mlx")
    tries_first.accept(None, [], mx.array(x[:1]))
    tries_first._exact_rounds = 0
    assert sampler.accept(None, [], mx.array(x[1:]))[1] == tries_first.accept(None, [], mx.array(x[1:]))[1]
    assert (sampler.syncs, sampler.widened, tries_first.syncs, tries_first.widened) == (3, 1, 4, 2)
    for _ in range(sampling.EXACT_AFTER_WIDENING - 1):
        sampler.accept(None, [], mx.array(x[1:]))
    assert sampler.widened == 1
    sampler.accept(None, [], mx.array(x[1:]))  # the candidates again
    assert sampler.widened == 2


@pytest.mark.parametrize("V", [6, 3000, 151_936])
def test_top_ids_and_proposal(V):
    """top_ids finds the n largest logits (at a vocabulary through block maxima); a Proposal is the target's
    transform applied to those logits alone, and its draws follow it."""
    n = 4
    rng = np.random.default_rng(V)
    x = rng.standard_normal((1, V)).astype(np.float32) * 2
    ids = np.sort(np.array(sampling.top_ids(mx.array(x), n))[0])
    assert list(ids) == sorted(np.argsort(-x[0])[:n])
    params = SamplingParams(0.8, 0.9, 3)
    sub = ids[np.argsort(-x[0, ids])]
    q_ref = np.zeros(V)
    q_ref[sub] = params.distribution(mx.array(x[:, sub]))[0]
    keys = mx.random.split(mx.random.key(1), 2000)
    draws = []
    for i in range(2000):
        tok, q = sampling.mx_propose(mx.array(x), params, n, keys[i])
        draws.append(int(tok.item()))
    d = q.host()
    np.testing.assert_allclose(dense(d, V), q_ref, atol=1e-6)
    np.testing.assert_allclose(np.array(q.dense(V))[0], q_ref, atol=1e-6)
    assert chi2_p(draws, q_ref) > 1e-3
    merged = sampling.Proposal(mx.array([[5, 2, 5, 9]]), mx.array([[0.3, 0.2, 0.0, 0.5]])).host()  # a repeated id
    assert merged.ids.tolist() == [2, 5, 9] and np.allclose(merged.w, [0.2, 0.3, 0.5])


def chi2_p(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew an id of probability 0"
    expected = probs[keep] / probs[keep].sum() * len(samples)
    return sps.chisquare(counts[keep], expected * counts[keep].sum() / expected.sum()).pvalue


def test_draws():
    w = np.array([0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    rng = np.random.default_rng(0)
    assert chi2_p([sampling.np_draw(w, rng.random()) for _ in range(4000)], w) > 1e-3
    big = np.zeros(5000, dtype=np.float32)  # the block path: mass in different blocks, block ends included
    big[[3, 127, 128, 1000, 4999]] = [0.1, 0.2, 0.3, 0.15, 0.25]
    draws = [sampling.np_draw(big, rng.random()) for _ in range(4000)]
    assert chi2_p(draws, big.astype(np.float64)) > 1e-3
    keys = mx.random.split(mx.random.key(0), 4000)
    draws = np.array(mx.concatenate([sampling.mx_draw(mx.array(w[None], dtype=mx.float32), keys[i])
                                     for i in range(4000)]))
    assert chi2_p(draws, w) > 1e-3


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.8, 0.9, 3)])
@pytest.mark.parametrize("draft_n", [None, 2])
def test_acceptance_rule_emits_the_target_distribution(backend, params, draft_n):
    """Draft d ~ q, verify against p: the first emitted token is distributed as p[0] and, when d was accepted, the
    second as p[1] (Leviathan et al. 2023). Both rule branches are exercised; draft_n = 2 truncates q to the two
    largest draft logits (p has up to 6 ids), so the residual carries the mass q lacks."""
    V, runs = 6, 2000
    rng = np.random.default_rng(2)
    q_logits = mx.array(rng.standard_normal((1, V)).astype(np.float32))
    p_logits = mx.array(rng.standard_normal((2, V)).astype(np.float32) * 1.5)
    ref = params.distribution(p_logits)
    sampler = Sampler(params, seed=0, backend=backend, draft_n=draft_n)
    first, second, accepted = [], [], 0
    for _ in range(runs):
        tok, q = sampler.draft(q_logits)
        n, nxt, d = sampler.accept(tok, [q], p_logits)
        first.append(d[0] if n else nxt)
        if n:
            second.append(nxt)
        accepted += n
    assert 0 < accepted < runs
    assert chi2_p(first, ref[0]) > 1e-3
    assert chi2_p(second, ref[1]) > 1e-3


def test_greedy_accepts_the_matching_prefix():
    logits = mx.zeros((4, 10)).at[mx.arange(4), mx.array([3, 1, 4, 1])].add(1.0)
    s = Sampler(SamplingParams(), backend="mlx")
    for drafts, n in (([3, 1, 4], 3), ([3, 1, 5], 2), ([2, 1, 4], 0)):
        assert s.accept(mx.array(drafts, dtype=mx.int32), [None] * 3, logits) == (n, [3, 1, 4, 1][n], drafts)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        Sampler(SamplingParams(), backend="cuda")


@pytest.fixture
def no_vocab_copies(monkeypatch):
    """numpy.asarray / numpy.array refuse an MLX array with a vocabulary-sized axis (a [rows, vocab] copy)."""
    vocab = 300
    real_asarray, real_array = np.asarray, np.array

    def guard(real):
        def f(a, *args, **kwargs):
            if isinstance(a, mx.array) and a.ndim and max(a.shape) >= vocab:
                raise AssertionError(f"a {a.shape} array was copied to the host")
            return real(a, *args, **kwargs)
        return f

    monkeypatch.setattr(np, "asarray", guard(real_asarray))
    monkeypatch.setattr(np, "array", guard(real_array))
    return vocab


def test_guard_catches_a_vocab_copy(no_vocab_copies):
    with pytest.raises(AssertionError, match="copied to the host"):
        SamplingParams(1.0).distribution(mx.zeros((2, no_vocab_copies)))  # the reference does copy


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.7, 0.8, 20), SamplingParams(0.6, 0.95)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_device_path_one_sync_per_round_no_vocab_copies(no_vocab_copies, monkeypatch, params, k):
    monkeypatch.setenv("MLXMTP_SAMPLER", "mlx")
    model = ToyModel(vocab=no_vocab_copies, num_mtp=1, seed=3, scale=4.0)
    st, sampler = RoundStats(), Sampler(params, seed=0)
    take(decode(model, [1, 2, 3, 4, 5], params, draft_tokens=k, stats=st, sampler=sampler), 12)
    assert st.target_forwards >= 3
    # one fetch per round, plus the prefill's and the one a pipelined plain decode reads when stopped
    assert sampler.widened == 0  # the first candidate set holds the top-p mass of these logits
    assert st.syncs - 1 - (k == 0 and sampler.pipelined) == st.target_forwards
    assert st.host_bytes <= 4 * (k + 3) * (st.target_forwards + 2)


def test_cpu_sampler_one_sync_per_round(no_vocab_copies, monkeypatch):
    """The numpy back end draws drafts on the device and reads the evaluated verify logits, drafts and q's through
    zero-copy views in one synchronisation per round: no bytes copied."""
    monkeypatch.setenv("MLXMTP_SAMPLER", "numpy")
    model = ToyModel(vocab=no_vocab_copies, num_mtp=1, seed=3, scale=4.0)
    for params, k in ((SamplingParams(0.6, 0.95), 2), (SamplingParams(0.7, 0.8, 20), 3), (SamplingParams(1.0), 0)):
        st = RoundStats()
        take(decode(model, [1, 2, 3, 4, 5], params, draft_tokens=k, seed=0, stats=st), 12)
        assert st.syncs == 1 + st.target_forwards and st.host_bytes == 0


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_truncated_proposals_keep_decoding_exact(sampling_model, backend, monkeypatch):
    """The decode loop's chi-square test (tests/test_speculative.py) with proposals truncated to the top 2 of 4
    ids: the emitted sequences still follow the target's joint distribution."""
    monkeypatch.setenv("MLXMTP_SAMPLER", backend)
    monkeypatch.setattr(sampling, "DRAFT_N", 2)
    params, prompt, runs = SamplingParams(1.0, 0.95), [0, 1, 2, 3], 1000
    probs = exact_joint(sampling_model, prompt, params)
    counts = sampled_counts(sampling_model, prompt, params, 2, runs)
    assert chi_square_p(counts, probs, runs) > 1e-3
