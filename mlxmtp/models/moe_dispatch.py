"""Expert dispatch for the MoE layers: the union of experts for small (verify / draft) batches.

A verify pass of m tokens with top-k routing makes m*k (token, expert) pairs. mlx-lm's SwitchGLU hands every pair to
gather_mm / gather_qmm, which below ~16 rows reads an expert's weights once per pair (field-notes.md, reason 1; on
the CPU back end GatherMM runs one GEMM per pair). The union path sorts the pairs by expert, finds the unique
experts and their row segments, reads each expert's weights once for all of its rows, and scatters the results back
to pair order. The routing weights are applied by the family's MoE block, as before (SwitchGLU's contract is
unchanged: [..., k, hidden] per pair).

Three implementations of the union path:
- the reference (`union_switch_glu`), in MLX ops: the segments are laid out on the host (one small sync on the
  routing indices per MoE layer) as an [experts, rows, hidden] block, and each projection is one gather_mm /
  gather_qmm with one index per unique expert (float weights as the left operand: W @ x^T, the orientation OpenBLAS
  runs fastest at a few rows). It runs everywhere and is what the Metal kernel must match;
- `sorted_switch_glu`, sync-free, for GPUs without the kernel (mlx-cuda; a Mac whose self-check fell back) and
  cache-sized float experts on the CPU: the pairs sorted by expert on the device, into gather_mm / gather_qmm with
  sorted_indices=True;
- the Metal kernel (mlxmtp.metal_kernels.moe_union), sync-free, chosen only where Metal is available and its
  self-check on this machine passed.

Mode (``MLXMTP_MOE_DISPATCH`` or `dispatch_mode`), decided per call by `choose_path`:
- "auto": above UNION_MAX_TOKENS (prefill) the stock path. On the CPU back end, float experts take the reference
  union path for 2..16 tokens when an expert's projection reaches UNION_CPU_BATCH_BYTES, else the sorted path
  (smaller experts stay in the CPU's caches between the adjacent pairs that share them, and the union's host sync
  per layer costs more than the re-reads), and for one token when it reaches UNION_CPU_ONE_TOKEN_BYTES (the same k
  experts, read in the faster orientation; the host sync costs well under 1% of such a layer), else the stock
  path; quantized experts take the stock path (CPU quantized matmul is compute-bound, its cost grows with rows, so
  the padded union block only adds work: linux-cpu.md, `mlxmtp doctor`). On a GPU, 2..16 tokens take the kernel
  where its self-check passed, else the sorted path (a host sync per layer would stall MLX's lazy pipelining
  there); one token the stock path (the union is the same k experts).
- "union": the kernel where enabled, else the reference union path, for every batch size;
- "sorted" / "stock": always that path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

MODES = ("auto", "union", "sorted", "stock")
# CPU, one token: the union path wins only by reading an expert in the faster orientation, which pays for its host
# sync when the expert's weights come from memory; experts that stay in the CPU's caches (the demo's 96 KB) decode
# faster on the stock path (paired, demo model: 95 vs 67 tok/s plain).
UNION_CPU_ONE_TOKEN_BYTES = 1 << 20
# CPU, 2..16 tokens: cost(m) / stock cost(1) of a verify pass at m = 2, 3, 4 (DeepSeek-V3 layers, 32 experts, top-4,
# float32; `bench_moe_verify.py --sizes 96,2048,4096,8192 --max-m 4 --repeats 25`): projections of 96 KiB: sorted
# 1.05 / 1.14 / 1.24, union 1.27 / 1.37 / 1.57; 2 MiB: sorted 1.31 / 1.65 / 1.87, union 1.35 / 1.69 / 2.06; 4 MiB:
# sorted 1.55 / 2.14 / 2.52, union 1.36 / 1.79 / 2.29 (8 MiB as 4). The demo model (96 KiB) decodes greedy MTP
# rounds in 1.13-1.15x (k = 1) and 1.05-1.10x (k = 3) the time on the union path (two runs of
# `bench_round_ab.py --switch union`).
UNION_CPU_BATCH_BYTES = 4 << 20
UNION_MAX_TOKENS = 16  # the small-batch range of the issue (#10); above it gather_qmm's sorted path shares weights

_mode = os.environ.get("MLXMTP_MOE_DISPATCH", "auto")
# Host reads of routing indices by the reference union path, one per MoE layer it runs: synchronisations that
# decoding statistics count with the sampler's (speculative.decode reads the difference over a generation).
host_reads = 0


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


def _expert_bytes(glu) -> int:
    """Bytes of one expert's gate projection."""
    w = glu.gate_proj.weight
    return w.nbytes // w.shape[0]


