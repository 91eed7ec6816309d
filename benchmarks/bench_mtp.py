#!/usr/bin/env python
"""Plain decoding, MTP at k = 1..4 and auto, and mlx-lm's own generate on one model and one prompt set, interleaved
and repeated in a single run (harness: mlxmtp/bench.py); prints the table and writes JSON with every run, the
medians and the ratios to plain decoding (Ctrl-C: of the runs that finished, then exit 130).

    python benchmarks/bench_mtp.py                                  # the bundled demo model
    python benchmarks/bench_mtp.py --model PATH --suite spec_bench_mini --repeats 5 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlxmtp  # noqa: F401  - first: it loads OpenBLAS before mlx.core (mlxmtp/blas.py)
from mlxmtp import bench
from mlxmtp.cli.generate import load_checked
from mlxmtp.errors import MLXMTPError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo model)")
    ap.add_argument("--suite", default=None, help=f"{', '.join(bench.available_suites())} or a .jsonl file "
                                                  "(default: stdlib_code for the demo model, else spec_bench_mini)")
    ap.add_argument("--draft-tokens", default="0,1,2,3,4,auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-mlx-lm", action="store_true", help="leave out mlx-lm's generate")
    ap.add_argument("--out", type=Path, default=Path("bench_mtp.json"))
    ap.add_argument("--force-load", action="store_true")
    args = ap.parse_args()
    interrupted = False
    try:
        settings = bench.parse_settings(args.draft_tokens, mlx_lm=not args.no_mlx_lm)
        path, model, tokenizer = load_checked(args.model, args.force_load)
        suite = args.suite or bench.default_suite(path)
        report = {"suite": suite, **bench.run(model, tokenizer, bench.load_suite(suite, path), settings,
                                              repeats=args.repeats, max_tokens=args.max_tokens, model_path=path)}
    except (MLXMTPError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except bench.Interrupted as stop:
        report, interrupted = {"suite": suite, **stop.report}, True
    except KeyboardInterrupt:  # before any run finished: nothing to keep
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    bench.print_report(report)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    if interrupted:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
