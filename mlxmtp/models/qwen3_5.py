"""Qwen3.5 / Qwen3.6, dense (``qwen3_5``) and MoE (``qwen3_5_moe``): the Qwen3-Next architecture (qwen3_next.py)
with the Gated DeltaNet projections stored separately, released as vision-language checkpoints.

HF transformers' modeling_qwen3_5(_moe).py, mlx-lm's qwen3_5(_moe).py, vLLM's qwen3_5_mtp.py. config.json holds the
language model's settings in ``text_config`` (the loader merges it); tensors are ``model.language_model.*``, the
vision tower ``model.visual.*`` (skipped: text only for now), ``lm_head.weight`` (absent or unused when
``tie_word_embeddings``) and the MTP layer ``mtp.*`` named as Qwen3-Next's. Text-only checkpoints (``model.*``) load
too. MoE experts are fused in the trunk (``mlp.experts.gate_up_proj``) and, in the MTP layer, stored one by one
(Qwen3.5) or fused (Qwen3.6); qwen3_next.sanitize_experts takes both. MoE layers always renormalise the top-k
weights (HF Qwen3_5MoeTopKRouter), the default of ``norm_topk_prob``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn

from . import gated_deltanet, qwen3_next
from .base import pop_prefix, rename_prefix


@dataclass
class ModelArgs(qwen3_next.ModelArgs):
    mtp_num_hidden_layers: int = 1

    def mtp_modules(self) -> int:
        # Released checkpoints have one MTP layer; more (vLLM cycles them under one fc and set of norms) would not
        # map onto MTP modules, and strict loading names their tensors.
        return min(self.mtp_num_hidden_layers, 1)


class GatedDeltaNet(gated_deltanet.GatedDeltaNet):
    """in_proj_qkv already in conv order (all q heads, all k heads, all v heads), then z, b and a."""

    def __init__(self, a: ModelArgs):
        super().__init__(a.hidden_size, a.linear_num_key_heads, a.linear_num_value_heads, a.linear_key_head_dim,
                         a.linear_value_head_dim, a.linear_conv_kernel_dim, a.rms_norm_eps)
        self.in_proj_qkv = nn.Linear(a.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(a.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(a.hidden_size, self.n_v_heads, bias=False)
        self.in_proj_a = nn.Linear(a.hidden_size, self.n_v_heads, bias=False)

    def project(self, x):
        B, L, _ = x.shape
        z = self.in_proj_z(x).reshape(B, L, self.n_v_heads, self.v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)


class Model(qwen3_next.Model):
    gdn = GatedDeltaNet

    def sanitize(self, weights: dict) -> dict:
        self.skip("vision tower (text-only for now)", pop_prefix(weights, "model.visual."))
        return super().sanitize(rename_prefix(weights, "model.language_model.", "model."))
