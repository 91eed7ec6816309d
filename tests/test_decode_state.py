"""DecodeState: a generation continued from a reused (trimmed or snapshotted) state equals one from a fresh
prefill, for every family and cache type. Seeded sampling at temperature 1 makes the check cover the drafter's
state too: the rejection sampler's draws depend on the drafts and on q, so a drafter whose caches or pending
hidden states were off would change the sampled tokens (greedy output alone would not show it)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import mlxmtp
import tests.tiny as tiny
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import DecodeState, RoundStats, decode
from tests.test_speculative import prompts, take
from tests.toy_model import ToyModel

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0)
N = 10


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    maker = importlib.import_module(f"tests.tiny.{request.param}")
    return mlxmtp.load_model(maker.make(tmp_path_factory.mktemp(request.param)), dtype=None)


def run(model, prompt, params, k, state=None, seed=0):
    st = RoundStats()
    out = take(decode(model, prompt, params, draft_tokens=k, seed=seed, stats=st, state=state), N)
    return out, (st.drafted, st.accepted, st.target_forwards)


def limited(model) -> bool:
    """Whether the model's caches include kinds that can roll back only a few positions."""
    from mlxmtp.cache import RecurrentCache, SlidingWindowCache

    return any(isinstance(c, (RecurrentCache, SlidingWindowCache)) for c in model.make_cache())


@pytest.mark.parametrize("k", [0, 2])
def test_follow_up_turn_equals_fresh_prefill(family_model, k):
    """Turn 2 = everything turn 1 committed + new tokens (what a chat's next turn looks like): reusable for every
    cache type. Turn 2' = turn 1 cut two tokens before its end (a stop string, max_tokens mid-round): exact where
    the caches can roll back that far, refused (not wrong) where they cannot."""
    model = family_model
    vocab = min(model.args.vocab_size, 256)
    k = k if model.num_mtp_modules else 0
    lag = model.num_mtp_modules if k else 0
    a = [int(t) for t in prompts(vocab, n=1, seed=7)[0]] * 2
    extra = [int(t) for t in prompts(vocab, n=1, seed=8)[0]]
    for params in (GREEDY, SAMPLED):
        state = DecodeState(model, use_mtp=k > 0)
        reply, _ = run(model, a, params, k, state=state)
        b = list(state.tokens) + extra
        cut = a + reply[:-2] + extra
        snapshot = state.copy()
        assert state.trim(b) == len(b) - len(extra) - max(1, lag)
        assert run(model, b, params, k, state=state, seed=1) == run(model, b, params, k, seed=1), (params, k)
        if snapshot.reusable(cut) >= 0:
            assert snapshot.trim(cut) >= len(a)
            assert run(model, cut, params, k, state=snapshot, seed=1) == run(model, cut, params, k, seed=1)
        else:
            assert limited(model)


