"""`mlxmtp chat` driven through stdin (CliRunner input), and its ChatSession logic: slash commands, /save + /load,
prompts with and without a chat template, Ctrl-C mid-reply, a conversation that outgrows the context, and the
prompt cache across turns (turn 2 prefills only its new tokens, and answers as a fresh prefill would)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner

import mlxmtp
from mlxmtp import tuning
from mlxmtp.cli import chat
from mlxmtp.cli.main import cli
from mlxmtp.conversation import conversation_ids
from mlxmtp.generation import GenerationIncrement, GenerationStats
from tests.tiny import deepseek_v3 as tiny

SETTINGS = dict(temp=0.0, top_p=1.0, top_k=0, max_tokens=6, draft="auto", seed=None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("ds") / "tiny")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return mlxmtp.load(ckpt)


@pytest.fixture(autouse=True)
def _costs_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE_FILE", tmp_path / "costs.json")


class Echo:
    def __init__(self):
        self.out, self.err = [], []

    def __call__(self, text="", nl=True, err=False):
        (self.err if err else self.out).append(text + ("\n" if nl else ""))


def session(loaded, **settings):
    echo = Echo()
    return chat.ChatSession(*loaded, {**SETTINGS, **settings}, echo=echo), echo


def chat_cli(ckpt, text, *flags):
    return CliRunner().invoke(cli, ["chat", "-m", str(ckpt), "--max-tokens", "6", *map(str, flags)], input=text)


def test_chat_through_stdin(ckpt, loaded):
    r = chat_cli(ckpt, "hello\nmore \\\ntext\n/stats\n", "--draft-tokens", 1)
    assert r.exit_code == 0, r.output
    assert "plain continuation" in r.stderr
    stats = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2 and all("tok/s" in s and "tau" in s and "acceptance" in s for s in stats)
    # the second prompt is the conversation so far, the new message on a new line: same text as generating
    # from it directly
    r1 = mlxmtp.generate(*loaded, "hello", max_tokens=6, draft_tokens=0)
    first = r1.text  # the reply continues as the ids it was generated as (conversation.py)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first, "ids": r1.tokens},
                {"role": "user", "content": "more \ntext"}]
    second = mlxmtp.generate(*loaded, conversation_ids(loaded[1], messages), max_tokens=6, draft_tokens=0).text
    assert r.stdout.startswith(f"{first}\n{second}\n") and "verify passes" in r.stdout


def test_exit_and_end_of_input(ckpt):
    r = chat_cli(ckpt, "/exit\nhello\n")
    assert r.exit_code == 0 and r.stdout == ""
    assert chat_cli(ckpt, "").exit_code == 0


def test_bad_flags_one_line(ckpt):
    r = chat_cli(ckpt, "", "--temp", -1)
    assert r.exit_code != 0 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_slash_commands(loaded):
    s, echo = session(loaded)
    assert s.handle("/help") and "/save FILE" in echo.out[-1]
    s.handle("/stats")
    assert echo.out[-1] == "no reply yet\n"
    for cmd, key, value in [("/set temp 0.7", "temp", 0.7), ("/set top_p 0.9", "top_p", 0.9),
                            ("/set top_k 5", "top_k", 5), ("/set max_tokens 3", "max_tokens", 3),
                            ("/set draft 2", "draft", 2), ("/set draft auto", "draft", "auto"),
                            ("/set seed 3", "seed", 3), ("/set seed none", "seed", None)]:
        s.handle(cmd)
        assert s.settings[key] == value
    before = dict(s.settings)
    for bad in ["/set temp -1", "/set top_p 2", "/set top_k x", "/set max_tokens 0", "/set draft -1", "/set draft no",
                "/set draft 99", "/set seed x", "/set colour red", "/frobnicate", "/save", "/load"]:
        echo.err.clear()
        assert s.handle(bad)
        assert len(echo.err) == 1 and echo.err[0].startswith("error: ")
    assert s.settings == before
    s.handle("/set")
    assert "temp=0.7" in echo.out[-1] and "draft=auto" in echo.out[-1] and "seed=None" in echo.out[-1]
    s.handle("/set temp 0")
    s.handle("hi")
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.last_stats.generated_tokens <= 3
    s.handle("/stats")
    assert "tok/s" in echo.out[-1]
    s.handle("/reset")
    assert s.messages == [] and s.last_stats is None
    assert s.handle("/exit") is False


def test_save_load_round_trip(loaded, tmp_path):
    s, _ = session(loaded)
    s.handle("hello")
    s.handle("again")
    f = tmp_path / "saved" / "conv.json"
    f.parent.mkdir()
    s.handle(f"/save {f}")
    assert json.loads(f.read_text()) == {"messages": s.messages}
    assert [p.name for p in f.parent.iterdir()] == ["conv.json"]  # no temp file left behind
    saved = list(s.messages)
    s.handle("/reset")
    s.handle(f"/load {f}")
    assert s.messages == saved and len(saved) == 4


@pytest.mark.parametrize("content", ["not json", '{"messages": [{"role": "wizard", "content": "x"}]}', "[1, 2]",
                                     '{"messages": "hello"}', None])
def test_load_bad_file_keeps_conversation(loaded, tmp_path, content):
    s, echo = session(loaded)
    s.handle("hello")
    before = list(s.messages)
    f = tmp_path / "bad.json"
    if content is not None:
        f.write_text(content)
    echo.err.clear()
    s.handle(f"/load {f}")
    assert s.messages == before
    assert len(echo.err) == 1 and echo.err[0].startswith("error: ") and echo.err[0].count("\n") == 1


def test_save_to_missing_directory(loaded, tmp_path):
    s, echo = session(loaded)
    target = tmp_path / "no" / "such" / "dir.json"
    s.handle(f"/save {target}")
    assert echo.err == [f"error: cannot save to {target}: no directory {target.parent}\n"]
    echo.err.clear()
    s.handle(f"/save {tmp_path}")
    assert echo.err == [f"error: cannot save to {tmp_path}: it is a directory\n"]
    assert list(tmp_path.iterdir()) == []


def test_load_missing_file_names_it(loaded, tmp_path):
    s, echo = session(loaded)
    s.handle(f"/load {tmp_path / 'gone.json'}")
    assert echo.err == [f"error: cannot read {tmp_path / 'gone.json'}: No such file or directory\n"]


def test_ctrl_c_mid_reply_keeps_conversation(ckpt, monkeypatch):
    def interrupted(*args, **kwargs):
        yield GenerationIncrement("part", [1], GenerationStats(generated_tokens=1))
        yield GenerationIncrement("ial", [2], GenerationStats(generated_tokens=2))
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "stream_generate", interrupted)
    f = ckpt.parent / "interrupted.json"
    r = chat_cli(ckpt, f"hello\n/save {f}\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("partial\n") and "(stopped)" in r.stderr
    assert json.loads(f.read_text())["messages"] == [{"role": "user", "content": "hello"},
                                                     {"role": "assistant", "content": "partial", "ids": [1, 2]}]


def test_conversation_outgrowing_context(loaded):
    s, echo = session(loaded)
    s.handle("hello")
    before = list(s.messages)
    s.handle("x" * 300)  # the tiny model's context is 256 tokens: this message alone does not fit
    assert s.messages == before and echo.err[-1].startswith("error: ") and "context is 256" in echo.err[-1]
    s.handle("again")
    assert len(s.messages) == 4
    # turns that fill the context: the oldest are dropped with one notice line, the conversation goes on
    for i in range(3):
        s.handle(f"{i}" * 80)
    notices = [e for e in echo.err if e.startswith("(context full")]
    assert notices and all("oldest messages; /reset starts over" in n for n in notices)
    assert s.messages[-2]["content"] == "2" * 80 and s.messages[-1]["role"] == "assistant"
    assert len(conversation_ids(loaded[1], s.messages[:-1])) + 6 <= 256


def test_system_message_kept_when_dropping(loaded):
    s, echo = session(loaded)
    s.messages = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        s.handle(f"{i}" * 70)
    assert s.messages[0] == {"role": "system", "content": "be brief"} and s.messages[1]["role"] == "user"


@pytest.fixture(scope="module")
def demo():
    return mlxmtp.load(mlxmtp.demo_model_path())


@pytest.mark.parametrize("draft", [0, 2])
def test_turns_prefill_only_new_tokens(demo, draft):
    """Six turns on the demo model: from turn 2 on, the prompt tokens prefilled are the new message's (plus the
    reply's last token, emitted but never fed), and each reply equals a fresh generation from the whole
    conversation."""
    s, echo = session(demo, max_tokens=12, draft=draft)
    lines = ["def add(a, b):", "def sub(a, b):", "class Point:", "import os", "for x in y:", "return None"]
    for i, line in enumerate(lines):
        before = conversation_ids(demo[1], s.messages)
        s.handle(line)
        prompt = conversation_ids(demo[1], s.messages[:-1])
        fresh = mlxmtp.generate(*demo, prompt, max_tokens=12, draft_tokens=draft)
        assert s.messages[-1]["content"] == fresh.text
        new = s.last_stats.prompt_tokens - s.last_stats.cached_tokens
        assert s.last_stats.prompt_tokens == len(prompt)
        if i:  # the reply's last token was emitted but never fed (no pass is queued past max_tokens)
            assert new == len(prompt) - len(before) + 1, i
            assert re.search(rf"\[prompt {new} new \+ {len(prompt) - new} cached tok", echo.err[-1])


def test_chat_pipe_reports_reuse(demo):
    """Through a pipe, as a user runs it: turn 2's stats line reports only the new message (+1) as prefilled."""
    r = CliRunner().invoke(cli, ["chat", "--max-tokens", "10", "--draft-tokens", "1"], input="import os\nimport sys\n")
    stats = [line for line in r.stderr.splitlines() if line.startswith("[prompt")]
    assert r.exit_code == 0 and len(stats) == 2, r.output
    first = len(demo[1].encode("import os"))
    assert stats[0].startswith(f"[prompt {first} new + 0 cached tok")
    new, cached = map(int, re.match(r"\[prompt (\d+) new \+ (\d+) cached", stats[1]).groups())
    assert new == len(demo[1].encode("\nimport sys", add_special_tokens=False)) + 1 and cached == first + 10 - 1
