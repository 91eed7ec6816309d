"""A tiny Step-3.5-Flash checkpoint in stepfun-ai's layout: tensors named and shaped by mlx-lm's step3p5 model (HF
transformers has the trunk only as Step3p7TextModel), written under the original names (stacked ``moe.*`` experts,
``moe.router_bias``, ``share_expert.*``, zero-centred norms), with three MTP layers ``model.layers.{4,5,6}`` each
with its own head. Layers: full, sliding, sliding, full (+ sliding MTP layers); sliding layers have twice the query
heads; a window of 8; per-layer rope; clamped SwiGLU on some layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.hf_layout import write_checkpoint
from tests.tiny.mimo import random_tensors, shapes_of

L, MTP = 4, 3
SLIDING, FULL = "sliding_attention", "full_attention"
CONFIG = {
    "architectures": ["Step3p5ForCausalLM"],
    "model_type": "step3p5",
    "hidden_size": 64,
    "num_hidden_layers": L,
    "vocab_size": 320,
    "num_attention_heads": 4,
    "num_attention_groups": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-5,
    # per-layer lists cover the trunk and the MTP layers (num_hidden_layers + num_nextn_predict_layers entries)
    "layer_types": [FULL, SLIDING, SLIDING, FULL] + [SLIDING] * MTP,
    "rope_theta": [50000.0, 10000.0, 10000.0, 50000.0] + [10000.0] * MTP,
    "partial_rotary_factors": [0.5, 1.0, 1.0, 0.5] + [1.0] * MTP,
    "sliding_window": 8,
    "attention_other_setting": {"attention_type": SLIDING, "num_attention_heads": 8, "num_attention_groups": 2,
                                "head_dim": 16, "true_head_dim": 16},
    "use_head_wise_attn_gate": True,
    "moe_num_experts": 8,
    "moe_top_k": 2,
    "moe_intermediate_size": 32,
    "share_expert_dim": 32,
    "moe_layers_enum": "1,2,3",
    "moe_router_activation": "sigmoid",
    "moe_router_scaling_factor": 2.0,
    "norm_expert_weight": True,
    "swiglu_limits": [0, 0, 0.3, 0] + [0] * MTP,
    "swiglu_limits_shared": [0.4, 0, 0, 0.5] + [0, 0.5, 0],
    "num_nextn_predict_layers": MTP,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "eos_token_id": 0,
}

# mlx-lm's parameter names -> the checkpoint's (the inverse of mlx-lm's step3p5 sanitize)
RENAMES = [(".mlp.switch_mlp.", ".moe."), (".mlp.gate.gate.", ".moe.gate."),
           (".mlp.gate.router_bias", ".moe.router_bias"), (".mlp.share_expert.", ".share_expert.")]


def original_name(k: str) -> str:
    for src, dst in RENAMES:
        k = k.replace(src, dst)
    return k


def make(path: Path, *, mtp: bool = True, seed: int = 0, transformer_infix: bool = False) -> Path:
    from mlx_lm.models import step3p5

    args = step3p5.ModelArgs.from_dict(CONFIG)
    shapes = {original_name(k): v for k, v in shapes_of(step3p5.Model(args)).items()}
    if mtp:
        H, V = args.hidden_size, args.vocab_size
        for j in range(MTP):
            p = f"model.layers.{L + j}."
            block = p + ("transformer." if transformer_infix else "")
            layer = step3p5.Step3p5DecoderLayer(args, L + j)
            shapes.update({original_name(k): v for k, v in shapes_of(layer, block).items()})
            shapes.update({p + "enorm.weight": (H,), p + "hnorm.weight": (H,), p + "eh_proj.weight": (H, 2 * H),
                           p + "shared_head.norm.weight": (H,), p + "shared_head.output.weight": (V, H)})
    tensors = random_tensors(shapes, np.random.default_rng(seed), zero_centred_norms=True)
    return write_checkpoint(Path(path), CONFIG, tensors)