def test_branch_mid_prefix(family_model):
    """A prompt that leaves the cached one half-way: trimmed exactly where the caches can roll back (KV, MLA
    latent); recurrent and sliding-window caches say they cannot, and a snapshot taken after prefill serves."""
    vocab = min(family_model.args.vocab_size, 256)
    k = 2 if family_model.num_mtp_modules else 0
    a = [int(t) for t in prompts(vocab, n=1, seed=7)[0]] * 2
    b = a[: len(a) // 2] + [int(t) for t in prompts(vocab, n=1, seed=8)[0]]
    state = DecodeState(family_model, use_mtp=k > 0)
    gen = decode(family_model, a[: len(a) // 2 + 1], SAMPLED, draft_tokens=k, seed=0, state=state)
    next(gen)  # prefill only
    snapshot = state.copy()
    take(gen, N)  # decoding on must leave the snapshot as it was
    fresh = run(family_model, b, SAMPLED, k, seed=1)
    if state.reusable(b) >= 0:
        state.trim(b)
        assert run(family_model, b, SAMPLED, k, state=state, seed=1) == fresh
    else:
        with pytest.raises(ValueError):
            state.trim(b)
    assert snapshot.trim(b) == len(a) // 2 - (family_model.num_mtp_modules if k else 0)
    assert run(family_model, b, SAMPLED, k, state=snapshot, seed=1) == fresh


@pytest.mark.parametrize("num_mtp", [1, 3])
def test_toy_many_turns_and_branches(num_mtp):
    """Small vocabulary, so drafts are often accepted: several turns, each continuing or branching, with k and
    auto-like depth changes between turns (modules that did not run lag and are trimmed as they stand)."""
    model = ToyModel(vocab=5, num_mtp=num_mtp, seed=5)
    state = DecodeState(model, use_mtp=True)
    history = [1, 2, 3, 4, 0, 1]
    for turn, (k, cut) in enumerate([(2, None), (1, None), (4, 3), (3, None), (1, 5)]):
        prompt = history if cut is None else history[:-cut] + [turn % 5]
        state.trim(prompt)
        got = run(model, prompt, SAMPLED, k, state=state, seed=turn)
        assert got == run(model, prompt, SAMPLED, k, seed=turn), turn
        history = prompt + got[0] + [(turn + 2) % 5, 3]


def test_refusals():
    model = ToyModel(vocab=5, num_mtp=1, seed=5)
    plain = DecodeState(model, use_mtp=False)
    take(decode(model, [1, 2, 3], GREEDY, state=plain), 4)
    plain.trim([1, 2, 3, 4])
    with pytest.raises(ValueError, match="without MTP"):
        next(decode(model, [1, 2, 3, 4], GREEDY, draft_tokens=2, state=plain))
    state = DecodeState(model, use_mtp=True)
    take(decode(model, [1, 2, 3], GREEDY, draft_tokens=1, state=state), 4)
    with pytest.raises(ValueError, match="does not continue"):
        next(decode(model, [4, 4, 4, 4, 4, 4, 4, 4, 4], GREEDY, draft_tokens=1, state=state))
    state.busy = True  # as an interrupted round leaves it
    assert state.reusable([1, 2, 3]) == -1


def test_generate_from_state_reports_cached_tokens():
    from mlxmtp.generation import generate

    model, tok = mlxmtp.load(mlxmtp.demo_model_path())
    first = "def add(a, b):\n    return"
    state = DecodeState(model, use_mtp=True)
    r1 = generate(model, tok, first, max_tokens=8, draft_tokens=2, state=state)
    follow = tok.encode(first) + r1.tokens + tok.encode("\n\ndef mul(a, b):")
    state.trim(follow)
    r2 = generate(model, tok, follow, max_tokens=8, draft_tokens=2, state=state)
    assert r2.stats.cached_tokens >= len(tok.encode(first))
    assert r2.tokens == generate(model, tok, follow, max_tokens=8, draft_tokens=2).tokens


@pytest.mark.parametrize("ks", [(0,), (2, 0, 0)])
@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_reuse_after_plain_rounds_inside_mtp(family_model, ks, backend, monkeypatch):
    """A generation that stops while a pipelined plain round inside MTP decoding has its pass queued leaves a
    state (trunk, drafter and its pending hidden states) from which the next turn equals a fresh prefill; greedy,
    and sampled on both back ends (pipelined on mlx)."""
    from tests.test_speculative import ForcedDepths

    model = family_model
    mtp = model.num_mtp_modules > 0  # a family without MTP: the same for pipelined plain decoding
    monkeypatch.setenv("MLXMTP_SAMPLER", backend)
    vocab = min(model.args.vocab_size, 256)
    a = [int(t) for t in prompts(vocab, n=1, seed=7)[0]] * 2
    extra = [int(t) for t in prompts(vocab, n=1, seed=8)[0]]
    for params in (GREEDY, SAMPLED):
        state, st = DecodeState(model, use_mtp=mtp), RoundStats()
        take(decode(model, a, params, draft_tokens="auto" if mtp else 0, policy=ForcedDepths(ks), seed=0,
                    state=state, stats=st), N)
        assert st.rounds_by_k[0] > 0 and not state.busy
        assert state.n_cached == len(state.tokens) - 1  # the queued pass's token was read when it stopped
        b = list(state.tokens) + extra
        state.trim(b)
        k = 2 if mtp else 0
        assert run(model, b, params, k, state=state, seed=1) == run(model, b, params, k, seed=1), (params, ks)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_no_pass_is_queued_past_max_new_tokens(backend, monkeypatch):
    """With the max_new_tokens hint, pipelined plain decoding runs exactly one trunk pass per token it will hand out
    (the prefill's included), leaves the state with every emitted token but the last in the cache, and gives the
    same tokens as without the hint, also when the caller iterates on past it."""
    monkeypatch.setenv("MLXMTP_SAMPLER", backend)
    model = ToyModel(vocab=5, num_mtp=1, seed=5)
    passes = []
    trunk = model.trunk
    monkeypatch.setattr(model, "trunk", lambda *a, **kw: passes.append(1) or trunk(*a, **kw))
    for params in (GREEDY, SAMPLED):
        state = DecodeState(model, use_mtp=False)
        passes.clear()
        got = take(decode(model, [1, 2, 3], params, seed=3, state=state, max_new_tokens=N), N)
        assert len(passes) == N  # the prefill, then N - 1 rounds
        assert state.n_cached == len(state.tokens) - 1 == 3 + N - 1
        assert got == take(decode(model, [1, 2, 3], params, seed=3), N)
        longer = take(decode(model, [1, 2, 3], params, seed=3, max_new_tokens=N), N + 3)
        assert longer == take(decode(model, [1, 2, 3], params, seed=3), N + 3)
