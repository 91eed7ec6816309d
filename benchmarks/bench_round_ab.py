#!/usr/bin/env python
"""One engine switch on and off, round by round in one process: the CPU's fused norms and rope
(layers.FUSE_FALLBACKS) or the MoE union path against auto's choice (moe_dispatch).

Whole-generation pairs on a shared 2-core machine move by +-5% between two runs of the same code; here two
generations decode the same prompt greedily with the switch on and off, their rounds interleaved (each pair of
rounds under the same load, the order alternating), and the result is the median of the paired per-token time
ratios (on / off), over several restarts of the pair.

    python benchmarks/bench_round_ab.py --switch fused --k 0,1
    python benchmarks/bench_round_ab.py --switch union --k 1,3 --out bench_round_ab.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)

from mlxmtp.loading import load
from mlxmtp.models import layers, moe_dispatch
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import decode

SWITCHES = {
    "fused": lambda on: setattr(layers, "FUSE_FALLBACKS", on),
    "union": lambda on: moe_dispatch.set_dispatch_mode("union" if on else "auto"),
}


def paired(model, prompt: list, k: int, switch, restarts: int, rounds: int) -> dict:
    times = {True: [], False: []}
    for _ in range(restarts):
        gens = {on: decode(model, prompt, SamplingParams(), draft_tokens=k) for on in (True, False)}
        for i in range(4 + rounds):  # the prefill and 3 rounds of warm-up
            for on in ((True, False) if i % 2 else (False, True)):
                switch(on)
                t0 = time.perf_counter()
                n = len(next(gens[on]))
                if i >= 4:
                    times[on].append((time.perf_counter() - t0) / n)
    return {"off ms per token": 1e3 * statistics.median(times[False]),
            "on ms per token": 1e3 * statistics.median(times[True]),
            "on / off": statistics.median(a / b for a, b in zip(times[True], times[False]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    ap.add_argument("--model", default=None, help="a checkpoint (default: the bundled demo model)")
    ap.add_argument("--k", default="0,1,3", help="draft depths, comma-separated")
    ap.add_argument("--restarts", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default="bench_round_ab.json")
    a = ap.parse_args()
    model, tokenizer = load(a.model)[:2]
    prompt = tokenizer.encode("import os\nimport sys\nfrom typing import")
    results = {}
    for k in (int(v) for v in a.k.split(",")):
        r = results[f"k={k}"] = paired(model, prompt, k, SWITCHES[a.switch], a.restarts, a.rounds)
        print(f"{a.switch} k={k}: off {r['off ms per token']:.3f} ms/token, on {r['on ms per token']:.3f}; "
              f"on / off (paired median) {r['on / off']:.3f}")
    Path(a.out).write_text(json.dumps({"switch": a.switch, "restarts": a.restarts, "rounds": a.rounds,
                                       "results": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
