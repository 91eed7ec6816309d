#!/usr/bin/env python
"""Verify cost over the union of experts (issue #10): cost(m)/cost(1) for m = 1..8 tokens with the stock MoE path
(mlx-lm's per-pair gather_mm / gather_qmm) and the union path (moe_dispatch: the Metal kernel where it runs, else
the reference in MLX ops), next to the bytes bound (dense weights once + the union of experts actually routed) and
the number of unique experts per MoE layer.

Two levels, both with random weights (float32 by default: on Linux only float32 goes through BLAS):
- one MoE layer (SwitchGLU) of the stand-in's proportions, routed by a random softmax router;
- a whole stand-in model built by the family code: DeepSeek-V3 proportions (MLA, 64 experts, top-8, group-limited
  routing, shared expert) and Qwen3.5-MoE proportions (Gated DeltaNet + attention layers, 128 experts, top-10,
  gated shared expert), two MoE layers each, a verify pass of m random tokens over a 64-token cache.
Every cost(m) is a median over repeats with fresh tokens each time (so the experts read are not the ones cached by
the last call); stock and union alternate within each repeat; ratios are against the stock 1-token step measured in
the same run (what plain decoding costs). On a Mac the same script is the measurement users send back.

    python benchmarks/bench_moe_verify.py                     # both stand-ins, layer and model, m = 1..8
    python benchmarks/bench_moe_verify.py --repeats 15 --out moe_verify.json --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
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
from mlxmtp.doctor import verify_curve
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
    tokens of real text route alike, which is where reading the union pays)."""
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
    for r in range(repeats + 1):  # the first sweep warms up
        for m in range(1, max_m + 1):
            x = (rho**0.5 * mx.random.normal((1, 1, D)) + (1 - rho) ** 0.5 * mx.random.normal((1, m, D))).astype(dtype)
            inds, _ = softmax_topk(router(x.astype(mx.float32)), k, True)
            mx.eval(x, inds)
            for mode in (MODES if r % 2 else MODES[::-1]):
                with moe_dispatch.dispatch_mode(mode):
                    t = timed(lambda: glu(x, inds))
                if r:
                    times[mode, m].append(t)
            if r:
                unique[m].append(moe_dispatch.union_stats(np.array(inds).reshape(m, k))[0])
    base = statistics.median(times["stock", 1])
    rows = []
    for m in range(1, max_m + 1):
        u = float(np.mean(unique[m]))
        rows.append({"m": m, "unique_experts": u, "bytes_bound": u / k,
                     **{mode: statistics.median(times[mode, m]) / base for mode in MODES}})
    return {"experts": E, "top_k": k, "rho": rho, "expert_bytes": expert_bytes, "stock_1_ms": base * 1e3, "rows": rows}


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


def print_table(title: str, res: dict) -> None:
    print(f"\n{title}  (stock 1-token step {res['stock_1_ms']:.2f} ms)")
    print(f"{'m':>2} {'experts':>8} {'bytes bound':>11} {'stock':>7} {'union':>7} {'stock/bound':>11} {'union/bound':>11}")
    for r in res["rows"]:
        print(f"{r['m']:>2} {r['unique_experts']:>8.1f} {r['bytes_bound']:>11.2f} {r['stock']:>7.2f} {r['union']:>7.2f}"
              f" {r['stock'] / r['bytes_bound']:>11.2f} {r['union'] / r['bytes_bound']:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stand-ins", default=",".join(STAND_INS), help=f"comma-separated: {', '.join(STAND_INS)}")
    ap.add_argument("--max-m", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rho", default="0,0.7", help="layer level: shared component of the m hidden states (0 = "
                                                   "independent routing), comma-separated")
    ap.add_argument("--no-model", action="store_true", help="only the single-layer measurement")
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
