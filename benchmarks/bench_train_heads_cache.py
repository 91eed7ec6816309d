"""Cost of one train-heads step with teacher targets on the fly (a trunk forward per batch) and read from the disk
cache (--teacher-cache K), interleaved in one run so the machine's load falls on both alike.

    python benchmarks/bench_train_heads_cache.py                      # the demo trunk, rows of 128 tokens
    python benchmarks/bench_train_heads_cache.py --top 64 --batch 4 --seq-len 512 --steps 6

Reports the median step time of each and the ratio on-the-fly / cached (the cache's build time is reported apart:
it is one trunk forward per row, paid once).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

import mlxmtp  # noqa: E402
from mlxmtp.loading import load_tokenizer  # noqa: E402
from mlxmtp.train_heads import TeacherCache, attach_heads, heads_loss, stream_rows, teacher, token_streams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(mlxmtp.demo_model_path()))
    ap.add_argument("--top", type=int, default=64, help="K of the cache (>= vocab: the full distribution)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    args = ap.parse_args()

    model, _ = attach_heads(Path(args.model), 1, "last-layer", 0)
    tok = load_tokenizer(Path(args.model))
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    rows = stream_rows(token_streams(tok, [text], 0.0)[0], args.seq_len)[: 4 * args.batch]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        cache = TeacherCache(Path(d), args.top).open(model, rows, args.batch, False)
        build = time.perf_counter() - t
        opt = optim.AdamW(learning_rate=1e-4)
        grad_fn = nn.value_and_grad(model, lambda h, x, p: heads_loss(model, h, x, p)[0])
        times = {"on the fly": [], "cached": []}
        rng = np.random.default_rng(0)
        for i in range(2 * args.steps + 2):
            kind = ("on the fly", "cached")[i % 2]
            idx = rng.integers(0, len(rows), args.batch)
            t = time.perf_counter()
            tokens = mx.array(rows[idx])
            hidden, target = cache.batch(idx) if kind == "cached" else teacher(model, tokens)
            loss, grads = grad_fn(hidden, tokens, target)
            opt.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), opt.state)
            if i >= 2:  # the first of each kind is a warm-up
                times[kind].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{args.model}: batch {args.batch} x {args.seq_len}, top-{args.top} cache of {len(rows)} rows built in "
          f"{build:.2f}s")
    for k, v in med.items():
        print(f"  {k:10s}: median step {v * 1000:.0f} ms over {len(times[k])}")
    print(f"  ratio on the fly / cached: {med['on the fly'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()
