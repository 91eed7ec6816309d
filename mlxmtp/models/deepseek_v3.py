"""DeepSeek-V3 / R1 (arXiv 2412.19437): multi-head latent attention, sigmoid group-limited MoE, one MTP module.

Conventions follow mlx-lm's deepseek_v3.py and HF transformers' DeepseekV3 (same checkpoint names). Differences:
- Attention is computed against the cached latent ("absorbed") whenever at most ``absorb_max`` tokens are new,
  so a multi-token verify pass costs about as much as a decode step; mlx-lm expands the whole cached latent into
  per-head keys and values whenever L > 1. Long prefill chunks use the expanded path.
- The MTP layer ``model.layers.{num_hidden_layers}`` is kept as ``mtp.0`` (mlx-lm drops it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.rope_utils import apply_yarn_mscale

from ..cache import KVCache
from ..errors import CheckpointError
from .base import BaseArgs, MTPModel, stack_experts
from .layers import MLP, RMSNorm, SwitchGLU, make_rope, sdpa, sigmoid_group_topk
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: Optional[int] = 1
    n_routed_experts: Optional[int] = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    norm_topk_prob: bool = True
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_interleave: bool = True  # HF: rope dims stored in interleaved pairs (mlx-lm: traditional=True)
    attention_bias: bool = False
    num_nextn_predict_layers: Optional[int] = 0

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers or 0


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434). The cache keeps the normed latent
    [B, 1, T, kv_lora_rank] and the shared rope key [B, 1, T, rope_dim]; kv_b_proj is split into ``embed_q``
    (the key half, absorbed into the query) and ``unembed_out`` (the value half, applied after attention)."""

    absorb_max = 16  # at most this many new tokens: attend in the latent space (decode, verify)

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, self.num_heads = args.num_attention_heads, args.num_attention_heads
        self.nope, self.rope_dim, self.rank = args.qk_nope_head_dim, args.qk_rope_head_dim, args.kv_lora_rank
        q_dim = H * (self.nope + self.rope_dim)
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(args.hidden_size, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, self.rank + self.rope_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=1e-6)
        self.embed_q = MultiLinear(self.nope, self.rank, H)
        self.unembed_out = MultiLinear(self.rank, args.v_head_dim, H)
        self.o_proj = nn.Linear(H * args.v_head_dim, args.hidden_size, bias=args.attention_bias)
        # YaRN: the rope carries mscale / mscale_all_dim, the softmax scale mscale_all_dim^2 (HF, mlx-lm)
        self.scale = apply_yarn_mscale((self.nope + self.rope_dim) ** -0.5, args.rope_scaling)
        self.rope = make_rope(self.rope_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings,
                              traditional=args.rope_interleave)

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x) if "q_proj" in self else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = mx.split(q.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3), [self.nope], axis=-1)
        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x)[:, None], [self.rank], axis=-1)
        latent = self.kv_a_layernorm(latent)
        offset = cache.offset if cache is not None else 0
        q_pe, k_pe = self.rope(q_pe, offset=offset), self.rope(k_pe, offset=offset)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)

        # The rope part of the scores enters SDPA as an additive mask that also carries the causal mask (mlx-lm).
        pe = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        if isinstance(mask, str):  # "causal", aligned bottom-right: query i sees keys up to T - L + i
            T = k_pe.shape[2]
            mask = mx.arange(T) <= mx.arange(T - L, T)[:, None]
        if mask is not None:
            pe = mx.where(mask, pe, mx.array(mx.finfo(pe.dtype).min, pe.dtype))
        if L <= self.absorb_max:
            out = self.unembed_out(sdpa(self.embed_q(q_nope), latent, latent, self.scale, pe))
        else:
            k, v = self.embed_q(latent, transpose=False), self.unembed_out(latent)
            out = sdpa(q_nope, k, v, self.scale, pe)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MoEGate(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self.route = partial(sigmoid_group_topk, top_k=args.num_experts_per_tok, n_group=args.n_group,
                             topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
                             norm_topk_prob=args.norm_topk_prob)

    def __call__(self, x):
        return self.route(x @ self.weight.T, self.e_score_correction_bias)


class MoE(nn.Module):
    """Routed experts (sigmoid "noaux_tc" routing) plus always-on shared experts (DeepSeek-V3, GLM-4.5)."""

    def __init__(self, args):
        super().__init__()
        self.gate = MoEGate(args)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x):
        inds, scores = self.gate(x)
        y = (self.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2).astype(x.dtype)
        return y + self.shared_experts(x) if "shared_experts" in self else y


