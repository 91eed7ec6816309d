"""`mlxmtp doctor [-m MODEL] [--json]`: machine, MLX, Metal, BLAS, the kernels' self-checks and, with a model, its
verify cost curve beside the bytes bound (mlxmtp/doctor.py)."""

from __future__ import annotations

import json

import click

from .generate import Command, force_option, load_checked


@click.command("doctor", cls=Command)
@click.option("--model", "-m", "model", metavar="PATH", default=None,
              help="also measure this checkpoint's verify cost curve (none by default)")
@click.option("--max-m", type=click.IntRange(1, 16), default=8, show_default=True, help="largest verify batch")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of text")
@force_option
def command(model, max_m, repeats, as_json, force_load):
    """Report what this machine runs and how well: paste the text into a bug report."""
    from .. import doctor

    loaded, path = None, None
    if model is not None:
        path, loaded, _ = load_checked(model, force_load)
    r = doctor.report(loaded, path, max_m=max_m, repeats=repeats)
    click.echo(json.dumps(r, indent=1) if as_json else doctor.render(r))
