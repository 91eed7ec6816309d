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
@click.argument("src")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--bits", type=Number(), default=4, show_default=True, help="Bits per trunk weight: 2, 3, 4, 5, 6, 8.")
@click.option("--group-size", type=Number(), default=64, show_default=True, help="Weights per scale: 32, 64, 128.")
@click.option("--mtp-bits", type=Number(), default=None, help="Bits of the MTP modules (default 8; 0: unquantized).")
@click.option("--embed-bits", type=Number(), default=None,
              help="Bits of the embedding and output head (default: --bits; 0: unquantized).")
@click.option("--dtype", default=None, help="float16, bfloat16 or float32 for what stays in float "
                                            "(default: the checkpoint's own).")
@click.option("--no-mtp", is_flag=True, help="Leave the MTP modules out.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (once the new one is complete).")
def command(src, out, bits, group_size, mtp_bits, embed_bits, dtype, no_mtp, force):
    """Convert the original checkpoint SRC (directory or hub repo id), keeping its MTP heads, into a quantized
    mlxmtp checkpoint OUT."""
    from ..convert import convert

    path = convert(src, out, bits=bits, group_size=group_size, mtp_bits=mtp_bits, embed_bits=embed_bits, dtype=dtype,
                   mtp=not no_mtp, force=force, show_progress=sys.stderr.isatty())
    click.echo(f"wrote {path}")
