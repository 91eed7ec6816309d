"""PromptCache: several turns of a conversation and branches off it, each decoded from the state the cache hands
out, equal the same generation from a fresh prefill, for every family and cache type (KV, MLA latent, sliding
window, Gated DeltaNet). Seeded sampling at temperature 1 covers the MTP drafter's state as well as the trunk's (the
rejection sampler's draws depend on the drafts and their distributions); greedy is checked on the toy model."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import mlxmtp
import tests.tiny as tiny
from mlxmtp.prompt_cache import PromptCache, limited_rollback, state_nbytes
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import prompts, take
from tests.toy_model import ToyModel

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))
SAMPLED = SamplingParams(temperature=1.0)
N = 8


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    maker = importlib.import_module(f"tests.tiny.{request.param}")
    return mlxmtp.load_model(maker.make(tmp_path_factory.mktemp(request.param)), dtype=None)


def turn(model, cache, prompt, k, seed, params=SAMPLED):
    """One generation through the cache: (tokens, prompt tokens reused), checked against a fresh prefill."""
    state = cache.fetch(prompt, use_mtp=k > 0)
    reused = state.n_cached
    st = RoundStats()
    out = take(decode(model, prompt, params, draft_tokens=k, seed=seed, stats=st, state=state), N)
    cache.store(state)
    fresh = RoundStats()
    assert out == take(decode(model, prompt, params, draft_tokens=k, seed=seed, stats=fresh), N), (prompt, reused)
    assert (st.drafted, st.accepted) == (fresh.drafted, fresh.accepted)
    return out, reused, state


@pytest.mark.parametrize("k", [0, 2])
def test_turns_and_branches_equal_fresh_prefill(family_model, k):
    model = family_model
    k = k if model.num_mtp_modules else 0
    lag = model.num_mtp_modules if k else 0
    vocab = min(model.args.vocab_size, 256)
    new = [[int(t) for t in p] for p in prompts(vocab, n=6, seed=3)]
    cache = PromptCache(model, max_states=6)
    prompt, history = new[0] * 2, []
    for t in range(1, 5):
        out, reused, state = turn(model, cache, prompt, k, seed=t)
        history.append(prompt)
        if t > 1:  # every turn after the first reuses what the last one held (KV: all of it but the MTP lag)
            assert reused > 0
            if not cache.snapshots:
                assert reused >= len(history[-2]) - lag
        # odd turns: the next prompt extends everything the state holds (a reply that ended on EOS, which the
        # template renders); even turns: the reply cut at N tokens (max_tokens mid-round), then a new message
        prompt = (list(state.tokens) if t % 2 else prompt + out) + new[t]
    # a regenerated last turn: the end of the turn before serves it (a snapshot where caches cannot trim)
    _, reused, _ = turn(model, cache, history[-1], k, seed=12)
    assert reused >= len(history[-2]) - lag
    # a branch half-way into the third turn's reply: KV caches trim to it; the others start from the end of the
    # first turn (the snapshot before the branch point), then prefill the second turn's message and what follows
    half = len(history[1]) + (len(history[2]) - len(history[1])) // 2
    _, reused, _ = turn(model, cache, history[2][:half] + new[5], k, seed=11)
    assert reused >= (half if not cache.snapshots else len(history[1]) - len(new[1])) - lag


def test_snapshots_only_where_caches_cannot_trim(family_model):
    from mlxmtp.cache import RecurrentCache, SlidingWindowCache

    kinds = {type(c) for c in family_model.make_cache()}
    assert limited_rollback(family_model) == bool(kinds & {RecurrentCache, SlidingWindowCache})


@pytest.mark.parametrize("num_mtp", [1, 3])
def test_toy_greedy_and_auto_depths(num_mtp):
    """Small vocabulary, so drafts are often accepted; depths change between turns as "auto" would."""
    model = ToyModel(vocab=5, num_mtp=num_mtp, seed=5)
    cache = PromptCache(model, max_states=2)
    prompt = [1, 2, 3, 4, 0, 1]
    for t, k in enumerate([2, 1, 4, 3, 1]):
        out, reused, state = turn(model, cache, prompt, k, seed=t, params=SamplingParams() if t % 2 else SAMPLED)
        assert t == 0 or reused >= len(prompt) - num_mtp - N
        prompt = prompt + out + [t % 5, 3]


def test_lru_and_memory_bound():
    model = ToyModel(vocab=5, num_mtp=1, seed=5)
    cache = PromptCache(model, max_states=2)
    states = []
    for first in range(3):  # three unrelated conversations: the oldest is evicted
        out, reused, state = turn(model, cache, [first, 1, 2, 3], 1, seed=0)
        assert reused == 0
        states.append(state)
    assert cache.states == states[1:]
    # a conversation's next turn replaces its state (KV-only: the longer state serves whatever the shorter did)
    _, reused, state = turn(model, cache, list(states[2].tokens) + [4], 1, seed=0)
    assert reused > 0 and cache.states == [states[1], state]
    # a branch before a state's end decodes on a copy, leaving the state for its own conversation
    _, reused, branch = turn(model, cache, [1, 1, 2, 4], 1, seed=0)
    assert 0 < reused < states[1].n_cached and branch is not states[1] and states[1] in cache.states
    # the byte bound: a state one byte over it is not kept, one that fits is (the state of [0, 1, 2, 3] is
    # states[0]'s: same prompt, seed and settings)
    one = state_nbytes(states[0])
    small = PromptCache(model, max_states=4, max_bytes=one - 1)
    turn(model, small, [0, 1, 2, 3], 1, seed=0)
    assert len(small) == 0 and small.nbytes == 0
    fits = PromptCache(model, max_states=4, max_bytes=one)
    turn(model, fits, [0, 1, 2, 3], 1, seed=0)
    assert len(fits) == 1 and fits.nbytes == one
    with pytest.raises(ValueError):
        PromptCache(model, max_states=-1)


def test_interrupted_state_not_kept():
    model = ToyModel(vocab=5, num_mtp=1, seed=5)
    cache = PromptCache(model)
    state = cache.fetch([1, 2, 3], use_mtp=True)
    take(decode(model, [1, 2, 3], SAMPLED, draft_tokens=1, seed=0, state=state), 4)
    state.busy = True  # as an exception inside a pass leaves it
    cache.store(state)
    assert len(cache) == 0
    plain = cache.fetch([1, 2, 3], use_mtp=False)
    assert plain.drafter is None and plain.n_cached == 0
