"""The `mlxmtp` command: one click group; each command lives in its own module of this package.

Errors meant for the user (MLXMTPError, bad values) print as one line on stderr with a non-zero exit; Ctrl-C exits
with 130. Set MLXMTP_DEBUG=1 to see tracebacks instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

# command name -> module in mlxmtp.cli defining a click command called `command`
COMMANDS = {
    "chat": "chat",
    "generate": "generate",
    "convert": "convert",
    "inspect": "inspect_cmd",
    "bench": "bench",
    "serve": "serve",
    "doctor": "doctor",
    "train-heads": "train_heads",
}


class Group(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, m in COMMANDS.items() if importlib.util.find_spec(f"mlxmtp.cli.{m}"))

    def get_command(self, ctx, name):
        if name not in COMMANDS or importlib.util.find_spec(f"mlxmtp.cli.{COMMANDS[name]}") is None:
            return None
        return importlib.import_module(f"mlxmtp.cli.{COMMANDS[name]}").command

    def invoke(self, ctx):
        from ..errors import MLXMTPError

        try:
            return super().invoke(ctx)
        except (MLXMTPError, ValueError, OSError) as e:
            if os.environ.get("MLXMTP_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


    def main(self, *args, **kwargs):
        """click's own usage errors (unknown option, bad number) as one line too."""
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
            sys.exit(code if isinstance(code, int) else 0)  # non-standalone click returns ctx.exit codes
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=Group)
@click.version_option(package_name="mlxmtp")
def cli():
    """Run LLMs on Apple Silicon with their own multi-token-prediction (MTP) heads."""
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
