#!/usr/bin/env python
"""This checkout's sampler against the sampler of an earlier revision, round by round in one process.

bench_overhead.py's host overhead is a difference of two medians taken in separate blocks of rounds; on a shared
2-core machine it moves by +-0.5 ms from run to run, more than a sampler change is worth. Here two generations
decode the same prompt on the same stand-in (bench_overhead's "small", or "qwen27b" with --model; V = 151,936), one
with this checkout's ``Sampler`` and one with ``mlxmtp/sampling.py`` as it was at REV (loaded from git), their
rounds interleaved: each pair of rounds runs under the same load, and the median of the paired differences of host
time (the calling thread's CPU time, as in bench_overhead) is the change. Random weights accept almost no drafts,
so a round with k > 0 is one rejection: p at the first draft, the residual, a draw.

    python benchmarks/bench_sampler_ab.py --rev 240eba2 --rounds 60 --out bench_sampler_ab.json
    python benchmarks/bench_sampler_ab.py --rev 240eba2 --model qwen27b --max-k 1 --rounds 30
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)
import numpy as np

from mlxmtp import sampling, speculative

sys.path.insert(0, str(Path(__file__).parent))
import bench_overhead  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sampler_at(rev: str):
    """mlxmtp/sampling.py at git revision rev, as a module of its own."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mlxmtp/sampling.py"], capture_output=True,
                         text=True)
    if src.returncode:
        sys.exit(f"error: no mlxmtp/sampling.py at {rev}: {src.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "sampling_at_rev.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("sampling_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def paired_rounds(model, prompt, params, k, rounds, modules) -> dict:
    gens, host = {}, {name: [] for name in modules}
    for name, module in modules.items():
        sampler = module.Sampler(module.SamplingParams(params.temperature, params.top_p, params.top_k), seed=0,
                                 backend="numpy")
        gens[name] = speculative.decode(model, prompt, params, draft_tokens=k, sampler=sampler)
        for _ in range(4):  # the prefill and warm-up rounds
            next(gens[name])
    for i in range(rounds):
        for name in (list(modules) if i % 2 else list(modules)[::-1]):
            h0 = time.thread_time()
            next(gens[name])
            host[name].append((time.thread_time() - h0) * 1e3)
    for g in gens.values():
        g.close()
    a, b = host.values()
    return {**{f"{name}_host_ms": statistics.median(h) for name, h in host.items()},
            "paired_diff_ms": statistics.median(x - y for x, y in zip(a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the git revision whose sampler is the baseline")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--max-k", type=int, default=2)
    ap.add_argument("--model", default="small", choices=list(bench_overhead.MODELS), help="bench_overhead's stand-in")
    ap.add_argument("--out", type=Path, default=Path("bench_sampler_ab.json"))
    args = ap.parse_args()
    modules = {"this": sampling, args.rev: sampler_at(args.rev)}
    model = bench_overhead.build(args.model)
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, bench_overhead.VOCAB, 32)]
    rows = []
    print(f"host ms per round (median), this checkout vs {args.rev}, paired rounds")
    for sname, params in list(bench_overhead.SETTINGS.items())[1:]:
        for k in range(args.max_k + 1):
            r = {"setting": sname, "k": k, **paired_rounds(model, prompt, params, k, args.rounds, modules)}
            rows.append(r)
            print(f"{sname:22s} k={k}  this {r['this_host_ms']:6.2f}  {args.rev} {r[f'{args.rev}_host_ms']:6.2f}  "
                  f"paired difference {r['paired_diff_ms']:+6.2f}")
    args.out.write_text(json.dumps({"vocab": bench_overhead.VOCAB, "model": args.model, "rev": args.rev,
                                    "rounds": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
