"""DeepSeek-V3 against transformers' DeepseekV3ForCausalLM and mlx-lm's deepseek_v3 on a tiny checkpoint; the
MLA cache (absorbed verify path, rollback) and the MTP module against a reference built from the raw tensors.

The helpers here are shared with test_glm4_moe.py (same MoE and MTP layer)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlxmtp
from mlxmtp.cache import rollback
from mlxmtp.models import deepseek_v3
from tests.tiny import deepseek_v3 as tiny

TOL = 1e-4
# Ways of feeding a 24-token sequence: chunk sizes through the cache ([L] alone: one pass without a cache).
MODES = {
    "prompt": [12],
    "decode": [1] * 12,
    "verify": [8, 3, 4, 3, 4],  # prefill, then verify-sized chunks
    "long prefill": [24],
    "prefill+decode": [20, 1, 1, 1, 1],
}


# --- helpers shared with test_glm4_moe.py ----------------------------------------------------------------------
def hf_model(cls, path: Path):
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MTP layer is unexpected to transformers (it ignores model.layers.61 only)
    logging.disable_progress_bar()
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


def mlx_lm_model(path: Path):
    """mlx-lm's model of the checkpoint, loaded strictly through its own sanitize (without the MTP layer)."""
    from mlx_lm.utils import _get_classes

    config = json.loads((path / "config.json").read_text())
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = model.sanitize(mx.load(str(path / "model.safetensors")))
    mtp = f"model.layers.{config['num_hidden_layers']}."
    model.load_weights([(k, v) for k, v in weights.items() if not k.startswith(mtp)])
    return model