def choose_path(glu, n_tokens: int, kernel_ok=None, gpu: bool | None = None) -> str:
    """Which path a SwitchGLU call of n_tokens takes: "kernel", "union", "sorted" or "stock" (module docstring).
    kernel_ok() says whether the Metal kernel may run for this layer (it runs the self-check the first time); gpu:
    whether MLX computes on a GPU (default: the default device)."""
    mode = get_dispatch_mode()
    if mode in ("stock", "sorted"):
        return mode
    gpu = mx.default_device() != mx.cpu if gpu is None else gpu
    if mode == "auto" and (n_tokens > UNION_MAX_TOKENS or (gpu and n_tokens < 2)):
        return "stock"
    if mode == "auto" and not gpu:
        if "scales" in glu.gate_proj:
            return "stock"
        if n_tokens < 2:
            return "union" if _expert_bytes(glu) >= UNION_CPU_ONE_TOKEN_BYTES else "stock"
        return "union" if _expert_bytes(glu) >= UNION_CPU_BATCH_BYTES else "sorted"
    if kernel_ok is not None and kernel_ok():
        return "kernel"
    return "union" if mode == "union" else "sorted"


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
    """Reference union path of a SwitchGLU: x [..., D], indices [..., k] -> [..., k, D], equal to the per-pair path.

    Float experts: one gather_mm per projection with the weights on the left over [U, D, R] (layers.SwitchLinear;
    OpenBLAS runs W @ x^T ~1.4x faster than x @ W^T at 1..4 rows, `bench_moe_verify.py --gemm`), activations kept
    in that layout and transposed back once after down_proj; quantized experts: gather_qmm over [U, R, D]."""
    global host_reads
    k, D = indices.shape[-1], x.shape[-1]
    host_reads += 1
    idx = np.array(mx.stop_gradient(indices)).reshape(-1, k)
    plan = plan_union(idx)
    xg = x.reshape(-1, D)[plan.rows]  # [U, R, D]: each expert's rows, read with its weights once
    if "scales" in glu.gate_proj:
        h = glu.activation(glu.up_proj(xg, plan.experts), glu.gate_proj(xg, plan.experts))
        y = glu.down_proj(h, plan.experts)  # [U, R, D]
    else:
        xt = xg.swapaxes(-1, -2)  # [U, D, R]: a strided view, no copy
        h = glu.activation(glu.up_proj(xt, plan.experts, weights_left=True),
                           glu.gate_proj(xt, plan.experts, weights_left=True))  # [U, H, R]
        y = glu.down_proj(h, plan.experts, weights_left=True).swapaxes(-1, -2)  # [U, R, D]
    return y.reshape(-1, D)[plan.pairs].reshape(*indices.shape, D)


def sorted_switch_glu(glu, x: mx.array, indices: mx.array) -> mx.array:
    """Sync-free union path for GPUs without the kernel and for cache-sized float experts on the CPU: the pairs
    sorted by expert on the device and handed to gather_mm / gather_qmm with sorted_indices=True (mlx-lm's
    SwitchGLU does so for prefill). MLX then reads each expert once per run of equal indices where it has a kernel
    for it (Metal gather_mm_rhs; CUDA's grouped GEMM; Metal gather_qmm only from 16 pairs and 4 per expert on
    average, mlx/backend/metal/quantized.cpp), else once per pair (on a CPU, an expert that fits its caches is then
    re-read from them by the adjacent pairs); either way no host sync, so MLX keeps building the graph ahead."""
    k, D = indices.shape[-1], x.shape[-1]
    flat = mx.stop_gradient(indices).reshape(-1)
    order = mx.argsort(flat)
    xs, idx = x.reshape(-1, 1, D)[order // k], flat[order]  # [P, 1, D] rows in expert order
    h = glu.activation(glu.up_proj(xs, idx, sorted_indices=True), glu.gate_proj(xs, idx, sorted_indices=True))
    y = glu.down_proj(h, idx, sorted_indices=True)  # [P, 1, D]
    return y[mx.argsort(order)].reshape(*indices.shape, D)


def switch_glu(glu, x: mx.array, indices: mx.array, stock) -> mx.array:
    """Dispatch one SwitchGLU call: the Metal union kernel, the union path (host plan), the sorted path or `stock`."""
    from ..metal_kernels import moe_union  # the kernel's module; it touches Metal only where Metal is available

    path = choose_path(glu, indices.size // indices.shape[-1], lambda: moe_union.kernel_enabled(glu))
    if path == "kernel":
        return moe_union.kernel_switch_glu(glu, x, indices)
    if path == "union":
        return union_switch_glu(glu, x, indices)
    if path == "sorted":
        return sorted_switch_glu(glu, x, indices)
    return stock(x, indices)


def union_stats(indices: np.ndarray) -> tuple[int, int]:
    """(unique experts, max rows per expert) of routing indices [m, k]: what the union path reads."""
    flat = np.asarray(indices).reshape(-1)
    _, counts = np.unique(flat, return_counts=True)
    return len(counts), int(counts.max())
