"""The benchmark harness (mlxmtp/bench.py) and `mlxmtp bench` on a tiny DeepSeek-V3 checkpoint: interleaving,
summaries, the JSON report, bandwidth projections (only for bandwidth-bound sizes), the expert-union weight-traffic
count, suites, Ctrl-C keeping the finished runs, the plot."""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear
from rich.console import Console

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
    assert "tok/s" in r.stdout and "bound@" not in r.stdout  # a toy model: no bandwidth projection ...
    assert "No bandwidth projection: under 0.5 GB of weights read per token" in r.stdout  # ... and why not
    report = json.loads(out.read_text())
    assert report["interrupted"] is False and len(report["runs"]) == report["runs_planned"]
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
        assert 0 < e["weight_bytes_per_token"] < bench.MIN_PROJECTED_BYTES and "projected_tokens_per_s" not in e
    assert len(s["k=2"]["acceptance_by_depth"]) == 2 and s["k=2"]["drafted"] == 2 * s["k=2"]["verify_passes"]
    # what auto chose, and the syncs per round (greedy: one)
    assert sum(s["auto"]["rounds_by_depth"]) == s["auto"]["verify_passes"] and s["plain"]["rounds_by_depth"] == [
        s["plain"]["verify_passes"]] and s["k=2"]["rounds_by_depth"][2] == s["k=2"]["verify_passes"]
    assert s["k=2"]["syncs_per_round"] == 1.0 and "auto chose: k=" in r.stdout
    # verify passes of 2-3 tokens read the union of their experts: more than top-k, at most all of them
    assert s["plain"]["experts_per_moe_layer_pass"] == 2
    assert 2 < s["k=2"]["experts_per_moe_layer_pass"] <= 6


def fake_run(setting, weight_bytes, repeat=0):
    return {"setting": setting, "repeat": repeat, "prompt_id": "p", "category": "code", "decode_tokens_per_s": 10.0,
            "target_forwards": 10, "drafted": 0, "accepted": 0, "acceptance_by_depth": [],
            "weight_bytes": weight_bytes * 10, "decode_tokens": 10, "experts_per_moe_layer_pass": None}


def test_projection_only_for_bandwidth_bound_sizes():
    settings = bench.parse_settings("0")
    big = bench.summarize([fake_run("plain", 4e9)], settings)["plain"]  # 4 GB per token: an 8B model at 4 bits
    assert list(big["projected_tokens_per_s"]) == ["819 GB/s (M3 Ultra)", "546 GB/s (M4 Max)", "273 GB/s (M4 Pro)"]
    assert big["projected_tokens_per_s"]["819 GB/s (M3 Ultra)"] == pytest.approx(819e9 / 4e9)
    assert "projected_tokens_per_s" not in bench.summarize([fake_run("plain", 0.4e9)], settings)["plain"]
    console = Console(record=True, width=200)
    bench.print_report({"model": "m", "prompts": 1, "repeats": 1, "max_tokens": 10, "categories": ["code"],
                        "summary": {"plain": big}}, console=console)
    text = console.export_text()
    assert "bound@819" in text and " 205 " in text and "an upper bound for a Mac with" in text


def test_ctrl_c_keeps_the_finished_runs(ckpt, tmp_path, monkeypatch):
    calls, real = [], bench._run_mlxmtp

    def interrupted_after_five(*args, **kwargs):  # 2 warm-ups, then 3 measured runs
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_run_mlxmtp", interrupted_after_five)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench", str(ckpt), "--repeats", "2", "--max-tokens", "4", "--draft-tokens", "1",
                                 "--suite", "spec_bench_mini", "--json", str(out)])
    assert r.exit_code == 130 and r.stderr.strip().splitlines()[-1] == "interrupted", r.output
    assert "Interrupted: 3 of " in r.stdout and "tok/s" in r.stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] is True and len(report["runs"]) == 3 and report["runs_planned"] > 3
    assert set(report["summary"]) == {r["setting"] for r in report["runs"]} and "plain" in report["summary"]


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
    types = [type(m) for m in modules]
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
    assert len(modules) == 3 * 4 and [type(m) for m in modules] == types
    assert "trunk" not in vars(model) and "mtp_forward" not in vars(model)


def test_parse_settings():
    assert [s.name for s in bench.parse_settings("2, 0,auto,1,2")] == ["plain", "k=1", "k=2", "auto"]
    assert [s.name for s in bench.parse_settings("3", mlx_lm=True)] == ["plain", "k=3", "mlx-lm"]
    for bad in ["-1", "banana", "1,,2"]:
        with pytest.raises(ValueError):
            bench.parse_settings(bad)


@pytest.mark.parametrize("args,words", [(["--draft-tokens", "1,banana"], "banana"), (["--repeats", "0"], "--repeats"),
                                        (["--suite", "nope"], "unknown suite"), (["--max-tokens", "300"], "context"),
                                        (["--draft-tokens", "0,9"], "from 0 to 8")])
def test_bench_bad_input(ckpt, args, words):
    r = CliRunner().invoke(cli, ["bench", "-m", str(ckpt), *args])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]


def test_plot_without_matplotlib(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    r = CliRunner().invoke(cli, ["bench", "-m", str(ckpt), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 1 and r.stderr.strip() == "error: --plot needs matplotlib: pip install matplotlib"


def test_plot_title_inside_the_figure(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    saved = {}
    monkey = Figure.savefig

    def keep(fig, path, **kwargs):
        monkey(fig, path, **kwargs)
        saved["fig"] = fig

    Figure.savefig = keep
    try:
        summary = {"plain": {**bench.summarize([fake_run("plain", 1e6)], bench.parse_settings("0"))["plain"]}}
        machine = {"device": "Device(cpu, 0)", "blas": "OpenBLAS (/usr/lib/x86_64-linux-gnu/openblas-pthread/x.so)"}
        bench.plot({"model": "/a/path/" + "a-long-model-name-" * 12, "machine": machine, "summary": summary},
                   tmp_path / "p.png")
    finally:
        Figure.savefig = monkey
    canvas = FigureCanvasAgg(saved["fig"])  # plot() closed the figure; draw it again as it was saved
    canvas.draw()
    box = saved["fig"]._suptitle.get_window_extent(canvas.get_renderer())
    width, height = canvas.get_width_height()
    assert (tmp_path / "p.png").stat().st_size > 0
    assert 0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height


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
