"""`mlxmtp convert QUANT --add-mtp ORIGINAL -o OUT` on the tiny DeepSeek-V3 checkpoint: the quantized checkpoint
without MTP gets the original's heads, from a local directory or from a hub-style cache holding only the files
with MTP tensors; the result drafts exactly as a checkpoint converted from the original directly; a different
model is refused with the field that differs."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp.cli.main import cli
from mlxmtp.inspection import mtp_index
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import prompts, take
from tests.tiny import deepseek_v3


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The original, a 4-bit conversion without MTP (what mlx-community publishes), and a direct conversion."""
    d = tmp_path_factory.mktemp("add_mtp")
    orig = deepseek_v3.make(d / "orig")
    for name, args in (("quant", ["--no-mtp"]), ("direct", [])):
        r = run("convert", orig, "-o", d / name, "--group-size", 32, *args)
        assert r.exit_code == 0, r.output
    config = json.loads((d / "quant" / "config.json").read_text())
    del config["mlxmtp"]  # as a conversion by another tool: nothing says the heads were left out on purpose
    (d / "quant" / "config.json").write_text(json.dumps(config))
    return orig, d / "quant", d / "direct"


def tensors(path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def assert_drafts_as_direct(out, direct):
    got, want = tensors(out), tensors(direct)
    assert sorted(got) == sorted(want)
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    model, ref = mlxmtp.load_model(out), mlxmtp.load_model(direct)
    assert model.num_mtp_modules == 1 and model.load_report["warning"] is None
    greedy, s, s_ref = SamplingParams(), RoundStats(), RoundStats()
    for p in prompts(256, n=3, seed=2):
        drafted = take(decode(model, p, greedy, draft_tokens=2, stats=s), 12)
        assert drafted == take(decode(model, p, greedy), 12), p
        assert drafted == take(decode(ref, p, greedy, draft_tokens=2, stats=s_ref), 12)
    assert s.drafted > 0 and (s.drafted, s.accepted) == (s_ref.drafted, s_ref.accepted)


def test_add_mtp_from_directory(ckpts, tmp_path):
    orig, quant, direct = ckpts
    r = run("convert", quant, "--add-mtp", orig, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "MTP modules   1 kept of 1 declared" in r.output and "MTP: 8-bit" in r.output
    out = tmp_path / "out"
    assert (out / "model-mtp.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["mlxmtp"]["mtp_from"] == str(orig)
    assert_drafts_as_direct(out, direct)


def test_add_mtp_from_hub_cache(ckpts, tmp_path, monkeypatch):
    """A hub cache (huggingface_hub's layout) holding config.json, the index and only the shard with the MTP layer:
    offline, anything else asked of the hub would fail."""
    import huggingface_hub.constants as hub

    orig, quant, direct = ckpts
    n = json.loads((orig / "config.json").read_text())["num_hidden_layers"]
    weights = load_file(str(orig / "model.safetensors"))
    snap = tmp_path / "hub" / "models--tiny-org--dsv3" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    mtp = {k: v for k, v in weights.items() if mtp_index(k, n) is not None}
    save_file(mtp, str(snap / "model-00002-of-00002.safetensors"))  # the trunk's shard 1 is not in the cache
    weight_map = {k: f"model-0000{2 if k in mtp else 1}-of-00002.safetensors" for k in weights}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(orig / "config.json", snap / "config.json")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    r = run("convert", quant, "--add-mtp", "tiny-org/dsv3", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlxmtp"]["mtp_from"] == "tiny-org/dsv3"
    assert_drafts_as_direct(tmp_path / "out", direct)


@pytest.mark.parametrize("field,value", [("hidden_size", 128), ("num_hidden_layers", 4), ("vocab_size", 512)])
def test_other_model_refused(ckpts, tmp_path, field, value):
    orig, quant, _ = ckpts
    other = tmp_path / "other"
    shutil.copytree(orig, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, field: value}))
    r = run("convert", quant, "--add-mtp", other, "-o", tmp_path / "out")
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1
    assert "not the same model" in r.stderr and f"{field} {value} vs {config[field]}" in r.stderr, r.stderr


def test_quant_with_mtp_refused(ckpts, tmp_path):
    orig, _, direct = ckpts
    r = run("convert", direct, "--add-mtp", orig, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "already has MTP weights" in r.stderr
