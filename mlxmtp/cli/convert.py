"""`mlxmtp convert SRC -o OUT`: quantize an original checkpoint, MTP modules included (mlxmtp/convert.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import MLXMTPError


class Number(click.ParamType):
    """An integer; a malformed one is a one-line MLXMTPError, like every other bad value (the library checks the
    allowed values), rather than click's usage block."""

    name = "N"

    def convert(self, value, param, ctx):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise MLXMTPError(f"{param.opts[-1]} {value!r}: expected a whole number") from None


@click.command("convert")
@click.argument("src", required=False)
@click.option("-m", "--model", "model", default=None, help="The checkpoint to convert (same as SRC).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--bits", type=Number(), default=4, show_default=True, help="Bits per trunk weight: 2, 3, 4, 5, 6, 8.")
@click.option("--group-size", type=Number(), default=64, show_default=True, help="Weights per scale: 32, 64, 128.")
@click.option("--mtp-bits", type=Number(), default=None, help="Bits of the MTP modules (default 8; 0: unquantized).")
@click.option("--embed-bits", type=Number(), default=None,
              help="Bits of the embedding and output head (default: --bits; 0: unquantized).")
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 for what stays in float "
                                            "(default: the checkpoint's own).")
@click.option("--no-mtp", is_flag=True, help="Leave the MTP modules out.")
@click.option("--add-mtp", "add_mtp_from", metavar="ORIGINAL", default=None,
              help="SRC is an existing quantized checkpoint without MTP (e.g. mlx-community's): add the MTP modules "
                   "of ORIGINAL (directory or hub repo id; only the files holding them are fetched), quantized at "
                   "--mtp-bits.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (once the new one is complete).")
def command(src, model, out, bits, group_size, mtp_bits, embed_bits, dtype, no_mtp, add_mtp_from, force):
    """Convert the original checkpoint SRC (directory or hub repo id), keeping its MTP heads, into a quantized
    mlxmtp checkpoint OUT; or, with --add-mtp ORIGINAL, give the quantized checkpoint SRC the MTP heads of ORIGINAL."""
    from ..convert import convert

    if src and model and src != model:
        raise MLXMTPError(f"two checkpoints given ({src} and -m {model}); give one")
    src = src or model
    if not src:
        raise MLXMTPError("no checkpoint given: mlxmtp convert SRC -o OUT (or -m SRC)")
    show = sys.stderr.isatty()
    if add_mtp_from:
        from ..add_mtp import add_mtp

        if no_mtp:
            raise MLXMTPError("--add-mtp and --no-mtp contradict each other")
        path = add_mtp(add_mtp_from, src, out, mtp_bits=mtp_bits, force=force, show_progress=show)
    else:
        path = convert(src, out, bits=bits, group_size=group_size, mtp_bits=mtp_bits, embed_bits=embed_bits,
                       dtype=dtype, mtp=not no_mtp, force=force, show_progress=show)
    for line in summary(path):
        click.echo(line)


def summary(path: Path) -> list[str]:
    """What was written: size on disk, precision per component, MTP modules kept (from the files themselves)."""
    from ..inspection import inspect_checkpoint
    from .inspect_cmd import COMPONENTS, _precision, _size

    r = inspect_checkpoint(path)
    files = [f for f in path.iterdir() if f.is_file()]
    shards = [f for f in files if f.suffix == ".safetensors"]
    size = sum(f.stat().st_size for f in files)
    q = r["quantization"]
    lines = [f"wrote {path} ({_size(size)}, {len(shards)} weight file{'s' if len(shards) > 1 else ''})"]
    if q:
        lines.append(f"  quantization  {q['bits']}-bit {q.get('mode', 'affine')}, group size {q['group_size']}")
    lines.append("  precision     " + "; ".join(f"{COMPONENTS[c]}: {_precision(s)}"
                                                for c, s in r["precision"].items() if s))
    m = r["mtp"]
    lines.append(f"  MTP modules   {m['found']} kept of {m['declared']} declared" + (f" ({m['note']})" if m["note"]
                                                                                     and m["found"] else ""))
    return lines
