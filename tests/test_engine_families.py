"""The engine on every model family: greedy decoding with MTP (k = 1..4 and auto) equals greedy decoding without
it, and a rejection at every draft position leaves the output unchanged, for every cache type the families use.
Families are found in tests/tiny/<family>.py (each writes a tiny Hugging Face layout checkpoint)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import mlxmtp
import tests.tiny as tiny
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import OracleDrafter, prompts, take

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))
GREEDY = SamplingParams()
N_TOKENS = 16


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    maker = importlib.import_module(f"tests.tiny.{request.param}")
    path = maker.make(tmp_path_factory.mktemp(request.param))
    return request.param, mlxmtp.load_model(path, dtype=None)


def test_greedy_mtp_equals_plain(family_model, tmp_path, monkeypatch):
    name, model = family_model
    monkeypatch.setattr("mlxmtp.tuning.CACHE_FILE", tmp_path / "costs.json")
    vocab = model.args.vocab_size
    drafted = 0
    for p in prompts(min(vocab, 256), n=20, seed=1):
        plain = take(decode(model, p, GREEDY, draft_tokens=0), N_TOKENS)
        for k in (1, 2, 3, 4):
            st = RoundStats()
            assert take(decode(model, p, GREEDY, draft_tokens=k, stats=st), N_TOKENS) == plain, (name, p, k)
            drafted += st.drafted
    if model.num_mtp_modules:
        assert drafted > 0
    from mlxmtp.tuning import DepthPolicy, measure_costs

    policy = DepthPolicy(measure_costs(model, 5), 4)
    for p in prompts(min(vocab, 256), n=5, seed=2):
        plain = take(decode(model, p, GREEDY), N_TOKENS)
        assert take(decode(model, p, GREEDY, draft_tokens="auto", policy=policy), N_TOKENS) == plain


def test_rollback_at_every_rejection_position(family_model):
    """Prompts longer than any sliding window in the tiny configs; rejection at 0..k in every round."""
    name, model = family_model
    vocab = min(model.args.vocab_size, 256)
    prompt = [int(t) for t in prompts(vocab, n=1, seed=3)[0]] * 3
    k = 4
    plain = take(decode(model, prompt, GREEDY), N_TOKENS + k + 2)
    truth = prompt + plain
    for right in range(k + 1):
        st = RoundStats()
        got = take(decode(model, prompt, GREEDY, draft_tokens=k, drafter=OracleDrafter(truth, vocab, right),
                          stats=st), N_TOKENS)
        assert got == plain[:N_TOKENS], (name, right)
        assert st.accepted == right * st.target_forwards


def test_greedy_with_plain_rounds_inside_mtp_equals_plain(family_model, monkeypatch):
    """auto's mix of depths, forced: plain rounds (pipelined, their hidden states handed to the drafter lazily,
    folded every few rows) between drafting rounds of every depth, on every cache type."""
    import mlxmtp.speculative as spec
    from tests.test_speculative import MIXED, ForcedDepths

    name, model = family_model
    monkeypatch.setattr(spec, "FOLD_ROWS", 3)
    for p in prompts(min(model.args.vocab_size, 256), n=5, seed=4):
        plain = take(decode(model, p, GREEDY), 2 * N_TOKENS)
        st = RoundStats()
        got = take(decode(model, p, GREEDY, draft_tokens="auto", policy=ForcedDepths(MIXED), stats=st), 2 * N_TOKENS)
        assert got == plain, (name, p)
        assert st.rounds_by_k[0] > 0 and (st.drafted > 0 or not model.num_mtp_modules)
