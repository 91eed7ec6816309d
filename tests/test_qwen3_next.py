"""Qwen3-Next: trunk parity with HF transformers (Qwen3NextForCausalLM loading the tiny checkpoint itself) and with
mlx-lm through every cache path, rollback of the Gated DeltaNet and attention caches, the MTP layer against a
reference written here from the raw tensors, strict loading.

The reference_* helpers are shared with test_qwen3_5.py."""

from __future__ import annotations

import importlib
import json
import logging

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxmtp
from tests.test_mimo import (check_mtp_against, check_mtp_rollback, check_strict, check_trunk_rollback,
                             mtp_combine, raw_tensors, rms_norm, through_cache, tokens_for, trunk_diffs)
from tests.tiny import qwen3_next as tiny

TOL = 1e-4
log = logging.getLogger(__name__)


# --- shared with test_qwen3_5 ----------------------------------------------------------------------------------

def hf_logits(cls_name: str, ckpt, tokens) -> np.ndarray:
    """Logits of transformers' own class loading the tiny checkpoint (which proves its layout is the real one)."""
    import torch
    import transformers

    hf, info = getattr(transformers, cls_name).from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or misshaped (mtp.* is ignored by design)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(np.array(tokens))).logits.numpy()


def mlx_lm_logits(module: str, ckpt, tokens) -> mx.array:
    ref = importlib.import_module(f"mlx_lm.models.{module}")
    m = ref.Model(ref.ModelArgs.from_dict(json.loads((ckpt / "config.json").read_text())))
    m.load_weights(list(m.sanitize(raw_tensors(ckpt)).items()), strict=True)
    return m(tokens)


def all_trunk_diffs(model, tokens, reference) -> dict:
    """trunk_diffs plus a long prefill (past MAX_ROLLBACK: mlx-lm's gated_delta_update path) then short chunks."""
    ref = mx.array(np.asarray(reference, dtype=np.float32))
    diffs = trunk_diffs(model, tokens, ref)
    step = lambda i, j, c: model(tokens[:, i:j], c)  # noqa: E731
    long = through_cache(step, model.make_cache(), tokens.shape[1], [20, 1, 3])
    return {**diffs, "prefill_20_then_1_3": mx.abs(long - ref).max().item()}


def check_trunk_parity(name: str, model, tokens, references: dict) -> None:
    """Every path within TOL of each reference, relative to the logits' scale (the l2-normalised q / k and the
    GDN output norm amplify float32 rounding differently in different random models)."""
    for ref_name, ref in references.items():
        diffs = all_trunk_diffs(model, tokens, ref)
        log.info("%s vs %s max abs diff: %s (max |logit| %.2f)", name, ref_name, diffs, np.abs(ref).max())
        assert max(diffs.values()) < TOL * max(1.0, float(np.abs(ref).max())), (name, ref_name, diffs)


def zc_norm(x, w, eps):
    return rms_norm(x, w, eps, zero_centred=True)


def rope(x, dims: int, theta: float):
    """Rotate-half rope on the first dims of each head of x [L, heads, D], positions 0..L-1 (HF)."""
    inv = 1.0 / theta ** (mx.arange(0, dims, 2) / dims)
    ang = mx.arange(x.shape[0])[:, None] * inv[None]
    cos, sin = (mx.concatenate([f(ang)] * 2, -1)[:, None] for f in (mx.cos, mx.sin))
    r, half = x[..., :dims], dims // 2
    rotated = mx.concatenate([-r[..., half:], r[..., :half]], -1)
    return mx.concatenate([r * cos + rotated * sin, x[..., dims:]], -1)


