"""The benchmark harness (mlxmtp/bench.py) and `mlxmtp bench` on a tiny DeepSeek-V3 checkpoint: interleaving,
summaries, the JSON report with its bandwidth projections, the expert-union weight-traffic count, suites."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

import mlxmtp
from mlxmtp import bench, tuning
from mlxmtp.cli.main import cli
from tests.tiny import deepseek_v3 as tiny

SUITE = [{"id": "a", "category": "code", "prompt": "def f(x):"},
         {"id": "b", "category": "chat", "prompt": "hello there", "raw": True}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("ds") / "tiny")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return mlxmtp.load(ckpt)


@pytest.fixture(autouse=True)
def _costs_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "CACHE_FILE", tmp_path / "costs.json")


def test_bench_cli_writes_json(ckpt, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench", "-m", str(ckpt), "--repeats", "1", "--max-tokens", "8", "--draft-tokens",
                                 "auto,2,0,1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stdout and "projected" in r.stdout
    report = json.loads(out.read_text())
    names = ["plain", "k=1", "k=2", "auto"]
    assert [s["name"] for s in report["settings"]] == names and report["suite"] == "spec_bench_mini"
    assert report["machine"]["blas"] == mlxmtp.blas.blas_in_use() and report["machine"]["mlx"] == mx.__version__
    n_prompts = len(bench.read_jsonl(bench.SUITES / "spec_bench_mini.jsonl"))
    assert report["prompts"] == n_prompts and len(report["runs"]) == n_prompts * 4
    assert set(report["categories"]) == {"code", "chat", "math", "summarization", "QA", "translation"}
    assert any(run["prompt_truncated"] for run in report["runs"])  # the tiny model's context is 256 tokens
    s = report["summary"]
    assert s["plain"]["ratio_vs_plain"] == 1.0 and s["plain"]["tau"] == 1.0
    for name in names:
        e = s[name]
        assert set(e["by_category"]) == set(report["categories"])
        assert e["weight_bytes_per_token"] > 0
        assert list(e["projected_tokens_per_s"]) == ["819 GB/s (M3 Ultra)", "546 GB/s (M4 Max)", "273 GB/s (M4 Pro)"]
        assert e["projected_tokens_per_s"]["819 GB/s (M3 Ultra)"] == pytest.approx(819e9 / e["weight_bytes_per_token"])
    assert len(s["k=2"]["acceptance_by_depth"]) == 2 and s["k=2"]["drafted"] == 2 * s["k=2"]["verify_passes"]
    # verify passes of 2-3 tokens read the union of their experts: more than top-k, at most all of them
    assert s["plain"]["experts_per_moe_layer_pass"] == 2
    assert 2 < s["k=2"]["experts_per_moe_layer_pass"] <= 6


def test_interleaved_with_mlx_lm(loaded, ckpt):
    settings = bench.parse_settings("0,1", mlx_lm=True)
    report = bench.run(*loaded, SUITE, settings, repeats=2, max_tokens=6, model_path=ckpt, progress=False)
    runs = report["runs"]
    assert len(runs) == 2 * 2 * 3
    groups = [runs[i:i + 3] for i in range(0, len(runs), 3)]  # one (repeat, prompt) each, every setting once
    assert all(sorted(r["setting"] for r in g) == ["k=1", "mlx-lm", "plain"] for g in groups)
    assert len({g[0]["setting"] for g in groups}) == 3  # the order rotates
    lm, plain = report["summary"]["mlx-lm"], report["summary"]["plain"]
    assert lm["backend"] == "mlx-lm" and lm["tau"] == 1.0 and "projected_tokens_per_s" not in lm
    # same greedy continuation: mlx-lm's model decodes as many tokens as mlxmtp's
    assert [r["generated_tokens"] for r in runs if r["setting"] == "mlx-lm"] == \
           [r["generated_tokens"] for r in runs if r["setting"] == "plain"]
    assert plain["decode_tokens_per_s_median"] > 0 and lm["ratio_vs_plain"] > 0


def test_weight_traffic(loaded):
    model = loaded[0]
    modules = [m for _, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchLinear))]
    experts = {n: b for n, b in tree_flatten(model.parameters()) if ".switch_mlp." in n}
    dense = sum(p.size * 4 for n, p in tree_flatten(model.parameters())
                if n not in experts and not n.startswith(("mtp.", "model.embed_tokens.")))
    per_expert = sum(p.size * 4 for n, p in experts.items() if not n.startswith("mtp.")) / (8 * 2)
    traffic = bench.WeightTraffic(model)
    assert traffic.dense["trunk"] == dense
    with traffic:
        cache = model.make_cache()
        mx.eval(model(mx.array([list(range(10, 30))]), cache))
        traffic.reset()
        mx.eval(model(mx.array([[5]]), cache))  # one decode step: top-2 of 8 experts in each of the 2 MoE layers
        one = traffic.summary(1)
        traffic.reset()
        mx.eval(model(mx.array([[5, 6, 7, 8]]), cache))  # a 4-token verify pass: the union of its experts
        four = traffic.summary(4)
    assert one["weight_bytes"] == dense + 2 * 2 * per_expert and one["experts_per_moe_layer_pass"] == 2
    assert 2 <= four["experts_per_moe_layer_pass"] <= 8 and four["verify_passes"] == 1
    assert four["weight_bytes"] == dense + four["experts_per_moe_layer_pass"] * 2 * per_expert
    # off: the model is exactly as before (no recording class, no wrapped methods)
    assert len(modules) == 3 * 4 and all(type(m) in (SwitchGLU, SwitchLinear) for m in modules)
    assert "trunk" not in vars(model) and "mtp_forward" not in vars(model)


def test_parse_settings():
    assert [s.name for s in bench.parse_settings("2, 0,auto,1,2")] == ["plain", "k=1", "k=2", "auto"]
    assert [s.name for s in bench.parse_settings("3", mlx_lm=True)] == ["plain", "k=3", "mlx-lm"]
    for bad in ["-1", "banana", "1,,2"]:
        with pytest.raises(ValueError):
            bench.parse_settings(bad)


@pytest.mark.parametrize("args,words", [(["--draft-tokens", "1,banana"], "banana"), (["--repeats", "0"], "--repeats"),
                                        (["--suite", "nope"], "unknown suite"), (["--max-tokens", "300"], "context")])
def test_bench_bad_input(ckpt, args, words):
    r = CliRunner().invoke(cli, ["bench", "-m", str(ckpt), *args])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_plot_without_matplotlib(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    r = CliRunner().invoke(cli, ["bench", "-m", str(ckpt), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 1 and r.stderr.strip() == "error: --plot needs matplotlib: pip install 'mlxmtp[plot]'"


def test_stdlib_code_suite(tmp_path, loaded):
    (tmp_path / "heldout_files.txt").write_text("argparse.py\nno/such/file.py\njson/decoder.py\n")
    assert bench.default_suite(tmp_path) == "stdlib_code"
    items = bench.load_suite("stdlib_code", tmp_path)
    assert [i["id"].split(":")[0] for i in items] == ["argparse.py", "json/decoder.py"]
    for i in items:
        lines = i["prompt"].splitlines()
        assert len(lines) == bench.PROMPT_LINES and lines[0].lstrip().startswith(("def ", "async def "))
        assert i["category"] == "stdlib_code" and i["raw"]
    ids, truncated = bench.encode(loaded[1], items[0], room=100)
    assert truncated and len(ids) == 100
    with pytest.raises(mlxmtp.MLXMTPError, match="heldout_files.txt"):
        bench.load_suite("stdlib_code", tmp_path / "elsewhere")


def test_builtin_suite():
    items = bench.load_suite("spec_bench_mini", None)
    cats = {}
    for i in items:
        cats[i["category"]] = cats.get(i["category"], 0) + 1
    assert set(cats) == {"code", "chat", "math", "summarization", "QA", "translation"} and min(cats.values()) >= 3
    assert len({i["id"] for i in items}) == len(items)
