#!/usr/bin/env python
"""Conversations that keep their cache, and `mlxmtp serve` under concurrent clients.

chat: a six-turn conversation (short messages, replies of up to --reply-tokens); at each turn the time to first
token from a fresh prefill of the whole conversation (what chat did before the prompt cache) and from the state the
last turn left (prompt_cache.PromptCache, what chat does now), interleaved (in alternating order) and repeated,
medians reported; the replies of both must be equal.

serve: a live `mlxmtp serve` on a free loopback port; 1, 4 and 8 clients at once, each sending its share of the
requests (streamed completions, distinct prompts, greedy) one after the other; requests/s, latency and time to first
token per request (mean, p50, p90), and generated tokens/s over all clients; the baseline, measured in the same run,
is the same requests generated one after the other in this process (mlxmtp.stream_generate, no HTTP).

    python benchmarks/bench_serve.py                       # the bundled demo model, both parts
    python benchmarks/bench_serve.py --part serve --clients 1,4,8 --requests 16 --out serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)
from mlxmtp import bench
from mlxmtp.conversation import conversation_ids
from mlxmtp.generation import stream_generate
from mlxmtp.prompt_cache import PromptCache, uses_mtp

MESSAGES = ["def fibonacci(n):", "class Stack:", "import os", "def read_config(path):", "for line in lines:",
            "def main():"]


def ttft(model, tokenizer, ids, state=None, **kw):
    """(seconds to the first increment, the whole generation's text and stats) of one generation."""
    t0 = time.perf_counter()
    first, parts, stats = None, [], None
    for inc in stream_generate(model, tokenizer, ids, state=state, **kw):
        first = first if first is not None else time.perf_counter() - t0
        parts.append(inc.text)
        stats = inc.stats
    return first, "".join(parts), stats


def chat_part(model, tokenizer, args) -> dict:
    kw = dict(max_tokens=args.reply_tokens, draft_tokens=args.draft_tokens)
    turns = []
    for r in range(args.repeats):
        cache, messages = PromptCache(model, max_states=2), []
        for t, text in enumerate(MESSAGES):
            messages.append({"role": "user", "content": text})
            ids = conversation_ids(tokenizer, messages)
            state = cache.fetch(ids, uses_mtp(model, args.draft_tokens))
            if (r + t) % 2:  # the order alternates, so warm-up and drift favour neither
                fresh_s, fresh_text, _ = ttft(model, tokenizer, ids, **kw)
            cached_s, text_out, stats = ttft(model, tokenizer, ids, state=state, **kw)
            if (r + t) % 2 == 0:
                fresh_s, fresh_text, _ = ttft(model, tokenizer, ids, **kw)
            cache.store(state)
            assert text_out == fresh_text, f"turn {t + 1}: a reused state changed the reply"
            messages.append({"role": "assistant", "content": text_out})
            if r == 0:
                turns.append({"turn": t + 1, "prompt_tokens": len(ids), "cached_tokens": stats.cached_tokens,
                              "fresh_ttft_s": [], "cached_ttft_s": []})
            turns[t]["fresh_ttft_s"].append(fresh_s)
            turns[t]["cached_ttft_s"].append(cached_s)
    for t in turns:
        t["fresh_ttft_median_s"] = statistics.median(t["fresh_ttft_s"])
        t["cached_ttft_median_s"] = statistics.median(t["cached_ttft_s"])
        t["speedup"] = t["fresh_ttft_median_s"] / t["cached_ttft_median_s"]
    print(f"\nchat: time to first token per turn (median of {args.repeats}; replies up to {args.reply_tokens} "
          f"tokens, draft tokens {args.draft_tokens})")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'fresh prefill':>14} {'prompt cache':>13} {'speedup':>8}")
    for t in turns:
        print(f"{t['turn']:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} {t['fresh_ttft_median_s'] * 1e3:>11.1f} ms"
              f" {t['cached_ttft_median_s'] * 1e3:>10.1f} ms {t['speedup']:>7.1f}x")
    return {"turns": turns}


def start_server(model_arg, draft_tokens, log: Path):
    cmd = [sys.executable, "-m", "mlxmtp", "serve", "--port", "0", "--draft-tokens", str(draft_tokens),
           "--queue-size", "64"] + (["--model", model_arg] if model_arg else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + 120
    while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{m.group(1)}/v1"


def one_request(client, prompt, max_tokens):
    t0 = time.perf_counter()
    first, n = None, 0
    for ch in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].text and first is None:
            first = time.perf_counter() - t0
        if ch.usage is not None:
            n = ch.usage.completion_tokens
    return time.perf_counter() - t0, first, n


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def request_prompts(prompts, serial, clients, per_client):
    return [[f"# request {serial}.{i}.{j}\n" + prompts[(i * per_client + j) % len(prompts)] for j in range(per_client)]
            for i in range(clients)]


