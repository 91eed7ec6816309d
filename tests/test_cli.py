"""`mlxmtp generate` through the command line (click's CliRunner) on tiny DeepSeek-V3 checkpoints: output formats,
and every bad input ending in one clear line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from click.testing import CliRunner

import mlxmtp
from mlxmtp import inspection, tuning
from mlxmtp.cli import generate as generate_cmd
from mlxmtp.cli.main import cli
from mlxmtp.generation import GenerationIncrement, GenerationStats
from tests.tiny import deepseek_v3 as tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("ds") / "tiny")


@pytest.fixture(autouse=True)
def _costs_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE_FILE", tmp_path / "costs.json")


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def assert_one_line_error(result, *words):
    assert result.exit_code != 0
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
    r = run("generate", "-m", ckpt, "-p", "hello", "--max-tokens", 12)
    assert r.exit_code == 0 and r.stdout == plain.text + "\n"
    assert "tok/s" in r.stderr and "tau" in r.stderr and "finish: length" in r.stderr


def test_prompt_from_stdin_and_sampling(ckpt):
    args = ["generate", "-m", ckpt, "--max-tokens", 6, "--temp", 0.8, "--top-p", 0.9, "--top-k", 20, "--seed", 3,
            "--json"]
    a, b = run(*args, input="hello"), run(*args, input="hello")
    assert a.exit_code == 0 and json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]
    assert json.loads(a.stdout)["stats"]["prompt_tokens"] == 5


def test_no_mtp_flag(ckpt):
    r = run("generate", "-m", ckpt, "-p", "hi", "--max-tokens", 4, "--draft-tokens", 2, "--no-mtp", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["stats"]["drafted"] == 0


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


@pytest.mark.parametrize("flag", [["--draft-tokens", "-3"], ["--draft-tokens", "banana"], ["--temp", "-1"],
                                  ["--top-p", "2"], ["--top-k", "-1"], ["--max-tokens", "0"], ["--bogus"]])
def test_nonsense_flags(ckpt, flag):
    assert_one_line_error(run("generate", "-m", ckpt, "-p", "hi", *flag), flag[0])


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
    assert r.exit_code == 130 and r.stdout == "partial\n" and r.stderr.strip() == "interrupted"
    assert "Traceback" not in r.output
