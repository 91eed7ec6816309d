"""Streaming conversion changes memory, not results: every family's tiny checkpoint (one file, sharded, FP8) converts
to exactly the tensors the eager path gives (the whole model loaded and evaluated, then quantized), and converting a
synthetic FP8 checkpoint in DeepSeek-V3's layout peaks at a bound set by its largest tensor, not by the model."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import shutil
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlxmtp
import mlxmtp.convert as conv
import tests.tiny as tiny
from mlxmtp.safetensors_io import dequantize_fp8
from tests import fp8_checkpoint
from tests.tiny import deepseek_v3

FAMILIES = sorted(m.name for m in pkgutil.iter_modules(tiny.__path__))


def fp8_copy(src, dst):
    """src with its linear weights stored as DeepSeek's FP8 (E4M3 + 128x128 scales), the rest in bf16."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.test_loading import fp8_blocks

    shutil.copytree(src, dst)
    stored = {}
    for k, w in load_file(str(dst / "model.safetensors")).items():
        if k.endswith("_proj.weight"):
            stored[k], stored[k + "_scale_inv"], _ = fp8_blocks(w)
        else:
            stored[k] = w.to(torch.bfloat16)
    save_file(stored, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    config["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def eager_reference(src, **kw) -> dict:
    """What conversion computed before streaming: the model loaded and evaluated whole, then quantized."""
    config = json.loads((src / "config.json").read_text())
    model = mlxmtp.load_model(src, dtype=conv.DTYPES[conv.source_dtype(config)])
    conv.quantize(model, kw["bits"], kw["group_size"], 8, kw["bits"])
    return {k: v for k, v in tree_flatten(model.parameters())}


def written(out) -> dict:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(mx.load(str(f)))
    return tensors


def assert_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert mx.array_equal(got[k], want[k]).item(), k


@pytest.mark.parametrize("family", FAMILIES)
def test_same_tensors_as_eager(family, tmp_path):
    src = importlib.import_module(f"tests.tiny.{family}").make(tmp_path / "src")
    kw = dict(bits=4, group_size=32)
    assert_identical(written(conv.convert(src, tmp_path / "q", **kw)), eager_reference(src, **kw))


@pytest.mark.parametrize("source", ["sharded", "fp8"])
def test_same_tensors_as_eager_deepseek(source, tmp_path, monkeypatch):
    if source == "sharded":
        src = deepseek_v3.make(tmp_path / "src", shards=3)
        monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)  # several output shards too
    else:
        src = fp8_copy(deepseek_v3.make(tmp_path / "bf16"), tmp_path / "src")
    kw = dict(bits=4, group_size=32)
    out = conv.convert(src, tmp_path / "q", **kw)
    assert len(list(out.glob("*.safetensors"))) == (1 if source == "fp8" else len(list(out.glob("model-*"))))
    assert_identical(written(out), eager_reference(src, **kw))


def test_fp8_block_broadcast_equals_repeat():
    """Where 128x128 blocks tile a weight, its scale is broadcast instead of repeated: the same values."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 0x7E, (256, 384), dtype=np.uint8) | rng.choice([0, 0x80], (256, 384)).astype(np.uint8)
    w = mx.from_fp8(mx.array(codes), mx.bfloat16)
    scale = mx.array(rng.uniform(1e-4, 1e-2, (2, 3)).astype(np.float32))
    got = dequantize_fp8({"p.weight": w, "p.weight_scale_inv": scale})["p.weight"]
    repeated = mx.repeat(mx.repeat(scale, 128, axis=0), 128, axis=1)
    assert mx.array_equal(got, (w.astype(mx.float32) * repeated).astype(mx.bfloat16)).item()


CHILD = textwrap.dedent(r"""
    import json, re, sys
    import mlxmtp.convert as conv
    conv.convert(sys.argv[3], sys.argv[2] + "-warmup", bits=4, group_size=32)  # every import (torch...) done
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak into a child across fork + exec
    status = lambda key: int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024
    base = status("VmRSS")
    conv.convert(sys.argv[1], sys.argv[2], bits=4)
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
""")


def test_peak_memory_bounded_by_largest_tensor(tmp_path):
    """A 190 MB FP8 checkpoint whose model is 340 MB in bf16: the conversion's growth over the process baseline
    stays within 12x its largest tensor (one layer's stacked expert projection in bf16: the stacking's inputs, the
    float32 products of the FP8 decode and the quantization's outputs), well below the model. Measured about 80 MB
    here; the eager conversion grew by over 1.2 GB on a checkpoint of this layout."""
    dims = dict(fp8_checkpoint.SMALL, moe_layers=4)
    src = fp8_checkpoint.make(tmp_path / "fp8", **dims)
    c = json.loads((src / "config.json").read_text())
    largest = 2 * max(c["n_routed_experts"] * c["moe_intermediate_size"] * c["hidden_size"],
                      c["vocab_size"] * c["hidden_size"])
    model_bf16 = 2 * sum(math.prod(s) for n, s, _ in fp8_checkpoint.tensor_shapes(c)
                         if not n.endswith(("mtp.embed_tokens.weight", "shared_head.head.weight")))
    bound = 12 * largest
    assert bound < 0.6 * model_bf16  # a conversion holding the model cannot pass
    warmup = deepseek_v3.make(tmp_path / "tiny")
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "q"), str(warmup)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["base"]
    print(f"\nlargest tensor {largest / 2**20:.0f} MB, model {model_bf16 / 2**20:.0f} MB bf16, "
          f"growth {growth / 2**20:.0f} MB (bound {bound / 2**20:.0f} MB)")
    assert growth < bound
    assert mlxmtp.load_model(tmp_path / "q", lazy=True).num_mtp_modules == 1