def in_process(model, tokenizer, prompts, args) -> dict:
    """The baseline: the requests one after the other, in this process, through the same generation API."""
    lat, first, toks = [], [], []
    ttft(model, tokenizer, prompts[0], max_tokens=args.max_tokens, draft_tokens=args.draft_tokens)  # warm-up
    t0 = time.perf_counter()
    for p in request_prompts(prompts, "direct", 1, args.requests)[0]:
        t1 = time.perf_counter()
        f, _, stats = ttft(model, tokenizer, p, max_tokens=args.max_tokens, draft_tokens=args.draft_tokens)
        lat.append(time.perf_counter() - t1), first.append(f), toks.append(stats.generated_tokens)
    return summary("in-process", lat, first, toks, [], time.perf_counter() - t0)


def summary(clients, lat, first, toks, errors, wall) -> dict:
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": wall,
            "requests_per_s": len(lat) / wall, "generated_tokens_per_s": sum(toks) / wall,
            "latency_mean_s": statistics.mean(lat), "latency_p50_s": pct(lat, 0.5), "latency_p90_s": pct(lat, 0.9),
            "ttft_mean_s": statistics.mean(first), "ttft_p50_s": pct(first, 0.5), "ttft_p90_s": pct(first, 0.9)}


def serve_part(model, tokenizer, prompts, args) -> dict:
    import openai

    results = [in_process(model, tokenizer, prompts, args)]
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc, url = start_server(args.model, args.draft_tokens, log)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        one_request(client, prompts[0], args.max_tokens)  # warm-up (and the auto policy's cost measurement)
        serial = 0
        for c in args.clients:
            lat, first, toks, errors = [], [], [], []
            per_client = max(1, args.requests // c)
            mine = request_prompts(prompts, serial, c, per_client)

            def worker(i):
                cl = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
                for p in mine[i]:
                    try:
                        total, f, n = one_request(cl, p, args.max_tokens)
                        lat.append(total), first.append(f), toks.append(n)
                    except Exception as e:  # counted and reported
                        errors.append(repr(e))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            serial += 1
            results.append(summary(c, lat, first, toks, errors, wall))
    finally:
        proc.terminate()
        proc.wait(15)
    print(f"\nserve: streamed completions of {args.max_tokens} tokens, greedy, draft tokens {args.draft_tokens}")
    print(f"{'clients':>10} {'requests':>8} {'req/s':>6} {'tok/s':>6} {'latency mean/p50/p90 s':>24} "
          f"{'TTFT mean/p50/p90 s':>21} {'errors':>6}")
    for r in results:
        print(f"{r['clients']:>10} {r['requests']:>8} {r['requests_per_s']:>6.2f} {r['generated_tokens_per_s']:>6.1f} "
              f"{r['latency_mean_s']:>10.2f} {r['latency_p50_s']:>6.2f} {r['latency_p90_s']:>6.2f} "
              f"{r['ttft_mean_s']:>9.2f} {r['ttft_p50_s']:>5.2f} {r['ttft_p90_s']:>5.2f} {len(r['errors']):>6}")
    return {"runs": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    ap.add_argument("--part", choices=["chat", "serve", "both"], default="both")
    ap.add_argument("--draft-tokens", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--reply-tokens", type=int, default=256, help="chat: the longest reply per turn")
    ap.add_argument("--repeats", type=int, default=3, help="chat: repeats of the conversation")
    ap.add_argument("--clients", default="1,4,8", help="serve: concurrent client counts")
    ap.add_argument("--requests", type=int, default=16, help="serve: requests per client count")
    ap.add_argument("--max-tokens", type=int, default=64, help="serve: tokens per request")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    from mlxmtp.cli.generate import load_checked, resolve_model

    report = {"machine": bench.machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    report["args"]["model"] = str(resolve_model(args.model))
    path, model, tokenizer = load_checked(args.model, False)
    if args.part in ("chat", "both"):
        report["chat"] = chat_part(model, tokenizer, args)
    if args.part in ("serve", "both"):
        items = bench.load_suite(bench.default_suite(path), path)
        report["serve"] = serve_part(model, tokenizer, [it["prompt"] for it in items], args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
