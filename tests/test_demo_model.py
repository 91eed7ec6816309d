"""The bundled demo model is a real MTP model: it loads through the same path as any checkpoint, its head was trained
by mlxmtp train-heads, and on held-out standard-library code and on code from outside the standard library (both
prompt sets end in a newline) its greedy tau at k = 1 and k = 3 holds the figures in the README, with output equal to
plain decoding; after a trailing newline it continues the code instead of printing blank lines."""

import json

import pytest

import mlxmtp
from mlxmtp import generation
from mlxmtp.bench import read_jsonl, stdlib_code_suite

MAX_TOKENS = 48
# README figures (training/README.md), asserted a little below the measured values: stdlib k=1 1.82, k=3 2.84;
# external k=1 1.87, k=3 3.04 (issue 12's targets: >= 1.8 at k=1 and >= 2.5 at k=3 on both).
MIN_TAU = {("stdlib", 1): 1.80, ("stdlib", 3): 2.80, ("external", 1): 1.84, ("external", 3): 3.00}


@pytest.fixture(scope="module")
def demo():
    path = mlxmtp.demo_model_path()
    model, tokenizer = mlxmtp.load(path)
    suites = {"stdlib": [i["prompt"] for i in stdlib_code_suite(path / "heldout_files.txt", n=12)],
              "external": [i["prompt"] for i in read_jsonl(path / "heldout_external.jsonl")]}
    return path, model, tokenizer, suites


def test_demo_model_is_a_real_mtp_model(demo):
    path, model, tokenizer, suites = demo
    assert model.load_report["model_type"] == "deepseek_v3" and model.num_mtp_modules == 1
    assert json.loads((path / "config.json").read_text())["mlxmtp"]["mtp_heads"]["trained_by"] == "mlxmtp train-heads"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 40 * 2**20
    for name, prompts in suites.items():
        assert len(prompts) == 12 and all(p.endswith("\n") for p in prompts)
        for k in (1, 3):
            accepted = forwards = 0
            for p in prompts:
                mtp = generation.generate(model, tokenizer, p, max_tokens=MAX_TOKENS, draft_tokens=k)
                if k == 1 or p is prompts[0]:
                    plain = generation.generate(model, tokenizer, p, max_tokens=MAX_TOKENS, draft_tokens=0)
                    assert mtp.tokens == plain.tokens, (name, k)
                accepted += mtp.stats.accepted
                forwards += mtp.stats.target_forwards
            tau = 1 + accepted / forwards
            assert tau >= MIN_TAU[name, k], f"{name}: held-out greedy tau at k={k} is {tau:.3f}"


def test_trailing_newline_continues_the_code(demo):
    """Three-line openings of functions it never saw, each ending in a newline: the continuation is mostly
    non-blank lines (the shipped model before issue 12 answered with a page of blank lines)."""
    _, model, tokenizer, suites = demo
    blank = total = 0
    for p in suites["external"]:
        lines = generation.generate(model, tokenizer, p, max_tokens=MAX_TOKENS, draft_tokens=1).text.split("\n")[:-1]
        blank += sum(not line.strip() for line in lines)
        total += len(lines)
    assert total and blank / total < 0.35, f"{blank} of {total} generated lines are blank"
