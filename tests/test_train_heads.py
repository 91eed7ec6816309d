"""`mlxmtp train-heads`: heads trained on a frozen trunk raise held-out acceptance, load with MTP and decode exactly;
the trainer's acceptance is bench's on the written checkpoint; an interrupted run resumes to the same result."""

from __future__ import annotations

import json
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlxmtp
from mlxmtp import bench, generation
from mlxmtp.cli.main import cli
from mlxmtp.errors import MLXMTPError
from mlxmtp.train_heads import Recipe, attach_heads, measure_acceptance, read_corpus, train_heads
from tests.tiny import minimax_m2, qwen3_5

# Greedy generations of the tiny random trunk are what its heads learn; prompts are random byte text.
TINY = dict(batch=8, seq_len=48, lr=1e-2, generate_tokens=4000, gen_prompt_tokens=16, gen_new_tokens=48,
            gen_temperature=0.0, eval_prompts=6, eval_prompt_tokens=16, eval_tokens=24, dtype="float32")


def random_text(seed: int, n_docs: int = 20, chars: int = 400) -> list[str]:
    rnd = random.Random(seed)
    return ["".join(rnd.choice("abcdefgh ij\n") for _ in range(chars)) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    return minimax_m2.make(tmp_path_factory.mktemp("minimax_m2"))


@pytest.fixture(scope="module")
def trained(trunk, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "out"
    return train_heads(trunk, out, random_text(0), Recipe(steps=60, eval_every=60, **TINY))


def test_training_raises_acceptance_and_checkpoint_decodes_exactly(trunk, trained):
    model, tok = mlxmtp.load(trained.out)
    assert model.num_mtp_modules == 3  # MiniMax-M2's declared count, all trained
    cfg = json.loads((trained.out / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 3 and cfg["mlxmtp"]["mtp_heads"]["trained_by"] == "mlxmtp train-heads"
    assert cfg["mlxmtp"]["mtp_heads"]["recipe"]["steps"] == 60
    # The untrained heads (same init, same seed) on the same held-out prompts: the chance level.
    untrained, _ = attach_heads(trunk, 3, "last-layer", 0)
    prompts = cfg["mlxmtp"]["mtp_heads"]["heldout"]["prompts"]
    assert prompts == 6
    from mlxmtp.train_heads import heldout_prompts, token_streams

    _, held = token_streams(tok, random_text(0), 0.05)
    texts = heldout_prompts(tok, held, 6, 16)
    before = measure_acceptance(untrained, tok, texts, 24, 1)["acceptance"]
    after = trained.heldout["k=1"]["acceptance"]
    print(f"tiny minimax_m2 held-out greedy acceptance at k=1: {before:.3f} untrained -> {after:.3f} after 60 steps")
    assert before < 0.08 and after > 0.15 and after > 3 * before
    for text in texts[:3]:
        ids = list(tok.encode(text))
        plain = generation.generate(model, tok, ids, max_tokens=20, draft_tokens=0).tokens
        for k in (1, 3):
            assert generation.generate(model, tok, ids, max_tokens=20, draft_tokens=k).tokens == plain


def test_trainer_acceptance_equals_bench_on_the_written_checkpoint(trunk, trained):
    model, tok = mlxmtp.load(trained.out)
    from mlxmtp.train_heads import heldout_prompts, token_streams

    _, held = token_streams(tok, random_text(0), 0.05)
    items = [{"id": str(i), "category": "heldout", "prompt": p, "raw": True}
             for i, p in enumerate(heldout_prompts(tok, held, 6, 16))]
    report = bench.run(model, tok, items, [bench.Setting("k=1", 1)], repeats=1, max_tokens=24, progress=False)
    runs = [r for r in report["runs"] if r["setting"] == "k=1"]
    bench_acc = sum(r["accepted"] for r in runs) / sum(r["drafted"] for r in runs)
    in_training = trained.log[-1][2]  # measured on the in-memory heads at the last step, before writing
    assert in_training == round(trained.heldout["k=1"]["acceptance"], 4) == round(bench_acc, 4)
    assert trained.heldout["k=1"]["accepted"] == sum(r["accepted"] for r in runs)


def test_interrupted_run_resumes_to_the_same_result(trunk, tmp_path):
    recipe = dict(TINY, steps=10, eval_every=100, save_every=3, generate_tokens=1000, eval_prompts=2)
    whole = train_heads(trunk, tmp_path / "whole", random_text(1), Recipe(**recipe))

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_heads(trunk, tmp_path / "cut", random_text(1), Recipe(**recipe), on_step=interrupt)
    state = json.loads((tmp_path / "cut.train-heads" / "state.json").read_text())
    assert state["step"] == 5 and not (tmp_path / "cut").exists()
    resumed = train_heads(trunk, tmp_path / "cut", random_text(1), Recipe(**recipe))
    assert resumed.log == whole.log
    a, b = mx.load(str(whole.out / "model.safetensors")), mx.load(str(resumed.out / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    # a different recipe does not silently continue someone else's run
    with pytest.raises(MLXMTPError, match="different recipe"):
        train_heads(trunk, tmp_path / "cut", random_text(1), Recipe(**{**recipe, "lr": 5e-3}), force=True)


def test_demo_trunk_with_its_head_removed(tmp_path):
    """The demo's trunk, head dropped: a few dozen steps on stdlib text lift greedy acceptance well above the
    untrained module's, and the checkpoint is the demo's layout (model.layers.4.*) with greedy output == plain."""
    demo = mlxmtp.demo_model_path()
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = set((demo / "heldout_files.txt").read_text().split())
    files = sorted(f for f in (stdlib / "json").glob("*.py") if f"json/{f.name}" not in held)
    corpus = [f.read_text() for f in files] + [(stdlib / "textwrap.py").read_text()]
    r = train_heads(demo, tmp_path / "out", corpus,
                    Recipe(steps=24, batch=6, seq_len=48, lr=3e-3, eval_every=24, eval_prompts=4,
                           eval_prompt_tokens=32, eval_tokens=20, heldout_fraction=0.1, dtype="float32"))
    model, tok = mlxmtp.load(r.out)
    names = mx.load(str(r.out / "model.safetensors")).keys()
    assert model.num_mtp_modules == 1 and "model.layers.4.eh_proj.weight" in names
    untrained, _ = attach_heads(demo, 1, "last-layer", 0)
    from mlxmtp.train_heads import heldout_prompts, token_streams

    _, held_ids = token_streams(tok, corpus, 0.1)
    texts = heldout_prompts(tok, held_ids, 4, 32)
    before = measure_acceptance(untrained, tok, texts, 20, 1)["acceptance"]
    after = r.heldout["k=1"]["acceptance"]
    print(f"demo trunk held-out greedy acceptance at k=1: {before:.3f} untrained -> {after:.3f} after 24 steps")
    assert after > before + 0.2
    plain = generation.generate(model, tok, texts[0], max_tokens=24, draft_tokens=0).tokens
    assert generation.generate(model, tok, texts[0], max_tokens=24, draft_tokens=2).tokens == plain


def test_bad_input_is_one_line(trunk, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train-heads", str(trunk), "-o", str(tmp_path / "o"), "--corpus", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.output.strip().startswith("error:") and "does not exist" in res.output
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(MLXMTPError, match="bad.jsonl:2"):
        read_corpus(tmp_path / "bad.jsonl")
    qwen = qwen3_5.make(tmp_path / "qwen")
    with pytest.raises(MLXMTPError, match="not supported"):
        train_heads(qwen, tmp_path / "q", random_text(0), Recipe(steps=1))
    res = runner.invoke(cli, ["train-heads", str(trunk), "-o", str(tmp_path / "o"), "--corpus", str(tmp_path),
                              "--steps", "0"])
    assert res.exit_code == 1 and res.output.count("\n") == 1


def test_memory_preflight_refuses(trunk, tmp_path, monkeypatch):
    from mlxmtp import inspection

    monkeypatch.setattr(inspection, "memory_budget", lambda: (1 << 20, "test budget"))
    with pytest.raises(MLXMTPError, match="training needs about"):
        train_heads(trunk, tmp_path / "o", random_text(0), Recipe(steps=1))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.train-heads").exists()


def test_cli_trains_and_inspect_says_so(trunk, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(random_text(2, n_docs=4)))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["train-heads", str(trunk), "-o", str(out), "--corpus", str(tmp_path / "corpus.txt"),
                                   "--steps", "3", "--batch", "2", "--seq-len", "16", "--modules", "1"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "held-out greedy k=1" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "trained by mlxmtp train-heads" in res.output
    shutil.rmtree(out)


def test_cached_teacher_targets_equal_on_the_fly(trunk, tmp_path, monkeypatch):
    """Teacher targets cached to disk with K = vocab (the full distribution) train exactly as on the fly: same losses
    at every step, same heads. A second run reads the cache (no trunk forward for targets). With K < vocab the loss is
    the KL over K + 1 bins, which a direct computation reproduces and which is at most the full KL."""
    from mlxmtp import train_heads as th

    V = mlxmtp.load_model(trunk).args.vocab_size
    recipe = dict(TINY, steps=8, eval_every=100, generate_tokens=1000, eval_prompts=2)
    fly = train_heads(trunk, tmp_path / "fly", random_text(3), Recipe(**recipe))
    cached = train_heads(trunk, tmp_path / "cached", random_text(3), Recipe(**recipe, teacher_cache=V))
    assert [s for s, _, _ in cached.log] == [s for s, _, _ in fly.log]
    np.testing.assert_allclose([l for _, l, _ in cached.log], [l for _, l, _ in fly.log], rtol=1e-4)
    a, b = mx.load(str(fly.out / "model.safetensors")), mx.load(str(cached.out / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.allclose(a[k], b[k], atol=1e-4).item() for k in a)
    assert (tmp_path / "cached.train-heads" / f"teacher-top{V}" / "meta.json").exists()

    def no_trunk(*_):
        raise AssertionError("the teacher ran although its targets are cached")

    monkeypatch.setattr(th, "teacher", no_trunk)
    again = train_heads(trunk, tmp_path / "again", random_text(3), Recipe(**recipe, teacher_cache=V),
                        work_dir=tmp_path / "cached.train-heads", force=True)
    assert again.log[-1] == cached.log[-1]
    monkeypatch.undo()

    model, _ = attach_heads(trunk, 3, "last-layer", 0)
    tokens = mx.array(np.random.default_rng(0).integers(1, V, (3, 20)).astype(np.int32))
    hidden, logp = th.teacher(model, tokens)
    full = th.heads_loss(model, hidden, tokens, logp)[1]
    top = th.heads_loss(model, hidden, tokens, th.topk_targets(logp, 16))[1]
    h, j = hidden, 0  # module 0 by hand: bins = the teacher's 16 most likely ids + the rest
    _, logits = model.mtp_forward(j, h[:, :19], tokens[:, 1:20])
    q = np.array(mx.softmax(logits.astype(mx.float32), axis=-1)).astype(np.float64)
    p = np.exp(np.array(logp[:, 1:20])).astype(np.float64)
    best = np.argsort(-p, axis=-1)[..., :16]
    pk, qk = np.take_along_axis(p, best, -1), np.take_along_axis(q, best, -1)
    pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
    by_hand = ((pk * np.log(pk / qk)).sum(-1) + pr * np.log(pr / qr)).mean()
    assert abs(top[0].item() - by_hand) < 1e-4 * max(1.0, by_hand)
    assert all(t.item() <= f.item() + 1e-6 for t, f in zip(top, full)) and top[0].item() < full[0].item()


def test_teacher_cache_disk_preflight(trunk, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(MLXMTPError, match="teacher cache needs"):
        train_heads(trunk, tmp_path / "o", random_text(0), Recipe(**dict(TINY, steps=1, generate_tokens=0),
                                                                  teacher_cache=8))


@pytest.mark.parametrize("quantized", [False, True], ids=["sharded", "quantized"])
def test_glm4_moe_trunk_sharded_and_quantized(tmp_path, quantized):
    """GLM-4.5 layout: a sharded trunk (the heads go into their own shard, listed in the index) and a 4-bit trunk
    converted by mlxmtp convert (trained only forward); both load with MTP and decode greedy == plain."""
    from mlxmtp.convert import convert
    from tests.tiny import glm4_moe

    src = glm4_moe.make(tmp_path / "glm", mtp=False, shards=1 if quantized else 2)
    if quantized:
        src = convert(src, tmp_path / "q4", bits=4, group_size=32, mtp=False)
    r = train_heads(src, tmp_path / "out", random_text(4), Recipe(**dict(TINY, steps=60, eval_every=60)))
    model, tok = mlxmtp.load(r.out)
    assert model.num_mtp_modules == 1 and model.load_report["model_type"] == "glm4_moe"
    if quantized:
        assert json.loads((r.out / "config.json").read_text())["quantization"]["bits"] == 4
    else:
        index = json.loads((r.out / "model.safetensors.index.json").read_text())["weight_map"]
        assert index["model.layers.3.eh_proj.weight"] == "model-mtp.safetensors"
        assert sorted(set(index.values())) == sorted(f.name for f in r.out.glob("*.safetensors"))
    from mlxmtp.train_heads import heldout_prompts, token_streams

    untrained, _ = attach_heads(src, 1, "last-layer", 0)
    texts = heldout_prompts(tok, token_streams(tok, random_text(4), 0.05)[1], 6, 16)
    before, after = measure_acceptance(untrained, tok, texts, 24, 1)["acceptance"], r.heldout["k=1"]["acceptance"]
    print(f"glm4_moe ({'4-bit' if quantized else 'sharded'}) held-out greedy acceptance at k=1: {before:.3f} "
          f"untrained -> {after:.3f} after 60 steps")
    print(f"  KL {r.log[0][1]:.4f} at step 1 -> {r.log[-1][1]:.4f}")
    assert r.log[-1][1] < 0.6 * r.log[0][1] and after > 0.3 and after > before + 0.05
    for text in random_text(5, n_docs=2, chars=60):
        ids = list(tok.encode(text))
        plain = generation.generate(model, tok, ids, max_tokens=16, draft_tokens=0).tokens
        assert generation.generate(model, tok, ids, max_tokens=16, draft_tokens=1).tokens == plain
