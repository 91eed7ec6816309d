"""`mlxmtp convert` on the tiny checkpoint of every family in tests/tiny: the quantized round trip (logits close to
the float model's, per-component precision, greedy MTP decoding equal to plain decoding), the output layout, sanitize
idempotence, atomic writing, and the command line's one-line errors."""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mlxmtp
import mlxmtp.convert as conv
import tests.tiny as tiny
from mlxmtp import inspection
from mlxmtp.cli.main import cli
from mlxmtp.models import get_family
from mlxmtp.safetensors_io import read_header
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import decode
from tests.test_speculative import prompts, take
from tests.tiny import deepseek_v3

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))
TOKENS = mx.array([[int(t) for t in np.random.default_rng(0).integers(0, 256, 24)]])


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory):
    maker = importlib.import_module(f"tests.tiny.{request.param}")
    path = maker.make(tmp_path_factory.mktemp(request.param))
    return request.param, path, mlxmtp.load_model(path)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return deepseek_v3.make(tmp_path_factory.mktemp("deepseek_v3"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def rel_rms(a, b) -> float:
    return (mx.sqrt(((a - b) ** 2).sum() / (b**2).sum())).item()


def quantized_bits(model) -> dict:
    """Module path -> bits of every quantized module."""
    return {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}


def test_sanitize_is_idempotent(source):
    """Converted checkpoints store the model's own names: every family's sanitize must pass them through."""
    _, _, model = source
    own = dict(tree_flatten(model.parameters()))
    family = get_family(model.config["model_type"])
    args = family.ModelArgs.from_dict(model.config)
    fresh = family.Model(args, num_mtp=args.mtp_modules())
    again = fresh.sanitize(dict(own))
    assert sorted(again) == sorted(own) and not fresh.skipped
    assert all(again[k] is own[k] or mx.array_equal(again[k], own[k]).item() for k in own)


def fake_quantized(src, quantized) -> nn.Module:
    """The float model of src with each weight that ``quantized`` holds quantized replaced by its quantize ->
    dequantize round trip at that module's bits and group size (computed here from the original weights)."""
    model = mlxmtp.load_model(src)
    weights = dict(tree_flatten(model.parameters()))
    updates = []
    for p, m in quantized.named_modules():
        if hasattr(m, "bits") and "scales" in m:
            w = weights[f"{p}.weight"]
            updates.append((f"{p}.weight", mx.dequantize(*mx.quantize(w, m.group_size, m.bits), m.group_size, m.bits)))
    model.load_weights(updates, strict=False)
    return model


def test_round_trip(source, tmp_path):
    name, src, ref = source
    expected, errors = ref(TOKENS), {}
    for bits in (8, 4):
        model = mlxmtp.load_model(conv.convert(src, tmp_path / f"q{bits}", bits=bits, group_size=32))
        assert model.num_mtp_modules == ref.num_mtp_modules
        q = quantized_bits(model)
        assert {b for p, b in q.items() if p.startswith("mtp.")} == ({8} if ref.num_mtp_modules else set())
        assert {b for p, b in q.items() if conv.component(p) != "mtp"} == {bits}
        assert not [p for p in q if p.rsplit(".", 1)[-1] in conv.ROUTERS]
        assert any(p.startswith("model.layers.") for p in q) and any(conv.component(p) == "embed_head" for p in q)

        # it computes what the float model computes with its weights round-tripped through mx.quantize
        got = model(TOKENS)
        assert rel_rms(got, fake_quantized(src, model)(TOKENS)) < 1e-3
        errors[bits] = rel_rms(got, expected)
        print(f"\n{name} {bits}-bit g32: max abs {mx.abs(got - expected).max().item():.3f}, "
              f"relative RMS {errors[bits]:.4f}")

        if model.num_mtp_modules:  # the quantized model's own MTP drafts leave greedy decoding unchanged
            greedy = SamplingParams()
            for p in prompts(256, n=3, seed=1):
                assert take(decode(model, p, greedy, draft_tokens=2), 12) == take(decode(model, p, greedy), 12), p
    # random tiny models are far more sensitive than trained ones (some tokens switch experts): a loose bound
    assert errors[8] < min(errors[4], 0.5)


def test_layout(deepseek, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)
    out = conv.convert(deepseek, tmp_path / "q", bits=4, group_size=32)
    shards = sorted(f.name for f in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(f.name for f in out.iterdir()) == sorted(
        shards + ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json"])
    original = json.loads((deepseek / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in original} == original
    assert config["quantization"] == config["quantization_config"]
    assert config["mlxmtp"] == {"converted_from": str(deepseek), "version": mlxmtp.__version__, "mtp_modules": 1}
    q = config["quantization"]
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert q["mtp.0.eh_proj"] == {"group_size": 32, "bits": 8}
    assert q["model.layers.0.self_attn.q_b_proj"] is False  # input width 48: not a multiple of 32

    model = mlxmtp.load_model(out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weight_map) == sorted(k for k, _ in tree_flatten(model.parameters()))
    assert model.load_report["skipped"] == {}


def test_mtp_and_embedding_left_in_float(deepseek, tmp_path):
    r = run("convert", deepseek, "-o", tmp_path / "q", "--bits", 4, "--group-size", 32, "--mtp-bits", 0,
            "--embed-bits", 0, "--dtype", "float16")
    assert r.exit_code == 0, r.output
    q = quantized_bits(mlxmtp.load_model(tmp_path / "q"))
    assert q and set(q.values()) == {4} and all(conv.component(p) == "trunk" for p in q)
    stored = read_header(tmp_path / "q" / "model.safetensors")
    assert {stored[k]["dtype"] for k in ("mtp.0.eh_proj.weight", "lm_head.weight", "model.embed_tokens.weight",
                                         "model.layers.0.self_attn.o_proj.scales")} == {"F16"}
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"  # the family keeps it


def test_no_mtp(deepseek, tmp_path, caplog):
    out = conv.convert(deepseek, tmp_path / "q", bits=8, group_size=32, mtp=False)
    assert not [k for k in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
                if k.startswith("mtp.")]
    caplog.clear()
    model = mlxmtp.load_model(out)
    assert model.num_mtp_modules == 0
    assert not caplog.records and model.load_report["warning"] is None  # left out on purpose: no warning


def test_fp8_source(deepseek, tmp_path):
    """DeepSeek's FP8 checkpoints: dequantized on loading, then quantized; the FP8 quantization_config is replaced."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.test_loading import fp8_blocks

    src = tmp_path / "fp8"
    shutil.copytree(deepseek, src)
    stored = {}
    for k, w in load_file(str(src / "model.safetensors")).items():
        if k.endswith("_proj.weight"):
            stored[k], stored[k + "_scale_inv"], _ = fp8_blocks(w)
        else:
            stored[k] = w.to(torch.bfloat16)
    save_file(stored, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))

    out = conv.convert(src, tmp_path / "q", bits=8, group_size=32)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    model = mlxmtp.load_model(out)
    assert model.num_mtp_modules == 1 and quantized_bits(model)
    # inspect's estimate of the FP8 source: dequantized into the loader's dtype, block scales dropped
    loaded = sum(v.nbytes for _, v in tree_flatten(mlxmtp.load_model(src).parameters()))
    assert inspection.estimate_memory(src)["weights_bytes"] == loaded


@pytest.mark.parametrize("exc,raised", [(KeyboardInterrupt, KeyboardInterrupt), (OSError, mlxmtp.MLXMTPError)])
def test_interrupted_conversion_leaves_nothing(deepseek, tmp_path, monkeypatch, exc, raised):
    save, calls = conv.save_file, []

    def fail_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) % 2 == 0:
            raise exc("injected")
        save(*args, **kwargs)

    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)
    monkeypatch.setattr(conv, "save_file", fail_second)
    with pytest.raises(raised):  # an OSError is the user's one-line error
        conv.convert(deepseek, tmp_path / "q", bits=4, group_size=32)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep").write_text("old")
    with pytest.raises(raised):  # --force replaces OUT only once the new one is complete
        conv.convert(deepseek, tmp_path / "q", bits=4, group_size=32, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (tmp_path / "q" / "keep").read_text() == "old"


def test_existing_out(deepseek, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep").write_text("old")
    r = run("convert", deepseek, "-o", tmp_path / "q", "--group-size", 32)
    assert r.exit_code == 1 and r.stderr.strip() == f"error: {tmp_path / 'q'} exists; pass --force to replace it"
    assert (tmp_path / "q" / "keep").exists()
    r = run("convert", deepseek, "-o", tmp_path / "q", "--group-size", 32, "--force")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "q" / "keep").exists() and mlxmtp.load_model(tmp_path / "q").num_mtp_modules == 1
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def broken(deepseek, tmp_path, how):
    src = tmp_path / "src"
    if how == "missing":
        return src
    shutil.copytree(deepseek, src)
    if how == "no config":
        (src / "config.json").unlink()
    elif how == "unknown model_type":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    elif how == "truncated":
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return src


@pytest.mark.parametrize("how,args,message", [
    ("missing", [], "does not exist"),
    ("no config", [], "no config.json"),
    ("unknown model_type", [], "unsupported model_type 'llama9'"),
    ("truncated", [], "model.safetensors is truncated"),
    ("ok", ["--bits", 7], "--bits 7: choose one of 2, 3, 4, 5, 6, 8"),
    ("ok", ["--bits", "four"], "--bits 'four': expected a whole number"),
    ("ok", ["--group-size", 48], "--group-size 48: choose one of 32, 64, 128"),
    ("ok", ["--mtp-bits", 1], "--mtp-bits 1: choose one of 0, 2, 3, 4, 5, 6, 8"),
    ("ok", ["--dtype", "int8"], "--dtype int8: choose one of float16, bfloat16, float32"),
])
def test_cli_errors(deepseek, tmp_path, how, args, message):
    src = broken(deepseek, tmp_path, how)
    before = sorted(tmp_path.iterdir())
    r = run("convert", src, "-o", tmp_path / "out", *args)
    assert r.exit_code == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output and sorted(tmp_path.iterdir()) == before


def test_cli_model_option_and_summary(tmp_path):
    """-m works as the positional; what was written is printed; converted_from is absolute; the demo's
    heldout_files.txt (bench's default suite for it) is carried over."""
    demo = mlxmtp.demo_model_path()
    shutil.copytree(demo, tmp_path / "demo")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = run("convert", "-m", "demo", "-o", "q", "--group-size", 32)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    out = tmp_path / "q"
    lines = r.output.splitlines()
    assert lines[0].startswith(f"wrote {out} (") and "1 weight file" in lines[0]
    assert "4-bit affine, group size 32" in lines[1]
    assert "trunk: 4-bit" in lines[2] and "MTP: 8-bit" in lines[2] and "embedding+head: 4-bit" in lines[2]
    assert lines[3].split() == ["MTP", "modules", "1", "kept", "of", "1", "declared"]
    assert json.loads((out / "config.json").read_text())["mlxmtp"]["converted_from"] == str(tmp_path / "demo")
    assert (out / "heldout_files.txt").read_text() == (demo / "heldout_files.txt").read_text()
    r = run("convert", "demo", "-m", "other", "-o", tmp_path / "q2")
    assert r.exit_code == 1 and "two checkpoints given" in r.stderr
    r = run("convert", "-o", tmp_path / "q2")
    assert r.exit_code == 1 and r.stderr.startswith("error: no checkpoint given")
