"""`mlxmtp doctor`: what this machine runs and how well, as text to paste into a bug report (or JSON).

- the machine: platform, MLX version and default device, Metal, the BLAS of MLX's CPU back end;
- each custom kernel (mlxmtp/metal_kernels/): its self-check against the reference on this machine (pass / fail,
  max difference, tolerance) and its time against the reference union path, the sync-free sorted path (what a GPU
  uses where the kernel does not run) and stock gather_(q)mm;
  without Metal the kernel is reported unavailable and only the reference and stock paths are measured;
- with a model: the verify cost curve cost(m)/cost(1), m = 1..8, of the dispatch this machine uses, beside the
  bytes bound of each m (dense weights once + the union of the experts the m tokens actually routed to).
"""

from __future__ import annotations

import os
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .bench import WeightTraffic, machine_info
from .cache import rollback
from .metal_kernels import moe_union
from .models import moe_dispatch
from .models.layers import SwitchGLU

# the layer every kernel check uses: small enough to check in a second on a CPU (100 MB in float32), a verify batch
# of CHECK_TOKENS tokens at top-4; the self-check before real use runs on the model's own layers (moe_union)
CHECK_SHAPE = dict(hidden=1024, intermediate=512, experts=16, top_k=4)
FORMATS = ("float32", "float16", "bfloat16", "q4", "q8")


