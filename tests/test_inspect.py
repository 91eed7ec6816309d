"""`mlxmtp inspect` and mlxmtp.inspection: what the headers say agrees with what the loader builds (parameters,
bytes), MTP modules found or missing, KV cache sizes, the fit check, and the command line."""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil

import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mlxmtp
import tests.tiny as tiny
from mlxmtp import inspection
from mlxmtp.blas import blas_in_use
from mlxmtp.cli.main import cli
from mlxmtp.convert import convert
from mlxmtp.errors import MLXMTPError
from mlxmtp.models import get_family
from tests.tiny import deepseek_v3, mimo

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return deepseek_v3.make(tmp_path_factory.mktemp("deepseek_v3"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def loaded(model) -> tuple[int, int]:
    """(parameters, bytes) of a loaded model; a quantized weight counts 32 / bits parameters per uint32."""
    params = dict(tree_flatten(model.parameters()))
    bits = {f"{p}.weight": m.bits for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}
    count = sum(v.size * 32 // bits[k] if k in bits else v.size for k, v in params.items()
                if not k.endswith((".scales", ".biases")))
    return count, sum(v.nbytes for v in params.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_headers_agree_with_the_loader(family, tmp_path):
    src = importlib.import_module(f"tests.tiny.{family}").make(tmp_path / "src")
    report = inspection.inspect_checkpoint(src)
    for path in (src, convert(src, tmp_path / "q4", bits=4, group_size=32)):
        r = report if path == src else inspection.inspect_checkpoint(path)
        model = mlxmtp.load_model(path)
        assert (r["parameters"]["total"], r["memory"]["weights_bytes"]) == loaded(model)
        assert r["parameters"]["total"] == report["parameters"]["total"]
        assert r["mtp"]["found"] == model.num_mtp_modules
        assert r["model_type"] == model.config["model_type"] and r["blas"] == blas_in_use()
    if get_family(r["model_type"]).Model.no_mtp_reason:
        assert r["mtp"]["note"] == get_family(r["model_type"]).Model.no_mtp_reason
    else:
        assert r["mtp"]["found"] == r["mtp"]["declared"] > 0 and r["mtp"]["note"] is None
    assert r["converted_from"] == str(src) and r["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert set(r["precision"]["trunk"]) >= {"4-bit"} and set(r["precision"]["embed_head"]) == {"4-bit"}
    assert set(r["precision"]["mtp"]) - {"float32"} == ({"8-bit"} if r["mtp"]["found"] else set())


def test_deepseek_report(deepseek):
    r = json.loads(run("inspect", deepseek, "--json").stdout)
    assert r["model_type"] == "deepseek_v3" and r["architecture"] == "DeepseekV3ForCausalLM"
    assert r["mtp"] == {"declared": 1, "found": 1, "note": None}
    assert r["skipped"] == {"MTP copies of the trunk's embedding / lm_head (shared)": 2}
    p, c = r["parameters"], deepseek_v3.CONFIG
    assert p["total"] == p["trunk"] + p["mtp"] + p["embed_head"]
    assert p["embed_head"] == 2 * c["vocab_size"] * c["hidden_size"]
    routed = 2 * 3 * c["n_routed_experts"] * c["moe_intermediate_size"] * c["hidden_size"]  # 2 MoE layers, 3 matrices
    assert p["active_per_token"] == p["trunk"] + p["embed_head"] - routed * (1 - 2 / 8)
    assert p["experts"] == {"routed": 8, "per_token": 2}
    m = r["memory"]
    assert m["kv_cache_bytes"] == (32 + 8) * 4096 * (3 + 1) * 4  # latent + rope key, 3 layers + MTP, float32
    assert m["kv_cache"].startswith("MLA latent") and m["context"] == 4096 and m["dtype"] == "float32"
    assert m["total_bytes"] == m["weights_bytes"] + m["kv_cache_bytes"] and m["fits"]


def test_gqa_and_sliding_window_caches(tmp_path):
    m = inspection.inspect_checkpoint(mimo.make(tmp_path / "mimo"), context=1000)["memory"]
    assert m["kv_cache_bytes"] == 2 * 2 * 16 * 1000 * (2 + 1) * 4  # K and V, 2 KV heads of 16, 2 layers + MTP
    assert m["kv_cache"] == "GQA (2 KV heads, keys 16 + values 16 per head)"
    config = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "hidden_size": 64, "hybrid_layer_pattern": [0, 1, 1, 0], "sliding_window_size": 7}
    size, desc = inspection.kv_cache(config, 1, 100, 2)
    assert size == 2 * 16 * 2 * 2 * (3 * 100 + 2 * 8) and "sliding window of 8 on 2 of 5 layers" in desc


def test_checkpoint_without_mtp_weights(tmp_path):
    src = deepseek_v3.make(tmp_path / "src", mtp=False)
    r = inspection.inspect_checkpoint(src)
    assert r["mtp"]["declared"] == 1 and r["mtp"]["found"] == 0
    assert r["mtp"]["note"].startswith("checkpoint has no MTP weights")
    out = run("inspect", src)
    assert out.exit_code == 0 and "checkpoint has no MTP weights" in out.stdout


def test_fit_check(deepseek, monkeypatch):
    assert inspection.check_fits(deepseek)["fits"]
    monkeypatch.setattr(inspection, "total_memory", lambda: 2**20)
    with pytest.raises(MLXMTPError) as e:
        inspection.check_fits(deepseek)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model needs ~0.0 GB") and "this machine has 0.0 GB (total RAM)" in msg
    assert msg.endswith("pass --force-load to try anyway")
    assert not inspection.check_fits(deepseek, override=True)["fits"]
    assert not inspection.estimate_memory(deepseek)["fits"]
    r = run("inspect", deepseek)
    assert r.exit_code == 0 and "NO: this machine has 1.0 MB (total RAM)" in r.stdout

    monkeypatch.setattr(inspection, "total_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(inspection.sys, "platform", "darwin")
    budget, why = inspection.memory_budget()
    assert budget == 48 * 2**30 and "recommended Metal working set" in why


def test_default_model_and_text_output(deepseek, monkeypatch):
    monkeypatch.setattr(mlxmtp, "demo_model_path", lambda: deepseek)
    r = run("inspect")
    assert r.exit_code == 0 and r.stderr == ""
    for text in ("deepseek_v3", "1 declared, 1 found", "MTP copies", "float32 100%", "MLA latent", "fits", "BLAS"):
        assert text in r.stdout, text


@pytest.mark.parametrize("args,words", [(["--context", "-5"], "--context"), (["--context", "0"], "--context"),
                                        (["--bogus"], "--bogus")])
def test_bad_flags(deepseek, args, words):
    r = run("inspect", deepseek, *args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


def test_api_refuses_a_context_below_one(deepseek):
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match="context must be"):
            inspection.inspect_checkpoint(deepseek, context=bad)


def test_model_as_option(deepseek):
    assert json.loads(run("inspect", "-m", deepseek, "--json").stdout) == json.loads(run("inspect", deepseek,
                                                                                          "--json").stdout)


@pytest.mark.parametrize("how,message", [("missing", "does not exist"), ("no config", "no config.json"),
                                         ("truncated", "model.safetensors is truncated"),
                                         ("unknown model_type", "unsupported model_type 'llama9'")])
def test_cli_errors(deepseek, tmp_path, how, message):
    src = tmp_path / "src"
    if how != "missing":
        shutil.copytree(deepseek, src)
    if how == "no config":
        (src / "config.json").unlink()
    elif how == "truncated":
        f = src / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "unknown model_type":
        (src / "config.json").write_text(json.dumps({**deepseek_v3.CONFIG, "model_type": "llama9"}))
    r = run("inspect", src)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_precision_shares_do_not_round_a_minority_away():
    from mlxmtp.cli.inspect_cmd import _precision

    assert _precision({"4-bit": 999_000, "bfloat16": 1_000}) == "4-bit >99%, bfloat16 <1%"
    assert _precision({"float32": 10}) == "float32 100%"
    assert _precision({"8-bit": 3, "bfloat16": 1}) == "8-bit 75%, bfloat16 25%"
