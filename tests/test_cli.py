"""`mlxmtp generate` and the command group through the command line (click's CliRunner; a subprocess where the
imports of a fresh process matter) on tiny DeepSeek-V3 checkpoints: output formats, start-up imports, the model
argument, stdin, and every bad input ending in one clear line on stderr, exit status 1 and no traceback."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import mlxmtp
from mlxmtp import blas, inspection, tuning
from mlxmtp.cli import generate as generate_cmd
from mlxmtp.cli.main import COMMANDS, cli
from mlxmtp.convert import convert
from mlxmtp.generation import GenerationIncrement, GenerationStats
from mlxmtp.speculative import MAX_DRAFT_TOKENS
from tests.tiny import deepseek_v3 as tiny

HEAVY = ("mlx_lm", "transformers", "torch")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("ds") / "tiny")


@pytest.fixture(autouse=True)
def _costs_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE_FILE", tmp_path / "costs.json")


def run(*args, input=None, prompt=None):
    args = [*args, "-p", prompt] if prompt is not None else args
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_error(result, *words):
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_generate_json(ckpt):
    r = run("generate", "-m", ckpt, "-p", "hello", "--max-tokens", 12, "--draft-tokens", 2, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "stats", "finish_reason"}
    assert list(out["stats"]) == list(GenerationStats().to_dict())
    assert out["finish_reason"] == "length" and len(out["tokens"]) == out["stats"]["generated_tokens"] == 12
    assert out["stats"]["drafted"] == 2 * out["stats"]["target_forwards"]
    # streamed text and the stats line; greedy MTP decoding gives the same text as the API's plain decoding
    model, tok = mlxmtp.load(ckpt)
    plain = mlxmtp.generate(model, tok, "hello", max_tokens=12, draft_tokens=0)
    assert out["tokens"] == plain.tokens
    r = run("generate", "-m", ckpt, "-p", "hello", "--max-tokens", 12, "--draft-tokens", 2)
    assert r.exit_code == 0 and r.stdout == plain.text + "\n"
    assert "tok/s" in r.stderr and "tau" in r.stderr and "verify passes" in r.stderr
    assert "finish: length" in r.stderr


def test_stats_line_of_plain_decoding_has_no_drafting_figures(ckpt):
    r = run("generate", "-m", ckpt, "-p", "hello", "--max-tokens", 6, "--draft-tokens", 0)
    assert r.exit_code == 0, r.output
    assert "plain decoding (no drafts)" in r.stderr
    assert "verify passes" not in r.stderr and "tau" not in r.stderr and "acceptance" not in r.stderr


def test_prompt_from_stdin_and_sampling(ckpt):
    args = ["generate", "-m", ckpt, "--max-tokens", 6, "--temp", 0.8, "--top-p", 0.9, "--top-k", 20, "--seed", 3,
            "--json", "--draft-tokens", 2]  # a fixed depth: auto's choices follow round times
    a, b = run(*args, input="hello"), run(*args, input="hello")
    assert a.exit_code == 0 and json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]
    assert json.loads(a.stdout)["stats"]["prompt_tokens"] == 5


def test_temperature_is_an_alias_of_temp(ckpt):
    args = ["generate", ckpt, "-p", "hello", "--max-tokens", 6, "--seed", 1, "--json", "--draft-tokens", 2]
    a, b = run(*args, "--temp", 0.9), run(*args, "--temperature", 0.9)
    assert a.exit_code == b.exit_code == 0, b.output
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_prompt_from_stdin_loses_one_trailing_newline(ckpt):
    def out(**how):
        r = run("generate", ckpt, "--max-tokens", 4, "--draft-tokens", 0, "--json", **how)
        assert r.exit_code == 0, r.output
        o = json.loads(r.stdout)
        return o["stats"]["prompt_tokens"], o["tokens"]

    typed = out(prompt="hello")
    assert out(input="hello\n") == out(input="hello\r\n") == typed  # `echo hello |`, and a Windows editor's file
    assert out(input="hello\n\n") == out(prompt="hello\n") != typed  # only one newline is dropped


def test_no_mtp_flag(ckpt):
    r = run("generate", "-m", ckpt, "-p", "hi", "--max-tokens", 4, "--draft-tokens", 2, "--no-mtp", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["drafted"] == 0
    assert r.stderr.strip() == "warning: --no-mtp: decoding plain, --draft-tokens 2 has no effect"
    r = run("generate", "-m", ckpt, "-p", "hi", "--max-tokens", 4, "--no-mtp", "--json")  # no drafts asked for
    assert r.exit_code == 0 and r.stderr == ""


def test_draft_tokens_on_a_checkpoint_converted_without_mtp(ckpt, tmp_path):
    out = convert(ckpt, tmp_path / "q4", bits=4, group_size=32, mtp=False)
    r = run("generate", out, "-p", "hi", "--max-tokens", 4, "--draft-tokens", 2, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["drafted"] == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: q4 was converted without its MTP modules"), r.stderr
    assert "--draft-tokens 2 has no effect" in lines[0]
    assert run("generate", out, "-p", "hi", "--max-tokens", 4, "--json").stderr == ""  # auto: nothing to say


def test_model_as_argument_or_option(ckpt, tmp_path):
    args = ["-p", "hi", "--max-tokens", 3, "--draft-tokens", 0, "--json"]
    by_option, by_argument = run("generate", "-m", ckpt, *args), run("generate", ckpt, *args)
    assert by_option.exit_code == by_argument.exit_code == 0, by_argument.output
    assert json.loads(by_option.stdout)["tokens"] == json.loads(by_argument.stdout)["tokens"]
    assert run("generate", ckpt, "--model", ckpt, *args).exit_code == 0  # the same one twice is fine
    assert_one_line_error(run("generate", ckpt, "--model", tmp_path, *args), "two models given")
    assert json.loads(run("inspect", "--model", ckpt, "--json").stdout)["path"] == str(ckpt)


def test_checkpoint_without_mtp_warns_and_runs(tmp_path, caplog):
    path = tiny.make(tmp_path / "nomtp", mtp=False)
    with caplog.at_level(logging.WARNING, logger="mlxmtp"):
        r = run("generate", "-m", path, "-p", "hi", "--max-tokens", 4, "--draft-tokens", 2, "--json")
    assert r.exit_code == 0, r.output
    assert any("no MTP weights" in m for m in caplog.messages)
    assert json.loads(r.stdout)["stats"]["drafted"] == 0


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("generate", "-m", tmp_path / "nope", "-p", "hi"), "does not exist")


def test_directory_without_config(tmp_path):
    assert_one_line_error(run("generate", "-m", tmp_path, "-p", "hi"), "no config.json")


def test_unknown_model_type(ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama9000"}))
    assert_one_line_error(run("generate", "-m", path, "-p", "hi"), "llama9000")


def test_truncated_safetensors(ckpt, tmp_path):
    path = shutil.copytree(ckpt, tmp_path / "c")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(run("generate", "-m", path, "-p", "hi"), "truncated")


@pytest.mark.parametrize("flag", [["--draft-tokens", "-3"], ["--draft-tokens", "banana"],
                                  ["--draft-tokens", str(MAX_DRAFT_TOKENS + 1)], ["--draft-tokens", "100"],
                                  ["--temp", "-1"], ["--temp", "nan"], ["--temp", "inf"], ["--temperature", "NaN"],
                                  ["--top-p", "2"], ["--top-p", "nan"], ["--top-k", "-1"], ["--max-tokens", "0"],
                                  ["--bogus"]])
def test_nonsense_flags(ckpt, flag):
    assert_one_line_error(run("generate", "-m", ckpt, "-p", "hi", *flag), flag[0])


def test_deepest_draft_is_accepted(ckpt):
    r = run("generate", ckpt, "-p", "hi", "--max-tokens", 3, "--draft-tokens", MAX_DRAFT_TOKENS, "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args", [["bogus"], ["generate", "--bogus"], ["inspect", "--bogus"], ["convert"],
                                  ["bench", "--repeats", "x"]])
def test_usage_errors_exit_1_like_every_user_error(args):
    r = run(*args)
    assert_one_line_error(r, "--help")


def test_bare_command_prints_the_help():
    r = run()
    assert r.exit_code == 0 and r.stdout.startswith("Usage: ") and "generate" in r.stdout


def fresh_process(code: str) -> dict:
    """Run code in a new interpreter; returns {module: imported?} for mlx.core, the command modules and HEAVY,
    recorded at exit (after the CLI's sys.exit). A module marked absent (sys.modules[name] = None) is not imported."""
    probe = ("import atexit, json, sys\n"
             "names = ['mlx.core', *HEAVY, *['mlxmtp.cli.' + m for m, _ in COMMANDS.values()]]\n"
             "atexit.register(lambda: sys.stderr.write('\\nMODULES ' + json.dumps("
             "{n: sys.modules.get(n) is not None for n in names})))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}; COMMANDS = {COMMANDS!r}\n" + probe + code],
                       capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stderr.rpartition("MODULES ")[2])


