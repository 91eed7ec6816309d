"""The draft-depth policy behind draft_tokens="auto" (mlxmtp/tuning.py), on simulated round times, and what it keeps
between generations (policy.json)."""

import json
import math
import random

import pytest

from mlxmtp import generation, tuning
from mlxmtp.sampling import SamplingParams
from mlxmtp.tuning import DepthPolicy
from tests.toy_model import ToyModel

FLAT = {"verify": [1.0, 1.05, 1.1, 1.15, 1.2], "draft": 0.05}  # memory-bound: a Mac's verify curve
LINEAR = {"verify": [1.0, 2.0, 3.0, 4.0, 5.0], "draft": 0.3}  # compute-bound: the reference BLAS


def run_rounds(policy, n, accept, seconds_for, switch_cost=0.0):
    """Simulated rounds: the first `accept` drafts of each round are accepted; a round whose depth differs from the
    last one's takes switch_cost seconds more. Returns (ks, tokens, seconds)."""
    ks, tokens, seconds = [], 0, 0.0
    for _ in range(n):
        k = policy.choose()
        a = min(k, accept)
        s = seconds_for(k) + (switch_cost if ks and k != ks[-1] else 0.0)
        ks.append(k)
        policy.observe(k, k, a, s)
        tokens, seconds = tokens + a + 1, seconds + s
    return ks, tokens, seconds


def run_conditional(policy, n, slowdown=lambda i: 1.0):
    """Simulated rounds whose drafts are accepted one after another with conditional chances (0.9, 0.6, 0.9), a
    round with k drafts taking (1.0, 1.95, 2.4, 2.75)[k] plain rounds times slowdown(round). Returns the ks."""
    rng, a, ratio = random.Random(0), (0.9, 0.6, 0.9), (1.0, 1.95, 2.4, 2.75)
    ks = []
    for i in range(n):
        k = policy.choose()
        accepted = 0
        while accepted < k and rng.random() < a[accepted]:
            accepted += 1
        policy.observe(k, k, accepted, 0.01 * ratio[k] * slowdown(i))
        ks.append(k)
    return ks


def test_drafting_pays_on_a_flat_curve_from_the_first_round():
    policy = DepthPolicy(FLAT, 4)
    ks, _, _ = run_rounds(policy, 30, accept=4, seconds_for=lambda k: 0.01 * FLAT["verify"][k])
    assert ks[0] > 0  # the measured curve already says drafting pays: no plain warm-up rounds
    assert ks[-10:].count(4) >= 9  # every draft accepted and verify nearly free: as deep as allowed


@pytest.mark.parametrize("switch_cost", [0.0, 0.02])
def test_plain_wins_and_probing_stays_within_budget(switch_cost):
    """Drafting loses on a compute-bound curve: auto settles on k = 0, and what its probes cost (against plain
    decoding over the same rounds) stays under its 1% budget plus one probe, also where each change of depth costs
    two plain rounds more (the round returning to plain decoding is charged to the probe)."""
    policy = DepthPolicy(LINEAR, 4)
    plain = 0.01

    def seconds_for(k):
        return plain * (1 + k)  # E(k) < 1 + k for acceptance < 1: plain wins at every depth

    ks, tokens, seconds = run_rounds(policy, 2000, accept=1, seconds_for=seconds_for, switch_cost=switch_cost)
    assert ks[-200:].count(0) >= 195
    assert any(k > 0 for k in ks[100:])  # it keeps probing
    assert tokens / seconds >= (1 - 0.012) / plain


def test_a_small_steady_win_is_found_despite_what_switching_costs():
    """k = 1 pays 5% in steady state (2 tokens in 1.9 plain rounds), but the first round after a change of depth
    costs half a plain round more (in decode: the MTP modules catch up on the plain rounds' rows; a plain round
    after drafting is not pipelined). Probes time only the rounds after their first, so auto finds k = 1 from
    the compute-bound prior that starts it on plain decoding."""
    policy = DepthPolicy(LINEAR, 4)
    ks, _, _ = run_rounds(policy, 3000, accept=1, switch_cost=0.005,
                          seconds_for=lambda k: 0.01 if k == 0 else 0.019 * (1 + 0.5 * (k - 1)))
    assert ks[0] == 0
    assert ks[-300:].count(1) >= 280


