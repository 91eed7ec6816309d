"""Step-3.5-Flash: trunk parity with mlx-lm and with HF transformers' Step3p7TextModel (the same text model)
through every cache path with prompts longer than the window, rollback, the three MTP layers (pre-norm hidden,
(1 + w) norms, own head each) against a reference from the raw tensors, the ``.transformer.`` infix, strict
loading."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp.cache import KVCache, SlidingWindowCache
from mlxmtp.models import step3p5
from tests.test_mimo import (TOL, check_mtp_against, check_mtp_rollback, check_strict, check_trunk_rollback,
                             load_block, mtp_combine, raw_tensors, rms_norm, tokens_for, trunk_diffs)
from tests.tiny import step3p5 as tiny

log = logging.getLogger(__name__)
V, T = 320, 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("step3p5"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


@pytest.fixture(scope="module")
def config(ckpt):
    return json.loads((ckpt / "config.json").read_text())


def test_caches(model):
    assert [type(c) for c in model.make_cache()] == [KVCache, SlidingWindowCache, SlidingWindowCache, KVCache]
    assert [type(c) for c in model.make_mtp_cache()] == [SlidingWindowCache] * 3
    assert step3p5.Model.mtp_hidden == "pre" and all(m.has_own_head for m in model.mtp)


def test_trunk_parity_with_mlx_lm(model, ckpt, config):
    from mlx_lm.models import step3p5 as ref

    m = ref.Model(ref.ModelArgs.from_dict(config))
    m.load_weights(list(m.sanitize(raw_tensors(ckpt)).items()), strict=True)
    tokens = tokens_for(V, T)
    diffs = trunk_diffs(model, tokens, m(tokens))
    log.info("step3p5 vs mlx-lm max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_trunk_parity_with_hf(model, ckpt, config):
    """HF transformers reads the original config (moe_layers_enum, attention_other_setting, padded per-layer
    lists) into Step3p7TextConfig; its checkpoint conversion fuses moe.gate_proj / up_proj, renames the rest."""
    import torch
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel

    hf_config = Step3p7TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "eager"
    hf = Step3p7TextModel(hf_config).float().eval()
    raw = load_file(str(ckpt / "model.safetensors"))
    state = {}
    for k, v in raw.items():
        layer = int(k.split(".")[2]) if k.startswith("model.layers.") else -1
        if k == "lm_head.weight" or layer >= tiny.L:  # the head is applied below; MTP layers are not HF's
            continue
        k = k[len("model."):]
        if ".moe.up_proj." in k:
            continue
        if ".moe.gate_proj." in k:
            v = np.concatenate([v, raw["model." + k.replace("gate_proj", "up_proj")]], axis=1)
        for src, dst in ((".moe.gate_proj.weight", ".mlp.experts.gate_up_proj"),
                         (".moe.down_proj.weight", ".mlp.experts.down_proj"), (".moe.gate.", ".mlp.gate."),
                         (".moe.router_bias", ".mlp.gate.e_score_correction_bias"),
                         (".share_expert.", ".mlp.shared_experts.")):
            k = k.replace(src, dst)
        state[k] = torch.from_numpy(v)
    hf.load_state_dict(state, strict=True)
    tokens = tokens_for(V, T)
    with torch.no_grad():
        hidden = hf(torch.tensor(np.array(tokens)), use_cache=False).last_hidden_state.numpy()
    diffs = trunk_diffs(model, tokens, hidden @ raw["lm_head.weight"].T)
    log.info("step3p5 vs HF transformers (Step3p7TextModel) max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(model, n):
    tokens = tokens_for(V, 40, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=30)
    check_mtp_rollback(model, tokens, n, prompt_len=30)


def test_mtp_layers_match_reference(model, ckpt, config):
    """Layer L + j: [enorm(e) ; hnorm(h)] with (1 + w) norms -> eh_proj -> mlx-lm's decoder layer of that index
    (its per-layer rope / limits, sliding window) -> its own shared_head (norm, output). The hidden state passed on
    is the block's output before the norm."""
    from mlx_lm.models import step3p5 as ref

    raw = raw_tensors(ckpt)
    eps, W, args = config["rms_norm_eps"], config["sliding_window"], ref.ModelArgs.from_dict(config)
    plus_one = lambda k, v: (k, v + 1 if "norm" in k else v)  # noqa: E731  mlx-lm stores the norms as 1 + w

    def reference(j, hidden, tokens):
        p = f"model.layers.{tiny.L + j}."
        block = load_block(ref.Step3p5DecoderLayer(args, tiny.L + j), raw, p, plus_one)
        x = mtp_combine(raw, p, raw["model.embed_tokens.weight"][tokens], hidden, eps, zero_centred=True)
        q, k = np.arange(x.shape[1])[:, None], np.arange(x.shape[1])[None]
        y = block(x, mx.array((k <= q) & (k > q - W))[None, None])
        post = rms_norm(y, raw[p + "shared_head.norm.weight"], eps, zero_centred=True)
        return y, post @ raw[p + "shared_head.output.weight"].T

    diff = check_mtp_against(model, tokens_for(V, 22, seed=3), reference)
    log.info("step3p5 MTP layers vs reference max abs diff: %.2e", diff)
    assert diff < TOL


def test_transformer_infix_and_embedding_copies(model, tmp_path):
    path = tiny.make(tmp_path / "infix", transformer_infix=True)
    tensors = load_file(str(path / "model.safetensors"))
    assert "model.layers.5.transformer.self_attn.g_proj.weight" in tensors
    tensors["model.layers.5.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    other = mlxmtp.load_model(path)
    assert other.load_report["skipped"] == {"MTP layers' copies of the embedding": 1}
    h, t = mx.ones((1, 3, 64)), mx.array([[1, 2, 3]])
    for j in range(3):
        assert mx.array_equal(other.mtp_forward(j, h, t)[1], model.mtp_forward(j, h, t)[1])


def test_strict_loading(tmp_path):
    check_strict(tiny.make, tmp_path,
                 drop=("model.layers.6.shared_head.output.weight", "mtp.2.head.weight"),
                 misshape="model.layers.2.moe.up_proj.weight",
                 extra="model.layers.7.enorm.weight")
