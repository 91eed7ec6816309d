"""The union-of-experts Metal kernel (moe_union.metal): its wrapper, when it may run, and its self-check.

The kernel runs only where Metal is available and the default device is the GPU, and only after it passed a
self-check on this machine: the first time a SwitchGLU of a given shape and weight format would use it, each of its
three projections is run by the kernel and by the reference (gather_mm / gather_qmm per sorted pair, the math of
mlx-lm's SwitchLinear) on the layer's own weights and random inputs of the real shapes. If the kernel fails to
compile or differs beyond TOLERANCE, that format uses MLX's own ops (moe_dispatch.choose_path: the sync-free sorted
path in "auto", the reference union path in "union") and one line on stderr says so.

Tolerance (documented contract): max |kernel - reference| <= TOLERANCE[dtype] * max(1, max |reference|); both
accumulate in float32, so the difference is the summation order plus one rounding of the output dtype.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

SOURCE = Path(__file__).with_name("moe_union.metal")
BODY_MARKER = "// ---- body ----"
KERNEL_BITS = (2, 4, 8)  # power-of-two affine widths: a value never straddles two uint32 words
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}
SIMDS, COLS, MAX_ROWS = 2, 4, 16  # simdgroups per threadgroup, output columns per simdgroup, rows in registers
CHECK_TOKENS = 4  # tokens of the self-check batch (a verify pass of 3 drafts)


def source_parts() -> tuple[str, str]:
    """(header, body) of moe_union.metal."""
    header, body = SOURCE.read_text().split(BODY_MARKER + "\n")
    return header, body


def metal_available() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


@lru_cache(maxsize=None)
def _kernel(quantized: bool):
    header, body = source_parts()
    inputs = ["x", "rows", "experts", "w"] + (["scales", "biases"] if quantized else [])
    return mx.fast.metal_kernel(name=f"mlxmtp_moe_union_{'q' if quantized else 'f'}", input_names=inputs,
                                output_names=["out"], source=body,
                                header=f"#define MOE_QUANTIZED {int(quantized)}\n" + header)


def weight_format(lin) -> Optional[str]:
    """A SwitchLinear's weight format if the kernel handles it ('q4', 'float16', ...), else None."""
    if isinstance(lin, QuantizedSwitchLinear):
        ok = (lin.mode == "affine" and lin.bits in KERNEL_BITS and lin.get("biases") is not None
              and lin.scales.dtype in KERNEL_DTYPES and lin.input_dims % lin.group_size == 0)
        return f"q{lin.bits}/{lin.group_size}" if ok else None
    if isinstance(lin, SwitchLinear) and lin.weight.dtype in KERNEL_DTYPES:
        return str(lin.weight.dtype).split(".")[-1]
    return None


