"""`mlxmtp generate`: one prompt in, streamed text out (stats on stderr), or one JSON object with --json.

Also the pieces chat, bench and serve share: the one-line usage errors, the model given as `-m PATH` or as the
first argument, the --draft-tokens type, the sampling options, checked loading (memory estimate first, then the
model) and the one-time hint when MLX runs on the slow reference BLAS.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import MLXMTPError
from ..generation import stream_generate
from ..speculative import MAX_DRAFT_TOKENS


class Command(click.Command):
    """Bad flags and values print as one line (`error: ...`, exit 1) like every other user error."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise MLXMTPError(f"{e.format_message().rstrip('.')}; see 'mlxmtp {info_name} --help'") from None


def parse_draft(value):
    """'auto' or an integer from 0 to MAX_DRAFT_TOKENS (the bound generation.stream_generate enforces)."""
    s = str(value).strip()
    if s != "auto" and not (s.isdigit() and int(s) <= MAX_DRAFT_TOKENS):
        raise ValueError(f"draft tokens must be an integer from 0 to {MAX_DRAFT_TOKENS} or 'auto', got {value!r}")
    return s if s == "auto" else int(s)


class DraftTokens(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        try:
            return parse_draft(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class FiniteFloat(click.FloatRange):
    """click's FloatRange, which lets nan and inf through (every comparison with nan is false)."""

    def convert(self, value, param, ctx):
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


def model_option(f):
    """The model as `-m/--model PATH` or as the first argument, the same in every command."""

    @functools.wraps(f)
    def merged(*args, model=None, model_arg=None, **kwargs):
        if model is not None and model_arg is not None and model != model_arg:
            raise MLXMTPError(f"two models given: {model_arg!r} and --model {model!r}")
        return f(*args, model=model if model is not None else model_arg, **kwargs)

    merged = click.argument("model_arg", metavar="[MODEL]", required=False)(merged)
    return click.option("--model", "-m", "model", metavar="PATH", default=None,
                        help="checkpoint directory or hub repo id, also accepted as the first argument "
                             "(default: the bundled demo model)")(merged)


def force_option(f):
    return click.option("--force-load", is_flag=True, help="load even when the memory estimate says it cannot fit")(f)


def sampling_options(f):
    for opt in reversed([
        click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--temp", "--temperature", "temp", type=FiniteFloat(min=0), default=0.0, show_default=True,
                     help="sampling temperature (0: greedy)"),
        click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: off"),
        click.option("--seed", type=int, default=None, help="seed for sampling"),
        click.option("--draft-tokens", type=DraftTokens(), default="auto", show_default=True,
                     help=f"drafts per verify pass: 0 (plain decoding), 1 to {MAX_DRAFT_TOKENS}, "
                          "or auto (chosen per round)"),
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


_hinted = False


def blas_hint() -> None:
    """Once per process, on stderr: MLX is on the reference BLAS although OpenBLAS could be used (mlxmtp/blas.py)."""
    global _hinted
    from ..blas import reference_blas_hint

    hint = reference_blas_hint()
    if hint and not _hinted:
        click.echo(f"hint: {hint}", err=True)
        _hinted = True


def load_checked(model: Optional[str], force_load: bool, mtp: bool = True):
    """(path, model, tokenizer), after refusing a model the memory estimate says cannot fit."""
    from ..inspection import check_fits
    from ..loading import load, resolve

    path = resolve(resolve_model(model))
    check_fits(path, force_load)
    blas_hint()
    return (path, *load(path, mtp=mtp))


def note_plain_decoding(path: Path, model, draft, no_mtp: bool = False) -> None:
    """One line when drafts were asked for (draft: a setting or a list of them) but no MTP module is loaded. A
    checkpoint that should have had them was already warned about by the loader; the cases left are on purpose."""
    ks = [k for k in (draft if isinstance(draft, (list, tuple)) else [draft]) if k not in (0, "auto")]
    if not ks or model.num_mtp_modules:
        return
    asked = "--draft-tokens " + ",".join(map(str, ks))
    if no_mtp:
        click.echo(f"warning: --no-mtp: decoding plain, {asked} has no effect", err=True)
    elif (model.config.get("mlxmtp") or {}).get("mtp_modules") == 0:
        click.echo(f"warning: {path.name} was converted without its MTP modules (convert --no-mtp): decoding plain, "
                   f"{asked} has no effect", err=True)


def stats_line(s) -> str:
    """One line of GenerationStats; drafting figures only where there were drafts."""
    line = (f"prompt {s.prompt_tokens} tok, {s.prefill_tokens_per_s:.1f} tok/s | generated {s.generated_tokens} tok, "
            f"{s.decode_tokens_per_s:.1f} tok/s")
    if s.drafted:
        by_depth = ", ".join(f"{a:.0%}" for a in s.acceptance_by_depth)
        line += (f" | tau {s.mean_accepted_length:.2f} | acceptance {s.acceptance_rate:.0%} (by depth {by_depth})"
                 f" | {s.target_forwards} verify passes")
    else:
        line += " | plain decoding (no drafts)"
    return line + f" | peak {s.peak_memory_gb:.2f} GB"


def read_stdin_prompt() -> str:
    """stdin as the prompt, less one trailing newline: `echo TEXT |` and a here-doc add one the user did not type
    (as llama.cpp's --file and most Unix filters treat a final newline)."""
    text = sys.stdin.read()
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


@click.command(cls=Command)
@model_option
@click.option("--prompt", "-p", default=None, help="prompt text (default: stdin, less one trailing newline)")
@sampling_options
@click.option("--no-mtp", is_flag=True, help="plain decoding; do not load the MTP modules")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: text, tokens, stats, finish_reason")
@force_option
def command(model, prompt, max_tokens, temp, top_p, top_k, seed, draft_tokens, no_mtp, as_json, force_load):
    """Generate text from a prompt with MTP drafting; text on stdout, a stats line on stderr.

    Ctrl-C stops it and still prints the statistics (or the JSON object, finish_reason "interrupted") of the
    tokens generated so far."""
    if prompt is None:
        if sys.stdin.isatty():
            raise MLXMTPError("no prompt: pass --prompt TEXT or pipe it on stdin")
        prompt = read_stdin_prompt()
    path, m, tokenizer = load_checked(model, force_load, mtp=not no_mtp)
    if click.get_current_context().get_parameter_source("draft_tokens") != click.core.ParameterSource.DEFAULT:
        note_plain_decoding(path, m, draft_tokens, no_mtp)
    if seed is not None and temp > 0 and draft_tokens == "auto" and m.num_mtp_modules:
        click.echo("note: --seed repeats a sample exactly only with a fixed --draft-tokens; auto's depths follow "
                   "this machine's round times (same distribution, other draws)", err=True)
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
        report(text, tokens, stats, "interrupted", as_json)
        raise
    report(text, tokens, stats, finish, as_json)


def report(text: list, tokens: list, stats, finish: str, as_json: bool) -> None:
    """After the streamed text: the stats line on stderr, or the JSON object (stats of what was generated)."""
    if as_json:
        click.echo(json.dumps({"text": "".join(text), "tokens": tokens, "stats": stats.to_dict() if stats else None,
                               "finish_reason": finish}))
        return
    if text:
        click.echo()
    if stats is not None:
        click.echo(f"[{stats_line(stats)} | finish: {finish}]", err=True)
