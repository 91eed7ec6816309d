"""The union kernel's own logic, off a Mac: moe_union.metal's body compiled as C++ and run over its whole grid
(lanes as threads, simd_sum a real reduction; mlxmtp/metal_kernels/logic_check.py), against the reference
(mlx-lm's per-pair gather_mm / gather_qmm), for every weight format the kernel takes; then the wrapper and the
self-check driven with that CPU twin standing in for the Metal launch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlxmtp.metal_kernels import logic_check, moe_union
from mlxmtp.models import moe_dispatch
from mlxmtp.models.layers import SwitchGLU

E = 8


def routing(kind: str, m: int, k: int, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    if kind == "random":
        inds = np.stack([rng.permutation(E)[:k] for _ in range(m)])
    elif kind == "same":  # every token on the same k experts: segments of m rows (m > MAX_ROWS loops)
        inds = np.tile(rng.permutation(E)[:k], (m, 1))
    else:  # "distinct": no expert shared between tokens
        assert m * k <= E
        inds = rng.permutation(E)[: m * k].reshape(m, k)
    return mx.array(inds.astype(np.uint32))


def layer(fmt: str, K: int, N: int):
    mx.random.seed(1)
    lin = SwitchLinear(K, N, E, bias=False)
    if fmt.startswith("q"):
        bits, gs = (int(v) for v in fmt[1:].split("/"))
        return lin.to_quantized(group_size=gs, bits=bits)
    lin.weight = lin.weight.astype(getattr(mx, fmt))
    return lin


CASES = [  # (format, x dtype, K, N, routing, tokens, top-k)
    ("float32", mx.float32, 264, 44, "random", 6, 3),  # K not a multiple of 256, partial output tile
    ("float32", mx.float32, 64, 40, "same", 20, 2),  # a segment longer than MAX_ROWS
    ("float32", mx.float32, 64, 16, "distinct", 4, 2),  # every token on other experts
    ("float16", mx.float16, 128, 24, "random", 5, 2),
    ("bfloat16", mx.bfloat16, 128, 24, "random", 5, 2),
    ("q4/32", mx.float32, 128, 36, "random", 7, 3),
    ("q8/64", mx.bfloat16, 128, 24, "random", 3, 2),
    ("q2/32", mx.float32, 64, 16, "same", 4, 2),
]


@pytest.mark.parametrize("fmt,dtype,K,N,kind,m,k", CASES)
def test_kernel_body_matches_reference(fmt, dtype, K, N, kind, m, k, tmp_path_factory):
    lin = layer(fmt, K, N)
    if fmt.startswith("q"):
        lin.scales, lin.biases = lin.scales.astype(dtype), lin.biases.astype(dtype)
    x = mx.random.normal((m, K), key=mx.random.key(2)).astype(dtype)
    _, rows, experts = moe_union.sorted_slots(routing(kind, m, k))
    got = logic_check.run_kernel_on_cpu(lin, x, rows, experts, tmp_path_factory.getbasetemp() / "kernels")
    if fmt in ("float16", "bfloat16"):  # the CPU's gather_mm is float32-only: the same values upcast, then rounded
        lin32 = SwitchLinear(K, N, E, bias=False)
        lin32.weight = lin.weight.astype(mx.float32)
        ref = moe_union.reference_matmul(lin32, x.astype(mx.float32), rows, experts).astype(dtype)
    else:
        ref = moe_union.reference_matmul(lin, x, rows, experts)
    ref = np.array(ref.astype(mx.float32))
    tol = moe_union.TOLERANCE[dtype] * max(1.0, np.abs(ref).max())
    assert np.abs(got - ref).max() <= tol, (fmt, np.abs(got - ref).max(), tol)
    if dtype == mx.float32:
        assert np.abs(got - ref).max() <= 1e-5


def test_corrupted_body_is_caught(tmp_path, monkeypatch):
    """The check can fail: a body that drops the last value of every chunk of 8 differs from the reference."""
    src = moe_union.SOURCE.read_text().replace("for (uint i = 0; i < 8; i++) {\n            s +=",
                                               "for (uint i = 0; i < 7; i++) {\n            s +=")
    assert src != moe_union.SOURCE.read_text()
    bad = tmp_path / "bad.metal"
    bad.write_text(src)
    monkeypatch.setattr(moe_union, "SOURCE", bad)
    lin = layer("float32", 64, 16)
    x = mx.random.normal((3, 64), key=mx.random.key(3))
    _, rows, experts = moe_union.sorted_slots(routing("random", 3, 2))
    got = logic_check.run_kernel_on_cpu(lin, x, rows, experts, tmp_path / "kernels")
    ref = np.array(moe_union.reference_matmul(lin, x, rows, experts))
    assert np.abs(got - ref).max() > 1e-3


@pytest.fixture
def cpu_kernel(monkeypatch, tmp_path):
    """Pretend Metal is there and let the C++ twin of the kernel run each launch."""

    def union_matmul(lin, x, rows, experts):
        out = mx.array(logic_check.run_kernel_on_cpu(lin, x, rows, experts, tmp_path / "kernels")).astype(x.dtype)
        return out + lin["bias"][experts] if "bias" in lin else out

    monkeypatch.setattr(moe_union, "metal_available", lambda: True)
    monkeypatch.setattr(moe_union, "union_matmul", union_matmul)
    monkeypatch.setattr(moe_union, "_verdicts", {})
    return union_matmul


def test_wrapper_and_self_check_with_cpu_twin(cpu_kernel, capsys):
    """kernel_switch_glu's sort / three launches / unsort equal the per-pair path; the self-check passes, silently."""
    mx.random.seed(4)
    glu = SwitchGLU(64, 24, E)
    x = mx.random.normal((1, 5, 64))
    inds = routing("random", 5, 2)[None]
    with moe_dispatch.dispatch_mode("stock"):
        want = glu(x, inds)
    with moe_dispatch.dispatch_mode("union"):
        got = glu(x, inds)  # goes through kernel_enabled -> self-check -> kernel_switch_glu
    assert moe_union._verdicts == {moe_union._signature(glu): True}
    assert mx.abs(got - want).max().item() <= 1e-5
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", ["compile", "wrong"])
def test_self_check_failure_falls_back_with_one_line(monkeypatch, capsys, failure):
    def broken(lin, x, rows, experts):
        if failure == "compile":
            raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: ...")
        return moe_union.reference_matmul(lin, x, rows, experts) * 1.01

    monkeypatch.setattr(moe_union, "metal_available", lambda: True)
    monkeypatch.setattr(moe_union, "union_matmul", broken)
    monkeypatch.setattr(moe_union, "_verdicts", {})
    glu = SwitchGLU(64, 24, E)
    x = mx.random.normal((1, 3, 64))
    inds = routing("random", 3, 2)[None]
    with moe_dispatch.dispatch_mode("stock"):
        want = glu(x, inds)
    with moe_dispatch.dispatch_mode("union"):
        got, again = glu(x, inds), glu(x, inds)
    # the reference union path: one GEMM per expert instead of one per pair, equal to rounding
    assert mx.abs(got - want).max().item() <= 1e-6 and mx.array_equal(got, again)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "self-check failed" in err[0] and "using MLX ops instead" in err[0], err


def test_linux_never_enables_the_kernel():
    assert not moe_union.metal_available()
    assert not moe_union.kernel_enabled(SwitchGLU(64, 24, E))
