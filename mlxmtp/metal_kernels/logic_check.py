"""Off-Mac check of the union kernel's logic: moe_union.metal's body compiled as C++ (g++, logic_check/cpu_shim.h)
and run over the kernel's whole grid on the CPU, lanes as threads, simd_sum as a real 32-lane reduction.

It covers the body's indexing and control flow: segment detection on sorted slots, the tile / simdgroup / lane split
of output columns and K, the affine dequantization at each bit width, rows beyond MAX_ROWS, partial tiles, the
early exit of non-leading slots, and that every lane of a simdgroup reaches each simd_sum (a divergent one hangs,
caught by the timeout). It cannot show Metal compilation, the signature mx.fast.metal_kernel writes, GPU speed, or
the GPU's rounding; the self-check on a Mac (moe_union.kernel_enabled, `mlxmtp doctor`) does.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import moe_union

HERE = Path(__file__).with_name("logic_check")
CPP_TYPES = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.uint32: "uint"}


def compiler() -> str | None:
    return shutil.which("g++")


def _raw(a: mx.array) -> bytes:
    """An array's bytes in memory order (bfloat16 / float16 as their 16-bit patterns)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).tobytes()
    return np.array(a).tobytes()


def build(defines: dict, workdir: Path) -> Path:
    """Compile the harness for one set of template values (cached by their hash in workdir)."""
    header, body = moe_union.source_parts()
    tag = hashlib.sha1((repr(sorted(defines.items())) + header + body).encode()).hexdigest()[:12]
    exe = workdir / f"moe_union_{tag}"
    if exe.exists():
        return exe
    if compiler() is None:
        raise RuntimeError("g++ not found: the kernel logic check compiles the kernel body as C++")
    src = workdir / f"src_{tag}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "kernel_header.inc").write_text(f"#define MOE_QUANTIZED {defines['MOE_QUANTIZED']}\n" + header)
    (src / "kernel_body.inc").write_text(body)
    cmd = [compiler(), "-std=c++20", "-O0", "-pthread", "-Wall", "-Werror", "-Wno-unused-variable",
           f"-I{src}", f"-I{HERE}", *(f"-D{k}={v}" for k, v in defines.items() if k != "MOE_QUANTIZED"),
           str(HERE / "harness.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"g++ failed on the kernel body:\n{proc.stderr[-4000:]}")
    return exe


def run_kernel_on_cpu(lin, x: mx.array, rows: mx.array, experts: mx.array, workdir: Path,
                      timeout: float = 120.0) -> np.ndarray:
    """moe_union.union_matmul(lin, x, rows, experts) computed by the kernel body on the CPU -> float32 [P, N]
    (without the layer's bias, which the wrapper adds in MLX ops)."""
    quantized = isinstance(lin, QuantizedSwitchLinear)
    P, K, N = experts.size, lin.input_dims, lin.output_dims
    scale_dtype = lin.scales.dtype if quantized else mx.float32
    defines = dict(CFG_T=CPP_TYPES[x.dtype], CFG_X=CPP_TYPES[x.dtype], CFG_W=CPP_TYPES[lin.weight.dtype],
                   CFG_S=CPP_TYPES[scale_dtype], CFG_K=K, CFG_N=N, CFG_P=P, CFG_BITS=lin.bits if quantized else 0,
                   CFG_GS=lin.group_size if quantized else 0, CFG_SIMDS=moe_union.SIMDS, CFG_COLS=moe_union.COLS,
                   CFG_MAX_ROWS=moe_union.MAX_ROWS, MOE_QUANTIZED=int(quantized))
    workdir.mkdir(parents=True, exist_ok=True)
    exe = build(defines, workdir)
    data = workdir / f"data_{exe.name}"
    data.mkdir(exist_ok=True)
    arrays = dict(x=x, rows=rows.astype(mx.uint32), experts=experts.astype(mx.uint32), w=lin.weight)
    if quantized:
        arrays.update(scales=lin.scales, biases=lin["biases"])
    for name in ("scales", "biases"):
        (data / f"{name}.bin").write_bytes(b"")
    for name, a in arrays.items():
        (data / f"{name}.bin").write_bytes(_raw(a))
    try:
        subprocess.run([str(exe), str(data)], check=True, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the kernel body did not finish in {timeout:.0f} s on the CPU (a lane of a simdgroup "
                           "skipped a simd_sum the others reached?)") from None
    return np.fromfile(data / "out.bin", dtype=np.float32).reshape(P, N)