def run(step, tokens: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Logits of tokens[:, :sum(sizes)] fed in chunks of the given sizes through step(chunk)."""
    outs, s = [], 0
    for n in sizes:
        outs.append(np.array(step(mx.array(tokens[:, s : s + n]))))
        s += n
    return np.concatenate(outs, axis=1)


def ours_in_mode(model, tokens, sizes):
    if len(sizes) == 1:
        return run(model, tokens, sizes)
    cache = model.make_cache()
    return run(lambda x: model(x, cache), tokens, sizes)


def mlx_lm_in_mode(model, tokens, sizes):
    from mlx_lm.models.cache import make_prompt_cache

    if len(sizes) == 1:
        return run(model, tokens, sizes)
    cache = make_prompt_cache(model)
    return run(lambda x: model(x, cache=cache), tokens, sizes)


def check_parity(model, hf_ref: np.ndarray, mlx_lm, tokens, mode: str, family: str):
    sizes = MODES[mode]
    ours = ours_in_mode(model, tokens, sizes)
    d_hf = float(np.abs(ours - hf_ref[:, : ours.shape[1]]).max())
    d_lm = float(np.abs(ours - mlx_lm_in_mode(mlx_lm, tokens, sizes)).max())
    print(f"\n{family} {mode}: max |ours - HF| = {d_hf:.2e}, max |ours - mlx-lm| = {d_lm:.2e}")
    assert d_hf < TOL and d_lm < TOL


def check_rollback(model, tokens, rng):
    """After n extra positions and rollback(n), trunk and MTP caches compute what fresh caches compute."""
    t = mx.array(tokens)
    hidden = model.trunk(t)[1]
    for n in range(1, 5):
        junk = mx.array(rng.randint(0, 256, (1, n)))
        fed, fresh = model.make_cache(), model.make_cache()
        model(t[:, :8], fed), model(t[:, :8], fresh)
        model(junk, fed)
        rollback(fed, n)
        np.testing.assert_allclose(np.array(model(t[:, 8:11], fed)), np.array(model(t[:, 8:11], fresh)), atol=1e-6)

        fed, fresh = model.make_mtp_cache(), model.make_mtp_cache()
        model.mtp_forward(0, hidden[:, :7], t[:, 1:8], fed[0]), model.mtp_forward(0, hidden[:, :7], t[:, 1:8], fresh[0])
        model.mtp_forward(0, mx.random.normal((1, n, hidden.shape[-1])), junk, fed[0])
        rollback(fed, n)
        a = model.mtp_forward(0, hidden[:, 7:10], t[:, 8:11], fed[0])
        b = model.mtp_forward(0, hidden[:, 7:10], t[:, 8:11], fresh[0])
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-6)


def mtp_reference(model_cls, path: Path, tmp: Path, hidden: np.ndarray, tokens: np.ndarray):
    """The MTP module of a DeepSeek-style checkpoint computed from its raw tensors in torch:
    x = eh_proj([enorm(emb(t[i+1])) ; hnorm(h[i])]) with emb zeroed at position 0; y = block(x);
    post = shared_head.norm(y); logits = shared_head.head(post). The decoder block is transformers' own, run as
    a one-layer model whose final norm is shared_head.norm."""
    import torch
    from safetensors.torch import load_file

    from tests.hf_layout import write_checkpoint

    config = json.loads((path / "config.json").read_text())
    raw = load_file(str(path / "model.safetensors"))
    p = f"model.layers.{config['num_hidden_layers']}."

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])

    emb = raw[p + "embed_tokens.weight"][torch.tensor(tokens)]
    emb[:, 0] = 0
    h = torch.tensor(hidden)
    x = torch.cat([rms(emb, raw[p + "enorm.weight"]), rms(h, raw[p + "hnorm.weight"])], -1) @ raw[p + "eh_proj.weight"].T

    block = {"model.layers.0." + k[len(p):]: v for k, v in raw.items() if k.startswith(p)}
    block["model.norm.weight"] = block.pop("model.layers.0.shared_head.norm.weight")
    block["model.embed_tokens.weight"] = block.pop("model.layers.0.embed_tokens.weight")
    block["lm_head.weight"] = block.pop("model.layers.0.shared_head.head.weight")
    for k in ("enorm", "hnorm", "eh_proj"):
        del block[f"model.layers.0.{k}.weight"]
    one = {**config, "num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0}
    hf = hf_model(model_cls, write_checkpoint(tmp, one, block, tokenizer=False))
    with torch.no_grad():
        post = hf.model(inputs_embeds=x).last_hidden_state
        return post.numpy(), hf.lm_head(post).numpy()


def check_mtp(model, model_cls, path: Path, tmp: Path, tokens: np.ndarray):
    t = mx.array(tokens[:, :12])
    hidden = model.trunk(t)[1][:, :11]  # rows i = 0..10 combine h[i] with emb(t[i+1])
    ref_post, ref_logits = mtp_reference(model_cls, path, tmp, np.array(hidden), tokens[:, 1:12])

    out, logits = model.mtp_forward(0, hidden, t[:, 1:12])
    assert np.abs(np.array(logits) - ref_logits).max() < TOL
    assert np.abs(np.array(out) - ref_post).max() < TOL  # mtp_hidden "post": the module's normed output

    cache = model.make_mtp_cache()[0]  # the same rows in two calls through the module's cache
    parts = [model.mtp_forward(0, hidden[:, s:e], t[:, s + 1 : e + 1], cache) for s, e in ((0, 5), (5, 11))]
    d = np.abs(np.concatenate([np.array(lg) for _, lg in parts], axis=1) - ref_logits).max()
    print(f"\nMTP module: max |ours - reference| = {d:.2e}")
    assert d < TOL


def check_mtp_hidden_flag(model, tokens):
    """mtp_hidden = "pre" hands on the module's pre-norm output (whose norm is the "post" output)."""
    t = mx.array(tokens[:, :8])
    hidden = model.trunk(t)[1][:, :7]
    post, logits = model.mtp_forward(0, hidden, t[:, 1:8])
    model.mtp_hidden = "pre"
    try:
        pre, logits2 = model.mtp_forward(0, hidden, t[:, 1:8])
    finally:
        del model.mtp_hidden
    np.testing.assert_allclose(np.array(logits2), np.array(logits), atol=1e-6)
    assert np.abs(np.array(pre) - np.array(post)).max() > 1e-2
    np.testing.assert_allclose(np.array(model.mtp[0].norm(pre)), np.array(post), atol=1e-5)


# --- DeepSeek-V3 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("deepseek_v3"))


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(1).randint(0, 256, (1, 24))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


@pytest.fixture(scope="module")
def hf_ref(ckpt, tokens):
    from transformers import DeepseekV3ForCausalLM

    return hf_logits(hf_model(DeepseekV3ForCausalLM, ckpt), tokens)


@pytest.fixture(scope="module")
def mlx_lm(ckpt):
    return mlx_lm_model(ckpt)


def test_load_report(model):
    r = model.load_report
    assert (r["mtp_modules_declared"], r["mtp_modules_loaded"]) == (1, 1)
    assert sum(r["skipped"].values()) == 2  # the MTP layer's embed_tokens and shared_head.head
    assert model.mtp[0].block.mlp.gate.e_score_correction_bias.dtype == mx.float32


@pytest.mark.parametrize("mode", list(MODES))
def test_parity(model, hf_ref, mlx_lm, tokens, mode):
    check_parity(model, hf_ref, mlx_lm, tokens, mode, "deepseek_v3")


@pytest.mark.parametrize("absorb_max", [0, 64])
@pytest.mark.parametrize("mode", ["prompt", "verify", "long prefill"])
def test_absorbed_and_expanded_paths(model, hf_ref, tokens, monkeypatch, absorb_max, mode):
    monkeypatch.setattr(deepseek_v3.MLAttention, "absorb_max", absorb_max)
    ours = ours_in_mode(model, tokens, MODES[mode])
    assert np.abs(ours - hf_ref[:, : ours.shape[1]]).max() < TOL


def test_verify_attends_in_latent_space(model, tokens, monkeypatch):
    """Verify-sized passes never expand the cached latent into per-head keys/values (a long prefill may)."""
    from mlx_lm.models.mla import MultiLinear

    calls = []
    original = MultiLinear.__call__

    def spy(self, x, transpose=True):
        calls.append(transpose)
        return original(self, x, transpose)

    monkeypatch.setattr(MultiLinear, "__call__", spy)
    cache = model.make_cache()
    model(mx.array(tokens[:, :20]), cache)
    assert False in calls  # the long prefill expanded
    calls.clear()
    for s, e in ((20, 23), (23, 24)):
        model(mx.array(tokens[:, s:e]), cache)
    assert calls and False not in calls


def test_rollback(model, tokens):
    check_rollback(model, tokens, np.random.RandomState(2))


def test_mtp_module(model, ckpt, tokens, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    check_mtp(model, DeepseekV3ForCausalLM, ckpt, tmp_path, tokens)


def test_mtp_hidden_flag(model, tokens):
    check_mtp_hidden_flag(model, tokens)


def test_without_q_lora_and_rope_scaling(tmp_path, tokens):
    """q_lora_rank null (a plain q_proj, as Moonlight) and no YaRN."""
    from transformers import DeepseekV3ForCausalLM

    path = tiny.make(tmp_path / "ckpt", q_lora_rank=None, rope_scaling=None)
    model = mlxmtp.load_model(path)
    assert "q_proj" in model.model.layers[0].self_attn
    ref = hf_logits(hf_model(DeepseekV3ForCausalLM, path), tokens)
    for mode in ("prompt", "verify"):
        ours = ours_in_mode(model, tokens, MODES[mode])
        assert np.abs(ours - ref[:, : ours.shape[1]]).max() < TOL


def test_mtp_count_from_config():
    assert deepseek_v3.ModelArgs.from_dict({}).mtp_modules() == 0
    assert deepseek_v3.ModelArgs.from_dict({"num_nextn_predict_layers": None}).mtp_modules() == 0
    assert deepseek_v3.ModelArgs.from_dict({"num_nextn_predict_layers": 1}).mtp_modules() == 1