def test_acceptance_per_depth_is_conditional_on_the_drafts_before():
    """Drafts accepted one after another with conditional chances a = (0.9, 0.6, 0.9): k = 3 yields
    E(3) = 1 + 0.9 + 0.54 + 0.486 = 2.926 tokens and pays 6% at 2.75 plain rounds, where k = 1 loses 3% and k = 2
    pays 2%. From a compute-bound prior that starts it on plain decoding, auto finds k = 3, its estimate being
    E(3), not the 2.62 that the unconditional rates (0.9, 0.54, 0.486) multiplied together would give (and that
    would keep it on plain decoding)."""
    policy = DepthPolicy(LINEAR, 3)
    ks = run_conditional(policy, 4000)
    assert policy.expected_tokens(3) == pytest.approx(2.926, abs=0.15)
    assert ks[-1000:].count(3) >= 750  # the rest: probes of the other depths, within the 1% budget


def test_round_times_are_compared_under_the_same_conditions():
    """The machine slows to 1/1.6 of its speed and back every 300 rounds (other load, thermal state), and k = 3
    pays 6% (the conditional chances and ratios of the test above). Once auto drafts, its plain rounds are only
    probes, far apart: a probe is timed against the rounds of the incumbent depth just before it, not against
    plain rounds from another phase, so auto's ratio for k = 3 stays right and it stays on k = 3."""
    policy = DepthPolicy(LINEAR, 3)
    ks = run_conditional(policy, 6000, slowdown=lambda i: 1.6 if (i // 300) % 2 else 1.0)
    assert policy.ratio[3] == pytest.approx(2.75, rel=0.1)
    assert ks[-2000:].count(3) >= 1700


def test_observed_round_times_override_the_measured_curve():
    """The curve says drafting is nearly free, but rounds with drafts are really slow: auto goes back to k = 0."""
    policy = DepthPolicy(FLAT, 4)
    ks, _, _ = run_rounds(policy, 300, accept=1, seconds_for=lambda k: 0.01 if k == 0 else 0.05 * (1 + k))
    assert ks[-100:].count(0) >= 97


def test_one_stalled_round_does_not_flip_the_choice():
    policy = DepthPolicy(LINEAR, 4)
    run_rounds(policy, 200, accept=1, seconds_for=lambda k: 0.01 * (1 + k))
    assert policy.choose() == 0
    policy.observe(0, 0, 0, 0.5)  # a 50x stall of a plain round (another process, a page fault)
    ks, _, _ = run_rounds(policy, 20, accept=1, seconds_for=lambda k: 0.01 * (1 + k))
    assert ks.count(0) >= 19


def test_low_acceptance_stops_drafting_and_probes_recover_it():
    """Acceptance drops to nothing and drafting rounds are slow: plain decoding. Then every draft is accepted and
    verify is nearly free: probes find k = 4 again (within 2500 rounds: while drafting, every other probe is of
    plain decoding, so k = 4, whose stored ratio of 2.2 five new samples must outvote, is probed every sixth)."""
    policy = DepthPolicy(FLAT, 4)
    ks, _, _ = run_rounds(policy, 300, accept=0, seconds_for=lambda k: 0.01 * (1 + 0.3 * k))
    assert ks[-50:].count(0) >= 48
    ks, _, _ = run_rounds(policy, 2500, accept=4, seconds_for=lambda k: 0.01 * (1 + 0.01 * k))
    assert ks[-10:].count(4) >= 9


@pytest.mark.parametrize("scale, case", [(1.0, "drafting pays 10%"), (1.16, "drafting loses 5%")])
def test_noisy_round_times_neither_overdraft_nor_underdraft(scale, case):
    """Round times with 20% noise (lognormal) and a drift of 1.3x every 700 rounds; four depths within a few
    percent of each other. auto picks among them by estimates it itself selected on, so the depth it runs tends to
    be the one whose ratio came out low (the winner's curse). Timed against that depth's rounds, probes of other
    depths would inherit the error, and the ratios sink together: auto then kept drafting where drafting loses
    (0.92-0.95x plain). Against stale plain rounds, they rise: auto stayed on plain where drafting paid 10%
    (0.93-0.95x the best depth). Anchored on plain rounds (every other probe while drafting, and probes of other
    depths through the incumbent's plain-timed ratio), auto reaches 0.96x the best fixed depth either way."""
    a = (0.9, 0.75, 0.85, 0.85)
    E = [1.0]
    for d in range(4):
        E.append(E[-1] + math.prod(a[: d + 1]))
    true = [1.0] + [r * scale for r in (1.9, 2.45, 2.85, 3.3)]
    best = max(E[k] / true[k] for k in range(5))
    for seed in range(2):
        rng = random.Random(seed)
        policy = DepthPolicy(LINEAR, 4)
        tokens = plain_rounds = 0.0
        for i in range(15000):
            k = policy.choose()
            n = 0
            while n < k and rng.random() < a[n]:
                n += 1
            drift = 1.3 if (i // 700) % 2 else 1.0
            policy.observe(k, k, n, 0.01 * true[k] * drift * math.exp(rng.gauss(0, 0.2)))
            if i >= 5000:
                tokens, plain_rounds = tokens + n + 1, plain_rounds + true[k]
        assert tokens / plain_rounds >= 0.96 * best, (case, seed)


def test_learned_state_starts_the_next_policy_on_the_right_depth():
    """A policy built from what another learned chooses its depth from the first round (no warm-up), and a
    learned record of the wrong shape or with nonsense values is ignored."""
    first = DepthPolicy(FLAT, 4)
    run_rounds(first, 400, accept=1, seconds_for=lambda k: 0.01 if k == 0 else 0.03 * (1 + k))
    assert first.choose() == 0
    fresh = DepthPolicy(FLAT, 4)
    assert fresh.choose() > 0  # the curve alone would draft
    second = DepthPolicy(FLAT, 4, learned=json.loads(json.dumps(first.learned())))
    assert second.choose() == 0
    good = first.learned()
    for bad in ({"samples": [[]] * 3}, {**good, "samples": [[], [-1.0], [], [], []]}, {**good, "samples": None},
                {**good, "samples": [[1.0], [], [], [], []]}, {**good, "accepted": ["x"] * 4},
                {**good, "accepted": [9.0, 0, 0, 0], "tried": [1.0, 1, 1, 1]}, {"tried": None}):
        assert DepthPolicy(FLAT, 4, learned=bad).learned() == DepthPolicy(FLAT, 4).learned()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE_FILE", tmp_path / "costs.json")
    monkeypatch.setattr(generation, "_POLICIES", {})
    return tmp_path


def test_generation_persists_what_auto_learned(cache_dir, tokenizer_dir):
    """A generation with auto stores its policy's state; a new process (here: the in-process policies cleared)
    starts from it; a corrupt policy file is ignored (and replaced)."""
    from mlxmtp import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = ToyModel(vocab=32, num_mtp=1, seed=9)
    generation.generate(model, tok, [1, 2, 3, 4], max_tokens=300, draft_tokens="auto")
    stored = json.loads((cache_dir / "policy.json").read_text())
    key = tuning.policy_key(model, SamplingParams())
    assert set(stored) == {key}
    learned = generation._POLICIES[(id(model), SamplingParams())].learned()
    assert stored[key] == learned and any(learned["samples"])  # observed round times, not the prior
    generation._POLICIES.clear()
    policy = generation._shared_policy(model, SamplingParams())
    assert policy.learned() == learned
    (cache_dir / "policy.json").write_text("{not json")
    generation._POLICIES.clear()
    res = generation.generate(model, tok, [1, 2, 3, 4], max_tokens=10, draft_tokens="auto")
    assert len(res.tokens) == 10 and key in json.loads((cache_dir / "policy.json").read_text())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tests.hf_layout import write_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d
