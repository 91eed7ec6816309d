"""Expert dispatch for the MoE layers: the union of experts for small (verify / draft) batches.

A verify pass of m tokens with top-k routing makes m*k (token, expert) pairs. mlx-lm's SwitchGLU hands every pair to
gather_mm / gather_qmm, which below ~16 rows reads an expert's weights once per pair (field-notes.md, reason 1; on
the CPU back end GatherMM runs one GEMM per pair). The union path sorts the pairs by expert, finds the unique
experts and their row segments, reads each expert's weights once for all of its rows, and scatters the results back
to pair order. The routing weights are applied by the family's MoE block, as before (SwitchGLU's contract is
unchanged: [..., k, hidden] per pair).

Two implementations of the union path:
- the reference (`union_switch_glu`), in MLX ops: the segments are laid out on the host (one small sync on the
  routing indices per MoE layer) as an [experts, rows, hidden] block, and each projection is one gather_mm /
  gather_qmm with one index per unique expert. It runs everywhere and is what the Metal kernel must match;
- the Metal kernel (mlxmtp.metal_kernels.moe_union), sync-free, chosen only where Metal is available and its
  self-check on this machine passed.

Mode (``MLXMTP_MOE_DISPATCH`` or `dispatch_mode`): "auto" (union for 2..UNION_MAX_TOKENS tokens, the stock path for
one token, where the union is the same k experts, and for prefill; and the stock path for quantized experts on the
CPU back end without the kernel, where quantized matmul is compute-bound and its cost grows with rows, so the padded
union block only adds work: linux-cpu.md, `mlxmtp doctor`), "union" (always) or "stock" (never).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

MODES = ("auto", "union", "stock")
UNION_MAX_TOKENS = 16  # the small-batch range of the issue (#10); above it gather_qmm's sorted path shares weights

_mode = os.environ.get("MLXMTP_MOE_DISPATCH", "auto")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"MoE dispatch mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def get_dispatch_mode() -> str:
    return _check_mode(_mode)


def set_dispatch_mode(mode: str) -> None:
    global _mode
    _mode = _check_mode(mode)


@contextmanager
def dispatch_mode(mode: str):
    """Run a block with another dispatch mode (tests, benchmarks, doctor)."""
    global _mode
    old, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = old


def use_union(n_tokens: int) -> bool:
    mode = get_dispatch_mode()
    if mode == "auto":
        return 2 <= n_tokens <= UNION_MAX_TOKENS
    return mode == "union"


@dataclass
class UnionPlan:
    """Layout of the pairs of one batch over the union of their experts.

    experts [U] uint32:   the unique experts, ascending.
    rows    [U, R] int32: the token of each (expert, slot); a segment shorter than R = max rows per expert is padded
                          with its first token (computed, then never read).
    pairs   [P] int32:    for pair p = token * k + choice, its position u * R + slot in the [U, R] block.
    """

    experts: mx.array
    rows: mx.array
    pairs: mx.array
    n_unique: int
    max_rows: int


def plan_union(indices: np.ndarray) -> UnionPlan:
    """The union layout of routing indices [m, k] (each token's k experts distinct, as every router makes them)."""
    m, k = indices.shape
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    U, R = len(experts), int(counts.max())
    segment = np.repeat(np.arange(U), counts)
    slot = np.arange(m * k) - np.repeat(starts, counts)
    token = order // k
    rows = np.repeat(token[starts], R).reshape(U, R)
    rows[segment, slot] = token
    pairs = np.empty(m * k, dtype=np.int64)
    pairs[order] = segment * R + slot
    return UnionPlan(mx.array(experts.astype(np.uint32)), mx.array(rows.astype(np.int32)),
                     mx.array(pairs.astype(np.int32)), U, R)


def union_switch_glu(glu, x: mx.array, indices: mx.array) -> mx.array:
    """Reference union path of a SwitchGLU: x [..., D], indices [..., k] -> [..., k, D], equal to the per-pair path."""
    k, D = indices.shape[-1], x.shape[-1]
    idx = np.array(mx.stop_gradient(indices)).reshape(-1, k)
    plan = plan_union(idx)
    xg = x.reshape(-1, D)[plan.rows]  # [U, R, D]: each expert's rows, read with its weights once
    h = glu.activation(glu.up_proj(xg, plan.experts), glu.gate_proj(xg, plan.experts))
    y = glu.down_proj(h, plan.experts)  # [U, R, D]
    return y.reshape(-1, D)[plan.pairs].reshape(*indices.shape, D)


def switch_glu(glu, x: mx.array, indices: mx.array, stock) -> mx.array:
    """Dispatch one SwitchGLU call: the Metal union kernel, the reference union path or `stock` (per pair)."""
    n_tokens = indices.size // indices.shape[-1]
    if not use_union(n_tokens):
        return stock(x, indices)
    from ..metal_kernels import moe_union  # imported lazily: Linux paths never touch the kernel

    if moe_union.kernel_enabled(glu):
        return moe_union.kernel_switch_glu(glu, x, indices)
    if get_dispatch_mode() == "auto" and mx.default_device() == mx.cpu and "scales" in glu.gate_proj:
        return stock(x, indices)
    return union_switch_glu(glu, x, indices)


def union_stats(indices: np.ndarray) -> tuple[int, int]:
    """(unique experts, max rows per expert) of routing indices [m, k]: what the union path reads."""
    flat = np.asarray(indices).reshape(-1)
    _, counts = np.unique(flat, return_counts=True)
    return len(counts), int(counts.max())
