"""MiniMax-M2: loads with no MTP module and says why in one line; trunk parity with HF transformers and mlx-lm
through every cache path; rollback; heads attached later (DeepSeek-style layout) load and match a reference from
the raw tensors; strict loading."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp.models import minimax_m2
from tests.test_mimo import (TOL, check_mtp_against, check_mtp_rollback, check_strict, check_trunk_rollback,
                             load_block, mtp_combine, raw_tensors, rms_norm, tokens_for, trunk_diffs)
from tests.tiny import minimax_m2 as tiny

log = logging.getLogger(__name__)
V, T = 320, 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("minimax_m2"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("minimax_m2_heads"), attach_heads=2)


def test_no_mtp_and_one_line_saying_why(ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="mlxmtp"):
        m = mlxmtp.load_model(ckpt)
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxmtp"]
    assert len(lines) == 1 and "\n" not in lines[0] and minimax_m2.Model.no_mtp_reason in lines[0]
    assert m.num_mtp_modules == 0 and m.make_mtp_cache() == [] and m.load_report["mtp_modules_declared"] == 0
    assert m.load_report["warning"] == lines[0]


def test_trunk_parity_with_hf(model):
    import torch

    tokens = tokens_for(V, T)
    with torch.no_grad():
        ref = tiny.reference(seed=0)(torch.tensor(np.array(tokens)), use_cache=False).logits.numpy()
    diffs = trunk_diffs(model, tokens, ref)
    log.info("minimax_m2 vs HF transformers max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_trunk_parity_with_mlx_lm(model, ckpt):
    from mlx_lm.models import minimax as ref

    m = ref.Model(ref.ModelArgs.from_dict(json.loads((ckpt / "config.json").read_text())))
    m.load_weights(list(m.sanitize(raw_tensors(ckpt)).items()), strict=True)
    tokens = tokens_for(V, T)
    diffs = trunk_diffs(model, tokens, m(tokens))
    log.info("minimax_m2 vs mlx-lm max abs diff: %s", diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(model, attached, n):
    tokens = tokens_for(V, 40, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=30)
    check_mtp_rollback(mlxmtp.load_model(attached), tokens, n, prompt_len=30)


def test_attached_heads_match_reference(attached):
    """A head trained later: [enorm(e) ; hnorm(h)] -> eh_proj -> one MiniMax-M2 layer (mlx-lm's) -> shared_head.norm
    -> the trunk's lm_head, fed the post-norm hidden state."""
    from mlx_lm.models import minimax as ref

    model = mlxmtp.load_model(attached)
    config = json.loads((attached / "config.json").read_text())
    raw, eps, L = raw_tensors(attached), config["rms_norm_eps"], config["num_hidden_layers"]
    assert model.num_mtp_modules == 2 and model.mtp_hidden == "post"

    def reference(j, hidden, tokens):
        p = f"model.layers.{L + j}."
        for proj, name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            raw[f"{p}block_sparse_moe.switch_mlp.{name}.weight"] = mx.stack(
                [raw[f"{p}block_sparse_moe.experts.{e}.{proj}.weight"] for e in range(config["num_local_experts"])])
        block = load_block(ref.MiniMaxDecoderLayer(ref.ModelArgs.from_dict(config)), raw, p)
        y = block(mtp_combine(raw, p, raw["model.embed_tokens.weight"][tokens], hidden, eps), "causal")
        post = rms_norm(y, raw[p + "shared_head.norm.weight"], eps)
        return post, post @ raw["lm_head.weight"].T

    diff = check_mtp_against(model, tokens_for(V, 20, seed=4), reference)
    log.info("minimax_m2 attached heads vs reference max abs diff: %.2e", diff)
    assert diff < TOL


def test_attached_heads_copies_of_embedding_and_head_are_skipped(attached, tmp_path):
    tensors = load_file(str(attached / "model.safetensors"))
    tensors["model.layers.4.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.4.shared_head.head.weight"] = tensors["lm_head.weight"]
    d = tmp_path / "copies"
    d.mkdir()
    (d / "config.json").write_text((attached / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"))
    m = mlxmtp.load_model(d)
    assert m.num_mtp_modules == 2 and m.load_report["skipped"] == {
        "MTP layers' copies of the trunk's embedding / head": 2}


def test_strict_loading(tmp_path):
    check_strict(tiny.make, tmp_path, drop="model.layers.1.self_attn.q_norm.weight",
                 misshape="model.layers.0.block_sparse_moe.gate.weight",
                 extra="model.layers.3.enorm.weight")  # a head the config does not declare
