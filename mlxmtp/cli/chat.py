"""`mlxmtp chat`: a terminal REPL over one model, streamed replies, a stats line after each.

Input: Enter sends. A line ending in a backslash continues on the next line (at a terminal and on piped stdin);
at a terminal, Esc then Enter also inserts a newline, and up/down browse the history (~/.cache/mlxmtp/chat_history).
Ctrl-C during a reply stops it (the partial reply stays in the conversation); Ctrl-C at the prompt clears the
line; Ctrl-D or /exit quits. When stdin is not a terminal, messages are read from it line by line, without prompts.

The prompt is the tokenizer's chat template applied to the conversation, or, for a tokenizer without one, the
conversation's texts, each new message on a new line (plain continuation; conversation.py). Each turn starts from
the decode state the last one left (prompt_cache.py): only the new message (and the template's glue) is prefilled,
and the stats line says how many prompt tokens were reused. When the conversation outgrows the context, the oldest
turns are dropped with a one-line notice. ``ChatSession`` holds the logic; the I/O is separate.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from ..conversation import conversation_ids
from ..errors import MLXMTPError
from ..generation import context_length, stream_generate
from ..prompt_cache import PromptCache, uses_mtp
from ..sampling import SamplingParams
from ..speculative import MAX_DRAFT_TOKENS
from .generate import Command, force_option, load_checked, model_option, parse_draft, sampling_options, stats_line

HISTORY = Path(os.environ.get("MLXMTP_CACHE_DIR", Path.home() / ".cache" / "mlxmtp")) / "chat_history"
ROLES = ("system", "user", "assistant")


def parse_seed(value: str):
    """An integer, or 'none' (unseeded)."""
    return None if value.lower() == "none" else int(value)


SETTINGS = {"temp": float, "top_p": float, "top_k": int, "max_tokens": int, "draft": parse_draft, "seed": parse_seed}

HELP = """\
/help                  this help
/reset                 start a new conversation
/stats                 statistics of the last reply
/set                   show the settings
/set NAME VALUE        change one: temp, top_p, top_k, max_tokens, draft (N or auto), seed (N or none)
/save FILE             write the conversation as JSON
/load FILE             replace the conversation with one written by /save
/exit                  quit (or Ctrl-D)
A line ending in \\ continues on the next line; at a terminal Esc Enter inserts a newline.
Ctrl-C stops a reply (the partial reply is kept)."""


def _token_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v)


class ChatSession:
    """The REPL's logic without terminal I/O: ``handle`` takes one message or slash command."""

    def __init__(self, model, tokenizer, settings: dict, echo=click.echo):
        self.model, self.tokenizer, self.echo = model, tokenizer, echo
        self.settings = dict(settings)  # temp, top_p, top_k, max_tokens, draft, seed
        self.messages: list[dict] = []
        self.last_stats = None
        # the last turn's decode state, and for models whose caches cannot trim, the one before (a snapshot)
        self.cache = PromptCache(model, max_states=2)

    def handle(self, line: str) -> bool:
        """Process one input; False when the session should end."""
        if line.startswith("/"):
            return self.command(line)
        if line.strip():
            self.reply(line)
        return True

    def prompt(self) -> list[int]:
        return conversation_ids(self.tokenizer, self.messages)

    def fit_context(self) -> list[int]:
        """The prompt, after dropping the oldest turns (a leading system message stays) until it leaves room for
        max_tokens (or half the context, if less). Raises ValueError when the new message alone does not fit."""
        ids, ctx = self.prompt(), context_length(self.model)
        if ctx is None:
            return ids
        room, dropped = min(self.settings["max_tokens"], ctx // 2), 0
        first = 1 if self.messages[0]["role"] == "system" else 0
        while len(ids) + room > ctx and len(self.messages) - first > 1:
            n = 2 if len(self.messages) - first > 2 and self.messages[first + 1]["role"] == "assistant" else 1
            del self.messages[first : first + n]
            dropped += n
            ids = self.prompt()
        if len(ids) >= ctx:
            raise ValueError(f"the message makes a prompt of {len(ids)} tokens; the model's context is {ctx}")
        if dropped:
            self.echo(f"(context full: dropped the {dropped} oldest messages; /reset starts over)", err=True)
        return ids

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        kept = list(self.messages)
        s, parts, reply_ids, stats = self.settings, [], [], None
        try:
            ids = self.fit_context()
        except ValueError as e:
            self.messages = kept[:-1]
            self.echo(f"error: {e}", err=True)
            return
        seed = None if s["seed"] is None else s["seed"] + len(self.messages)
        state = self.cache.fetch(ids, uses_mtp(self.model, s["draft"]))
        steps = stream_generate(self.model, self.tokenizer, ids, max_tokens=s["max_tokens"], temperature=s["temp"],
                                top_p=s["top_p"], top_k=s["top_k"], draft_tokens=s["draft"], seed=seed, state=state)
        try:
            for inc in steps:
                self.echo(inc.text, nl=False)
                parts.append(inc.text)
                reply_ids += inc.tokens
                stats = inc.stats
            note = {"length": " (max_tokens reached)", "context": " (context full)"}.get(inc.finish_reason, "")
        except ValueError as e:
            self.messages = kept[:-1]
            self.echo(f"error: {e}", err=True)
            return
        except KeyboardInterrupt:
            steps.close()
            note = " (stopped)"
        finally:
            self.cache.store(state)  # dropped there if Ctrl-C came in the middle of a pass
        self.echo()
        self.messages.append({"role": "assistant", "content": "".join(parts), "ids": reply_ids})
        self.last_stats = stats
        if stats is not None:
            acc = f"acceptance {stats.acceptance_rate:.0%}" if stats.drafted else "no drafts"
            self.echo(f"[prompt {stats.prompt_tokens - stats.cached_tokens} new + {stats.cached_tokens} cached tok, "
                      f"prefill {stats.prefill_tokens_per_s:.1f} tok/s | decode {stats.decode_tokens_per_s:.1f} tok/s | "
                      f"tau {stats.mean_accepted_length:.2f} | {acc} | {stats.generated_tokens} tokens{note}]",
                      err=True)
        elif note:
            self.echo(f"[{note.strip()}]", err=True)

    def command(self, line: str) -> bool:
        name, _, arg = line[1:].strip().partition(" ")
        if name == "exit":
            return False
        run = getattr(self, f"cmd_{name}", None)
        if run is None:
            self.echo(f"error: unknown command /{name}; /help lists them", err=True)
            return True
        try:
            run(arg.strip())
        except (MLXMTPError, ValueError, OSError) as e:
            self.echo(f"error: {e}", err=True)
        return True

    def cmd_help(self, arg):
        self.echo(HELP)

    def cmd_reset(self, arg):
        self.messages, self.last_stats = [], None
        self.cache.clear()
        self.echo("(new conversation)")

    def cmd_stats(self, arg):
        self.echo(stats_line(self.last_stats) if self.last_stats else "no reply yet")

    def cmd_set(self, arg):
        if not arg:
            self.echo(" ".join(f"{k}={v}" for k, v in self.settings.items()))
            return
        key, _, value = arg.partition(" ")
        if key not in SETTINGS:
            raise ValueError(f"unknown setting {key!r}; one of {', '.join(SETTINGS)}")
        try:
            new = {**self.settings, key: SETTINGS[key](value.strip())}
        except ValueError:
            raise ValueError(f"bad value for {key}: {value.strip()!r}") from None
        SamplingParams(new["temp"], new["top_p"], new["top_k"])  # validates
        if new["max_tokens"] < 1:
            raise ValueError("max_tokens must be >= 1")
        if new["draft"] != "auto" and new["draft"] > MAX_DRAFT_TOKENS:
            raise ValueError(f"draft must be 'auto' or from 0 to {MAX_DRAFT_TOKENS}")
        self.settings = new
        self.echo(f"{key}={new[key]}")

    def cmd_save(self, arg):
        if not arg:
            raise ValueError("usage: /save FILE")
        path = Path(arg).expanduser()
        if not path.parent.is_dir():
            raise MLXMTPError(f"cannot save to {arg}: no directory {path.parent}")
        if path.is_dir():
            raise MLXMTPError(f"cannot save to {arg}: it is a directory")
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as e:
            raise MLXMTPError(f"cannot save to {arg}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"messages": self.messages}, f, indent=1, ensure_ascii=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.echo(f"saved {len(self.messages)} messages to {path}")

    def cmd_load(self, arg):
        if not arg:
            raise ValueError("usage: /load FILE")
        try:
            data = json.loads(Path(arg).expanduser().read_text())
        except ValueError as e:
            raise MLXMTPError(f"{arg} is not a JSON file ({e})") from None
        except OSError as e:
            raise MLXMTPError(f"cannot read {arg}: {e.strerror}") from None
        msgs = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise MLXMTPError(f"{arg} is not a conversation written by /save")
        self.messages = [{"role": m["role"], "content": m["content"],
                          **({"ids": m["ids"]} if _token_ids(m.get("ids")) else {})} for m in msgs]
        self.last_stats = None
        self.echo(f"loaded {len(self.messages)} messages")


def read_message(read_line) -> str:
    """One message: lines ending in a backslash continue it."""
    lines = [read_line(">>> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line("... "))
    return "\n".join(lines)


def run(session: ChatSession, read_line) -> None:
    while True:
        try:
            text = read_message(read_line)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        if not session.handle(text):
            return


def terminal_reader():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(HISTORY)), key_bindings=keys)
    return lambda message: prompt.prompt(message)


def stream_reader(stream):
    def read(message):
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


@click.command(cls=Command)
@model_option
@sampling_options
@force_option
def command(model, max_tokens, temp, top_p, top_k, seed, draft_tokens, force_load):
    """Chat with a model in the terminal.

    \b
    Enter sends; a line ending in \\ continues on the next line; Esc Enter inserts a newline.
    Ctrl-C stops a reply (the partial reply is kept); Ctrl-D or /exit quits; /help lists the commands.
    When stdin is not a terminal, messages are read from it line by line.
    """
    path, m, tokenizer = load_checked(model, force_load)
    settings = dict(temp=temp, top_p=top_p, top_k=top_k, max_tokens=max_tokens, draft=draft_tokens, seed=seed)
    session = ChatSession(m, tokenizer, settings)
    mode = "chat template" if tokenizer.has_chat_template else "plain continuation (no chat template)"
    click.echo(f"{path.name}: {m.num_mtp_modules} MTP module(s), {mode}; /help for commands, Ctrl-D to quit",
               err=True)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    run(session, terminal_reader() if interactive else stream_reader(sys.stdin))
