"""`mlxmtp bench`: plain decoding vs MTP settings (and optionally mlx-lm), interleaved and repeated; see bench.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import bench
from .generate import Command, force_option, load_checked, model_option, note_plain_decoding


@click.command(cls=Command)
@model_option
@click.option("--draft-tokens", "draft", metavar="LIST", default="0,1,2,3,auto", show_default=True,
              help="comma-separated settings: k >= 0 or auto (0 = plain decoding, always included)")
@click.option("--suite", default=None,
              help=f"prompt suite(s), comma-separated: {', '.join(bench.available_suites())} or a .jsonl file "
                   "(default: stdlib_code for a model with heldout_files.txt, else spec_bench_mini)")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write everything (settings, raw runs, medians, ratios, machine) to this file")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="draw tokens/s and tau against draft depth (needs matplotlib)")
@click.option("--mlx-lm/--no-mlx-lm", "mlx_lm", default=False, show_default=True,
              help="also run mlx-lm's own generate (no MTP) on the same checkpoint as a baseline")
@force_option
def command(model, draft, suite, repeats, max_tokens, json_out, plot, mlx_lm, force_load):
    """Benchmark MTP decoding against plain decoding on a prompt suite (greedy, batch 1).

    Settings run interleaved and repeated on the same prompts. Prints median decode tokens/s and the ratio to
    plain decoding, tau and acceptance (per depth, per category), the weight bytes read per token and, for a model
    big enough to be bandwidth-bound, the tokens/s that 819 / 546 / 273 GB/s would allow (projections, not
    measurements). Ctrl-C stops it and still prints and writes what the finished runs measured.
    """
    settings = bench.parse_settings(draft, mlx_lm)
    if plot is not None:
        bench.pyplot()  # fail before a long run, not after it
    path, m, tokenizer = load_checked(model, force_load)
    note_plain_decoding(path, m, [s.draft_tokens for s in settings])
    suite = suite or bench.default_suite(path)
    prompts = bench.load_suite(suite, path)
    try:
        report = {"suite": suite, **bench.run(m, tokenizer, prompts, settings, repeats=repeats,
                                              max_tokens=max_tokens, model_path=path)}
    except bench.Interrupted as stop:
        write({"suite": suite, **stop.report}, json_out, plot)
        raise
    write(report, json_out, plot)


def write(report: dict, json_out, plot) -> None:
    bench.print_report(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=1))
        click.echo(f"wrote {json_out}", err=True)
    if plot is not None:
        bench.plot(report, plot)
        click.echo(f"wrote {plot}", err=True)
