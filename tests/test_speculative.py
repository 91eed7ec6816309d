"""The draft-and-accept engine: greedy equality, self-draft acceptance, exact sampling distribution, rollback at
every rejection position, stop conditions. Float32 throughout."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats as sps

import mlxmtp.speculative as spec
from mlxmtp import sampling
from mlxmtp import generation, load_tokenizer
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import RoundStats, decode
from tests.hf_layout import write_tokenizer
from tests.toy_model import SelfDraft, ToyModel

GREEDY = SamplingParams()


def take(gen, n):
    out = []
    for new in gen:
        out.extend(new)
        if len(out) >= n:
            gen.close()
            return out[:n]
    return out


def prompts(vocab, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, size=int(rng.integers(4, 12)))] for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return load_tokenizer(d)


@pytest.mark.parametrize("num_mtp", [1, 3])
def test_greedy_equality_toy(num_mtp):
    model = ToyModel(vocab=32, num_mtp=num_mtp, seed=1)
    for p in prompts(32):
        plain = take(decode(model, p, GREEDY, draft_tokens=0), 24)
        for k in (1, 2, 3, 4):
            assert take(decode(model, p, GREEDY, draft_tokens=k), 24) == plain, (p, k)


@pytest.mark.parametrize("num_mtp,k", [(1, 1), (1, 3), (1, 4), (3, 2), (3, 3), (3, 5)])
def test_self_draft_accepts_everything(num_mtp, k):
    target = ToyModel(vocab=32, num_mtp=0, seed=2)
    for p in prompts(32, n=5):
        model = SelfDraft(target, p, num_mtp=num_mtp)
        st = RoundStats()
        got = take(decode(model, p, GREEDY, draft_tokens=k, stats=st), 1 + 6 * (k + 1))
        assert got == take(decode(target, p, GREEDY), len(got))
        assert st.drafted == st.accepted == 6 * k
        assert 1 + st.accepted / st.target_forwards == k + 1


class OracleDrafter:
    """Drafts the true greedy continuation for the first `right` positions, then a wrong token: rejection at
    position `right` of every round (k = right means all accepted)."""

    def __init__(self, truth, vocab, right):
        self.truth, self.vocab, self.right = truth, vocab, right

    def extend(self, hidden):
        pass

    def draft(self, tokens, k, sampler):
        n = len(tokens)
        out = []
        for d in range(k):
            t = self.truth[n + d] if n + d < len(self.truth) else 0
            out.append(t if d < self.right else (t + 1) % self.vocab)
        return (mx.array(out, dtype=mx.int32) if out else None), [None] * k


def check_rollback_every_position(model, vocab, prompt, k=4, n_tokens=20):
    """Rejection at each position 0..k of every round leaves the output equal to plain greedy decoding."""
    plain = take(decode(model, prompt, GREEDY), n_tokens + k + 2)
    truth = list(prompt) + plain
    for right in range(k + 1):
        drafter = OracleDrafter(truth, vocab, right)
        st = RoundStats()
        got = take(decode(model, prompt, GREEDY, draft_tokens=k, drafter=drafter, stats=st), n_tokens)
        assert got == plain[:n_tokens], f"rejection at position {right}"
        assert st.accepted == right * st.target_forwards


def test_rollback_every_position_toy():
    check_rollback_every_position(ToyModel(vocab=32, num_mtp=0, seed=3), 32, [1, 2, 3, 4, 5])


def check_mtp_calls_match_full_recompute(generate, min_calls: int) -> None:
    """Every MTP call made while ``generate(model, prompt)`` decodes ends on a committed row: its logits must equal
    module 0 run from scratch over the final sequence."""
    model = ToyModel(vocab=32, num_mtp=1, seed=4)
    seen = []
    orig = model.mtp_forward

    def spy(j, hidden, tokens, cache=None):
        out, logits = orig(j, hidden, tokens, cache)
        seen.append((cache.offset, logits[0, -1]))
        return out, logits

    model.mtp_forward = spy
    prompt = [3, 1, 4, 1, 5]
    toks = list(prompt) + generate(model, prompt)
    del model.mtp_forward
    pre, post = model.trunk(mx.array([toks]))
    _, ref = model.mtp_forward(0, model.select_hidden(pre, post)[:, :-1], mx.array([toks[1:]]))
    assert len(seen) >= min_calls
    for off, logits in seen:
        np.testing.assert_allclose(np.array(logits), np.array(ref[0, off - 1]), atol=1e-5)


def test_draft_logits_match_full_recompute():
    """At k = 1 every MTP call ends on a committed row (checks that the MTP cache is extended over exactly the
    accepted positions)."""
    check_mtp_calls_match_full_recompute(lambda m, p: take(decode(m, p, GREEDY, draft_tokens=1), 30), 15)


def exact_joint(model, prompt, params, n=3):
    """Exact probability of each n-token continuation under the target's final distributions."""
    V = model.args.vocab_size
    probs = {}
    for seq in itertools.product(range(V), repeat=n):
        logits = model(mx.array([list(prompt) + list(seq[:-1])]))[0, len(prompt) - 1:]
        p = params.distribution(logits)
        probs[seq] = float(np.prod([p[i, t] for i, t in enumerate(seq)]))
    return probs