def _median_ms(fn, repeats: int) -> float:
    mx.eval(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _check_layer(fmt: str) -> SwitchGLU:
    s = CHECK_SHAPE
    mx.random.seed(0)
    glu = SwitchGLU(s["hidden"], s["intermediate"], s["experts"])
    if fmt.startswith("q"):
        nn.quantize(glu, group_size=64, bits=int(fmt[1:]))
    else:
        glu.set_dtype(getattr(mx, fmt))
    mx.eval(glu.parameters())
    return glu


def kernel_report(repeats: int = 10) -> list[dict]:
    """Per weight format: the self-check (Metal only) and times of kernel / reference union / stock."""
    s = CHECK_SHAPE
    metal = moe_union.metal_available()
    out = []
    for fmt in FORMATS:
        dtype = mx.float32 if fmt.startswith("q") or fmt == "float32" else getattr(mx, fmt)
        row = {"kernel": "moe_union", "format": fmt, "shape": dict(s, tokens=moe_union.CHECK_TOKENS)}
        if not metal and dtype != mx.float32:
            row.update(status="not measured", note="MLX's CPU gather_mm is float32-only")
            out.append(row)
            continue
        glu = _check_layer(fmt)
        x = mx.random.normal((1, moe_union.CHECK_TOKENS, s["hidden"]), key=mx.random.key(1)).astype(dtype)
        inds = mx.argsort(mx.random.uniform(shape=(1, moe_union.CHECK_TOKENS, s["experts"]), key=mx.random.key(2)),
                          axis=-1)[..., : s["top_k"]]
        stock = lambda: switch_glu_stock(glu, x, inds)  # noqa: E731
        row["stock_ms"] = _median_ms(stock, repeats)
        row["reference_ms"] = _median_ms(lambda: moe_dispatch.union_switch_glu(glu, x, inds), repeats)
        row["sorted_ms"] = _median_ms(lambda: moe_dispatch.sorted_switch_glu(glu, x, inds), repeats)
        if metal:
            checks = moe_union.check_switch_glu(glu, dtype)
            failed = [c for c in checks if not c.passed]
            row.update(status="fail" if failed else "pass",
                       max_diff=max(c.max_diff for c in checks), tolerance=min(c.tolerance for c in checks))
            if failed:
                row["error"] = failed[0].error or f"{failed[0].name}: max difference above tolerance"
            else:
                row["kernel_ms"] = _median_ms(lambda: moe_union.kernel_switch_glu(glu, x, inds), repeats)
        else:
            with moe_dispatch.dispatch_mode("auto"):
                path = moe_dispatch.choose_path(glu, moe_union.CHECK_TOKENS)
            row.update(status="unavailable", note=f"no Metal (MLX CPU back end): auto takes the {path} path here")
        out.append(row)
    return out


def switch_glu_stock(glu, x, inds):
    with moe_dispatch.dispatch_mode("stock"):
        return glu(x, inds)


def cost_ratios(times: dict, modes, max_m: int) -> tuple[float, list[dict]]:
    """times[mode, m]: costs in seconds -> (the first mode's median 1-token cost, rows per m). A row has, per mode,
    its median cost over that base, the p25 / p75 of its costs over it, and "<mode>/1": its median over the mode's
    own median 1-token cost."""
    base = statistics.median(times[modes[0], 1])
    rows = []
    for m in range(1, max_m + 1):
        row = {"m": m}
        for mode in modes:
            ts = times[mode, m]
            q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
            row.update({mode: statistics.median(ts) / base, f"{mode}_p25": q[0] / base, f"{mode}_p75": q[2] / base,
                        f"{mode}/1": statistics.median(ts) / statistics.median(times[mode, 1])})
        rows.append(row)
    return base, rows


def verify_curve(model, max_m: int = 8, repeats: int = 5, modes=("auto",), context: int = 64, seed: int = 0) -> dict:
    """cost(m)/cost(1) of a verify pass of m random tokens over a `context`-token cache, per dispatch mode (ratios
    against the first mode's 1-token pass, modes alternating within each repeat), next to the bytes bound and the
    unique experts per MoE layer (counted on an extra pass outside the timing)."""
    traffic = WeightTraffic(model)
    rng = np.random.default_rng(seed)
    vocab = min(getattr(model.args, "vocab_size", 256), 1 << 30)
    cache = model.make_cache()
    mx.eval(model(mx.array(rng.integers(0, vocab, (1, context))), cache))
    times = {(mode, m): [] for mode in modes for m in range(1, max_m + 1)}
    read = {m: [] for m in range(1, max_m + 1)}
    unique = {m: [] for m in range(1, max_m + 1)}
    load = os.getloadavg()[0]
    for r in range(repeats + 1):  # the first sweep warms up
        for m in range(1, max_m + 1):
            tokens = mx.array(rng.integers(0, vocab, (1, m)))  # fresh tokens: other experts than the last pass's
            for mode in (modes if r % 2 else modes[::-1]):
                with moe_dispatch.dispatch_mode(mode):
                    t0 = time.perf_counter()
                    mx.eval(model(tokens, cache))
                    t = time.perf_counter() - t0
                rollback(cache, m)
                if r:
                    times[mode, m].append(t)
            if r:  # the same pass once more, counted (outside the timing)
                with traffic:
                    mx.eval(model(tokens, cache))
                    s = traffic.summary(m)
                rollback(cache, m)
                read[m].append(s["verify_weight_bytes"])
                unique[m].append(s["experts_per_moe_layer_pass"])
    base, rows = cost_ratios(times, modes, max_m)
    b1 = float(np.mean(read[1]))
    for row in rows:
        u = [v for v in unique[row["m"]] if v is not None]
        row.update(bytes_bound=float(np.mean(read[row["m"]])) / b1, unique_experts=float(np.mean(u)) if u else None)
    return {"one_token_ms": base * 1e3, "weight_bytes_1_token": b1, "modes": list(modes), "rows": rows,
            "load_average": [load, os.getloadavg()[0]]}


def report(model=None, model_path=None, max_m: int = 8, repeats: int = 5) -> dict:
    info = machine_info()
    info["metal"] = bool(mx.metal.is_available())
    if info["metal"]:
        info["metal_device"] = {k: v for k, v in mx.metal.device_info().items() if isinstance(v, (str, int, float))}
    out = {"machine": info, "moe_dispatch": moe_dispatch.get_dispatch_mode(), "kernels": kernel_report()}
    if model is not None:
        modes = ("auto", "stock") if moe_dispatch.get_dispatch_mode() == "auto" else (moe_dispatch.get_dispatch_mode(),)
        out["model"] = {"path": str(model_path), **verify_curve(model, max_m, repeats, modes)}
    return out


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"mlxmtp {m['mlxmtp']}  mlx {m['mlx']}  mlx-lm {m['mlx_lm']}  python {m['python']}",
             f"machine   {m['platform']} ({m['machine']}, {m['cpu_count']} CPUs)",
             f"device    {m['device']}",
             f"Metal     {'available' if m['metal'] else 'not available'}"
             + (f" ({m['metal_device'].get('architecture', '')})" if m.get("metal_device") else ""),
             f"BLAS      {m['blas']}",
             f"MoE dispatch mode: {r['moe_dispatch']}", "", "kernel self-checks (one MoE layer "
             + ", ".join(f"{k} {v}" for k, v in r["kernels"][0]["shape"].items()) + "):"]
    for k in r["kernels"]:
        head = f"  {k['kernel']:<10} {k['format']:<9} {k['status']}"
        if k["status"] in ("pass", "fail"):
            head += f"  max diff {k['max_diff']:.2e} (tolerance {k['tolerance']:.2e})"
        times = [f"{name} {k[key]:.3f} ms" for name, key in (("kernel", "kernel_ms"), ("reference union",
                 "reference_ms"), ("sorted", "sorted_ms"), ("stock gather", "stock_ms")) if key in k]
        lines.append(head + ("  | " + ", ".join(times) if times else "") + (f"  [{k['note']}]" if "note" in k else "")
                     + (f"  error: {k['error']}" if "error" in k else ""))
    if "model" in r:
        c = r["model"]
        lines += ["", f"verify cost curve of {c['path']} (1-token pass {c['one_token_ms']:.2f} ms; ratios against "
                      f"it; bytes bound = weights read, dense once + union of routed experts):",
                  "   m  bytes bound  experts/layer  " + "  ".join(f"{mode:>7}" for mode in c["modes"])]
        for row in c["rows"]:
            u = "-" if row["unique_experts"] is None else f"{row['unique_experts']:.1f}"
            lines.append(f"  {row['m']:>2}  {row['bytes_bound']:>11.2f}  {u:>13}  "
                         + "  ".join(f"{row[mode]:>7.2f}" for mode in c["modes"]))
    if not m["metal"]:
        lines += ["", "not checked here: the Metal kernel itself (needs a Mac); its logic is tested off-Mac by "
                      "tests/test_metal_kernel_logic.py (the body compiled as C++)"]
    return "\n".join(lines)
