#!/usr/bin/env python
"""Engine overhead per decoding round: what a round costs beyond the passes it runs.

Stand-ins with random weights and a real vocabulary (151,936): "small" (Qwen3.5 architecture, hidden 256, 3 Gated
DeltaNet + 1 full-attention layer, one MTP layer) and "qwen27b" (Qwen3.5/3.6-27B's layer shapes: hidden 5120,
MLP 17408, 24 heads / 4 KV heads x 256, Gated DeltaNet 16 key / 48 value heads x 128; one full-attention trunk layer
and the MTP layer, tied embeddings, so that it fits in memory). For greedy, Qwen3's (T 0.7, top-p 0.8, top-k 20)
and DeepSeek-R1's (T 0.6, top-p 0.95) settings and k = 0..4 it reports, per round: the median round time
(speculative.decode, time between its yields), the sum of the isolated pass costs of that round (verify of k+1
tokens + k one-row MTP passes, each evaluated on its own), their difference (engine overhead), host
synchronisations and bytes copied to the host. Random weights accept almost no drafts, so every round drafts k
and verifies k + 1 rows: the structure of a round, not its payoff, is what is measured.

Host time is measured on its own as well: the calling thread's CPU time (time.thread_time) per round and per
isolated pass. MLX evaluates on its own worker threads, so this is the time the host spends building graphs,
dispatching them and running the engine's Python: on a Mac the part of a round the GPU waits for. The reference
is the bare round: the same passes built as one graph and evaluated once, with nothing of the engine (isolated
passes each pay an evaluation's fixed host cost, which a round pays once). Round minus bare round is the engine's
host overhead (its sampler's graphs, acceptance, bookkeeping); unlike the wall-time difference it hardly moves
with the load on the machine's cores, which makes the issue-8 target (1 ms + 0.2 ms per draft) checkable here.

    python benchmarks/bench_overhead.py --out bench_overhead.json             # small stand-in
    python benchmarks/bench_overhead.py --models small,qwen27b --rounds 8
    python benchmarks/bench_overhead.py --sampler-ops                          # the sampler's steps, paired
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
import numpy as np

from mlxmtp import sampling, speculative
from mlxmtp.cache import rollback
from mlxmtp.models import get_family
from mlxmtp.sampling import SamplingParams

VOCAB = 151_936
BASE = {"model_type": "qwen3_5_text", "vocab_size": VOCAB, "partial_rotary_factor": 0.25, "attn_output_gate": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        "linear_conv_kernel_dim": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "mtp_num_hidden_layers": 1, "tie_word_embeddings": True, "eos_token_id": 0}
MODELS = {
    "small": {**BASE, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "layer_types": ["linear_attention"] * 3 + ["full_attention"], "full_attention_interval": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
              "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64},
    "qwen27b": {**BASE, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 1,
                "layer_types": ["full_attention"], "full_attention_interval": 1, "num_attention_heads": 24,
                "num_key_value_heads": 4, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 48,
                "linear_key_head_dim": 128, "linear_value_head_dim": 128},
}
SETTINGS = {"greedy": SamplingParams(), "qwen3 T0.7 p0.8 k20": SamplingParams(0.7, 0.8, 20),
            "r1 T0.6 p0.95": SamplingParams(0.6, 0.95)}


def build(name: str):
    family = get_family("qwen3_5")
    model = family.Model(family.ModelArgs.from_dict(MODELS[name]), num_mtp=1)
    mx.eval(model.parameters())
    return model


def median_time(fn, repeats: int) -> tuple:
    """(median wall seconds, median host seconds: the calling thread's CPU time) of fn()."""
    fn()
    ts, hs = [], []
    for _ in range(repeats):
        t0, h0 = time.perf_counter(), time.thread_time()
        fn()
        ts.append(time.perf_counter() - t0)
        hs.append(time.thread_time() - h0)
    return statistics.median(ts), statistics.median(hs)


def pass_costs(model, prompt: list, max_k: int, repeats: int) -> dict:
    """Isolated costs, each (wall seconds, host seconds): a verify pass of m rows (trunk + head, evaluated) and a
    one-row MTP pass, on a cache holding the prompt; and ``bare``: a function running the bare round at depth k."""
    cache = model.make_cache()
    pre, post = model.trunk(mx.array([prompt]), cache)
    mx.eval(pre, post)
    toks = mx.array([prompt[: max_k + 1]])

    def verify(m):
        mx.eval(model.lm_head(model.trunk(toks[:, :m], cache)[1]))
        rollback(cache, m)

    mcache = model.make_mtp_cache()
    hidden = model.select_hidden(pre, post)
    mx.eval(model.mtp_forward(0, hidden[:, :-2], mx.array([prompt[1:-1]]), mcache[0]))

    def draft():
        mx.eval(model.mtp_forward(0, hidden[:, -1:], toks[:, :1], mcache[0]))
        rollback([mcache[0]], 1)

    def bare(k):
        """The passes of a greedy round at depth k and nothing else: k chained one-row MTP passes (each drafting
        its argmax), the verify pass over [t, d1..dk], one evaluation; then both caches rolled back."""
        h, tok, drafts = hidden[:, -1:], toks[:, :1], []
        for _ in range(k):
            h, logits = model.mtp_forward(0, h, tok, mcache[0])
            tok = mx.argmax(logits[:, -1:], axis=-1).astype(mx.int32)
            drafts.append(tok)
        mx.eval(model.lm_head(model.trunk(mx.concatenate([toks[:, :1]] + drafts, axis=1), cache)[1]))
        rollback(cache, k + 1)
        rollback([mcache[0]], k)

    return {"verify": [median_time(lambda: verify(m), repeats) for m in range(1, max_k + 2)],
            "draft": median_time(draft, repeats), "bare": bare}


def measure_rounds(model, prompt, settings: dict, k, rounds, bare, warmup=3, blocks=4) -> dict:
    """Median round time, host time, syncs and host bytes per round of each setting at draft depth k, and the same
    times of the bare round (``bare(k)``) under the key "bare". The settings and the bare round take turns in blocks
    of rounds, so that the load on a shared machine falls on all of them alike; before each block the device is
    drained (untimed) and the block's first round dropped, so that a pipelined setting's queued pass neither runs
    during another setting's block nor hides in this one's first round."""
    runs, timed = {}, {}  # timed[name]: (one round, its wall times, its host times)
    for name, params in settings.items():
        st = speculative.RoundStats()
        gen = speculative.decode(model, prompt, params, draft_tokens=k, seed=0, stats=st)
        for _ in range(1 + warmup):  # the prefill, then warm-up rounds
            next(gen)
        runs[name] = (st, gen, (st.target_forwards, st.syncs, st.host_bytes))
        timed[name] = (gen.__next__, [], [])
    timed["bare"] = (lambda: bare(k), [], [])
    per_block = -(-rounds // blocks)
    for _ in range(blocks):
        for fn, times, host in timed.values():
            mx.synchronize()
            fn()  # dropped: it may read a pass queued before the drain
            for _ in range(per_block):
                t0, h0 = time.perf_counter(), time.thread_time()
                fn()
                times.append(time.perf_counter() - t0)
                host.append(time.thread_time() - h0)
            mx.synchronize()
    out = {name: {"round_ms": statistics.median(times) * 1e3, "host_ms": statistics.median(host) * 1e3}
           for name, (_, times, host) in timed.items()}
    for name, (st, gen, (f0, s0, b0)) in runs.items():
        gen.close()
        n = st.target_forwards - f0
        out[name].update(syncs_per_round=(st.syncs - s0) / n, host_bytes_per_round=(st.host_bytes - b0) / n)
    return out


def paired(fns: dict, repeats: int) -> dict:
    """Median ms of each function, the functions interleaved so that the load on a shared machine cancels out."""
    for f in fns.values():
        f()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in ts.items()}


def sampler_ops(repeats: int) -> dict:
    """The sampler's steps on one row of random logits at V = 151,936, MLX's and numpy's ways side by side, and
    mx.compile against eager for the device draft (the choices sampling.py makes on MLX's CPU back end)."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, VOCAB)).astype(np.float32))
    xn = np.asarray(memoryview(x))[0]
    key = mx.random.key(0)
    q = sampling.Dist(np.arange(64), np.full(64, 1 / 64))  # a draft's sparse proposal
    gen = np.random.default_rng(0)

    def rejection(params):
        row = sampling.Row(xn, params)
        return row.accepts(5, 1 / 64, gen.random()) or row.draw_residual(q, gen)
    out = {"selection": paired({
        "mlx argmax (greedy)": lambda: mx.eval(mx.argmax(x, -1)),
        "mlx argpartition top-64": lambda: mx.eval(mx.argpartition(-x, 63, -1)[:, :64]),
        "mlx top_ids 64 (block maxima)": lambda: mx.eval(sampling.top_ids(x, 64)),
        "numpy argpartition top-64": lambda: np.argpartition(xn, VOCAB - 64),
        "mlx softmax": lambda: mx.eval(mx.softmax(x, -1)),
        "numpy float32 exp + float64 sum": lambda: np.exp(xn).sum(dtype=np.float64),
    }, repeats)}
    for sname, params in list(SETTINGS.items())[1:]:
        def eager():
            tok, q = sampling.mx_propose(x, params, sampling.DRAFT_N, key)
            mx.eval(tok, q.ids, q.probs)
        compiled = sampling.compiled_proposer(params, sampling.DRAFT_N)
        out[sname] = paired({
            "draft eager": eager, "draft compiled": lambda: mx.eval(compiled(x, key)),
            "numpy p(d), the cut found (Row.at)": lambda: sampling.Row(xn, params).at([5]),
            "numpy rejection, the cut found: p(d), residual, draw":
                lambda: sampling.Row(xn, params).residual(q).sample(0.5),
            "numpy plain draw as decoding does it (Row.draw)": lambda: sampling.Row(xn, params).draw(gen),
            "numpy rejection as decoding does it (accepts, draw_residual)": lambda: rejection(params),
            "numpy reference sort (SamplingParams.distribution)": lambda: params.distribution(x),
        }, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small")
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=7, help="repeats of each isolated pass")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench_overhead.json"))
    ap.add_argument("--sampler-ops", action="store_true", help="only the sampler's steps at V = 151,936 (paired)")
    args = ap.parse_args()
    if args.sampler_ops:
        ops = sampler_ops(max(args.repeats, 15))
        for group, ms in ops.items():
            print(f"\n{group}")
            for name, t in ms.items():
                print(f"  {name:62s} {t:8.3f} ms")
        args.out.write_text(json.dumps({"vocab": VOCAB, "sampler_ops_ms": ops}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
        return
    names = args.models.split(",")
    if any(n not in MODELS for n in names):
        sys.exit(f"error: --models takes {', '.join(MODELS)}")
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, VOCAB, args.prompt_tokens)]
    report = {"vocab": VOCAB, "sampler": sampling.default_backend(), "models": {}}
    for name in names:
        model = build(name)
        costs = pass_costs(model, prompt, args.max_k, args.repeats)
        rows = []
        for k in range(args.max_k + 1):
            # isolated costs measured next to the rounds they are compared with (the load on a shared machine
            # drifts)
            near = pass_costs(model, prompt, k, args.repeats)
            isolated = (near["verify"][k][0] + k * near["draft"][0]) * 1e3
            measured = measure_rounds(model, prompt, SETTINGS, k, args.rounds, near["bare"])
            b = measured.pop("bare")
            for sname, r in measured.items():
                rows.append({"setting": sname, "k": k, **r, "isolated_ms": isolated,
                             "overhead_ms": r["round_ms"] - isolated, "bare_round_ms": b["round_ms"],
                             "bare_overhead_ms": r["round_ms"] - b["round_ms"], "bare_round_host_ms": b["host_ms"],
                             "host_overhead_ms": r["host_ms"] - b["host_ms"], "host_target_ms": 1 + 0.2 * k})
        rows.sort(key=lambda r: list(SETTINGS).index(r["setting"]))
        greedy = {r["k"]: r["round_ms"] for r in rows if r["setting"] == "greedy"}
        for r in rows:
            r["vs_greedy"] = r["round_ms"] / greedy[r["k"]]
        ms = {"verify": [[t * 1e3 for t in c] for c in costs["verify"]], "draft": [t * 1e3 for t in costs["draft"]]}
        report["models"][name] = {"config": MODELS[name], "pass_costs_ms": ms, "rounds": rows}
        print(f"\n{name}: verify of 1..{args.max_k + 1} rows {', '.join(f'{c[0]:.2f}' for c in ms['verify'])} ms "
              f"(host {', '.join(f'{c[1]:.2f}' for c in ms['verify'])}); one-row MTP pass {ms['draft'][0]:.2f} ms "
              f"(host {ms['draft'][1]:.2f})")
        print("wall ms: round, isolated passes summed, bare round, round - isolated, round - bare; host ms (the "
              "calling thread's CPU time): round, bare round, round - bare, target")
        print(f"{'setting':22s} {'k':>2s} {'round':>7s} {'isol.':>7s} {'bare':>7s} {'-isol.':>7s} {'-bare':>7s} "
              f"{'xgreedy':>7s} | {'round':>6s} {'bare':>6s} {'-bare':>6s} {'target':>6s} | {'syncs':>5s} {'bytes':>6s}")
        for r in rows:
            print(f"{r['setting']:22s} {r['k']:2d} {r['round_ms']:7.2f} {r['isolated_ms']:7.2f} "
                  f"{r['bare_round_ms']:7.2f} {r['overhead_ms']:7.2f} {r['bare_overhead_ms']:7.2f} "
                  f"{r['vs_greedy']:7.2f} | {r['host_ms']:6.2f} {r['bare_round_host_ms']:6.2f} "
                  f"{r['host_overhead_ms']:6.2f} {r['host_target_ms']:6.1f} | {r['syncs_per_round']:5.1f} "
                  f"{r['host_bytes_per_round']:6.0f}")
        del model
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
