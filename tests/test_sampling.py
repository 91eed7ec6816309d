"""The device sampler (mlxmtp/sampling.py): both back ends' final distributions equal the float64 reference
(temperature, top-k, top-p, their combinations, ties, top-p = 1, top-k >= vocab), candidate widening, the draws,
the acceptance rule's output distribution, and what crosses to the host while decoding. Float32 throughout."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats as sps

from mlxmtp import sampling
from mlxmtp.sampling import CANDIDATES, Sampler, SamplingParams, mx_distribution, np_distribution
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import take
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


def near_the_cut(x: np.ndarray, params: SamplingParams, tol: float = 1e-4) -> np.ndarray:
    """Ids whose cumulative mass before them (reference order) is within tol of top_p: a float32 cumulative sum
    over thousands of ids may put the top-p cut one id earlier or later there."""
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
    for n_cand in CANDIDATES + (V,):
        p, ok = mx_distribution(mx.array(x), params, n_cand)
        p, ok = np.array(p), np.array(ok)
        assert ok.any() or n_cand < V
        # float32 masses: a cut within 1e-5 of top_p may fall one id off (1e-4 for the full sort's cumsum)
        cut = near_the_cut(x, params, 1e-4 if n_cand >= V > CANDIDATES[-1] else 1e-5)
        # (the ids at such a cut are left out; moving one of them changes the row's normaliser by < 1e-3 here)
        r = np.where(cut.any(-1, keepdims=True), 1e-3, rtol)
        bad = (np.abs(p - ref) > atol + r * ref) & ~cut & ok[:, None]
        assert not bad.any(), f"mlx, {params}, {n_cand} candidates: {np.argwhere(bad)[:3]}"
    for i in range(len(x)):
        np.testing.assert_allclose(dense(np_distribution(x[i], params), V), ref[i], atol=atol, rtol=rtol,
                                   err_msg=f"numpy, {params}")


@pytest.mark.parametrize("V", [40, 3000])
def test_distributions_equal_reference(V):
    for x in logits_cases(V):
        for params in GRID:
            check_backends(x, params)
        for params in (SamplingParams(1.0, top_k=V), SamplingParams(0.8, 0.9, V + 5), SamplingParams(1.0, 1.0, V - 1)):
            check_backends(x, params)


def test_candidate_widening():
    """Flat logits: the first candidates hold ~4% of the mass, so top-p 0.5 needs the second set (mlx), and a
    window of WINDOW around the maximum misses the tail mass that top-p 0.5 needs (numpy)."""
    V = 6000
    x = np.random.default_rng(1).uniform(0, 0.1, (2, V)).astype(np.float32)
    params = SamplingParams(1.0, top_p=0.5)
    assert [bool(np.array(mx_distribution(mx.array(x), params, n)[1]).all()) for n in CANDIDATES] == [False, True]
    check_backends(x, params)

    y = np.full(V, -(sampling.WINDOW + 1), dtype=np.float32)  # just outside the first window
    y[7] = 0.0
    params = SamplingParams(1.0, top_p=0.5)  # the top id holds 1 / (1 + 2999 e^-5) = 5%
    ref = params.distribution(mx.array(y[None]))[0]
    assert (ref > 0).sum() > 1  # the tail is in the nucleus
    np.testing.assert_allclose(dense(np_distribution(y, params), V), ref, atol=1e-9, rtol=1e-4)
    assert (dense(np_distribution(y, params, exact=False), V) > 0).sum() == 1  # without widening: only the top


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
def test_acceptance_rule_emits_the_target_distribution(backend, params):
    """Draft d ~ q, verify against p: the first emitted token is distributed as p[0] and, when d was accepted, the
    second as p[1] (Leviathan et al. 2023). Both rule branches are exercised."""
    V, runs = 6, 2000
    rng = np.random.default_rng(2)
    q_logits = mx.array(rng.standard_normal((1, V)).astype(np.float32))
    p_logits = mx.array(rng.standard_normal((2, V)).astype(np.float32) * 1.5)
    ref = params.distribution(p_logits)
    sampler = Sampler(params, seed=0, backend=backend)
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


def test_cpu_sampler_syncs_per_sampled_row(no_vocab_copies, monkeypatch):
    """The numpy back end reads evaluated logits through zero-copy views: one synchronisation per draft and one per
    verify, no bytes copied."""
    monkeypatch.setenv("MLXMTP_SAMPLER", "numpy")
    model = ToyModel(vocab=no_vocab_copies, num_mtp=1, seed=3, scale=4.0)
    st = RoundStats()
    take(decode(model, [1, 2, 3, 4, 5], SamplingParams(0.6, 0.95), draft_tokens=2, seed=0, stats=st), 12)
    assert st.syncs == 1 + 3 * st.target_forwards and st.host_bytes == 0
