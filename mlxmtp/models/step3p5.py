"""Step-3.5-Flash (stepfun-ai/Step-3.5-Flash): sliding / full attention hybrid with a head-wise sigmoid gate
(``g_proj``), per-layer rope settings, zero-centred (1 + w) norms everywhere; MoE trunk with a shared expert.

Config keys and trunk math as mlx-lm's step3p5.py (checked against HF transformers' Step3p7TextModel too): the
per-layer lists (``layer_types``, ``rope_theta``, ``partial_rotary_factors``, ``swiglu_limits[_shared]``) run past
``num_hidden_layers`` over the MTP layers; ``attention_other_setting`` gives the sliding layers' head counts;
``moe_layers_enum`` lists the MoE layers. Tensor names are the checkpoint's: ``moe.{gate_proj,up_proj,down_proj}``
(experts stacked), ``moe.gate``, ``moe.router_bias``, ``share_expert.*``; norms are stored zero-centred.

MTP as vLLM's step3p5_mtp.py / SGLang's step3p5_mtp.py: ``num_nextn_predict_layers`` layers appended as
``model.layers.{num_hidden_layers + j}``: enorm, hnorm (both 1 + w), eh_proj ([embedding ; hidden]), the decoder
layer of that index (its own layer type, rope and MLP; block names may carry a ``.transformer.`` infix), and an own
head per module (``shared_head.norm``, ``shared_head.output``). Module 0 is fed the trunk's PRE-norm hidden state
and each module passes its pre-norm output on (SGLang's ``hidden_states_before_norm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwiGLU

from ..cache import KVCache, SlidingWindowCache
from .base import BaseArgs, MTPModel
from .layers import SwitchGLU, ZeroCentredRMSNorm, attend, make_rope, sigmoid_group_topk
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_attention_groups: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: Union[float, list] = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 262144
    sliding_window: int = 512
    layer_types: Optional[list] = None
    yarn_only_types: Optional[list] = None
    partial_rotary_factors: Optional[list] = None
    attention_other_setting: Optional[dict] = None
    use_head_wise_attn_gate: bool = True
    moe_num_experts: int = 288
    moe_top_k: int = 8
    moe_intermediate_size: int = 1280
    share_expert_dim: int = 1280
    moe_layers_enum: Union[str, list, None] = None
    moe_router_scaling_factor: float = 3.0
    norm_expert_weight: bool = True
    swiglu_limits: Optional[list] = None
    swiglu_limits_shared: Optional[list] = None
    num_nextn_predict_layers: int = 0

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers

    def at(self, key: str, i: int, default):
        """Layer i's entry of a per-layer setting (a list, or one value for every layer)."""
        value = getattr(self, key)
        if isinstance(value, list):
            return value[i] if i < len(value) and value[i] is not None else default
        return default if value is None else value

    def sliding(self, i: int) -> bool:
        if self.layer_types and i < len(self.layer_types):
            return self.layer_types[i] == "sliding_attention"
        return i >= self.num_hidden_layers or i % 2 == 0  # mlx-lm alternates; MTP layers slide

    def moe(self, i: int) -> bool:
        enum = self.moe_layers_enum
        if enum:
            return i in {int(x) for x in (enum.split(",") if isinstance(enum, str) else enum)}
        return 1 <= i < self.num_hidden_layers


def clamped_swiglu(up, gate, limit: float):
    return mx.minimum(nn.silu(gate), limit) * mx.clip(up, -limit, limit)


class ClampedSwiGLU(nn.Module):
    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        return clamped_swiglu(up, gate, self.limit)


