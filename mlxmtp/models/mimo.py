"""MiMo-7B (XiaomiMiMo/MiMo-7B-Base, -RL, ...): a Qwen2 trunk (bias on q/k/v) and one MTP layer.

Trunk as mlx-lm's mimo.py. MTP as vLLM's mimo_mtp.py: ``model.mtp_layers.{j}.`` holds token_layernorm (enorm),
hidden_layernorm (hnorm), input_proj (eh_proj), a Qwen2 decoder layer stored without a prefix (input_layernorm,
self_attn.*, post_attention_layernorm, mlp.*) and final_layernorm. MiMo is the one family whose projection takes
[hidden ; embedding]. Embedding and head are the trunk's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.nn as nn

from ..cache import KVCache
from .base import BaseArgs, MTPModel, pop_prefix
from .layers import MLP, Attention, RMSNorm, causal_mask
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers


class DecoderLayer(nn.Module):
    """Qwen2 decoder layer."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads,
                                   a.hidden_size // a.num_attention_heads, bias=True, rope_base=a.rope_theta,
                                   rope_scaling=a.rope_scaling, max_pos=a.max_position_embeddings)
        self.mlp = MLP(a.hidden_size, a.intermediate_size)
        self.input_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x, cache=None):
        mask = causal_mask(x.shape[1]) if cache is None else None
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiMoModel(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(a) for _ in range(a.num_hidden_layers)]
        self.norm = RMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(MTPModel):
    def __init__(self, args: ModelArgs, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = MiMoModel(args)
        if not args.tie_word_embeddings:
            self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method shadows it
        norm = partial(RMSNorm, eps=args.rms_norm_eps)
        self.mtp = [MTPModule(args.hidden_size, DecoderLayer(args), norm, hidden_first=True) for _ in range(num_mtp)]

    def make_cache(self):
        return [KVCache() for _ in self.model.layers]

    def make_mtp_cache(self):
        return [KVCache() for _ in self.mtp]

    def sanitize(self, weights: dict) -> dict:
        inv_freq = [k for k in weights if k.endswith(".rotary_emb.inv_freq")]
        self.skip("rotary inverse frequencies (recomputed)", inv_freq)
        weights = {k: v for k, v in weights.items() if k not in inv_freq}
        if self.args.tie_word_embeddings:
            self.skip("lm_head tied to the embedding", pop_prefix(weights, "lm_head."))
        out = {}
        for k, v in weights.items():
            parts = k.split(".")
            if k.startswith("model.mtp_layers.") and int(parts[2]) < len(self.mtp):
                rest = ".".join(parts[3:])
                k = f"mtp.{parts[2]}." + next((new + rest[len(old):] for old, new in MTP_NAMES if rest.startswith(old)),
                                              "block." + rest)
            out[k] = v
        return out


# an MTP layer's own tensors -> MTPModule's names (everything else is its Qwen2 block)
MTP_NAMES = [("token_layernorm.", "enorm."), ("hidden_layernorm.", "hnorm."), ("input_proj.", "eh_proj."),
             ("final_layernorm.", "norm.")]