def sampled_counts(model, prompt, params, k, runs, n=3):
    counts = {}
    for seed in range(runs):
        seq = tuple(take(decode(model, prompt, params, draft_tokens=k, seed=seed), n))
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def chi_square_p(counts, probs, runs):
    impossible = sum(n for c, n in counts.items() if probs[c] == 0)
    assert impossible == 0, "sampled a sequence the target gives probability 0 (top-k / top-p violated)"
    cells = sorted((c for c in probs if probs[c] > 0), key=probs.get, reverse=True)
    expected = np.array([probs[c] * runs for c in cells])
    observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
    # pool cells with small expectations into one (chi-square validity)
    small = expected < 5
    exp, obs = expected[~small], observed[~small]
    if small.any():
        exp, obs = np.append(exp, expected[small].sum()), np.append(obs, observed[small].sum())
    return sps.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.fixture(scope="module")
def sampling_model():
    # vocabulary of 4 and unit-scale logits: target and drafter distributions overlap but differ
    return ToyModel(vocab=4, num_mtp=1, seed=5, scale=3.0)


@pytest.mark.parametrize("params,k,backend", [(SamplingParams(1.0), 2, "numpy"),
                                              (SamplingParams(0.8, top_p=0.9, top_k=3), 3, "numpy"),
                                              (SamplingParams(0.8, top_p=0.9, top_k=3), 3, "mlx")])
def test_sampling_distribution_is_exact(sampling_model, params, k, backend, monkeypatch):
    """Both sampler back ends (the device one is what Metal runs)."""
    monkeypatch.setenv("MLXMTP_SAMPLER", backend)
    prompt = [0, 1, 2, 3]
    probs = exact_joint(sampling_model, prompt, params)
    runs = 2000 if backend == "numpy" else 1000  # the device path costs more per round on a CPU
    counts = sampled_counts(sampling_model, prompt, params, k, runs)
    st = RoundStats()
    take(decode(sampling_model, prompt, params, draft_tokens=k, seed=0, stats=st), 50)
    assert 0 < st.accepted < st.drafted  # both branches of the rule are exercised
    assert chi_square_p(counts, probs, runs) > 1e-3


def test_chi_square_detects_broken_acceptance(sampling_model, monkeypatch):
    params = SamplingParams(1.0)

    def accept_while_equal_to_argmax(self, drafts, qs, logits):  # a plausible but wrong rule
        x = self._view(logits)
        d, self._host_drafts = self._host_drafts[: len(qs)], []
        for i, t in enumerate(d + [None]):
            p = sampling.np_distribution(x[i], self.params)
            if t is None or t != int(p.w.argmax()):
                return i, sampling.np_sample(p, self.rng.random()), d

    monkeypatch.setenv("MLXMTP_SAMPLER", "numpy")
    monkeypatch.setattr(sampling.Sampler, "_accept_numpy", accept_while_equal_to_argmax)
    prompt = [0, 1, 2, 3]
    probs = exact_joint(sampling_model, prompt, params)
    counts = sampled_counts(sampling_model, prompt, params, 2, 2000)
    assert chi_square_p(counts, probs, 2000) < 1e-6


def test_seeded_runs_reproducible(sampling_model):
    params = SamplingParams(1.0)
    a = take(decode(sampling_model, [0, 1], params, draft_tokens=2, seed=7), 30)
    b = take(decode(sampling_model, [0, 1], params, draft_tokens=2, seed=7), 30)
    assert a == b