class DecoderLayer(nn.Module):
    """Pre-norm block: attention, then a dense MLP or the MoE."""

    def __init__(self, args, self_attn: nn.Module, moe: bool):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = MoE(args) if moe else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, cache=None):
        L = x.shape[1]
        mask = cache.make_mask(L) if cache is not None else (None if L == 1 else "causal")
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args, make_layer):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [make_layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


# MTP layer checkpoint names (DeepSeek-V3 README_WEIGHTS.md) -> MTPModule names; the rest is the decoder block.
MTP_NAMES = {"enorm.": "enorm.", "hnorm.": "hnorm.", "eh_proj.": "eh_proj.", "shared_head.norm.": "norm."}


class Model(MTPModel):
    """Trunk and MTP modules of DeepSeek-V3; GLM-4.5 (glm4_moe.py) reuses it with GQA layers."""

    mtp_hidden = "post"  # vLLM / SGLang feed the post-final-norm hidden (see mtp-families.md)
    float32_params = ("e_score_correction_bias",)

    def __init__(self, args, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = Backbone(args, self.make_layer)
        self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method lm_head() calls it
        norm = partial(RMSNorm, eps=args.rms_norm_eps)
        self.mtp = [MTPModule(args.hidden_size, self.make_layer(args, args.num_hidden_layers + j), norm)
                    for j in range(num_mtp)]

    @staticmethod
    def make_layer(args, i: int) -> DecoderLayer:
        moe = args.n_routed_experts is not None and i >= args.first_k_dense_replace and i % args.moe_layer_freq == 0
        return DecoderLayer(args, MLAttention(args), moe)

    def make_cache(self):
        return [KVCache() for _ in self.model.layers]

    def make_mtp_cache(self):
        return [KVCache() for _ in self.mtp]

    def sanitize(self, weights):
        weights = dict(weights)
        blocks = [f"model.layers.{i}" for i in range(self.args.num_hidden_layers)]
        for j in range(len(self.mtp)):
            p = f"model.layers.{self.args.num_hidden_layers + j}."
            # The MTP layer stores copies of the trunk's embedding and lm_head; the module uses the trunk's.
            dups = [p + "embed_tokens.weight", p + "shared_head.head.weight"]
            self.skip("MTP copies of the trunk's embed_tokens / lm_head (shared, DeepSeek-V3 sec. 2.2)",
                      [k for k in dups if weights.pop(k, None) is not None])
            for k in [k for k in weights if k.startswith(p)]:
                rest = k[len(p):]
                own = next((s for s in MTP_NAMES if rest.startswith(s)), None)
                rest = MTP_NAMES[own] + rest[len(own):] if own else "block." + rest
                weights[f"mtp.{j}.{rest}"] = weights.pop(k)
            blocks.append(f"mtp.{j}.block")
        for b in blocks:
            if self.args.n_routed_experts:
                stack_experts(weights, f"{b}.mlp", self.args.n_routed_experts)
            self._split_kv_b(weights, f"{b}.self_attn")
        return weights

    def _split_kv_b(self, weights, prefix):
        """kv_b_proj [H * (nope + v), rank] -> embed_q [H, rank, nope] and unembed_out [H, v, rank] (mlx-lm)."""
        w = weights.pop(f"{prefix}.kv_b_proj.weight", None)
        if w is None:
            return
        a = self.args
        H, nope = a.num_attention_heads, a.qk_nope_head_dim
        if w.shape != (H * (nope + a.v_head_dim), a.kv_lora_rank):
            raise CheckpointError(f"tensor '{prefix}.kv_b_proj.weight' has shape {tuple(w.shape)}, expected "
                                  f"{(H * (nope + a.v_head_dim), a.kv_lora_rank)}")
        w = w.reshape(H, nope + a.v_head_dim, a.kv_lora_rank)
        weights[f"{prefix}.embed_q.weight"] = mx.contiguous(w[:, :nope].swapaxes(1, 2))
        weights[f"{prefix}.unembed_out.weight"] = mx.contiguous(w[:, nope:])