def cli_process(*args) -> str:
    return f"import sys; sys.argv = ['mlxmtp', *{[str(a) for a in args]!r}]\nfrom mlxmtp.cli.main import cli; cli()"


def test_help_imports_no_command_module_and_nothing_heavy():
    loaded = fresh_process(cli_process("--help"))
    assert not any(loaded.values()), loaded  # not even mlx: the listing comes from main.COMMANDS


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "inspect", "convert"])
def test_command_help_imports_nothing_heavy(command):
    loaded = fresh_process(cli_process(command, "--help"))
    assert not any(loaded[m] for m in HEAVY), loaded


def test_generate_never_imports_torch(ckpt):
    loaded = fresh_process(cli_process("generate", ckpt, "-p", "hi", "--max-tokens", 2))
    assert loaded["transformers"] and loaded["mlx_lm"]  # the tokenizer was loaded through them ...
    assert not loaded["torch"]  # ... and torch, installed with the test extra, was not


def test_reference_blas_hint_once(ckpt, monkeypatch):
    monkeypatch.setattr(blas, "_loaded", None)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.delenv("MLXMTP_NO_OPENBLAS", raising=False)
    monkeypatch.setattr(generate_cmd, "_hinted", False)
    args = ["generate", ckpt, "-p", "hi", "--max-tokens", 2, "--json"]
    first, second = run(*args), run(*args)
    assert first.exit_code == second.exit_code == 0
    assert first.stderr.strip() == f"hint: {blas.reference_blas_hint()}" and "libopenblas0-pthread" in first.stderr
    assert second.stderr == ""
    monkeypatch.setattr(generate_cmd, "_hinted", False)
    monkeypatch.setenv("MLXMTP_NO_OPENBLAS", "1")  # asked for: nothing to hint
    assert run(*args).stderr == ""