class MLP(nn.Module):
    """SwiGLU; with a limit, silu(gate) is clipped from above and up to [-limit, limit]."""

    def __init__(self, hidden: int, intermediate: int, limit: float = 0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.limit = limit

    def __call__(self, x):
        up, gate = self.up_proj(x), self.gate_proj(x)
        return self.down_proj(clamped_swiglu(up, gate, self.limit) if self.limit else nn.silu(gate) * up)


class MoE(SwitchGLU):
    """``moe``: the experts stacked as stored, the router ``gate`` and its ``router_bias`` (sigmoid scores; the
    biased ones choose the top-k; weights renormalised and scaled by moe_router_scaling_factor)."""

    def __init__(self, a: ModelArgs, i: int):
        limit = a.at("swiglu_limits", i, 0)
        super().__init__(a.hidden_size, a.moe_intermediate_size, a.moe_num_experts,
                         activation=ClampedSwiGLU(limit) if limit else SwiGLU())
        self.gate = nn.Linear(a.hidden_size, a.moe_num_experts, bias=False)
        self.router_bias = mx.zeros((a.moe_num_experts,))
        self.route = dict(top_k=a.moe_top_k, n_group=1, topk_group=1, routed_scaling_factor=a.moe_router_scaling_factor,
                          norm_topk_prob=a.norm_expert_weight)

    def __call__(self, x):
        inds, scores = sigmoid_group_topk(self.gate(x), self.router_bias, **self.route)
        y = super().__call__(x, inds)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.sliding = a.sliding(i)
        other = (a.attention_other_setting or {}) if self.sliding else {}
        self.n_heads = other.get("num_attention_heads", a.num_attention_heads)
        self.n_kv = other.get("num_attention_groups", a.num_attention_groups)
        self.head_dim = hd = a.head_dim
        H = a.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        self.q_norm = ZeroCentredRMSNorm(hd, eps=a.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(hd, eps=a.rms_norm_eps)
        if a.use_head_wise_attn_gate:
            self.g_proj = nn.Linear(H, self.n_heads, bias=False)
        layer_type = "sliding_attention" if self.sliding else "full_attention"
        scaling = a.rope_scaling if not a.yarn_only_types or layer_type in a.yarn_only_types else None
        self.rope = make_rope(int(hd * a.at("partial_rotary_factors", i, 1.0)), a.at("rope_theta", i, 10000.0),
                              scaling, a.max_position_embeddings)
        self.window = a.sliding_window if self.sliding else None

    def __call__(self, x, cache=None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        out = attend(q, k, v, self.head_dim**-0.5, cache, self.window)
        if "g_proj" in self:  # one sigmoid gate per head
            out = (out.reshape(B, L, self.n_heads, -1) * mx.sigmoid(self.g_proj(x))[..., None]).reshape(B, L, -1)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.self_attn = Attention(a, i)
        limit = a.at("swiglu_limits_shared", i, 0)
        if a.moe(i):
            self.moe = MoE(a, i)
            self.share_expert = MLP(a.hidden_size, a.share_expert_dim, limit)
        else:
            self.mlp = MLP(a.hidden_size, a.intermediate_size, limit)
        self.input_layernorm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)

    def __call__(self, x, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cache)
        r = self.post_attention_layernorm(h)
        return h + (self.moe(r) + self.share_expert(r) if "moe" in self else self.mlp(r))


class Step3p5Model(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(a, i) for i in range(a.num_hidden_layers)]
        self.norm = ZeroCentredRMSNorm(a.hidden_size, eps=a.rms_norm_eps)


class Model(MTPModel):
    mtp_hidden = "pre"
    float32_params = ("router_bias",)

    def __init__(self, args: ModelArgs, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = Step3p5Model(args)
        self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method shadows it
        norm = partial(ZeroCentredRMSNorm, eps=args.rms_norm_eps)
        L = args.num_hidden_layers
        self.mtp = [MTPModule(args.hidden_size, DecoderLayer(args, L + j), norm, head_vocab=args.vocab_size)
                    for j in range(num_mtp)]

    def _cache(self, layer):
        return SlidingWindowCache(self.args.sliding_window) if layer.self_attn.sliding else KVCache()

    def make_cache(self):
        return [self._cache(layer) for layer in self.model.layers]

    def make_mtp_cache(self):
        return [self._cache(m.block) for m in self.mtp]

    def sanitize(self, weights: dict) -> dict:
        out, copies = {}, []
        for k, v in weights.items():
            parts = k.split(".")
            j = int(parts[2]) - self.args.num_hidden_layers if k.startswith("model.layers.") else -1
            if 0 <= j < len(self.mtp):  # layers past those the config declares stay as they are: strictness names them
                rest = ".".join(parts[4:] if parts[3] == "transformer" else parts[3:])
                if rest.startswith("embed_tokens."):  # a copy of the trunk's embedding (SGLang loads it onto that)
                    copies.append(k)
                    continue
                k = f"mtp.{j}." + next((new + rest[len(old):] for old, new in MTP_NAMES if rest.startswith(old)),
                                       "block." + rest)
            out[k] = v
        self.skip("MTP layers' copies of the embedding", copies)
        return out


# an MTP layer's own tensors -> MTPModule's names (everything else is its decoder block)
MTP_NAMES = [("enorm.", "enorm."), ("hnorm.", "hnorm."), ("eh_proj.", "eh_proj."), ("shared_head.norm.", "norm."),
             ("shared_head.output.", "head.")]
