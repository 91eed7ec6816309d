"""OpenBLAS thread counts per phase (blas.using_threads, tuning.decode_threads): decoding rounds run on the chosen
count, the prefill on OpenBLAS's own, the count comes back however a generation ends, and greedy MTP decoding
still equals plain decoding with the rounds on one thread."""

from __future__ import annotations

import pytest

import mlxmtp.speculative as spec
from mlxmtp import blas, generation, load_tokenizer, tuning
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import decode
from tests.hf_layout import write_tokenizer
from tests.test_speculative import take
from tests.toy_model import ToyModel

GREEDY = SamplingParams()


class FakeOpenBLAS:
    """The two OpenBLAS calls blas.py makes, with the counts set recorded."""

    def __init__(self, n: int = 2):
        self.n, self.sets = n, []

    def openblas_get_num_threads(self) -> int:
        return self.n

    def openblas_set_num_threads(self, n: int) -> None:
        self.n = n
        self.sets.append(n)


@pytest.fixture
def fake_openblas(monkeypatch):
    lib = FakeOpenBLAS()
    monkeypatch.setattr(blas, "_lib", lib)
    return lib


@pytest.fixture
def passes(monkeypatch):
    """(rows, OpenBLAS threads) of every trunk pass decode runs."""
    seen = []
    trunk = spec._trunk

    def recorded(model, tokens, cache, want_hidden):
        seen.append((tokens.shape[0], blas.openblas_threads()))
        return trunk(model, tokens, cache, want_hidden)

    monkeypatch.setattr(spec, "_trunk", recorded)
    return seen


@pytest.mark.parametrize("k", [0, 2])
def test_rounds_run_on_the_chosen_count_and_the_prefill_on_openblas_own(fake_openblas, passes, k):
    model = ToyModel(vocab=32, num_mtp=1, seed=3)
    steps = decode(model, list(range(1, 13)), GREEDY, draft_tokens=k, threads=1)
    for _ in range(6):
        next(steps)
    assert blas.openblas_threads() == 1  # suspended between rounds: still the rounds' count
    steps.close()
    assert blas.openblas_threads() == 2 and fake_openblas.sets == [1, 2]
    assert passes[0] == (12, 2)  # the prompt's pass
    assert len(passes) > 3 and all(threads == 1 for _, threads in passes[1:])


def test_the_count_comes_back_when_a_round_fails(fake_openblas, monkeypatch):
    model = ToyModel(vocab=32, num_mtp=1, seed=3)
    steps = decode(model, [1, 2, 3, 4], GREEDY, draft_tokens=2, threads=1)
    next(steps)

    def broken(*args, **kwargs):
        raise RuntimeError("a failing pass")

    monkeypatch.setattr(spec, "_trunk", broken)
    with pytest.raises(RuntimeError, match="a failing pass"):
        for _ in steps:
            pass
    assert blas.openblas_threads() == 2


def test_no_count_or_no_openblas_changes_nothing(fake_openblas, monkeypatch):
    with blas.using_threads(None):
        assert blas.openblas_threads() == 2
    with blas.using_threads(2):
        pass
    assert fake_openblas.sets == []
    monkeypatch.setattr(blas, "_lib", None)
    with blas.using_threads(1):
        assert blas.openblas_threads() is None


def test_the_real_library_takes_and_restores_a_count():
    before = blas.openblas_threads()  # None where this machine's MLX does not use OpenBLAS
    with blas.using_threads(1):
        assert blas.openblas_threads() == (None if before is None else 1)
    assert blas.openblas_threads() == before


def test_small_trunks_decode_on_one_thread(fake_openblas, monkeypatch):
    model = ToyModel(vocab=32, num_mtp=1, seed=3)
    assert tuning.decode_threads(model) == 1
    monkeypatch.setattr(tuning, "ONE_THREAD_BYTES", 1)  # as if the trunk were large
    assert tuning.decode_threads(model) is None
    monkeypatch.setattr(tuning, "ONE_THREAD_BYTES", 64 << 20)
    fake_openblas.n = 1  # OpenBLAS already on one thread
    assert tuning.decode_threads(model) is None
    monkeypatch.setattr(blas, "_lib", None)
    assert tuning.decode_threads(model) is None


def test_stream_generate_decodes_on_the_chosen_count(fake_openblas, passes, tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    model = ToyModel(vocab=32, num_mtp=1, seed=3)
    res = generation.generate(model, tok, [1, 2, 3, 4, 5], max_tokens=12, draft_tokens=2)
    assert len(res.tokens) == 12 and passes[0] == (5, 2)
    assert all(threads == 1 for _, threads in passes[1:]) and blas.openblas_threads() == 2


@pytest.mark.parametrize("num_mtp", [1, 3])
def test_greedy_mtp_equals_plain_with_the_rounds_on_one_thread(num_mtp):
    model = ToyModel(vocab=32, num_mtp=num_mtp, seed=5)
    for p in ([1, 2, 3], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2], list(range(3, 30))):
        plain = take(decode(model, p, GREEDY, draft_tokens=0, threads=1), 30)
        for k in (1, 3):
            assert take(decode(model, p, GREEDY, draft_tokens=k, threads=1), 30) == plain, (p, k)
