"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, arXiv 2412.06464): the linear-attention layer of Qwen3-Next and
Qwen3.5, keeping its conv window and recurrent state in ``mlxmtp.cache.RecurrentCache``.

    q, k, v = split(silu(causal_depthwise_conv(W_qkv x)))     kernel K: the cache keeps the last K-1 inputs
    q, k    = l2norm(q) / sqrt(d_k), l2norm(k)
    g = exp(-exp(A_log) * softplus(a + dt_bias)),  beta = sigmoid(b)          (a, b: per value head)
    S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T                  (S: [Hv, Dv, Dk], float32)
    o_t = S_t q_t,   y = W_out(rms_norm(o) * w * silu(z))

as in HF transformers' Qwen3NextGatedDeltaNet and mlx-lm's gated_delta.py (whose helpers and state layout are
used here). A call of L <= cache.MAX_ROLLBACK positions through a cache steps the recurrence and keeps the state
after every position, so that rollback is exact; longer calls (prefill) and cache-less calls use mlx-lm's
``gated_delta_update``, which picks its Metal kernel at run time where there is one and otherwise runs the same
step-by-step ops. The families differ only in how the input projections are stored (``project``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gated_delta import compute_g, gated_delta_update, normalize_qk

from ..cache import MAX_ROLLBACK
from .layers import rms_norm


class GatedRMSNorm(nn.Module):
    """rms_norm(x) * w * silu(gate): the GDN output norm, with a plain (not zero-centred) weight."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, gate):
        y = rms_norm(x, self.weight, self.eps)
        return (nn.silu(gate.astype(mx.float32)) * y).astype(x.dtype)  # the gate in float32 (HF, mlx-lm)


@mx.compile
def _step(q, k, v, g, beta, state):
    """One position: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state [B, H, Dv, Dk] -> (o [B, H, Dv], state)."""
    state = state * g[..., None, None]
    delta = (v - (state * k[..., None, :]).sum(-1)) * beta[..., None]
    state = state + k[..., None, :] * delta[..., None]
    return (state * q[..., None, :]).sum(-1).astype(q.dtype), state


def recurrent_steps(q, k, v, g, beta, state):
    """The recurrence over L positions, keeping every state: (o [B, L, Hv, Dv], [S_0, S_1, ..., S_L])."""
    if (r := v.shape[2] // q.shape[2]) > 1:  # each key head serves r consecutive value heads
        q, k = mx.repeat(q, r, 2), mx.repeat(k, r, 2)
    outs, states = [], [state]
    for t in range(q.shape[1]):
        o, state = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
        states.append(state)
    return mx.stack(outs, axis=1), states


class GatedDeltaNet(nn.Module):
    """The layer less its input projections. A family's subclass defines them and ``project(x)``: x [B, L, hidden]
    -> qkv [B, L, conv_dim] (all q heads, all k heads, all v heads), z [B, L, Hv, Dv], b and a [B, L, Hv]."""

    def __init__(self, hidden: int, n_k_heads: int, n_v_heads: int, k_dim: int, v_dim: int, conv_kernel: int,
                 eps: float):
        super().__init__()
        self.n_k_heads, self.n_v_heads, self.k_dim, self.v_dim = n_k_heads, n_v_heads, k_dim, v_dim
        self.key_dim, self.value_dim = n_k_heads * k_dim, n_v_heads * v_dim
        self.conv_kernel = conv_kernel
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones((n_v_heads,))
        self.A_log = mx.zeros((n_v_heads,))
        self.norm = GatedRMSNorm(v_dim, eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def __call__(self, x, cache=None):
        B, L, _ = x.shape
        qkv, z, b, a = self.project(x)
        window = None if cache is None else cache.conv_state
        if window is None:
            window = mx.zeros((B, self.conv_kernel - 1, self.conv_dim), x.dtype)
        conv_input = mx.concatenate([window, qkv], axis=1)
        q, k, v = mx.split(nn.silu(self.conv1d(conv_input)), [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, L, self.n_k_heads, self.k_dim)
        k = k.reshape(B, L, self.n_k_heads, self.k_dim)
        v = v.reshape(B, L, self.n_v_heads, self.v_dim)
        q, k = normalize_qk(q, k, inv_scale=self.k_dim**-0.5, eps=1e-6)  # HF's l2norm eps
        state = None if cache is None else cache.state
        if state is None:
            state = mx.zeros((B, self.n_v_heads, self.v_dim, self.k_dim), mx.float32)
        if cache is not None and L <= MAX_ROLLBACK:
            out, states = recurrent_steps(q, k, v, compute_g(self.A_log, a, self.dt_bias), mx.sigmoid(b), state)
        else:
            out, state = gated_delta_update(q, k, v, a, b, self.A_log, self.dt_bias, state)
            states = [state]
        if cache is not None:
            cache.update(conv_input, states, L)
        return self.out_proj(self.norm(out, z).reshape(B, L, -1))