def test_max_tokens_exact_and_eos_inside_accepted_run(tokenizer):
    target = ToyModel(vocab=32, num_mtp=0, seed=6)
    prompt = [5, 6, 7, 8]
    model = SelfDraft(target, prompt, num_mtp=1)
    for n in (1, 2, 5, 7, 11):
        res = generation.generate(model, tokenizer, prompt, max_tokens=n, draft_tokens=4)
        assert len(res.tokens) == n and res.finish_reason == "length"
        assert res.stats.generated_tokens == n
    plain = generation.generate(target, tokenizer, prompt, max_tokens=12, draft_tokens=0).tokens
    eos = plain[6]
    first = plain.index(eos)
    tokenizer_eos = tokenizer.eos_token_ids
    try:
        tokenizer.eos_token_ids = {eos}
        res = generation.generate(model, tokenizer, prompt, max_tokens=12, draft_tokens=4)
    finally:
        tokenizer.eos_token_ids = tokenizer_eos
    assert res.tokens == plain[:first] and res.finish_reason == "stop"
    assert res.stats.accepted >= first - 1  # the EOS came in the middle of an accepted run


def test_stop_string_cuts_mid_round(tokenizer):
    target = ToyModel(vocab=120, num_mtp=0, seed=8)
    prompt = [65, 66, 67, 68]
    model = SelfDraft(target, prompt, num_mtp=1)
    full = generation.generate(target, tokenizer, prompt, max_tokens=10, draft_tokens=0)
    stop = full.text[3:5]
    res = generation.generate(model, tokenizer, prompt, max_tokens=10, draft_tokens=4, stop=[stop])
    assert res.text == full.text[: full.text.find(stop)] and res.finish_reason == "stop"
    streamed = "".join(i.text for i in generation.stream_generate(model, tokenizer, prompt, max_tokens=10,
                                                                   draft_tokens=4, stop=[stop]))
    assert streamed == res.text