def test_prompt_longer_than_context(ckpt):
    assert_one_line_error(run("generate", "-m", ckpt, "-p", "x" * 300), "context")


def test_empty_prompt(ckpt):
    assert_one_line_error(run("generate", "-m", ckpt, input=""), "empty")


def test_memory_refusal_and_force_load(ckpt, monkeypatch):
    monkeypatch.setattr(inspection, "memory_budget", lambda: (1, "test budget"))
    assert_one_line_error(run("generate", "-m", ckpt, "-p", "hi"), "--force-load")
    assert run("generate", "-m", ckpt, "-p", "hi", "--max-tokens", 2, "--force-load").exit_code == 0


def test_default_model(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(mlxmtp, "demo_model_path", lambda: tmp_path / "demo_model")
    assert_one_line_error(run("generate", "-p", "hi"), "--model")
    monkeypatch.setattr(mlxmtp, "demo_model_path", lambda: ckpt)
    assert run("generate", "-p", "hi", "--max-tokens", 2).exit_code == 0


def test_ctrl_c_mid_generation(ckpt, monkeypatch):
    def interrupted(*args, **kwargs):
        yield GenerationIncrement("partial", [1], GenerationStats())
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_cmd, "stream_generate", interrupted)
    r = run("generate", "-m", ckpt, "-p", "hi")
    assert r.exit_code == 130 and r.stdout == "partial\n" and "Traceback" not in r.output
    stats, end = r.stderr.strip().splitlines()  # what was generated is still reported
    assert stats == f"[{generate_cmd.stats_line(GenerationStats())} | finish: interrupted]" and end == "interrupted"
    r = run("generate", "-m", ckpt, "-p", "hi", "--json")
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted"
    assert json.loads(r.stdout) == {"text": "partial", "tokens": [1], "stats": GenerationStats().to_dict(),
                                    "finish_reason": "interrupted"}


def test_seed_with_auto_says_it_does_not_pin_the_draws(ckpt):
    r = run("generate", ckpt, "-p", "hello", "--max-tokens", 4, "--temp", 0.8, "--seed", 1)
    assert r.exit_code == 0, r.output
    assert "--seed repeats a sample exactly only with a fixed --draft-tokens" in r.stderr
    fixed = run("generate", ckpt, "-p", "hello", "--max-tokens", 4, "--temp", 0.8, "--seed", 1, "--draft-tokens", 2)
    assert fixed.exit_code == 0 and "--seed repeats" not in fixed.stderr
