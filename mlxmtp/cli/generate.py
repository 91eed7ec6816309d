"""`mlxmtp generate`: one prompt in, streamed text out (stats on stderr), or one JSON object with --json.

Also the pieces chat and bench share: the one-line usage errors, the --draft-tokens type, the sampling options and
checked loading (memory estimate first, then the model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import MLXMTPError
from ..generation import GenerationStats, stream_generate


class Command(click.Command):
    """Bad flags and values print as one line (`error: ...`, exit 1) like every other user error."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise MLXMTPError(f"{e.format_message().rstrip('.')}; see 'mlxmtp {info_name} --help'") from None


def parse_draft(value):
    """'auto' or an integer >= 0."""
    s = str(value).strip()
    if s != "auto" and not s.isdigit():
        raise ValueError(f"draft tokens must be an integer >= 0 or 'auto', got {value!r}")
    return s if s == "auto" else int(s)


class DraftTokens(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        try:
            return parse_draft(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def model_option(f):
    return click.option("--model", "-m", "model", metavar="PATH", default=None,
                        help="checkpoint directory (default: the bundled demo model)")(f)


def force_option(f):
    return click.option("--force-load", is_flag=True, help="load even when the memory estimate says it cannot fit")(f)


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="sampling temperature (0: greedy)"),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: off"),
        click.option("--seed", type=int, default=None, help="seed for sampling"),
        click.option("--draft-tokens", type=DraftTokens(), default="auto", show_default=True,
                     help="drafts per verify pass: 0 (plain decoding), k, or auto (chosen per round)"),
    ]):
        f = opt(f)
    return f


def resolve_model(model: Optional[str]) -> Path:
    if model is not None:
        return Path(model)
    from .. import demo_model_path

    path = demo_model_path()
    if not (path / "config.json").exists():
        raise MLXMTPError(f"the bundled demo model is not installed ({path}); pass --model PATH")
    return path


def load_checked(model: Optional[str], force_load: bool, mtp: bool = True):
    """(path, model, tokenizer), after refusing a model the memory estimate says cannot fit."""
    from ..inspection import check_fits
    from ..loading import load, resolve

    path = resolve(resolve_model(model))
    check_fits(path, force_load)
    return (path, *load(path, mtp=mtp))


def stats_line(s: GenerationStats) -> str:
    line = (f"prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_s:.1f} tok/s | generated {s.generated_tokens} tok, "
            f"{s.decode_tokens_per_s:.1f} tok/s | tau {s.mean_accepted_length:.2f}")
    if s.drafted:
        by_depth = ", ".join(f"{a:.0%}" for a in s.acceptance_by_depth)
        line += f" | acceptance {s.acceptance_rate:.0%} (by depth {by_depth})"
    return line + f" | {s.target_forwards} verify passes | peak {s.peak_memory_gb:.2f} GB"


@click.command(cls=Command)
@model_option
@click.option("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
@sampling_options
@click.option("--no-mtp", is_flag=True, help="plain decoding; do not load the MTP modules")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, tokens, stats, finish_reason")
@force_option
def command(model, prompt, max_tokens, temp, top_p, top_k, seed, draft_tokens, no_mtp, as_json, force_load):
    """Generate text from a prompt with MTP drafting; text on stdout, a stats line on stderr."""
    if prompt is None:
        if sys.stdin.isatty():
            raise MLXMTPError("no prompt: pass --prompt TEXT or pipe it on stdin")
        prompt = sys.stdin.read()
    _, m, tokenizer = load_checked(model, force_load, mtp=not no_mtp)
    text, tokens, stats, finish = [], [], None, None
    try:
        for inc in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens, temperature=temp, top_p=top_p,
                                   top_k=top_k, seed=seed, draft_tokens=draft_tokens, mtp=not no_mtp):
            if not as_json:
                click.echo(inc.text, nl=False)
            text.append(inc.text)
            tokens.extend(inc.tokens)
            stats, finish = inc.stats, inc.finish_reason
    except KeyboardInterrupt:
        if text and not as_json:
            click.echo()
        raise
    if as_json:
        click.echo(json.dumps({"text": "".join(text), "tokens": tokens, "stats": stats.to_dict(),
                               "finish_reason": finish}))
        return
    click.echo()
    click.echo(f"[{stats_line(stats)} | finish: {finish}]", err=True)
