"""GLM-4.5 (glm4_moe) against transformers' Glm4MoeForCausalLM and mlx-lm's glm4_moe on a tiny checkpoint; cache
rollback and the MTP module (helpers from test_deepseek_v3.py: the MoE and MTP layer are DeepSeek's)."""

from __future__ import annotations

import numpy as np
import pytest

import mlxmtp
from mlxmtp.models import glm4_moe
from tests.test_deepseek_v3 import (MODES, TOL, check_mtp, check_mtp_hidden_flag, check_parity, check_rollback,
                                    hf_logits, hf_model, mlx_lm_model, ours_in_mode)
from tests.tiny import glm4_moe as tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("glm4_moe"))


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(1).randint(0, tiny.CONFIG["vocab_size"], (1, 24))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


@pytest.fixture(scope="module")
def hf_ref(ckpt, tokens):
    from transformers import Glm4MoeForCausalLM

    return hf_logits(hf_model(Glm4MoeForCausalLM, ckpt), tokens)


def test_load_report(model):
    r = model.load_report
    assert (r["mtp_modules_declared"], r["mtp_modules_loaded"]) == (1, 1)
    assert sum(r["skipped"].values()) == 2  # the MTP layer's embed_tokens and shared_head.head
    attn = model.model.layers[0].self_attn
    assert attn.rope.rope.dims == 8 and "q_norm" in attn and "bias" in attn.q_proj


@pytest.mark.parametrize("mode", list(MODES))
def test_parity(model, hf_ref, ckpt, tokens, mode):
    check_parity(model, hf_ref, mlx_lm_model(ckpt), tokens, mode, "glm4_moe")


def test_rollback(model, tokens):
    check_rollback(model, tokens, np.random.RandomState(2))


def test_mtp_module(model, ckpt, tokens, tmp_path):
    from transformers import Glm4MoeForCausalLM

    check_mtp(model, Glm4MoeForCausalLM, ckpt, tmp_path, tokens)


def test_mtp_hidden_flag(model, tokens):
    check_mtp_hidden_flag(model, tokens)


def test_without_qk_norm_and_bias(tmp_path, tokens):
    """GLM-4.5-Air style attention (no QK-norm), here also without q/k/v bias."""
    from transformers import Glm4MoeForCausalLM

    path = tiny.make(tmp_path / "ckpt", use_qk_norm=False, attention_bias=False)
    model = mlxmtp.load_model(path)
    ref = hf_logits(hf_model(Glm4MoeForCausalLM, path), tokens)
    for mode in ("prompt", "verify"):
        ours = ours_in_mode(model, tokens, MODES[mode])
        assert np.abs(ours - ref[:, : ours.shape[1]]).max() < TOL


def test_mtp_count_from_config():
    assert glm4_moe.ModelArgs.from_dict({}).mtp_modules() == 0
    assert glm4_moe.ModelArgs.from_dict({"num_nextn_predict_layers": 1}).mtp_modules() == 1
    assert glm4_moe.ModelArgs.from_dict({"hidden_size": 64, "num_attention_heads": 4}).head_dim == 16
