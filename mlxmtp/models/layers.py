"""Layers shared by the model families: norms, rope, grouped-query attention, MLPs, MoE routing.

Family files assemble these; anything only one family uses lives in that family's file.
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import rope_utils, switch_layers
from mlx_lm.models.activations import swiglu

from . import moe_dispatch

__all__ = [
    "rms_norm",
    "RMSNorm",
    "ZeroCentredRMSNorm",
    "make_rope",
    "sdpa",
    "causal_mask",
    "attend",
    "Attention",
    "MLP",
    "SwitchLinear",
    "SwitchGLU",
    "softmax_topk",
    "sigmoid_group_topk",
]

# MLX's CPU back end has no kernels of its own for mx.fast.rms_norm and mx.fast.rope: each call expands into its
# fallback graph of ~8 and ~15 small ops. Under mx.compile their elementwise chains fuse into one kernel each, with
# the same results (dtypes kept op by op): a demo-model decode step goes from 884 to 629 graph nodes and 0.83-0.89x
# the time, a 4-row verify pass 0.81-0.91x (two runs); passes that bandwidth bounds (the 151,936-token stand-ins)
# move by 0.96-1.02x (benchmarks/bench_fused_norms.py). Metal and CUDA have the kernels: there the plain call runs.
# Compiled rope traces per shape (its positions come from the shape), so only passes of up to FUSED_ROWS positions
# (decode, verify, drafts, the drafter's catch-up) take it; prefill chunks, whose lengths vary, do not.
FUSED_ROWS = 32
FUSE_FALLBACKS = True  # False: the plain calls everywhere (the benchmark's and the tests' baseline)


def fuses_fallbacks() -> bool:
    """Whether mx.fast's norms and rope run as fallback graphs here, which compiling fuses (the CPU back end)."""
    return FUSE_FALLBACKS and mx.default_device().type == mx.DeviceType.cpu


@functools.lru_cache(maxsize=None)
def _fused_rms_norm(dims: int, eps: float):
    # shapeless: one trace serves every leading shape (the fallback's mean divides by dims, a constant of this key)
    return mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps), shapeless=True)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm, its fallback graph fused where it has one (fuses_fallbacks)."""
    if fuses_fallbacks():
        return _fused_rms_norm(x.shape[-1], eps)(x, weight)
    return mx.fast.rms_norm(x, weight, eps)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter) through rms_norm."""

    def __call__(self, x):
        return rms_norm(x, self["weight"], self.eps)


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose stored weight w scales by (1 + w) (Qwen3-Next / Qwen3.5, Gemma; weights stay as stored)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, 1.0 + self.weight, self.eps)


# mlx-lm's rope modules that pass their offset straight to mx.fast.rope, so that it can be an array (a compiled
# function's input; an int would be a constant, retraced at every position); DynamicNTKScalingRoPE computes with it,
# and a class this list does not name (another mlx-lm version's) keeps the plain call.
_ARRAY_OFFSET = (nn.RoPE,) + tuple(getattr(rope_utils, name) for name in
                                   ("SuScaledRoPE", "Llama3RoPE", "YarnRoPE", "ProportionalRoPE")
                                   if hasattr(rope_utils, name))


class FusedRoPE(nn.Module):
    """One of mlx-lm's rope modules, compiled for passes of up to FUSED_ROWS positions where fuses_fallbacks."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope
        self._compiled = mx.compile(lambda x, offset: rope(x, offset=offset))

    def __call__(self, x, offset=0):
        if x.shape[-2] <= FUSED_ROWS and fuses_fallbacks():
            return self._compiled(x, mx.array(offset, mx.int32) if isinstance(offset, int) else offset)
        return self.rope(x, offset=offset)


def make_rope(dims: int, base: float, scaling: Optional[dict] = None, max_pos: Optional[int] = None,
              traditional: bool = False):
    """RoPE as Hugging Face configs describe it (mlx-lm's initialize_rope knows the scaling variants)."""
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) in (None, "default"):
        scaling = None
    rope = rope_utils.initialize_rope(dims, base, traditional, scaling, max_pos)
    return FusedRoPE(rope) if isinstance(rope, _ARRAY_OFFSET) else rope


