"""MiMo-V2-Flash: trunk parity with HF transformers and mlx-lm through every cache path (prompts longer than the
sliding window), rollback of sliding and full caches, the three MTP modules against a reference from the raw
tensors, the fused qkv layout, strict loading."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp.cache import KVCache, SlidingWindowCache
from tests.test_mimo import (TOL, check_mtp_against, check_mtp_rollback, check_strict, check_trunk_rollback,
                             load_block, mtp_combine, raw_tensors, rms_norm, tokens_for, trunk_diffs)
from tests.tiny import mimo_v2_flash as tiny

log = logging.getLogger(__name__)
V, T = 320, 24  # 24 positions: three windows of 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("mimo_v2_flash"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


@pytest.fixture(scope="module")
def config(ckpt):
    return json.loads((ckpt / "config.json").read_text())


def mlx_lm_model(ckpt, config, **override):
    from mlx_lm.models import mimo_v2_flash as ref

    m = ref.Model(ref.ModelArgs.from_dict({**config, **override}))
    m.load_weights(list(m.sanitize(raw_tensors(ckpt)).items()), strict=True)
    return m


def test_caches(model):
    assert [type(c) for c in model.make_cache()] == [KVCache, SlidingWindowCache, SlidingWindowCache, KVCache]
    assert all(isinstance(c, SlidingWindowCache) and c.window == 8 for c in model.make_mtp_cache())
    assert len(model.make_mtp_cache()) == model.num_mtp_modules == 3


def test_trunk_parity_with_hf(model):
    import torch

    tokens = tokens_for(V, T)
    with torch.no_grad():
        ref = tiny.reference(seed=0)(torch.tensor(np.array(tokens)), use_cache=False).logits.numpy()
    diffs = trunk_diffs(model, tokens, ref)
    log.info("mimo_v2_flash vs HF transformers max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_trunk_parity_with_mlx_lm(model, ckpt, config):
    """mlx-lm's mask is one key shorter than HF's / SGLang's (it reads sliding_window_size as the window with the
    query included): with the window made equal the trunks agree; as mlx-lm reads the config they agree only
    where the window does not bind yet."""
    tokens = tokens_for(V, T)
    w = config["sliding_window_size"]
    diffs = trunk_diffs(model, tokens, mlx_lm_model(ckpt, config, sliding_window_size=w + 1)(tokens))
    log.info("mimo_v2_flash vs mlx-lm (window + 1) max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs
    as_read = mlx_lm_model(ckpt, config)(tokens)
    assert mx.abs(as_read[:, :w] - model(tokens)[:, :w]).max().item() < TOL
    assert mx.abs(as_read[:, w:] - model(tokens)[:, w:]).max().item() > 1e-2


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(model, n):
    tokens = tokens_for(V, 40, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=30)
    check_mtp_rollback(model, tokens, n, prompt_len=30)


def test_mtp_modules_match_reference(model, ckpt, config):
    """Module j: [enorm(e) ; hnorm(h)] -> eh_proj -> a sliding-window block with sinks and a dense MLP (mlx-lm's
    decoder layer, same window as the trunk) -> final_layernorm -> the trunk's head."""
    from mlx_lm.models import mimo_v2_flash as ref

    raw = raw_tensors(ckpt)
    eps, W = config["layernorm_epsilon"], config["sliding_window_size"] + 1
    args = ref.ModelArgs.from_dict(config)

    def reference(j, hidden, tokens):
        p = f"model.mtp.layers.{j}."
        block = load_block(ref.DecoderLayer(args, is_moe=False, is_sliding_window=True), raw, p)
        L = hidden.shape[1]
        q, k = np.arange(L)[:, None], np.arange(L)[None]
        mask = mx.array((k <= q) & (k > q - W))[None, None]
        y = block(mtp_combine(raw, p, raw["model.embed_tokens.weight"][tokens], hidden, eps), mask)
        post = rms_norm(y, raw[p + "final_layernorm.weight"], eps)
        return post, post @ raw["lm_head.weight"].T

    diff = check_mtp_against(model, tokens_for(V, 22, seed=7), reference)
    log.info("mimo_v2_flash MTP modules vs reference max abs diff: %.2e", diff)
    assert diff < TOL


def test_fused_qkv_layout(model, tmp_path):
    path = tiny.make(tmp_path / "fused", fused_qkv=True)
    names = list(load_file(str(path / "model.safetensors")))
    assert "model.mtp.layers.1.self_attn.qkv_proj.weight" in names and not any("q_proj" in k for k in names)
    fused = mlxmtp.load_model(path)
    tokens = tokens_for(V, 12)
    assert mx.array_equal(fused(tokens), model(tokens))
    for j in range(3):
        assert mx.array_equal(fused.mtp[j].block.self_attn.k_proj.weight, model.mtp[j].block.self_attn.k_proj.weight)


def test_pre_mlp_layernorm_spelling(model, ckpt, tmp_path):
    tensors = {k.replace("post_attention_layernorm", "pre_mlp_layernorm") if k.startswith("model.mtp.") else k: v
               for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    d = tmp_path / "renamed"
    d.mkdir()
    (d / "config.json").write_text((ckpt / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"))
    other = mlxmtp.load_model(d)
    assert mx.array_equal(other.mtp[2].block.post_attention_layernorm.weight,
                          model.mtp[2].block.post_attention_layernorm.weight)


def test_strict_loading(tmp_path):
    check_strict(tiny.make, tmp_path,
                 drop=("model.mtp.layers.2.self_attn.attention_sink_bias", "mtp.2.block.self_attn.attention_sink_bias"),
                 misshape="model.layers.2.mlp.gate.weight",
                 extra="model.layers.0.self_attn.attention_sink_bias")