def reference_attention(raw, p, a, x):
    """Gated full attention of x [1, L, H]: q_proj gives [query ; gate] per head, zero-centred QK-norm, partial
    rope, causal softmax attention, output * sigmoid(gate)."""
    L, n, kv, d = x.shape[1], a.num_attention_heads, a.num_key_value_heads, a.head_dim
    qg = (x[0] @ raw[p + "q_proj.weight"].T).reshape(L, n, 2 * d)
    q, gate = qg[..., :d], qg[..., d:]
    k = (x[0] @ raw[p + "k_proj.weight"].T).reshape(L, kv, d)
    v = (x[0] @ raw[p + "v_proj.weight"].T).reshape(L, kv, d)
    q, k = zc_norm(q, raw[p + "q_norm.weight"], a.rms_norm_eps), zc_norm(k, raw[p + "k_norm.weight"], a.rms_norm_eps)
    rd = int(d * a.partial_rotary_factor)
    q, k = rope(q, rd, a.rope_theta), rope(k, rd, a.rope_theta)
    k, v = mx.repeat(k, n // kv, 1), mx.repeat(v, n // kv, 1)
    s = mx.einsum("qhd,khd->hqk", q, k) * d**-0.5
    s = mx.where(mx.tril(mx.ones((L, L))) > 0, s, -mx.inf)
    o = mx.einsum("hqk,khd->qhd", mx.softmax(s, -1), v).reshape(L, -1) * mx.sigmoid(gate.reshape(L, -1))
    return (o @ raw[p + "o_proj.weight"].T)[None]


def expert_weights(raw, p, n_experts):
    """(gate, up, down) [E, ...] from experts stored fused or one by one."""
    if p + "experts.gate_up_proj" in raw:
        gate, up = mx.split(raw[p + "experts.gate_up_proj"], 2, axis=1)
        return gate, up, raw[p + "experts.down_proj"]
    return tuple(mx.stack([raw[f"{p}experts.{e}.{w}.weight"] for e in range(n_experts)])
                 for w in ("gate_proj", "up_proj", "down_proj"))


def swiglu(x, gate, up, down):
    return (nn.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_mlp(raw, p, a, x):
    """Dense SwiGLU, or softmax top-k routing over every expert computed densely plus the gated shared expert."""
    if p + "gate.weight" not in raw:
        return swiglu(x, *(raw[f"{p}{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj")))
    probs = mx.softmax(x @ raw[p + "gate.weight"].T, -1)
    kth = mx.sort(probs, -1)[..., -a.num_experts_per_tok, None]
    w = mx.where(probs >= kth, probs, 0.0)
    w = w / w.sum(-1, keepdims=True) if a.norm_topk_prob else w
    gate, up, down = expert_weights(raw, p, a.num_experts)
    y = sum(w[..., e, None] * swiglu(x, gate[e], up[e], down[e]) for e in range(a.num_experts))
    shared = swiglu(x, *(raw[f"{p}shared_expert.{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj")))
    return y + mx.sigmoid(x @ raw[p + "shared_expert_gate.weight"].T) * shared


def reference_block(raw, p, a, x):
    h = x + reference_attention(raw, p + "self_attn.", a, zc_norm(x, raw[p + "input_layernorm.weight"], a.rms_norm_eps))
    return h + reference_mlp(raw, p + "mlp.", a, zc_norm(h, raw[p + "post_attention_layernorm.weight"], a.rms_norm_eps))


def mtp_reference(raw, a, embed: str, head: str):
    """The Qwen MTP layer from the raw tensors: fc(concat(pre_fc_norm_embedding(e), pre_fc_norm_hidden(h))) with e
    zeroed at position 0, the decoder layer mtp.layers.0, mtp.norm, the shared head; zero-centred norms."""
    def reference(j, hidden, tokens):
        x = mtp_combine(raw, "mtp.", raw[embed][tokens], hidden, a.rms_norm_eps, zero_centred=True,
                        names=("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc"))
        y = zc_norm(reference_block(raw, "mtp.layers.0.", a, x), raw["mtp.norm.weight"], a.rms_norm_eps)
        return y, y @ raw[head].T
    return reference


# --- Qwen3-Next --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("qwen3_next"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


def test_trunk_parity(model, ckpt):
    tokens = tokens_for(320, 24)
    check_trunk_parity("qwen3_next", model, tokens, {"HF": hf_logits("Qwen3NextForCausalLM", ckpt, tokens),
                                                     "mlx-lm": np.array(mlx_lm_logits("qwen3_next", ckpt, tokens))})


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback(model, n):
    tokens = tokens_for(320, 24, seed=n)
    check_trunk_rollback(model, tokens, n, prompt_len=12)
    check_mtp_rollback(model, tokens, n, prompt_len=12)


def test_mtp_module_matches_reference(model, ckpt):
    reference = mtp_reference(raw_tensors(ckpt), model.args, "model.embed_tokens.weight", "lm_head.weight")
    assert model.num_mtp_modules == 1 and model.mtp_hidden == "post"
    diff = check_mtp_against(model, tokens_for(320, 20, seed=5), reference)
    log.info("qwen3_next MTP vs reference max abs diff: %s", diff)
    assert diff < TOL


def test_strict_loading(tmp_path):
    check_strict(tiny.make, tmp_path, drop=("mtp.pre_fc_norm_hidden.weight", "mtp.0.hnorm.weight"),
                 misshape="model.layers.0.linear_attn.in_proj_ba.weight",
                 extra="mtp.layers.1.input_layernorm.weight")


def test_loads_without_mtp(tmp_path):
    plain = mlxmtp.load_model(tiny.make(tmp_path / "plain", mtp=False))
    assert plain.num_mtp_modules == 0 and "no MTP weights" in plain.load_report["warning"]
    assert mlxmtp.load_model(tiny.make(tmp_path / "full"), mtp=False).num_mtp_modules == 0