def sdpa(q, k, v, scale: float, mask, sinks: Optional[mx.array] = None):
    """Scaled dot-product attention; q [B, Hq, L, D], k/v [B, Hkv, T, D] (GQA broadcast inside)."""
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_ and mask.ndim == 2:
        mask = mask[None, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


class Attention(nn.Module):
    """Grouped-query attention with the options the families need.

    bias:          bias on q/k/v projections (Qwen2 / MiMo, GLM).
    qk_norm:       None, "head" (RMSNorm over each head's dim) or "zero_centred_head" (Qwen3-Next style).
    rope_dims:     rotary dims per head (partial rotary, GLM's 0.5); 0 means no rope.
    output_gate:   None, or "elementwise": q_proj also emits a sigmoid gate per output channel (Qwen3-Next).
    sinks:         learned per-head attention-sink logits (MiMo-V2).
    window:        sliding window (the cache type decides the mask; this only records it).
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, v_head_dim: Optional[int] = None,
                 bias: bool = False, o_bias: bool = False, qk_norm: Optional[str] = None, norm_eps: float = 1e-6,
                 rope_dims: Optional[int] = None, rope_base: float = 10000.0, rope_scaling: Optional[dict] = None,
                 max_pos: Optional[int] = None, output_gate: Optional[str] = None, sinks: bool = False,
                 window: Optional[int] = None, scale: Optional[float] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.output_gate = output_gate
        self.window = window
        q_out = n_heads * head_dim * (2 if output_gate == "elementwise" else 1)
        self.q_proj = nn.Linear(hidden, q_out, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv_heads * self.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, hidden, bias=o_bias)
        if qk_norm is not None:
            norm = ZeroCentredRMSNorm if qk_norm == "zero_centred_head" else RMSNorm
            self.q_norm = norm(head_dim, eps=norm_eps)
            self.k_norm = norm(head_dim, eps=norm_eps)
        self.qk_norm = qk_norm
        if sinks:
            self.sinks = mx.zeros((n_heads,))
        self.has_sinks = sinks
        rope_dims = head_dim if rope_dims is None else rope_dims
        self.rope = make_rope(rope_dims, rope_base, rope_scaling, max_pos) if rope_dims else None
        self.scale = scale if scale is not None else head_dim**-0.5

    def __call__(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        q = self.q_proj(x)
        gate = None
        if self.output_gate == "elementwise":
            q, gate = mx.split(q.reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            gate = gate.reshape(B, L, -1)
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.v_head_dim)
        if self.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        if self.rope is not None:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            mask = cache.make_mask(L)
            k, v = cache.update_and_fetch(k, v)
        out = sdpa(q, k, v, self.scale, mask, self.sinks if self.has_sinks else None)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if gate is not None:
            out = out * mx.sigmoid(gate)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class SwitchLinear(switch_layers.SwitchLinear):
    """mlx-lm's SwitchLinear (same parameters; to_quantized gives mlx-lm's QuantizedSwitchLinear), which can also
    multiply with the weights on the left, the union path's float layout (moe_dispatch.union_switch_glu)."""

    def __call__(self, x, indices, sorted_indices=False, weights_left=False):
        if not weights_left:
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        # x [U, in, R] -> W[indices[u]] @ x[u]: [U, out, R]
        y = mx.gather_mm(self["weight"], x, lhs_indices=indices, rhs_indices=mx.arange(indices.size, dtype=mx.uint32))
        return y + self["bias"][indices][..., None] if "bias" in self else y


class SwitchGLU(switch_layers.SwitchGLU):
    """mlx-lm's SwitchGLU (same parameters and checkpoint layout, quantizes the same way) whose calls go through
    moe_dispatch: small verify / draft batches read each expert in the union of the routed experts once."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int, activation=switch_layers.SwiGLU(),
                 bias: bool = False):
        super().__init__(input_dims, hidden_dims, num_experts, activation, bias)
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)

    def __call__(self, x, indices):
        return moe_dispatch.switch_glu(self, x, indices, super().__call__)


# The routers are compiled (as mlx-lm's group_expert_select is): a dozen small ops per MoE layer and token fuse into
# a few kernels, about 7% of a decode step on the demo model (MLX CPU). Ints and floats are compile-time constants.
@mx.compile
def softmax_topk(gate_logits: mx.array, top_k: int, norm_topk_prob: bool):
    """Softmax routing (Qwen MoE): the top-k experts by probability, optionally renormalised."""
    probs = mx.softmax(gate_logits.astype(mx.float32), axis=-1)
    inds = mx.argpartition(-probs, kth=top_k - 1, axis=-1)[..., :top_k]
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds, scores


@mx.compile
def sigmoid_group_topk(gate_logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
                       routed_scaling_factor: float, norm_topk_prob: bool):
    """DeepSeek-V3 "noaux_tc" routing (arXiv 2412.19437 sec. 2.1.2): sigmoid affinities; the bias-corrected scores
    choose experts, limited to the best `topk_group` of `n_group` groups (a group scores as the sum of its two best
    corrected scores); the gate weights are the uncorrected affinities, renormalised and scaled."""
    scores = mx.sigmoid(gate_logits.astype(mx.float32))
    corrected = scores + bias
    if n_group > 1:
        E = corrected.shape[-1]
        grouped = corrected.reshape(*corrected.shape[:-1], n_group, E // n_group)
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
        drop = n_group - topk_group
        if drop > 0:
            low = mx.argpartition(group_scores, kth=drop - 1, axis=-2)[..., :drop, :]
            # masked groups score -inf (DeepSeek's inference/model.py and HF; mlx-lm uses 0.0, which differs when
            # bias-corrected scores are negative)
            grouped = mx.put_along_axis(grouped, mx.stop_gradient(low), mx.array(-mx.inf), axis=-2)
        corrected = grouped.reshape(*corrected.shape)
    inds = mx.stop_gradient(mx.argpartition(-corrected, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * routed_scaling_factor


def causal_mask(n: int, window: Optional[int] = None):
    """Mask of a pass over n positions without a cache: causal and, with a window, limited to the last `window`
    positions (the query's own included), as SlidingWindowCache.make_mask does with one."""
    if window is None or n <= window:
        return "causal" if n > 1 else None
    q, k = mx.arange(n)[:, None], mx.arange(n)[None]
    return (k <= q) & (k > q - window)


def attend(q, k, v, scale: float, cache=None, window: Optional[int] = None, sinks: Optional[mx.array] = None):
    """Attention of the L new positions q [B, Hq, L, D] (rope applied) over the cache and their own k, v
    [B, Hkv, L, D|Dv]; the mask comes from the cache, else it is causal (sliding with a window). -> [B, L, Hq*Dv]"""
    B, _, L, _ = q.shape
    if cache is not None:
        mask = cache.make_mask(L)
        k, v = cache.update_and_fetch(k, v)
    else:
        mask = causal_mask(L, window)
    return sdpa(q, k, v, scale, mask, sinks).transpose(0, 2, 1, 3).reshape(B, L, -1)
