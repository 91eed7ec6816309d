"""The engine on every model family: greedy decoding with MTP (k = 1..4 and auto) equals greedy decoding without
it, and a rejection at every draft position leaves the output unchanged, for every cache type the families use.
Families are found in tests/tiny/<family>.py (each writes a tiny Hugging Face layout checkpoint)."""

from __future__ import annotations

import importlib
import pkgutil

import mlx.core as mx
import numpy as np
import pytest

import mlxmtp
import tests.tiny as tiny
from mlxmtp import tuning
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


def test_greedy_mtp_equals_plain_on_the_decoding_threads(family_model):
    """As stream_generate decodes: the rounds on tuning.decode_threads' OpenBLAS count, the prefill on OpenBLAS's."""
    name, model = family_model
    threads = tuning.decode_threads(model)
    for p in prompts(min(model.args.vocab_size, 256), n=5, seed=2):
        plain = take(decode(model, p, GREEDY, draft_tokens=0, threads=threads), N_TOKENS)
        for k in (1, 3):
            assert take(decode(model, p, GREEDY, draft_tokens=k, threads=threads), N_TOKENS) == plain, (name, p, k)


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


@pytest.mark.parametrize("fold_rows, draft_rows", [(3, 9), (100, 1)])
def test_greedy_with_plain_rounds_inside_mtp_equals_plain(family_model, fold_rows, draft_rows, monkeypatch):
    """auto's mix of depths, forced: plain rounds (pipelined, their hidden states handed to the drafter lazily,
    folded every few rows, or caught up by the next draft) between drafting rounds of every depth, on every cache
    type."""
    import mlxmtp.speculative as spec
    from tests.test_speculative import MIXED, ForcedDepths

    name, model = family_model
    monkeypatch.setattr(spec, "FOLD_ROWS", fold_rows)
    monkeypatch.setattr(spec, "DRAFT_ROWS", draft_rows)
    for p in prompts(min(model.args.vocab_size, 256), n=5, seed=4):
        plain = take(decode(model, p, GREEDY), 2 * N_TOKENS)
        st = RoundStats()
        got = take(decode(model, p, GREEDY, draft_tokens="auto", policy=ForcedDepths(MIXED), stats=st), 2 * N_TOKENS)
        assert got == plain, (name, p)
        assert st.rounds_by_k[0] > 0 and (st.drafted > 0 or not model.num_mtp_modules)


def test_fused_norms_and_rope_give_the_plain_calls_results(family_model):
    """On the CPU back end the layers compile mx.fast's norms and rope (models/layers.py): the trunk's logits over a
    prompt, decode steps and a verify pass, and every MTP module's, match the plain calls', and so do the tokens."""
    from mlxmtp.models import layers

    name, model = family_model
    p = [int(t) for t in prompts(min(model.args.vocab_size, 256), n=1, seed=5)[0]]

    def run():
        cache = model.make_cache()
        pre, post = model.trunk(mx.array([p]), cache)
        out = [model.lm_head(post)]
        for step in ([[3]], [[4]], [[5, 6, 7, 8]]):  # two decode steps and a verify pass
            out.append(model(mx.array(step), cache))
        hidden = model.select_hidden(pre, post)
        for j in range(model.num_mtp_modules):
            hidden, logits = model.mtp_forward(j, hidden[:, :-1], mx.array([p[j + 1 :]]), model.make_mtp_cache()[j])
            out.append(logits)
        return [np.array(o.astype(mx.float32)) for o in out] + [take(decode(model, p, GREEDY, draft_tokens=2),
                                                                     N_TOKENS)]

    layers.FUSE_FALLBACKS = False
    try:
        plain = run()
    finally:
        layers.FUSE_FALLBACKS = True
    fused = run()
    assert fused[-1] == plain[-1], name
    for f, q in zip(fused[:-1], plain[:-1]):
        np.testing.assert_allclose(f, q, rtol=1e-5, atol=1e-5, err_msg=name)
