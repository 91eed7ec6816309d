"""MiMo-7B: trunk parity with mlx-lm (no HF class exists) through every cache path, rollback, the MTP layer
([hidden ; embedding]) against a reference written from the raw tensors, strict loading.

The helpers under "shared checks" are imported by other families' tests too: keep their signatures."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp.cache import rollback
from mlxmtp.errors import CheckpointError
from tests.tiny import mimo as tiny

TOL = 1e-4


# --- shared checks ---------------------------------------------------------------------------------------------

def tokens_for(vocab: int, n: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, size=(1, n)))


def through_cache(step, cache, n: int, sizes) -> mx.array:
    """Concatenated outputs of step(i, j, cache) over consecutive chunks [i, j) of the given sizes (cycled)."""
    outs, i, s = [], 0, 0
    while i < n:
        j = min(n, i + sizes[s % len(sizes)])
        outs.append(step(i, j, cache))
        i, s = j, s + 1
    return mx.concatenate(outs, axis=1)


def trunk_diffs(model, tokens, reference) -> dict:
    """Max |logits - reference| for a whole-sequence pass, token by token through the cache, and through the cache
    in chunks of 5, 3, 4, 5, 3, 4, ... (verification feeds 1 + draft depth). reference: [1, T, V]."""
    ref = mx.array(np.asarray(reference, dtype=np.float32))
    T = tokens.shape[1]
    step = lambda i, j, c: model(tokens[:, i:j], c)  # noqa: E731
    paths = {"full": model(tokens), "token_by_token": through_cache(step, model.make_cache(), T, [1]),
             "chunks_3_4": through_cache(step, model.make_cache(), T, [5, 3, 4])}
    return {k: mx.abs(v - ref).max().item() for k, v in paths.items()}


def check_trunk_rollback(model, tokens, n: int, prompt_len: int):
    """After feeding n extra tokens and rolling them back, the next logits equal those of a cache that never saw
    them."""
    fresh, rolled = model.make_cache(), model.make_cache()
    model(tokens[:, :prompt_len], fresh)
    model(tokens[:, :prompt_len], rolled)
    model(tokens[:, prompt_len:prompt_len + n], rolled)
    rollback(rolled, n)
    nxt = tokens[:, prompt_len + n:prompt_len + n + 3]
    diff = mx.abs(model(nxt, rolled) - model(nxt, fresh)).max().item()
    assert diff < 1e-5, (n, diff)


def mtp_inputs(model, tokens):
    """The inputs of MTP module 0 at every position: the trunk hidden state the family feeds and t[i+1]."""
    pre, post = model.trunk(tokens)
    return model.select_hidden(pre, post)[:, :-1], tokens[:, 1:]


def check_mtp_rollback(model, tokens, n: int, prompt_len: int):
    hidden, nxt_tokens = mtp_inputs(model, tokens)
    for j in range(model.num_mtp_modules):
        fresh, rolled = model.make_mtp_cache()[j], model.make_mtp_cache()[j]
        sl = lambda a, b: (hidden[:, a:b], nxt_tokens[:, a:b])  # noqa: E731
        model.mtp_forward(j, *sl(0, prompt_len), fresh)
        model.mtp_forward(j, *sl(0, prompt_len), rolled)
        model.mtp_forward(j, *sl(prompt_len, prompt_len + n), rolled)
        rollback([rolled], n)
        b = sl(prompt_len + n, prompt_len + n + 3)
        (h1, l1), (h2, l2) = model.mtp_forward(j, *b, rolled), model.mtp_forward(j, *b, fresh)
        assert mx.abs(l1 - l2).max().item() < 1e-5 and mx.abs(h1 - h2).max().item() < 1e-5, (j, n)


def check_mtp_against(model, tokens, reference) -> float:
    """Each module's mtp_forward over the whole sequence, and through its cache in chunks of 3-4, against
    reference(j, hidden, tokens) -> (hidden_out, logits). Modules are chained on their own output hidden state, as
    module j drafts depth j. Returns the max abs difference."""
    hidden, nxt = mtp_inputs(model, tokens)
    worst = 0.0
    for j in range(model.num_mtp_modules):
        want_h, want_l = reference(j, hidden, nxt)
        got_h, got_l = model.mtp_forward(j, hidden, nxt)
        step = lambda i, k, c: mx.concatenate(model.mtp_forward(j, hidden[:, i:k], nxt[:, i:k], c), -1)  # noqa
        chunked = through_cache(step, model.make_mtp_cache()[j], hidden.shape[1], [5, 3, 4])
        both = mx.concatenate([want_h, want_l], -1)
        worst = max(worst, mx.abs(got_h - want_h).max().item(), mx.abs(got_l - want_l).max().item(),
                    mx.abs(chunked - both).max().item())
        hidden, nxt = got_h[:, :-1], nxt[:, 1:]
    return worst


def rms_norm(x, w, eps, zero_centred=False):
    x = x.astype(mx.float32)
    return x * mx.rsqrt((x * x).mean(-1, keepdims=True) + eps) * ((1.0 + w) if zero_centred else w)


def mtp_combine(raw, prefix, emb, hidden, eps, names=("enorm", "hnorm", "eh_proj"), hidden_first=False,
                zero_centred=False):
    """eh_proj(concat(enorm(e), hnorm(h))) from raw tensors; e is zeroed at absolute position 0."""
    emb = mx.concatenate([mx.zeros_like(emb[:, :1]), emb[:, 1:]], axis=1)
    e = rms_norm(emb, raw[prefix + names[0] + ".weight"], eps, zero_centred)
    h = rms_norm(hidden, raw[prefix + names[1] + ".weight"], eps, zero_centred)
    return mx.concatenate([h, e] if hidden_first else [e, h], -1) @ raw[prefix + names[2] + ".weight"].T


def raw_tensors(path) -> dict:
    return {k: mx.array(v) for k, v in load_file(str(path / "model.safetensors")).items()}


def load_block(block, raw: dict, prefix: str, transform=lambda k, v: (k, v)):
    """Load the raw tensors under prefix into a reference (mlx-lm) decoder layer (every one of its parameters)."""
    own = set(dict(tree_flatten(block.parameters())))
    items = [transform(k[len(prefix):], v) for k, v in raw.items() if k.startswith(prefix)]
    block.load_weights([(k, v) for k, v in items if k in own], strict=True)
    return block


def check_strict(make, tmp_path, *, drop, misshape, extra):
    """A missing, a misshaped and an unexpected tensor each fail with a CheckpointError naming it. Each argument
    is a checkpoint name, or (checkpoint name, the parameter name the error reports) where sanitize renames it."""
    src = make(tmp_path / "ok")
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    (drop, drop_msg), (bad, bad_msg), (new, new_msg) = ((a, a) if isinstance(a, str) else a
                                                        for a in (drop, misshape, extra))
    cases = [
        (drop_msg, {k: v for k, v in tensors.items() if k != drop}),
        (bad_msg, {**tensors, bad: np.zeros((3, *tensors[bad].shape[1:]), np.float32)}),
        (new_msg, {**tensors, new: np.zeros((4,), np.float32)}),
    ]
    for i, (msg, ts) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file(ts, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=msg.replace(".", r"\.")):
            mlxmtp.load_model(d)


# --- MiMo --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("mimo"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


def mlx_lm_logits(ckpt, tokens):
    from mlx_lm.models import mimo as ref

    config = json.loads((ckpt / "config.json").read_text())
    m = ref.Model(ref.ModelArgs.from_dict(config))
    m.load_weights(list(m.sanitize(raw_tensors(ckpt)).items()), strict=True)
    return m(tokens)


def test_trunk_parity_with_mlx_lm(model, ckpt):
    tokens = tokens_for(320, 24)
    diffs = trunk_diffs(model, tokens, mlx_lm_logits(ckpt, tokens))
    logging.getLogger(__name__).info("mimo vs mlx-lm max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(model, n):
    tokens = tokens_for(320, 40, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=30)
    check_mtp_rollback(model, tokens, n, prompt_len=30)


def test_mtp_module_matches_reference(model, ckpt):
    from mlx_lm.models import mimo as ref

    raw = raw_tensors(ckpt)
    args = ref.ModelArgs.from_dict(json.loads((ckpt / "config.json").read_text()))
    p = "model.mtp_layers.0."
    block = load_block(ref.TransformerBlock(args), raw, p)

    def reference(j, hidden, tokens):
        x = mtp_combine(raw, p, raw["model.embed_tokens.weight"][tokens], hidden, args.rms_norm_eps,
                        names=("token_layernorm", "hidden_layernorm", "input_proj"), hidden_first=True)
        y = rms_norm(block(x, "causal"), raw[p + "final_layernorm.weight"], args.rms_norm_eps)
        return y, y @ raw["lm_head.weight"].T

    assert model.num_mtp_modules == 1 and model.mtp[0].hidden_first
    diff = check_mtp_against(model, tokens_for(320, 20, seed=5), reference)
    logging.getLogger(__name__).info("mimo MTP layer vs reference max abs diff: %.2e", diff)
    assert diff < TOL


def test_strict_loading(tmp_path):
    check_strict(tiny.make, tmp_path, drop=("model.mtp_layers.0.input_proj.weight", "mtp.0.eh_proj.weight"),
                 misshape="model.layers.1.self_attn.k_proj.weight",
                 extra="model.mtp_layers.1.input_proj.weight")


def test_loads_without_mtp(tmp_path):
    plain = mlxmtp.load_model(tiny.make(tmp_path / "plain", mtp=False))
    assert plain.num_mtp_modules == 0 and "no MTP weights" in plain.load_report["warning"]
    assert mlxmtp.load_model(tiny.make(tmp_path / "full"), mtp=False).num_mtp_modules == 0
