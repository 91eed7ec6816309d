"""Strict loading on the tiny DeepSeek-V3 checkpoint: shards, missing / unexpected / misshaped tensors, truncated
files, unknown model types, checkpoints without MTP weights, and DeepSeek's FP8 (E4M3, 128x128 block scales)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

import mlxmtp
from mlxmtp import CheckpointError, UnsupportedModelError
from tests.hf_layout import write_checkpoint
from tests.tiny import deepseek_v3 as tiny

TOKENS = mx.array([[3, 141, 59, 26, 53, 58, 97, 93, 238, 46]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.make(tmp_path_factory.mktemp("deepseek_v3"))


@pytest.fixture(scope="module")
def model(ckpt):
    return mlxmtp.load_model(ckpt)


def edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint whose tensors went through edit(dict)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_sharded_checkpoint(tmp_path, model):
    path = tiny.make(tmp_path / "sharded", shards=3)
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) == 3
    sharded = mlxmtp.load_model(path)
    assert sharded.num_mtp_modules == 1
    np.testing.assert_array_equal(np.array(sharded(TOKENS)), np.array(model(TOKENS)))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.weight", "model.layers.3.eh_proj.weight",
                                  "model.layers.2.mlp.experts.5.up_proj.weight"])
def test_missing_tensor(ckpt, tmp_path, name):
    path = edited(ckpt, tmp_path / "c", lambda t: t.pop(name))
    shown = name.replace("model.layers.3.", "mtp.0.")  # the MTP layer's tensors are reported by module name
    # "lacks tensor": stack_experts' own message says "missing tensor" (an expert of a stacked set)
    with pytest.raises(CheckpointError, match=f"(lacks|missing) tensor '?{shown}") as e:
        mlxmtp.load_model(path)
    assert "missing: missing" not in str(e.value)


def test_unexpected_tensor(ckpt, tmp_path):
    name = "model.layers.1.self_attn.q_a_proj.bias"
    path = edited(ckpt, tmp_path / "c", lambda t: t.update({name: np.zeros(48, np.float32)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {name}"):
        mlxmtp.load_model(path)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.self_attn.kv_b_proj.weight",
                                  "model.layers.2.mlp.experts.0.down_proj.weight"])
def test_misshaped_tensor(ckpt, tmp_path, name):
    path = edited(ckpt, tmp_path / "c", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
        mlxmtp.load_model(path)


def test_truncated_file(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        mlxmtp.load_model(tmp_path / "c")


def test_unknown_model_type(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v9"}))
    with pytest.raises(UnsupportedModelError, match="deepseek_v9"):
        mlxmtp.load_model(tmp_path / "c")


def test_checkpoint_without_mtp_weights(tmp_path, model, caplog):
    path = tiny.make(tmp_path / "c", mtp=False)  # config still declares num_nextn_predict_layers: 1
    with caplog.at_level(logging.WARNING):
        plain = mlxmtp.load_model(path)
    assert plain.num_mtp_modules == 0 and plain.load_report["mtp_modules_declared"] == 1
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["mlxmtp"]
    assert "no MTP weights" in plain.load_report["warning"]
    np.testing.assert_array_equal(np.array(plain(TOKENS)), np.array(model(TOKENS)))


def test_mtp_not_requested(ckpt, model, caplog):
    with caplog.at_level(logging.WARNING):
        plain = mlxmtp.load_model(ckpt, mtp=False)
    assert plain.num_mtp_modules == 0 and plain.make_mtp_cache() == []
    assert not caplog.records and plain.load_report["warning"] is None
    assert plain.load_report["skipped"]["MTP modules not requested (mtp=False)"] > 0
    np.testing.assert_array_equal(np.array(plain(TOKENS)), np.array(model(TOKENS)))


def fp8_blocks(w, block: int = 128):
    """DeepSeek-V3's FP8 format: E4M3 weights with one float32 weight_scale_inv per 128x128 block
    (amax / 448, README_WEIGHTS.md). Returns (fp8 weight, scale_inv, dequantized float32)."""
    import torch

    R, C = w.shape
    nr, nc = -(-R // block), -(-C // block)
    padded = torch.nn.functional.pad(w, (0, nc * block - C, 0, nr * block - R)).reshape(nr, block, nc, block)
    scale = padded.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (padded / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).reshape(nr * block, nc * block)[:R, :C]
    return q.reshape(nr * block, nc * block)[:R, :C].contiguous(), scale.float(), deq


def test_fp8_checkpoint(ckpt, tmp_path, model):
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    stored, dequantized = {}, {}
    for k, w in load_torch(str(ckpt / "model.safetensors")).items():
        if k.endswith(("_proj.weight", "_proj_with_mqa.weight")):  # the linear layers, as DeepSeek's
            stored[k], stored[k + "_scale_inv"], deq = fp8_blocks(w)
            dequantized[k] = deq.to(torch.bfloat16).float()
        else:  # everything else stays bf16
            stored[k] = w.to(torch.bfloat16)
            dequantized[k] = stored[k].float()
    assert stored["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)  # [192, 64]: two row blocks
    (tmp_path / "fp8").mkdir()
    save_torch(stored, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    reference = write_checkpoint(tmp_path / "ref", config, dequantized, tokenizer=False)

    fp8, ref = params(mlxmtp.load_model(tmp_path / "fp8")), params(mlxmtp.load_model(reference))
    assert fp8.keys() == ref.keys()
    for k in fp8:  # exactly the bf16-rounded dequantized weights
        np.testing.assert_array_equal(fp8[k], ref[k], err_msg=k)
    orig = params(model)
    w = "model.layers.2.mlp.switch_mlp.gate_proj.weight"  # within E4M3's precision (3 mantissa bits) of the original
    assert np.abs(fp8[w] - orig[w]).max() <= 2**-4 * np.abs(orig[w]).max()


def test_load_without_argument_is_the_demo():
    model, tokenizer = mlxmtp.load()
    assert model.load_report["path"] == str(mlxmtp.demo_model_path()) and model.num_mtp_modules == 1
    assert tokenizer.encode("def f(x):")


def test_long_prompt_gives_no_transformers_warning(capfd):
    tokenizer = mlxmtp.load_tokenizer(mlxmtp.demo_model_path())  # model_max_length 2048
    capfd.readouterr()
    assert len(tokenizer.encode("x = 1\n" * 2000)) > 2048
    assert "Token indices sequence length" not in capfd.readouterr().err
