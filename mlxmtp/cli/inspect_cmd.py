"""`mlxmtp inspect [MODEL]`: what a checkpoint holds and whether it fits here, without loading any weights
(mlxmtp/inspection.py)."""

from __future__ import annotations

import json

import click

from .generate import Command, model_option

COMPONENTS = {"trunk": "trunk", "mtp": "MTP", "embed_head": "embedding+head"}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _size(n: int) -> str:
    from ..inspection import GB

    return f"{n / 2**20:.1f} MB" if n < GB else f"{n / GB:.1f} GB" if n < 100 * GB else f"{n / GB:.0f} GB"


def _share(x: float) -> str:
    """A share as a whole percentage, where rounding would hide a minority (norms beside quantized weights: "4-bit
    >99%, bfloat16 <1%", not "100%, 0%")."""
    return "<1%" if 0 < x < 0.005 else ">99%" if 0.995 <= x < 1 else f"{x:.0%}"


def _precision(shares: dict) -> str:
    total = sum(shares.values())
    return ", ".join(f"{k} {_share(v / total)}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])) or "-"


def render(r: dict) -> list[tuple[str, str]]:
    """The report as (label, text) rows."""
    p, m, mtp = r["parameters"], r["memory"], r["mtp"]
    family = r["model_type"] + (f" ({r['architecture']})" if r["architecture"] else "")
    q = r["quantization"]
    quant = (f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q['group_size']}; " if q else "") + "; ".join(
        f"{COMPONENTS[c]}: {_precision(s)}" for c, s in r["precision"].items() if s)
    params = f"{_count(p['total'])} (" + ", ".join(f"{COMPONENTS[c]} {_count(p[c])}" for c in COMPONENTS if p[c]) + ")"
    if p["active_per_token"] is not None:
        e = p["experts"]
        params += (f"; {_count(p['active_per_token'])} active per token without MTP "
                   f"({e['per_token']} of {e['routed']} routed experts)")
    rows = [("model", r["path"]), ("family", family)]
    if r["converted_from"]:
        rows.append(("converted from", r["converted_from"]))
    rows += [
        ("MTP", f"{mtp['declared']} declared, {mtp['found']} found in the weights"
                + (f": {mtp['note']}" if mtp["note"] else "")),
        ("skipped", "; ".join(f"{why} ({n} tensors)" for why, n in r["skipped"].items()) or "nothing"),
        ("precision", quant),
        ("parameters", params),
        ("memory", (f"~{_size(m['total_bytes'])}: weights {_size(m['weights_bytes'])} "
                    f"({m['dtype']} where not quantized) + KV cache {_size(m['kv_cache_bytes'])} "
                    f"at {m['context']} tokens, {m['kv_cache']}")),
        ("fits", f"{'yes' if m['fits'] else 'NO'}: this machine has {_size(m['budget_bytes'])} ({m['budget']})"),
        ("BLAS", r["blas"]),
    ]
    return rows


@click.command("inspect", cls=Command)
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--context", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens of KV cache to budget for.")
def command(model, as_json, context):
    """Describe MODEL (a checkpoint directory or hub repo id; default: the bundled demo model) from its config and
    safetensors headers: family, MTP modules, precision, parameters, memory needed and whether it fits here."""
    from rich.console import Console
    from rich.table import Table

    from .. import demo_model_path
    from ..inspection import inspect_checkpoint

    report = inspect_checkpoint(model or demo_model_path(), context=context)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, text in render(report):
        table.add_row(label, text)
    Console().print(table)
