#!/usr/bin/env python
"""Verify cost over the union of experts (issue #10): cost(m)/cost(1) for m = 1..8 tokens with the stock MoE path
(mlx-lm's per-pair gather_mm / gather_qmm) and the union path (moe_dispatch: the Metal kernel where it runs, else
the reference in MLX ops), next to the bytes bound and the number of unique experts per MoE layer.

Two levels, both with random weights (float32 by default: on Linux only float32 goes through BLAS):
- one MoE layer (SwitchGLU) of the stand-in's proportions, routed by a random softmax router;
- a whole stand-in model built by the family code: DeepSeek-V3 proportions (MLA, 64 experts, top-8, group-limited
  routing, shared expert) and Qwen3.5-MoE proportions (Gated DeltaNet + attention layers, 128 experts, top-10,
  gated shared expert), two MoE layers each, a verify pass of m random tokens over a 64-token cache.

The cost model behind the bytes bound: a pass is memory-bound, its cost proportional to the weight bytes it reads,
each weight read once per pass. One MoE layer: bound(m) = U(m) / k, U(m) the unique experts its m tokens route to
(a 1-token step reads k experts). Whole model: bound(m) = (dense + sum over MoE layers of U_l(m) e_l) / (dense +
sum of k e_l), dense = every non-expert weight the pass reads (attention, dense MLPs, shared experts, routers,
norms, lm_head; the embedding reads m rows and is not counted), e_l one expert's bytes, U_l(m) counted per layer on
the pass itself (mlxmtp.bench.WeightTraffic). KV-cache and activation traffic and per-op overhead are left out:
the first two grow with m (so the bound is a floor), the last does not (it pulls measured ratios towards 1).

Columns: stock = stock cost(m) / stock cost(1), what plain decoding cost before the union path; union = union
cost(m) / stock cost(1); union/u1 = union cost(m) / union cost(1), the ratio MTP sees where the union path is also
the 1-token step (auto on the CPU back end with float experts); each over the bound, and the spread (p25-p75 of
cost(m) over the median cost(1)). Every cost(m) is a median over repeats with fresh tokens each time (so the experts
read are not the ones cached by the last call), the modes alternating within each repeat; the load average is
printed with each table. On a Mac the same script is the measurement users send back.

    python benchmarks/bench_moe_verify.py                     # both stand-ins, layer and model, m = 1..8
    python benchmarks/bench_moe_verify.py --repeats 15 --out moe_verify.json --dtype bfloat16
    python benchmarks/bench_moe_verify.py --gemm --no-model   # also: one expert's x @ W^T against W @ x^T
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from mlxmtp.bench import machine_info
from mlxmtp.doctor import cost_ratios, verify_curve
from mlxmtp.models import deepseek_v3, moe_dispatch, qwen3_next
from mlxmtp.models.layers import SwitchGLU, softmax_topk

# Experts of 12-25 MB in float32, so that the k experts of one token (100-200 MB) do not fit the CPU's last-level
# cache (32 MB here) and every expert read comes from memory, as on a GPU; smaller experts stay cached between the
# pairs of one pass on a CPU and the per-pair path looks cheaper than any bytes bound.
STAND_INS = {
    "deepseek_v3": (deepseek_v3, dict(  # 64 experts of 25 MB, top-8 of 8 groups, shared expert, MLA; 3 layers
        vocab_size=16384, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=3,
        num_attention_heads=16, n_shared_experts=1, n_routed_experts=64, routed_scaling_factor=2.5,
        kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64, n_group=8,
        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=1, max_position_embeddings=4096)),
    "qwen3_5_moe": (qwen3_next, dict(  # 128 experts of 12.6 MB, top-10, gated shared expert; a GDN + an attention layer
        vocab_size=16384, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=2,
        head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=64,
        linear_value_head_dim=64, num_experts=128, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, full_attention_interval=2)),
}
MODES = ("stock", "union")


def randomize(model: nn.Module, seed: int) -> None:
    """Random weights: matrices ~ N(0, 1/fan_in) (routers included, so routing spreads), vectors unchanged."""
    mx.random.seed(seed)

    def init(_, p):
        return p if p.ndim < 2 else mx.random.normal(p.shape) * p.shape[-1] ** -0.5

    model.update(tree_map_with_path(init, model.parameters()))


def timed(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def layer_bench(args_d: dict, dtype, max_m: int, repeats: int, seed: int, rho: float) -> dict:
    """One MoE layer; the m hidden states share a component of weight rho (rho = 0: independent routing; adjacent
    tokens of real text route alike, which is where reading the union pays). Each mode gets fresh tokens."""
    D, H = args_d["hidden_size"], args_d["moe_intermediate_size"]
    E = args_d.get("n_routed_experts") or args_d["num_experts"]
    k = args_d["num_experts_per_tok"]
    mx.random.seed(seed)
    glu, router = SwitchGLU(D, H, E), nn.Linear(D, E, bias=False)
    glu.update(tree_map_with_path(lambda _, p: (p * 1.0).astype(dtype), glu.parameters()))
    mx.eval(glu.parameters(), router.parameters())
    expert_bytes = sum(p.nbytes for _, p in tree_flatten(glu.parameters())) / E
    times = {(mode, m): [] for mode in MODES for m in range(1, max_m + 1)}
    unique = {m: [] for m in range(1, max_m + 1)}
    load = os.getloadavg()[0]
    for r in range(repeats + 1):  # the first sweep warms up
        for m in range(1, max_m + 1):
            for mode in (MODES if r % 2 else MODES[::-1]):
                x = (rho**0.5 * mx.random.normal((1, 1, D)) + (1 - rho) ** 0.5 * mx.random.normal((1, m, D)))
                inds, _ = softmax_topk(router(x), k, True)
                x = x.astype(dtype)
                mx.eval(x, inds)
                with moe_dispatch.dispatch_mode(mode):
                    t = timed(lambda: glu(x, inds))
                if r:
                    times[mode, m].append(t)
                    unique[m].append(moe_dispatch.union_stats(np.array(inds).reshape(m, k))[0])
    base, rows = cost_ratios(times, MODES, max_m)
    for row in rows:
        u = float(np.mean(unique[row["m"]]))
        row.update(unique_experts=u, bytes_bound=u / k)
    return {"experts": E, "top_k": k, "rho": rho, "expert_bytes": expert_bytes, "stock_1_ms": base * 1e3,
            "rows": rows, "load_average": [load, os.getloadavg()[0]]}


def model_bench(family, args_d: dict, dtype, max_m: int, repeats: int, seed: int) -> dict:
    model = family.Model(family.ModelArgs.from_dict(args_d), num_mtp=0)
    randomize(model, seed)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    model.config = {"torch_dtype": str(dtype).split(".")[-1]}  # what WeightTraffic reads the itemsize from
    res = verify_curve(model, max_m, repeats, modes=MODES, seed=seed)  # the curve `mlxmtp doctor -m` prints
    res["parameters"] = sum(p.size for _, p in tree_flatten(model.parameters()))
    res["stock_1_ms"] = res["one_token_ms"]
    return res


def sizes_bench(kib: list, dtype, max_m: int, repeats: int, seed: int) -> dict:
    """Where the CPU's choice between the union and the sorted path turns (moe_dispatch.UNION_CPU_BATCH_BYTES): a
    DeepSeek-V3 stand-in with experts of each projection size (KiB; hidden 512, 32 experts, top-4, 2 MoE layers),
    stock, union and sorted verify passes over m = 1..max_m, as cost(m) / stock cost(1)."""
    out = {}
    for size in kib:
        d = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
                 moe_intermediate_size=size * 1024 // (512 * dtype.size), n_shared_experts=1, n_routed_experts=32,
                 routed_scaling_factor=2.5, kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32, v_head_dim=64,
                 qk_nope_head_dim=64, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
                 max_position_embeddings=4096)
        model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(d), num_mtp=0)
        randomize(model, seed)
        model.set_dtype(dtype)
        mx.eval(model.parameters())
        model.config = {"torch_dtype": str(dtype).split(".")[-1]}
        res = out[f"{size} KiB"] = verify_curve(model, max_m, repeats, modes=("stock", "union", "sorted"), seed=seed)
        print(f"\nexpert projections of {size} KiB: stock 1-token pass {res['one_token_ms']:.2f} ms")
        print(f"{'m':>2} {'stock':>6} {'union':>6} {'sorted':>6}")
        for r in res["rows"]:
            print(f"{r['m']:>2} {r['stock']:>6.2f} {r['union']:>6.2f} {r['sorted']:>6.2f}")
        del model
    return out


def print_table(title: str, res: dict) -> None:
    r1 = res["rows"][0]
    print(f"\n{title}\n  stock 1-token step {res['stock_1_ms']:.2f} ms, union {res['stock_1_ms'] * r1['union']:.2f} ms; "
          f"load average {res['load_average'][0]:.1f} -> {res['load_average'][1]:.1f} (this machine: {os.cpu_count()} "
          "CPUs)")
    print(f"{'m':>2} {'experts':>7} {'bound':>6} {'stock':>6} {'union':>6} {'union/1':>7} {'stock/bd':>8} "
          f"{'union/bd':>8} {'union/1/bd':>10}  {'stock p25-p75':>13}  {'union p25-p75':>13}")
    for r in res["rows"]:
        b = r["bytes_bound"]
        print(f"{r['m']:>2} {r['unique_experts']:>7.1f} {b:>6.2f} {r['stock']:>6.2f} {r['union']:>6.2f} "
              f"{r['union/1']:>7.2f} {r['stock'] / b:>8.2f} {r['union'] / b:>8.2f} {r['union/1'] / b:>10.2f}  "
              f"{r['stock_p25']:>6.2f}-{r['stock_p75']:<6.2f}  {r['union_p25']:>6.2f}-{r['union_p75']:<6.2f}")


def gemm_bench(D: int, H: int, E: int, repeats: int) -> list[dict]:
    """One expert projection [H, D] in float32 at R = 1..4 rows: x @ W^T (mlx-lm's SwitchLinear, the stock path)
    against W @ x^T (the union path's float layout), a fresh (uncached) expert per call, the two interleaved."""
    mx.random.seed(0)
    W = mx.random.normal((E, H, D)) * D**-0.5
    mx.eval(W)
    zero = mx.array([0], mx.uint32)
    out = []
    for R in (1, 2, 3, 4):
        x = mx.random.normal((1, R, D))
        mx.eval(x)
        ts = {"x@W^T": [], "W@x^T": []}
        for i in range(2 * repeats + 2):
            e = mx.array([i % E], mx.uint32)
            f = ((lambda: mx.gather_mm(x, W.swapaxes(-1, -2), rhs_indices=e)) if i % 2 else
                 (lambda: mx.gather_mm(W, x.swapaxes(-1, -2), lhs_indices=e, rhs_indices=zero)))
            t = timed(f)
            if i >= 2:
                ts["x@W^T" if i % 2 else "W@x^T"].append(t)
        out.append({"rows": R, **{k: statistics.median(v) * 1e3 for k, v in ts.items()}})
    print(f"\none expert projection [{H} x {D}] float32, median ms over {repeats} (uncached experts)")
    for r in out:
        print(f"  R={r['rows']}  x@W^T {r['x@W^T']:.2f}  W@x^T {r['W@x^T']:.2f}  ratio {r['x@W^T'] / r['W@x^T']:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stand-ins", default=",".join(STAND_INS), help=f"comma-separated: {', '.join(STAND_INS)}")
    ap.add_argument("--max-m", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rho", default="0,0.7", help="layer level: shared component of the m hidden states (0 = "
                                                   "independent routing), comma-separated")
    ap.add_argument("--no-model", action="store_true", help="only the single-layer measurement")
    ap.add_argument("--gemm", action="store_true", help="also time one expert projection in both orientations")
    ap.add_argument("--sizes", help="instead: the union / sorted choice on the CPU, at these expert projection sizes "
                                     "(KiB, comma-separated; e.g. 96,1024,2048,4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_moe_verify.json"))
    a = ap.parse_args()
    names = [s.strip() for s in a.stand_ins.split(",") if s.strip()]
    bad = [n for n in names if n not in STAND_INS]
    if bad or not names or not 1 <= a.max_m <= moe_dispatch.UNION_MAX_TOKENS or a.repeats < 1:
        sys.exit(f"error: stand-ins must be among {', '.join(STAND_INS)}, --max-m in 1..{moe_dispatch.UNION_MAX_TOKENS}"
                 ", --repeats >= 1")
    dtype = getattr(mx, a.dtype)
    from mlxmtp.metal_kernels import moe_union

    report = {"machine": machine_info(), "dtype": a.dtype, "repeats": a.repeats,
              "union_path": "metal kernel" if moe_union.metal_available() else "reference (MLX ops)", "results": {}}
    print(f"union path: {report['union_path']}; BLAS: {report['machine'].get('blas')}; dtype {a.dtype}")
    if a.sizes:
        report["sizes"] = sizes_bench([int(v) for v in a.sizes.split(",")], dtype, a.max_m, a.repeats, a.seed)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {a.out}")
        return
    if a.gemm:
        d = STAND_INS[names[0]][1]
        report["gemm"] = gemm_bench(d["hidden_size"], d["moe_intermediate_size"],
                                    d.get("n_routed_experts") or d["num_experts"], 4 * a.repeats)
    for name in names:
        family, args_d = STAND_INS[name]
        res = {"layer": {}}
        for rho in (float(v) for v in a.rho.split(",")):
            lay = res["layer"][f"rho={rho:g}"] = layer_bench(args_d, dtype, a.max_m, a.repeats, a.seed, rho)
            print_table(f"{name}: one MoE layer ({lay['experts']} experts, top-{lay['top_k']}, rho {rho:g})", lay)
        if not a.no_model:
            res["model"] = model_bench(family, args_d, dtype, a.max_m, a.repeats, a.seed)
            print_table(f"{name}: whole stand-in model ({res['model']['parameters'] / 1e6:.0f}M parameters, "
                        "random tokens)",
                        res["model"])
        report["results"][name] = res
        a.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