def test_auto_matches_plain_and_reports_stats(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("mlxmtp.tuning.CACHE_FILE", tmp_path / "costs.json")
    model = ToyModel(vocab=32, num_mtp=1, seed=9)
    for p in prompts(32, n=5):
        plain = generation.generate(model, tokenizer, p, max_tokens=20, draft_tokens=0)
        auto = generation.generate(model, tokenizer, p, max_tokens=20, draft_tokens="auto")
        assert auto.tokens == plain.tokens
        if auto.stats.target_forwards:
            assert auto.stats.syncs_per_round == 1.0  # greedy: one synchronisation per round
    d = auto.stats.to_dict()
    for key in ("prompt_tokens", "prefill_tokens_per_s", "generated_tokens", "decode_tokens_per_s",
                "target_forwards", "drafted", "accepted", "acceptance_rate", "mean_accepted_length",
                "acceptance_by_depth", "syncs_per_round", "rounds_by_depth", "peak_memory_gb"):
        assert key in d
    assert sum(d["rounds_by_depth"]) == d["target_forwards"]  # what auto chose, round by round
    assert (tmp_path / "costs.json").exists()


def test_bad_arguments(tokenizer):
    model = ToyModel(vocab=32)
    for kwargs in ({"draft_tokens": -1}, {"draft_tokens": "many"}, {"temperature": -1.0}, {"top_p": 0.0},
                   {"max_tokens": 0}):
        with pytest.raises(ValueError):
            generation.generate(model, tokenizer, [1, 2], **kwargs)
    model.args.max_position_embeddings = 8
    with pytest.raises(ValueError, match="context"):
        generation.generate(model, tokenizer, list(range(10)))


def test_chunked_prefill_keeps_drafts_exact(monkeypatch):
    """A prompt longer than the prefill chunk: trunk and MTP modules are filled in chunks, drafts stay exact."""
    monkeypatch.setattr(spec, "PREFILL_CHUNK", 7)
    target = ToyModel(vocab=32, num_mtp=0, seed=10)
    prompt = [i % 32 for i in range(40)]
    plain = take(decode(target, prompt, GREEDY), 20)
    for num_mtp in (1, 3):
        st = RoundStats()
        got = take(decode(SelfDraft(target, prompt, num_mtp=num_mtp), prompt, GREEDY, draft_tokens=3, stats=st), 20)
        assert got == plain and st.accepted == st.drafted


class ForcedDepths:
    """A policy stub that asks for a fixed cycle of depths, plain rounds (k = 0) between drafting ones, and records
    the rounds it is told about."""

    def __init__(self, ks):
        self.ks, self.i, self.observed, self.seconds = list(ks), 0, [], []

    def start(self):
        pass

    def choose(self):
        k = self.ks[self.i % len(self.ks)]
        self.i += 1
        return k

    def observe(self, k, drafted, accepted, seconds):
        assert seconds is None or seconds > 0
        self.observed.append(k)
        self.seconds.append(seconds)


MIXED = (0, 0, 2, 0, 1, 3, 0)


@pytest.mark.parametrize("num_mtp", [1, 3])
@pytest.mark.parametrize("ks", [MIXED, (0,), (3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)])
def test_plain_rounds_inside_mtp_greedy_equal_plain(num_mtp, ks, monkeypatch):
    """Plain rounds inside MTP decoding (pipelined, their hidden states handed to the drafter lazily) mixed with
    drafting rounds: the output is plain greedy decoding; every round is reported to the policy in order, one
    synchronisation each. The long plain run crosses FOLD_ROWS, so the drafter folds its pending rows mid-run."""
    monkeypatch.setattr(spec, "FOLD_ROWS", 8)
    model = ToyModel(vocab=32, num_mtp=num_mtp, seed=1)
    for p in prompts(32, n=6):
        plain = take(decode(model, p, GREEDY, draft_tokens=0), 40)
        policy, st = ForcedDepths(ks), RoundStats()
        gen = decode(model, p, GREEDY, draft_tokens="auto", policy=policy, stats=st)
        got = take(gen, 40)
        assert got == plain, (p, ks)
        assert policy.observed == [policy.ks[i % len(ks)] for i in range(len(policy.observed))]
        assert len(policy.observed) == st.target_forwards and st.target_forwards >= 40 // 4
        assert sum(st.rounds_by_k) == st.target_forwards and st.rounds_by_k[0] > 0
        # the prefill's token, one per round, and (when stopped with a plain round's pass queued) its token
        assert st.syncs - 1 - (st.syncs - 1 - st.target_forwards > 0) == st.target_forwards
        assert st.drafted > 0 or ks == (0,)


def test_the_plain_round_before_a_drafting_one_is_untimed():
    """A pipelined plain round handed out because the next round drafts had no pass built behind it, so its time
    is short of a plain round's: decode reports it to the policy without one (None); every other round has its
    time."""
    policy = ForcedDepths((0, 0, 0, 2, 0, 1, 1))
    take(decode(ToyModel(vocab=32, num_mtp=1, seed=1), [1, 2, 3, 4], GREEDY, draft_tokens="auto", policy=policy), 60)
    assert len(policy.observed) > 20
    for i, (k, s) in enumerate(zip(policy.observed, policy.seconds)):
        assert (s is None) == (k == 0 and policy.ks[(i + 1) % len(policy.ks)] > 0), i


@pytest.mark.parametrize("num_mtp", [1, 3])
@pytest.mark.parametrize("fold_rows, draft_rows", [(4, spec.DRAFT_ROWS), (100, 2)])
def test_plain_rounds_inside_mtp_keep_drafts_aligned(num_mtp, fold_rows, draft_rows, monkeypatch):
    """Self-drafting modules accept every draft only if the drafter's rows stay aligned with the committed
    tokens across plain rounds, folds and drafting rounds; (100, 2): no fold, each draft after plain rounds first
    runs their rows through the modules' caches."""
    monkeypatch.setattr(spec, "FOLD_ROWS", fold_rows)
    monkeypatch.setattr(spec, "DRAFT_ROWS", draft_rows)
    target = ToyModel(vocab=32, num_mtp=0, seed=2)
    for p in prompts(32, n=4):
        model = SelfDraft(target, p, num_mtp=num_mtp)
        st = RoundStats()
        got = take(decode(model, p, GREEDY, draft_tokens="auto", policy=ForcedDepths(MIXED + (0,) * 6), stats=st),
                   60)
        assert got == take(decode(target, p, GREEDY), 60)
        assert st.drafted == st.accepted > 0


@pytest.mark.parametrize("fold_rows, draft_rows", [(3, spec.DRAFT_ROWS), (100, 1)])
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(1.0)], ids=["greedy", "numpy-sampled"])
def test_plain_rounds_inside_mtp_hand_the_drafter_the_right_hidden_states(fold_rows, draft_rows, params,
                                                                          monkeypatch):
    """k in {0, 1}: every MTP call (drafts, folds, a draft's catch-up after plain rounds) ends on a committed row
    (the hidden states of plain rounds reach the drafter exactly: pipelined ones, and the numpy sampler's, which
    cannot be pipelined)."""
    monkeypatch.setenv("MLXMTP_SAMPLER", "numpy")
    monkeypatch.setattr(spec, "FOLD_ROWS", fold_rows)
    monkeypatch.setattr(spec, "DRAFT_ROWS", draft_rows)
    depths = ForcedDepths((0, 0, 0, 0, 0, 1, 0, 1, 1))
    check_mtp_calls_match_full_recompute(
        lambda m, p: take(decode(m, p, params, draft_tokens="auto", policy=depths, seed=0), 40), 10)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(1.0)], ids=["greedy", "numpy-sampled"])