def union_matmul(lin, x: mx.array, rows: mx.array, experts: mx.array) -> mx.array:
    """The kernel: out[p] = W[experts[p]] @ x[rows[p]] (+ bias) for slots sorted by expert -> [P, out_dims]."""
    P, K, N = experts.size, lin.input_dims, lin.output_dims
    quantized = isinstance(lin, QuantizedSwitchLinear)
    inputs = [x, rows, experts, lin.weight] + ([lin.scales, lin["biases"]] if quantized else [])
    template = [("T", x.dtype), ("K", K), ("N", N), ("P", P), ("BITS", lin.bits if quantized else 0),
                ("GS", lin.group_size if quantized else 0), ("SIMDS", SIMDS), ("COLS", COLS),
                ("MAX_ROWS", MAX_ROWS)]
    tiles = -(-N // (SIMDS * COLS))
    (out,) = _kernel(quantized)(inputs=inputs, template=template, grid=(32 * SIMDS * tiles, P, 1),
                                threadgroup=(32 * SIMDS, 1, 1), output_shapes=[(P, N)], output_dtypes=[x.dtype])
    if "bias" in lin:
        out = out + lin["bias"][experts]
    return out


def reference_matmul(lin, x: mx.array, rows: mx.array, experts: mx.array) -> mx.array:
    """What union_matmul must equal: mlx-lm's per-pair SwitchLinear over the same slots -> [P, out_dims]."""
    return lin(x[rows][:, None, :], experts).squeeze(1)


def sorted_slots(indices: mx.array):
    """(order, token of each slot, expert of each slot) of routing indices [m, k], slots sorted by expert."""
    flat = indices.reshape(-1).astype(mx.uint32)
    order = mx.argsort(flat)
    return order, (order // indices.shape[-1]).astype(mx.uint32), flat[order]


def kernel_switch_glu(glu, x: mx.array, indices: mx.array) -> mx.array:
    """The union path through the kernel: three launches, no host sync. x [..., D], indices [..., k] -> [..., k, D]."""
    k, D = indices.shape[-1], x.shape[-1]
    order, tokens, experts = sorted_slots(mx.stop_gradient(indices).reshape(-1, k))
    xf = x.reshape(-1, D)
    h = glu.activation(union_matmul(glu.up_proj, xf, tokens, experts),
                       union_matmul(glu.gate_proj, xf, tokens, experts))
    slots = mx.arange(experts.size, dtype=mx.uint32)
    y = union_matmul(glu.down_proj, h, slots, experts)  # [P, D] in sorted order
    return y[mx.argsort(order)].reshape(*indices.shape, D)


@dataclass
class CheckResult:
    """One projection's self-check."""

    name: str
    shape: tuple
    weight_format: str
    passed: bool
    max_diff: float = float("nan")
    tolerance: float = float("nan")
    kernel_ms: float = float("nan")
    reference_ms: float = float("nan")
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _time(fn, repeats: int = 5) -> float:
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - t) / repeats * 1e3


def check_projection(name: str, lin, dtype, n_tokens: int = CHECK_TOKENS, top_k: int = 8, seed: int = 0,
                     timed: bool = False) -> CheckResult:
    """Kernel against reference on `lin`'s weights, n_tokens random rows routed to top_k random experts each."""
    fmt = weight_format(lin)
    E, K = lin.num_experts, lin.input_dims
    res = CheckResult(name, (E, lin.output_dims, K), fmt or "unsupported", False)
    if fmt is None or K % 8:
        res.error = "weight format or input dims not handled by the kernel (K must be a multiple of 8)"
        return res
    key = mx.random.key(seed)
    kx, ki = mx.random.split(key)
    x = mx.random.normal((n_tokens, K), key=kx).astype(dtype)
    top_k = min(top_k, E)
    inds = mx.argsort(mx.random.uniform(shape=(n_tokens, E), key=ki), axis=-1)[:, :top_k]
    _, rows, experts = sorted_slots(inds)
    try:
        got = union_matmul(lin, x, rows, experts)
        mx.eval(got)
    except Exception as e:  # compile or launch failure: reported, never raised into a generation
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    ref = reference_matmul(lin, x, rows, experts)
    diff = mx.abs(got.astype(mx.float32) - ref.astype(mx.float32)).max().item()
    res.max_diff = diff
    res.tolerance = TOLERANCE[dtype] * max(1.0, mx.abs(ref.astype(mx.float32)).max().item())
    res.passed = bool(diff <= res.tolerance)
    if timed:
        res.kernel_ms = _time(lambda: union_matmul(lin, x, rows, experts))
        res.reference_ms = _time(lambda: reference_matmul(lin, x, rows, experts))
    return res


def check_switch_glu(glu, dtype, timed: bool = False) -> list[CheckResult]:
    return [check_projection(n, getattr(glu, n), dtype, timed=timed) for n in ("gate_proj", "up_proj", "down_proj")]


_verdicts: dict = {}


def _signature(glu) -> tuple:
    return tuple((type(p).__name__, weight_format(p), p.num_experts, p.output_dims, p.input_dims)
                 for p in (glu.gate_proj, glu.up_proj, glu.down_proj))


def kernel_enabled(glu, dtype=None) -> bool:
    """Whether this SwitchGLU's union calls go to the kernel: Metal present and the self-check of its shape and
    weight format passed on this machine (checked once per signature per process)."""
    if not metal_available():
        return False
    sig = _signature(glu)
    if sig not in _verdicts:
        dtype = dtype or (glu.gate_proj.scales.dtype if isinstance(glu.gate_proj, QuantizedSwitchLinear)
                          else glu.gate_proj.weight.dtype)
        results = check_switch_glu(glu, dtype)
        bad = [r for r in results if not r.passed]
        _verdicts[sig] = not bad
        if bad:
            r = bad[0]
            why = r.error or f"max difference {r.max_diff:.3g} > tolerance {r.tolerance:.3g}"
            print(f"mlxmtp: MoE union kernel self-check failed for {r.name} {r.shape} {r.weight_format} ({why}); "
                  "using MLX ops instead (moe_dispatch)", file=sys.stderr)
    return _verdicts[sig]
