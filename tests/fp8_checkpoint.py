"""A synthetic checkpoint in DeepSeek-V3's exact FP8 layout, at any size: E4M3 weights with one float32
``weight_scale_inv`` per 128x128 block (DeepSeek-V3 README_WEIGHTS.md), bf16 norms, embedding, head and router,
float32 ``e_score_correction_bias``, the MTP layer at ``model.layers.{num_hidden_layers}`` with its copies of the
embedding and head, sharded with model.safetensors.index.json. Random weights: for memory and speed measurements
of conversion and loading (tests/test_convert_streaming.py, benchmarks/bench_convert_memory.py), not for output.

Written shard by shard, so making a checkpoint needs about one shard of memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.hf_layout import write_tokenizer
from tests.tiny.deepseek_v3 import CONFIG as TINY

BLOCK = 128

# About 2.5 GB in 5 shards (the measurement); ``make(..., **SMALL)`` is the few-hundred-MB test version.
FULL = dict(hidden_size=2048, vocab_size=32000, moe_layers=16, n_routed_experts=32, moe_intermediate_size=512,
            intermediate_size=5632, shards=5)
SMALL = dict(hidden_size=1024, vocab_size=4096, moe_layers=8, n_routed_experts=16, moe_intermediate_size=512,
             intermediate_size=2048, shards=3)


def config_for(hidden_size: int, vocab_size: int, moe_layers: int, n_routed_experts: int,
               moe_intermediate_size: int, intermediate_size: int) -> dict:
    heads = hidden_size // 128
    return {**TINY, "hidden_size": hidden_size, "vocab_size": vocab_size, "num_hidden_layers": moe_layers + 1,
            "first_k_dense_replace": 1, "n_routed_experts": n_routed_experts, "num_experts_per_tok": 4,
            "n_group": 4, "topk_group": 2, "moe_intermediate_size": moe_intermediate_size,
            "intermediate_size": intermediate_size, "num_attention_heads": heads, "num_key_value_heads": heads,
            "q_lora_rank": hidden_size * 3 // 4, "kv_lora_rank": hidden_size // 4, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 4096,
            "rope_scaling": {**TINY["rope_scaling"], "original_max_position_embeddings": 1024},
            "torch_dtype": "bfloat16", "initializer_range": 0.02,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [BLOCK, BLOCK]}}


def tensor_shapes(c: dict):
    """(name, shape, kind) of every tensor in checkpoint order; kind is "fp8", "bf16" or "f32"."""
    H, V, heads = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    yield "model.embed_tokens.weight", (V, H), "bf16"
    n = c["num_hidden_layers"]
    for i in range(n + 1):  # layer n is the MTP layer
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (H,), "bf16"
        yield p + "post_attention_layernorm.weight", (H,), "bf16"
        a = p + "self_attn."
        yield a + "q_a_proj.weight", (c["q_lora_rank"], H), "fp8"
        yield a + "q_a_layernorm.weight", (c["q_lora_rank"],), "bf16"
        yield a + "q_b_proj.weight", (heads * (nope + rope), c["q_lora_rank"]), "fp8"
        yield a + "kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + rope, H), "fp8"
        yield a + "kv_a_layernorm.weight", (c["kv_lora_rank"],), "bf16"
        yield a + "kv_b_proj.weight", (heads * (nope + v), c["kv_lora_rank"]), "fp8"
        yield a + "o_proj.weight", (H, heads * v), "fp8"
        if i < c["first_k_dense_replace"]:
            mlps, inter = [p + "mlp."], c["intermediate_size"]
        else:
            yield p + "mlp.gate.weight", (c["n_routed_experts"], H), "bf16"
            yield p + "mlp.gate.e_score_correction_bias", (c["n_routed_experts"],), "f32"
            mlps = [p + f"mlp.experts.{e}." for e in range(c["n_routed_experts"])] + [p + "mlp.shared_experts."]
            inter = c["moe_intermediate_size"]
        for m in mlps:
            yield m + "gate_proj.weight", (inter, H), "fp8"
            yield m + "up_proj.weight", (inter, H), "fp8"
            yield m + "down_proj.weight", (H, inter), "fp8"
        if i == n:
            yield p + "enorm.weight", (H,), "bf16"
            yield p + "hnorm.weight", (H,), "bf16"
            yield p + "eh_proj.weight", (H, 2 * H), "fp8"
            yield p + "shared_head.norm.weight", (H,), "bf16"
            yield p + "shared_head.head.weight", (V, H), "bf16"
            yield p + "embed_tokens.weight", (V, H), "bf16"
    yield "model.norm.weight", (H,), "bf16"
    yield "lm_head.weight", (V, H), "bf16"


def _tensor(shape, kind, gen):
    import torch

    if kind == "fp8":
        codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        codes[(codes & 0x7F) == 0x7F] = 0x70  # no NaN codes
        return codes.view(torch.float8_e4m3fn)
    if kind == "f32":
        return 0.1 * torch.rand(shape, generator=gen)
    if len(shape) == 1:  # norm gains
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)


def nbytes(shape, kind) -> int:
    return math.prod(shape) * {"fp8": 1, "bf16": 2, "f32": 4}[kind]


def make(path: Path, *, shards: int = 5, seed: int = 0, **dims) -> Path:
    """Write the checkpoint (config.json, tokenizer, ``shards`` safetensors files and their index) to path."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = config_for(**dims)
    entries = []
    for name, shape, kind in tensor_shapes(c):
        entries.append((name, shape, kind))
        if kind == "fp8":
            entries.append((name + "_scale_inv", (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)), "f32"))
    total = sum(nbytes(s, k) for _, s, k in entries)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, size, i = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, i
        i += 1
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        shard, size = {}, 0

    for name, shape, kind in entries:
        if kind == "f32" and name.endswith("_scale_inv"):
            shard[name] = torch.full(shape, 1e-3) * (1 + torch.rand(shape, generator=gen))
        else:
            shard[name] = _tensor(shape, kind, gen)
        size += nbytes(shape, kind)
        if size >= total / shards and i < shards - 1 and not name.endswith("_proj.weight"):  # weight + its scale
            flush()
    flush()
    if i != shards:  # rename to the count actually written
        for old in sorted(set(weight_map.values())):
            new = old.replace(f"-of-{shards:05d}", f"-of-{i:05d}")
            (path / old).rename(path / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(c, indent=2))
    write_tokenizer(path, c["vocab_size"])
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--small", action="store_true", help="the few-hundred-MB test size")
    ap.add_argument("--moe-layers", type=int, help="override the number of MoE layers (double it to see growth)")
    a = ap.parse_args()
    dims = dict(SMALL if a.small else FULL)
    if a.moe_layers:
        dims["moe_layers"] = a.moe_layers
    print(make(a.out, **dims))
