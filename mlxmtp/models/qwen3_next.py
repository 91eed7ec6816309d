"""Qwen3-Next (Qwen/Qwen3-Next-80B-A3B-*): Gated DeltaNet and gated full attention in a 3:1 pattern, MoE with a
gated shared expert, zero-centred ("1 + w") RMSNorms, and one MTP layer.

Trunk as HF transformers' modeling_qwen3_next.py and mlx-lm's qwen3_next.py (whose sanitize turns the norms into
plain RMSNorms by adding 1; here they stay as stored). The full-attention layers' q_proj emits a query and a
sigmoid output gate per head, with zero-centred QK-norm and partial rotary. MTP as vLLM's qwen3_next_mtp.py:
``mtp.pre_fc_norm_embedding`` (enorm), ``mtp.pre_fc_norm_hidden`` (hnorm), ``mtp.fc`` (eh_proj, [embedding ;
hidden]), one full-attention decoder layer ``mtp.layers.0`` and ``mtp.norm``; embedding and head are the trunk's.
The config declares no MTP count (vLLM assumes 1). qwen3_5.py reuses this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, RecurrentCache
from . import gated_deltanet
from .base import BaseArgs, MTPModel, pop_prefix, rename_prefix, stack_experts
from .layers import MLP, Attention, SwitchGLU, ZeroCentredRMSNorm, causal_mask, softmax_topk
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    layer_types: Optional[list] = None
    full_attention_interval: int = 4
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    attention_bias: bool = False
    # Rope: Qwen3-Next configs give rope_theta / partial_rotary_factor at the top level, Qwen3.5 in rope_parameters.
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.layer_types is None:  # HF's default pattern: every full_attention_interval-th layer is full attention
            self.layer_types = ["full_attention" if (i + 1) % self.full_attention_interval == 0 else
                                "linear_attention" for i in range(self.num_hidden_layers)]
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            self.partial_rotary_factor = self.rope_parameters.get("partial_rotary_factor",
                                                                  self.partial_rotary_factor)
            self.rope_scaling = self.rope_scaling or self.rope_parameters

    def mtp_modules(self) -> int:
        return 1  # the config declares none; vLLM reads num_nextn_predict_layers, absent, as 1

    def is_moe(self, i: int) -> bool:
        """Whether decoder layer i has the sparse MLP (HF's rule; vLLM applies it to MTP layer j as layer j)."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


class GatedDeltaNet(gated_deltanet.GatedDeltaNet):
    """Qwen3-Next stores the projections grouped by key head: in_proj_qkvz rows are, per key head, its q, k and
    the v and z of the value heads it serves; in_proj_ba likewise b then a (HF fix_query_key_value_ordering)."""

    def __init__(self, a: ModelArgs):
        super().__init__(a.hidden_size, a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim,
                         a.linear_value_head_dim, a.linear_conv_kernel_dim, a.rms_norm_eps)
        self.in_proj_qkvz = nn.Linear(a.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(a.hidden_size, 2 * self.n_v_heads, bias=False)

    def project(self, x):
        B, L, _ = x.shape
        dk, r = self.k_dim, self.n_v_heads // self.n_k_heads
        q, k, v, z = mx.split(self.in_proj_qkvz(x).reshape(B, L, self.n_k_heads, -1),
                              [dk, 2 * dk, 2 * dk + r * self.v_dim], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.n_k_heads, 2 * r), 2, axis=-1)
        qkv = mx.concatenate([q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)], axis=-1)
        return qkv, z.reshape(B, L, self.n_v_heads, self.v_dim), b.reshape(B, L, -1), a.reshape(B, L, -1)


class SparseMoeBlock(nn.Module):
    """Softmax top-k routed experts plus a shared expert scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = a.num_experts_per_tok, a.norm_topk_prob
        self.gate = nn.Linear(a.hidden_size, a.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(a.hidden_size, a.moe_intermediate_size, a.num_experts)
        self.shared_expert = MLP(a.hidden_size, a.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(a.hidden_size, 1, bias=False)

    def __call__(self, x):
        inds, scores = softmax_topk(self.gate(x), self.top_k, self.norm_topk_prob)
        y = (self.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2).astype(x.dtype)
        return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, linear: bool, moe: bool, gdn=GatedDeltaNet):
        super().__init__()
        self.is_linear = linear
        if linear:
            self.linear_attn = gdn(a)
        else:
            self.self_attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                                       bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="zero_centred_head",
                                       norm_eps=a.rms_norm_eps, rope_dims=int(a.head_dim * a.partial_rotary_factor),
                                       rope_base=a.rope_theta, rope_scaling=a.rope_scaling,
                                       max_pos=a.max_position_embeddings, output_gate="elementwise")
        self.mlp = SparseMoeBlock(a) if moe else MLP(a.hidden_size, a.intermediate_size)
        self.input_layernorm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x, cache=None):
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, cache)
        else:
            h = self.self_attn(h, causal_mask(x.shape[1]) if cache is None else None, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, a: ModelArgs, gdn):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(a, t == "linear_attention", a.is_moe(i), gdn) for i, t in enumerate(a.layer_types)]
        self.norm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(MTPModel):
    float32_params = ("A_log", "dt_bias")  # the decay rate is computed in float32 (HF, mlx-lm)
    gdn = GatedDeltaNet

    def __init__(self, args: ModelArgs, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = LanguageModel(args, self.gdn)
        if not args.tie_word_embeddings:
            self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method shadows it
        norm = lambda d: ZeroCentredRMSNorm(d, eps=args.rms_norm_eps)  # noqa: E731
        self.mtp = [MTPModule(args.hidden_size, DecoderLayer(args, False, args.is_moe(j)), norm)
                    for j in range(num_mtp)]

    def make_cache(self):
        return [RecurrentCache() if layer.is_linear else KVCache() for layer in self.model.layers]

    def make_mtp_cache(self):
        return [KVCache() for _ in self.mtp]

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            self.skip("lm_head tied to the embedding", pop_prefix(weights, "lm_head."))
        for old, new in (("mtp.fc.", "eh_proj."), ("mtp.pre_fc_norm_embedding.", "enorm."),
                         ("mtp.pre_fc_norm_hidden.", "hnorm."), ("mtp.norm.", "norm."), ("mtp.layers.0.", "block.")):
            weights = rename_prefix(weights, old, "mtp.0." + new)
        for prefix in {k.split(".experts.")[0] for k in weights if ".mlp.experts." in k}:
            sanitize_experts(weights, prefix, self.args.num_experts)
        for k, v in weights.items():
            if k.endswith(".conv1d.weight") and v.shape[-1] != 1:  # HF Conv1d [C, 1, K] -> MLX [C, K, 1]
                weights[k] = v.moveaxis(2, 1)
        return weights


def sanitize_experts(weights: dict, prefix: str, n_experts: int) -> None:
    """Experts stored one by one (``experts.{e}.gate_proj.weight``, original Qwen3-Next / Qwen3.5 MTP layers) or
    fused (``experts.gate_up_proj`` [E, 2I, H] with gate rows first, and ``experts.down_proj`` [E, H, I]: Qwen3.5-MoE
    trunks, Qwen3.6 MTP layers, transformers 5) -> ``switch_mlp.{gate,up,down}_proj.weight``."""
    gate_up = weights.pop(f"{prefix}.experts.gate_up_proj", None)
    if gate_up is not None:
        gate, up = mx.split(gate_up, 2, axis=1)
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
    if f"{prefix}.experts.down_proj" in weights:
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
    stack_experts(weights, prefix, n_experts)
