#!/usr/bin/env python
"""The CPU back end's fused norms and rope (models/layers.py, FUSE_FALLBACKS) against the plain calls, paired.

On MLX's CPU back end mx.fast.rms_norm and mx.fast.rope expand into fallback graphs of small ops; the model layers
compile them there. This times, in one process and interleaved block by block, greedy plain decoding (steps queued
with async_eval, as decode does) and a verify pass of 4 rows, with FUSE_FALLBACKS on and off, on the bundled demo
model (DeepSeek-V3 layers) and bench_overhead's stand-ins (Qwen3.5 layers, V = 151,936), and counts the graph
nodes of one decode step. The ratio is the median of the paired per-block ratios (fused / plain).

    python benchmarks/bench_fused_norms.py --out bench_fused_norms.json
    python benchmarks/bench_fused_norms.py --models demo,small,qwen27b --blocks 11
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)
import mlx.core as mx

from mlxmtp.cache import cache_arrays, copy_caches
from mlxmtp.loading import load
from mlxmtp.models import layers

sys.path.insert(0, str(Path(__file__).parent))
import bench_overhead  # noqa: E402


def nodes(y: mx.array) -> int:
    """Primitive nodes of y's graph (mx.export_to_dot's rectangles)."""
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, y)
        return len(re.findall(r"shape=rectangle", Path(f.name).read_text()))


def measure(model, steps: int, blocks: int) -> dict:
    """Per decode step and per verify pass (seconds), fused and plain, each block on a copy of a 199-token cache."""
    prompt_cache = model.make_cache()
    mx.eval(model(mx.array([list(range(1, 200))]), prompt_cache))
    tok = mx.array([[7]])

    def decode(cache):
        y = tok
        for _ in range(steps):
            y = mx.argmax(model(y, cache)[:, -1:], axis=-1)
            mx.async_eval(y)
        mx.eval(y)

    def verify(cache):
        for _ in range(steps // 4):  # each pass continues the last: 4 more positions
            mx.eval(model(mx.array([[7, 8, 9, 10]]), cache))

    out = {}
    for fused in (False, True):
        layers.FUSE_FALLBACKS = fused
        out[f"nodes {'fused' if fused else 'plain'}"] = nodes(model(tok, copy_caches(prompt_cache)))
        decode(copy_caches(prompt_cache)), verify(copy_caches(prompt_cache))  # traces and warm-up
    for name, fn, per in (("decode step", decode, steps), ("verify pass of 4", verify, steps // 4)):
        t = {False: [], True: []}
        for b in range(blocks):
            for fused in ((False, True) if b % 2 else (True, False)):  # either order as often
                layers.FUSE_FALLBACKS = fused
                cache = copy_caches(prompt_cache)
                mx.eval(cache_arrays(cache))
                t0 = time.perf_counter()
                fn(cache)
                t[fused].append((time.perf_counter() - t0) / per)
        out[name] = {"plain ms": 1e3 * statistics.median(t[False]), "fused ms": 1e3 * statistics.median(t[True]),
                     "fused / plain": statistics.median(f / p for f, p in zip(t[True], t[False]))}
    layers.FUSE_FALLBACKS = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,small")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per block (verify: a quarter as many passes)")
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--out", default="bench_fused_norms.json")
    a = ap.parse_args()
    results = {}
    for name in a.models.split(","):
        model = load()[0] if name == "demo" else bench_overhead.build(name)
        r = results[name] = measure(model, a.steps, a.blocks)
        print(f"{name}: graph nodes of a decode step {r['nodes plain']} -> {r['nodes fused']}")
        for key in ("decode step", "verify pass of 4"):
            v = r[key]
            print(f"  {key:18s} plain {v['plain ms']:7.3f} ms  fused {v['fused ms']:7.3f} ms  "
                  f"fused / plain {v['fused / plain']:.3f}")
        del model
    Path(a.out).write_text(json.dumps({"device": str(mx.default_device()), "steps": a.steps, "blocks": a.blocks,
                                       "models": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
