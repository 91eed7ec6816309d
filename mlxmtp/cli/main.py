"""The `mlxmtp` command: one click group; each command lives in its own module of this package, imported only when
that command runs, so `mlxmtp --help` lists the commands from the table below without importing any of them.

Exit status: 0 success; 1 any error the user can fix, printed as one `error: ...` line on stderr, whether it is a
bad flag or value (click's usage errors, which click itself would exit 2 for) or bad input (a missing checkpoint,
a prompt longer than the context); 130 Ctrl-C, after printing what was finished. Set MLXMTP_DEBUG=1 to see
tracebacks instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

import click

_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; 8.1 prints the help itself

# command name -> (module in mlxmtp.cli defining a click command called `command`, the line `mlxmtp --help` shows)
COMMANDS = {
    "chat": ("chat", "Chat with a model in the terminal."),
    "generate": ("generate", "Generate text from a prompt with MTP drafting."),
    "convert": ("convert", "Convert an original checkpoint, MTP heads included, to a quantized one."),
    "inspect": ("inspect_cmd", "Describe a checkpoint and whether it fits here, without loading it."),
    "bench": ("bench", "Benchmark MTP decoding against plain decoding."),
    "serve": ("serve", "Serve a model over an OpenAI-compatible HTTP API."),
    "doctor": ("doctor", "Check this installation and machine."),
    "train-heads": ("train_heads", "Train MTP heads for a model's frozen trunk."),
}


def _exists(name: str) -> bool:
    return name in COMMANDS and importlib.util.find_spec(f"mlxmtp.cli.{COMMANDS[name][0]}") is not None


class Group(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if _exists(n))

    def get_command(self, ctx, name):
        return importlib.import_module(f"mlxmtp.cli.{COMMANDS[name][0]}").command if _exists(name) else None

    def format_commands(self, ctx, formatter):
        """From the table: listing the commands must not import them (and through them mlx-lm, transformers)."""
        with formatter.section("Commands"):
            formatter.write_dl([(n, COMMANDS[n][1]) for n in self.list_commands(ctx)])

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
        """click's own usage errors (unknown option, bad number) as one line too, with exit status 1."""
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
            sys.exit(code if isinstance(code, int) else 0)  # non-standalone click returns ctx.exit codes
        except _NO_ARGS as e:  # bare `mlxmtp`: the help, as --help prints it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            msg = e.format_message()
            if isinstance(e, click.UsageError) and e.ctx is not None:
                msg = f"{msg.rstrip('.')}; see '{e.ctx.command_path} --help'"
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)

    def __call__(self, *args, **kwargs):
        """The console script (and `python -m mlxmtp`); CliRunner calls main() and skips this.

        transformers imports torch whenever it is installed (transformers.modeling_rope_utils, reached through
        mlx-lm's tokenizer loading), 1.5-3 s of start-up spent on a library no mlxmtp command uses; marking torch
        absent in this process makes transformers' is_torch_available() false and any `import torch` fail fast."""
        sys.modules.setdefault("torch", None)
        return super().__call__(*args, **kwargs)


@click.group(cls=Group)
@click.version_option(package_name="mlxmtp")
def cli():
    """Run LLMs on Apple Silicon with their own multi-token-prediction (MTP) heads."""
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
