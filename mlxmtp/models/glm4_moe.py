"""GLM-4.5 / 4.6 / 4.7 / 4.5-Air (glm4_moe): GQA with q/k/v bias, optional QK-norm and partial rotary (0.5), the
DeepSeek-V3 MoE (sigmoid noaux_tc routing, shared experts, first_k_dense_replace dense layers) and a DeepSeek-style
MTP layer at model.layers.{num_hidden_layers} (mlx-lm's glm4_moe.py, HF Glm4Moe). Everything but the attention
is deepseek_v3.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import deepseek_v3
from .base import BaseArgs
from .layers import Attention


@dataclass
class ModelArgs(BaseArgs):
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    use_qk_norm: bool = False
    n_shared_experts: Optional[int] = 1
    n_routed_experts: Optional[int] = 128
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    num_nextn_predict_layers: Optional[int] = 0

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers or 0


class Model(deepseek_v3.Model):
    @staticmethod
    def make_layer(args: ModelArgs, i: int) -> deepseek_v3.DecoderLayer:
        attn = Attention(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         bias=args.attention_bias, qk_norm="head" if args.use_qk_norm else None,
                         norm_eps=args.rms_norm_eps, rope_dims=int(args.head_dim * args.partial_rotary_factor),
                         rope_base=args.rope_theta, rope_scaling=args.rope_scaling,
                         max_pos=args.max_position_embeddings)
        return deepseek_v3.DecoderLayer(args, attn, args.n_routed_experts is not None
                                        and i >= args.first_k_dense_replace)