def test_fold_keeps_pending_rows_bounded(params, monkeypatch):
    """A long run of plain rounds inside MTP decoding leaves the drafter at most FOLD_ROWS pending trunk rows,
    pipelined or not (the numpy sampler's)."""
    monkeypatch.setenv("MLXMTP_SAMPLER", "numpy")
    monkeypatch.setattr(spec, "FOLD_ROWS", 5)
    model = ToyModel(vocab=32, num_mtp=2, seed=1)
    state = spec.DecodeState(model, use_mtp=True)
    gen = decode(model, [1, 2, 3, 4], params, draft_tokens="auto", policy=ForcedDepths((0,)), state=state, seed=0)
    for _ in range(30):
        next(gen)
        drafter = state.drafter
        assert (drafter.inputs[0].shape[1] if drafter.inputs[0] is not None else 0) + drafter.pending_rows <= 5
    assert state.drafter.frontier[0] > 10  # the modules ran over the rows, no draft round needed
    gen.close()


def test_a_draft_after_plain_rounds_runs_its_modules_over_few_rows(monkeypatch):
    """After 20 plain rounds without a fold, the next draft first runs their rows through the modules' caches (one
    call per module over the many rows) and only then the full modules over at most DRAFT_ROWS rows each."""
    monkeypatch.setattr(spec, "FOLD_ROWS", 100)
    model = ToyModel(vocab=32, num_mtp=2, seed=1)
    calls = []
    orig = model.mtp_forward

    def spy(j, hidden, tokens, cache=None):
        calls.append((j, hidden.shape[1]))
        return orig(j, hidden, tokens, cache)

    model.mtp_forward = spy
    gen = decode(model, [1, 2, 3, 4], GREEDY, draft_tokens="auto", policy=ForcedDepths((0,) * 20 + (2,)))
    for _ in range(6):  # the prefill and the first plain rounds
        next(gen)
    calls.clear()
    for _ in range(20):  # the other plain rounds and the drafting round
        next(gen)
    gen.close()
    assert [(j, n > spec.DRAFT_ROWS) for j, n in calls[:4]] == [(0, True), (1, True), (0, False), (1, False)], calls
    assert all(n <= spec.DRAFT_ROWS for _, n in calls[2:4])


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_sampling_exact_with_plain_rounds_inside_mtp(sampling_model, backend, monkeypatch):
    """Sampling with plain rounds mixed in (pipelined on the mlx backend at top-p 1) keeps the target's
    distribution."""
    monkeypatch.setenv("MLXMTP_SAMPLER", backend)
    params = SamplingParams(1.0, top_k=3)
    prompt = [0, 1, 2, 3]
    probs = exact_joint(sampling_model, prompt, params)
    runs = 1500
    counts = {}
    for seed in range(runs):
        seq = tuple(take(decode(sampling_model, prompt, params, draft_tokens="auto", policy=ForcedDepths((0, 2, 0)),
                                seed=seed), 3))
        counts[seq] = counts.get(seq, 0) + 1
    assert chi_square_p(counts, probs, runs) > 1e-3
