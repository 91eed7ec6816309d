"""MiMo-V2-Flash (XiaomiMiMo/MiMo-V2-Flash): sliding-window / global attention hybrid with attention-sink logits,
q/k heads wider than v heads, partial rope, scaled values; MoE trunk (sigmoid, noaux_tc); three MTP modules.

Config keys and trunk math as mlx-lm's mimo_v2_flash.py and vLLM / SGLang: ``hybrid_layer_pattern`` (1 = sliding),
``moe_layer_freq`` (1 = MoE), ``swa_*`` head counts / dims / rope theta for the sliding layers, sink logits where
``add_{swa,full}_attention_sink_bias``. The window follows HF transformers (after SGLang, the reference Xiaomi
co-wrote): a query sees its ``sliding_window_size`` predecessors and itself (HF ``sliding_window`` =
``sliding_window_size + 1``; mlx-lm's and vLLM's mask is one key shorter).

MTP as vLLM's mimo_v2_mtp.py / SGLang's mimo_v2_nextn.py: ``model.mtp.layers.{j}.`` holds enorm, hnorm, eh_proj
([embedding ; hidden]), a sliding-window decoder layer with a dense MLP stored without a prefix, final_layernorm;
module j drafts depth j; embedding and head are the trunk's. ``num_nextn_predict_layers`` counts them (3 when the
config does not say). Newer releases store ``self_attn.qkv_proj`` fused (``attention_projection_layout:
"fused_qkv"``), in ``num_key_value_heads`` consecutive blocks [q; k; v] (SGLang's load_mimo_v2_qkv_proj_weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, SlidingWindowCache
from ..errors import CheckpointError
from .base import BaseArgs, MTPModel, stack_experts
from .layers import MLP, RMSNorm, SwitchGLU, attend, make_rope, sigmoid_group_topk
from .mtp import MTPModule


@dataclass
class ModelArgs(BaseArgs):
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    swa_num_attention_heads: int
    swa_num_key_value_heads: int
    swa_head_dim: int
    swa_v_head_dim: int
    hybrid_layer_pattern: list
    moe_layer_freq: list
    n_routed_experts: int
    num_experts_per_tok: int
    sliding_window_size: Optional[int] = None
    sliding_window: Optional[int] = None  # HF's spelling: the window with the query included
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    attention_value_scale: Optional[float] = None
    attention_bias: bool = False
    attention_projection_layout: Optional[str] = None
    layernorm_epsilon: float = 1e-6
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: Optional[float] = None
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 3

    def mtp_modules(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def window(self) -> int:
        """Keys a sliding-window query sees, itself included."""
        return self.sliding_window_size + 1 if self.sliding_window_size is not None else self.sliding_window


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, sliding: bool):
        super().__init__()
        p = "swa_" if sliding else ""
        self.n_heads, self.n_kv = getattr(a, p + "num_attention_heads"), getattr(a, p + "num_key_value_heads")
        self.head_dim, self.v_head_dim = getattr(a, p + "head_dim"), getattr(a, p + "v_head_dim")
        H = a.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=a.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=a.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.v_head_dim, bias=a.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, H, bias=False)
        if a.add_swa_attention_sink_bias if sliding else a.add_full_attention_sink_bias:
            self.attention_sink_bias = mx.zeros((self.n_heads,))
        theta = a.swa_rope_theta if sliding else a.rope_theta
        self.rope = make_rope(int(a.partial_rotary_factor * self.head_dim), theta)
        self.value_scale = a.attention_value_scale
        self.window = a.window if sliding else None

    def __call__(self, x, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)
        if self.value_scale is not None:
            v = v * self.value_scale
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        sinks = self.get("attention_sink_bias")
        return self.o_proj(attend(q, k, v, self.head_dim**-0.5, cache, self.window, sinks))


class Gate(nn.Module):
    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.weight = mx.zeros((n_experts, hidden))
        self.e_score_correction_bias = mx.zeros((n_experts,))

    def __call__(self, x):
        return x @ self.weight.T


class MoE(nn.Module):
    """Routed experts only (no shared expert), DeepSeek-V3 noaux_tc routing."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate = Gate(a.hidden_size, a.n_routed_experts)
        self.switch_mlp = SwitchGLU(a.hidden_size, a.moe_intermediate_size, a.n_routed_experts)
        self.route = dict(top_k=a.num_experts_per_tok, n_group=a.n_group, topk_group=a.topk_group,
                          routed_scaling_factor=a.routed_scaling_factor or 1.0, norm_topk_prob=a.norm_topk_prob)

    def __call__(self, x):
        inds, scores = sigmoid_group_topk(self.gate(x), self.gate.e_score_correction_bias, **self.route)
        y = self.switch_mlp(x, inds)
        return (y * scores[..., None]).sum(axis=-2).astype(y.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, sliding: bool, moe: bool):
        super().__init__()
        self.self_attn = Attention(a, sliding)
        self.mlp = MoE(a) if moe else MLP(a.hidden_size, a.intermediate_size)
        self.input_layernorm = RMSNorm(a.hidden_size, eps=a.layernorm_epsilon)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, eps=a.layernorm_epsilon)
        self.sliding = sliding

    def __call__(self, x, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MiMoV2Model(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = [DecoderLayer(a, a.hybrid_layer_pattern[i] == 1, a.moe_layer_freq[i] == 1)
                       for i in range(a.num_hidden_layers)]
        self.norm = RMSNorm(a.hidden_size, eps=a.layernorm_epsilon)


# an MTP layer's own tensors -> MTPModule's names (everything else is its decoder block; SGLang and vLLM accept the
# post-attention norm spelled pre_mlp_layernorm)
MTP_NAMES = [("enorm.", "enorm."), ("hnorm.", "hnorm."), ("eh_proj.", "eh_proj."), ("final_layernorm.", "norm."),
             ("pre_mlp_layernorm.", "block.post_attention_layernorm.")]


def split_fused_qkv(name: str, w: mx.array, attn: Attention, groups: int):
    """[q; k; v] rows stored as `groups` consecutive blocks [q_g; k_g; v_g] -> q, k, v."""
    q, k, v = (n * d // groups for n, d in ((attn.n_heads, attn.head_dim), (attn.n_kv, attn.head_dim),
                                            (attn.n_kv, attn.v_head_dim)))
    if w.shape[0] != groups * (q + k + v):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {groups * (q + k + v)} rows")
    w = w.reshape(groups, q + k + v, -1)
    return (w[:, :q].reshape(-1, w.shape[-1]), w[:, q:q + k].reshape(-1, w.shape[-1]),
            w[:, q + k:].reshape(-1, w.shape[-1]))


class Model(MTPModel):
    float32_params = ("e_score_correction_bias", "mlp.gate.weight")

    def __init__(self, args: ModelArgs, num_mtp: int):
        super().__init__()
        self.args = args
        self.model = MiMoV2Model(args)
        self["lm_head"] = nn.Linear(args.hidden_size, args.vocab_size, bias=False)  # the method shadows it
        norm = partial(RMSNorm, eps=args.layernorm_epsilon)
        self.mtp = [MTPModule(args.hidden_size, DecoderLayer(args, sliding=True, moe=False), norm)
                    for _ in range(num_mtp)]

    def _cache(self, layer):
        return SlidingWindowCache(self.args.window) if layer.sliding else KVCache()

    def make_cache(self):
        return [self._cache(layer) for layer in self.model.layers]

    def make_mtp_cache(self):
        return [self._cache(m.block) for m in self.mtp]

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            parts = k.split(".")
            if k.startswith("model.mtp.layers.") and int(parts[3]) < len(self.mtp):
                rest = ".".join(parts[4:])
                k = f"mtp.{parts[3]}." + next((new + rest[len(old):] for old, new in MTP_NAMES if rest.startswith(old)),
                                              "block." + rest)
            out[k] = v
        groups = self.args.num_key_value_heads if self.args.attention_projection_layout == "fused_qkv" else 1
        for k in [k for k in out if k.endswith(".self_attn.qkv_proj.weight")]:
            layer = k[: -len(".self_attn.qkv_proj.weight")]
            attn = self._attention(layer)
            if attn is not None:  # else strict loading names the tensor
                for proj, w in zip(("q_proj", "k_proj", "v_proj"), split_fused_qkv(k, out.pop(k), attn, groups)):
                    out[f"{layer}.self_attn.{proj}.weight"] = w
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.mlp, MoE):
                stack_experts(out, f"model.layers.{i}.mlp", self.args.n_routed_experts)
        return out

    def _attention(self, layer: str) -> Optional[Attention]:
        """The attention of ``model.layers.{i}`` or ``mtp.{j}.block``, if this model has that layer."""
        parts = layer.split(".")
        blocks, i = ((self.model.layers, parts[2]) if parts[0] == "model" else ([m.block for m in self.mtp], parts[1]))
        return blocks[int(i)].self_attn if int(i) < len(blocks) else None
