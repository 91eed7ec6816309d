"""Qwen3.5 / 3.6, dense (qwen3_5, tied head) and MoE (qwen3_5_moe, fused trunk experts): trunk parity with HF
transformers (its ...ForConditionalGeneration loading the tiny vision-language checkpoint itself) and with mlx-lm
through every cache path, rollback, the MTP layer against a reference from the raw tensors (MTP experts one by one
as in Qwen3.5, or fused as in Qwen3.6), the vision tower skipped and reported, the text-only layout, strict
loading."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlxmtp
from tests.test_mimo import (check_mtp_against, check_mtp_rollback, check_strict, check_trunk_rollback, raw_tensors,
                             tokens_for)
from tests.test_qwen3_next import TOL, check_trunk_parity, hf_logits, mlx_lm_logits, mtp_reference
from tests.tiny import qwen3_5, qwen3_5_moe

FAMILIES = {"qwen3_5": (qwen3_5, "Qwen3_5ForConditionalGeneration"),
            "qwen3_5_moe": (qwen3_5_moe, "Qwen3_5MoeForConditionalGeneration")}
EMBED = "model.language_model.embed_tokens.weight"
log = logging.getLogger(__name__)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, tiny module, HF class name, checkpoint, model)."""
    tiny, hf_cls = FAMILIES[request.param]
    ckpt = tiny.make(tmp_path_factory.mktemp(request.param))
    return request.param, tiny, hf_cls, ckpt, mlxmtp.load_model(ckpt)


def head_name(model) -> str:
    return EMBED if model.args.tie_word_embeddings else "lm_head.weight"


def test_trunk_parity(family):
    name, _, hf_cls, ckpt, model = family
    tokens = tokens_for(320, 24)
    check_trunk_parity(name, model, tokens, {"HF": hf_logits(hf_cls, ckpt, tokens),
                                             "mlx-lm": np.array(mlx_lm_logits(name, ckpt, tokens))})


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(family, n):
    model = family[-1]
    tokens = tokens_for(320, 24, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=12)
    check_mtp_rollback(model, tokens, n, prompt_len=12)


def test_mtp_module_matches_reference(family):
    name, _, _, ckpt, model = family
    assert model.num_mtp_modules == 1 and model.mtp_hidden == "post"
    diff = check_mtp_against(model, tokens_for(320, 20, seed=5),
                             mtp_reference(raw_tensors(ckpt), model.args, EMBED, head_name(model)))
    log.info("%s MTP vs reference max abs diff: %s", name, diff)
    assert diff < TOL


def test_fused_mtp_experts(tmp_path):
    """Qwen3.6 stores the MTP layer's experts fused: same tensors, same module."""
    tokens = tokens_for(320, 12, seed=6)
    model = mlxmtp.load_model(qwen3_5_moe.make(tmp_path / "fused", fused_mtp_experts=True))
    reference = mtp_reference(raw_tensors(tmp_path / "fused"), model.args, EMBED, "lm_head.weight")
    assert check_mtp_against(model, tokens, reference) < TOL


def test_vision_tower_skipped(family):
    _, _, _, ckpt, model = family
    n_visual = sum(k.startswith("model.visual.") for k in load_file(str(ckpt / "model.safetensors")))
    assert n_visual > 0 and model.load_report["skipped"] == {"vision tower (text-only for now)": n_visual}


def test_text_only_layout(family, tmp_path):
    """A language-model-only checkpoint (flat config, ``model.*`` tensors, no vision tower) is the same model."""
    name, _, _, ckpt, model = family
    config = json.loads((ckpt / "config.json").read_text())
    save_file({k.replace("model.language_model.", "model."): v
               for k, v in load_file(str(ckpt / "model.safetensors")).items() if not k.startswith("model.visual.")},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config["text_config"], "model_type": name}))
    text = mlxmtp.load_model(tmp_path)
    tokens = tokens_for(320, 12, seed=7)
    assert text.load_report["skipped"] == {} and text.num_mtp_modules == 1
    assert mx.array_equal(text(tokens), model(tokens))
    h = model.trunk(tokens)[1]
    assert mx.array_equal(text.mtp_forward(0, h, tokens)[1], model.mtp_forward(0, h, tokens)[1])


def test_strict_loading(family, tmp_path):
    name, tiny, *_ = family
    drop = ("mtp.layers.0.mlp.experts.3.up_proj.weight", "mtp.0.block.mlp.experts.3.up_proj.weight") \
        if name == "qwen3_5_moe" else ("mtp.fc.weight", "mtp.0.eh_proj.weight")
    check_strict(tiny.make, tmp_path, drop=drop,
                 misshape=("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                           "model.layers.0.linear_attn.in_proj_qkv.weight"),
                 extra="mtp.layers.1.input_layernorm.weight")


def test_loads_without_mtp(family, tmp_path):
    _, tiny, *_ = family
    plain = mlxmtp.load_model(tiny.make(tmp_path / "plain", mtp=False))
    assert plain.num_mtp_modules == 0 and "no MTP weights" in plain.load_report["warning"]
