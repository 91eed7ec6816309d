"""MiniMax-M2 / M2.5 (MiniMaxAI/MiniMax-M2*): full GQA attention with RMS QK-norm over all heads at once and partial
rope (``rotary_dim``); every layer MoE with sigmoid routing and ``e_score_correction_bias`` (renormalised top-k, no
shared expert). Trunk as HF transformers' minimax_m2 and mlx-lm's minimax.py; checkpoint names
``block_sparse_moe.{gate, e_score_correction_bias, experts.{e}.w1|w2|w3}``.

No MTP weights were ever published (MiniMax-M2 issue 47, M2.5 issue 8), although the configs say ``use_mtp`` and
``num_mtp_modules: 3``: those keys are ignored and the model runs without MTP. Heads trained later attach the
DeepSeek-V3 way: declared with ``num_nextn_predict_layers: n`` and stored as ``model.layers.{num_hidden_layers + j}.``
``enorm``, ``hnorm``, ``eh_proj`` ([embedding ; hidden] -> hidden), ``shared_head.norm`` and one MiniMax-M2 decoder
layer (``self_attn.*``, ``block_sparse_moe.*``, ``input_layernorm``, ``post_attention_layernorm``); copies of the
trunk's ``embed_tokens`` / ``shared_head.head`` there are skipped (embedding and head are the trunk's). Module 0 is fed
the post-norm hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from .base import BaseArgs, MTPModel, stack_experts
from .layers import RMSNorm, SwitchGLU, attend, make_rope, sigmoid_group_topk
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    head_dim: Optional[int] = None
    rotary_dim: Optional[int] = None
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 196608
    use_qk_norm: bool = True
    num_nextn_predict_layers: int = 0

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv = a.num_attention_heads, a.num_key_value_heads
        self.head_dim = hd = a.head_dim or a.hidden_size // a.num_attention_heads
        H = a.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        if a.use_qk_norm:  # one norm over all heads of q, one over all of k
            self.q_norm = RMSNorm(self.n_heads * hd, eps=a.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * hd, eps=a.rms_norm_eps)
        self.rope = make_rope(a.rotary_dim or hd, a.rope_theta, max_pos=a.max_position_embeddings)

    def __call__(self, x, cache=None):
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        return self.o_proj(attend(q, k, v, self.head_dim**-0.5, cache))


class SparseMoeBlock(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate = nn.Linear(a.hidden_size, a.num_local_experts, bias=False)
        self.e_score_correction_bias = mx.zeros((a.num_local_experts,))
        self.switch_mlp = SwitchGLU(a.hidden_size, a.intermediate_size, a.num_local_experts)
        self.top_k = a.num_experts_per_tok

    def __call__(self, x):
        inds, scores = sigmoid_group_topk(self.gate(x), self.e_score_correction_bias, self.top_k, 1, 1, 1.0, True)
        y = self.switch_mlp(x, inds)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.block_sparse_moe = SparseMoeBlock(a)
        self.input_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MiniMaxModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(a) for _ in range(a.num_hidden_layers)]
        self.norm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


# attachable MTP heads: a layer's own tensors -> MTPModule's names (everything else is its decoder block)
MTP_NAMES = [("enorm.", "enorm."), ("hnorm.", "hnorm."), ("eh_proj.", "eh_proj."), ("shared_head.norm.", "norm.")]
EXPERT_PROJS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


class Model(MTPModel):
    no_mtp_reason = "MiniMax published no MTP weights for MiniMax-M2 / M2.5; running without MTP (plain decoding)"
    float32_params = ("e_score_correction_bias",)

    def __init__(self, args: ModelArgs, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = MiniMaxModel(args)
        self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method shadows it
        norm = partial(RMSNorm, eps=args.rms_norm_eps)
        self.mtp = [MTPModule(args.hidden_size, DecoderLayer(args), norm) for _ in range(num_mtp)]

    def make_cache(self):
        return [KVCache() for _ in self.model.layers]

    def make_mtp_cache(self):
        return [KVCache() for _ in self.mtp]

    def sanitize(self, weights: dict) -> dict:
        L, out, copies = self.args.num_hidden_layers, {}, []
        for k, v in weights.items():
            parts = k.split(".")
            j = int(parts[2]) - L if k.startswith("model.layers.") else -1
            if 0 <= j < len(self.mtp):
                rest = ".".join(parts[3:])
                if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                    copies.append(k)
                    continue
                k = f"mtp.{j}." + next((new + rest[len(old):] for old, new in MTP_NAMES if rest.startswith(old)),
                                       "block." + rest)
            out[k] = v
        self.skip("MTP layers' copies of the trunk's embedding / head", copies)
        blocks = [f"model.layers.{i}" for i in range(L)] + [f"mtp.{j}.block" for j in range(len(self.mtp))]
        for b in blocks:
            p = f"{b}.block_sparse_moe"
            stack_experts(out, p, self.args.num_local_experts, projs=tuple(EXPERT_PROJS))
            for old, new in EXPERT_PROJS.items():
                if f"{p}.switch_mlp.{old}.weight" in out:
                    out[f"{p}.switch_mlp.{new}.weight"] = out.pop(f"{p}.switch_mlp.{old}.weight")
        return out
