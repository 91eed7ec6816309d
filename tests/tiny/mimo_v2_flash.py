"""A tiny MiMo-V2-Flash checkpoint in XiaomiMiMo's layout: the trunk built by HF transformers' MiMoV2FlashForCausalLM
(random weights, fixed seed) written under the original tensor names (per-expert ``mlp.experts.{e}.*``,
``self_attn.attention_sink_bias``) with the original config keys, plus three MTP modules ``model.mtp.layers.{j}``.
Layers: full, sliding, sliding, full (the first dense, the rest MoE); a window of 8 keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.hf_layout import write_checkpoint
from tests.tiny.mimo import random_tensors, shapes_of

CONFIG = {
    "architectures": ["MiMoV2FlashForCausalLM"],
    "model_type": "mimo_v2_flash",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "v_head_dim": 8,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "swa_head_dim": 16,
    "swa_v_head_dim": 8,
    "hybrid_layer_pattern": [0, 1, 1, 0],
    "moe_layer_freq": [0, 1, 1, 1],
    "sliding_window_size": 7,
    "add_swa_attention_sink_bias": True,
    "add_full_attention_sink_bias": False,
    "rope_theta": 50000.0,
    "swa_rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
    "attention_value_scale": 0.707,
    "attention_bias": False,
    "layernorm_epsilon": 1e-6,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": None,
    "n_shared_experts": None,
    "num_nextn_predict_layers": 3,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "eos_token_id": 0,
}


def hf_config(config: dict = CONFIG):
    """The same architecture as HF transformers' MiMoV2FlashConfig spells it."""
    from transformers import MiMoV2FlashConfig

    types = {0: "full_attention", 1: "sliding_attention"}
    return MiMoV2FlashConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], moe_intermediate_size=config["moe_intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], head_dim=config["head_dim"],
        v_head_dim=config["v_head_dim"], layer_types=[types[t] for t in config["hybrid_layer_pattern"]],
        mlp_layer_types=["sparse" if f else "dense" for f in config["moe_layer_freq"]],
        sliding_window_size=config["sliding_window_size"], rms_norm_eps=config["layernorm_epsilon"],
        n_routed_experts=config["n_routed_experts"], num_experts_per_tok=config["num_experts_per_tok"],
        n_group=config["n_group"], topk_group=config["topk_group"], norm_topk_prob=config["norm_topk_prob"],
        routed_scaling_factor=config["routed_scaling_factor"], attention_value_scale=config["attention_value_scale"],
        max_position_embeddings=config["max_position_embeddings"], rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"],
                               "partial_rotary_factor": config["partial_rotary_factor"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": config["swa_rope_theta"],
                                  "partial_rotary_factor": config["partial_rotary_factor"]}},
        tie_word_embeddings=False, attn_implementation="eager")


def reference(seed: int = 0):
    """HF transformers' model with the tiny checkpoint's trunk weights."""
    import torch
    from transformers import MiMoV2FlashForCausalLM

    model = MiMoV2FlashForCausalLM(hf_config()).float().eval()
    state = {k: v.shape for k, v in model.state_dict().items()}
    weights = random_tensors(state, np.random.default_rng(seed))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model


def original_names(state: dict, moe_intermediate: int) -> dict:
    """HF transformers' parameter names -> the checkpoint's (the inverse of HF's conversion mapping)."""
    out = {}
    for k, v in state.items():
        v = v.detach().numpy()
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj.weight"] = v[e, :moe_intermediate]
                out[f"{p}{e}.up_proj.weight"] = v[e, moe_intermediate:]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('down_proj')]}{e}.down_proj.weight"] = v[e]
        else:
            out[k.replace("self_attn.sinks", "self_attn.attention_sink_bias")] = v
    return out


def fuse_qkv(tensors: dict, config: dict) -> dict:
    """The fused layout of newer releases: per layer one qkv_proj of num_key_value_heads blocks [q_g; k_g; v_g]."""
    g = config["num_key_value_heads"]
    out = dict(tensors)
    for k in [k for k in tensors if k.endswith("self_attn.q_proj.weight")]:
        p = k[: -len("q_proj.weight")]
        q, kk, v = (out.pop(p + n + "_proj.weight") for n in "qkv")
        blocks = [np.concatenate([a.reshape(g, -1, a.shape[-1])[i] for a in (q, kk, v)]) for i in range(g)]
        out[p + "qkv_proj.weight"] = np.concatenate(blocks)
    return out


def make(path: Path, *, mtp: bool = True, seed: int = 0, fused_qkv: bool = False) -> Path:
    from mlx_lm.models import mimo_v2_flash as mlx_ref

    config = dict(CONFIG)
    tensors = original_names(reference(seed).state_dict(), config["moe_intermediate_size"])
    if mtp:
        H = config["hidden_size"]
        block = mlx_ref.DecoderLayer(mlx_ref.ModelArgs.from_dict(config), is_moe=False, is_sliding_window=True)
        shapes = {}
        for j in range(config["num_nextn_predict_layers"]):
            p = f"model.mtp.layers.{j}."
            shapes.update(shapes_of(block, p))
            shapes.update({p + "enorm.weight": (H,), p + "hnorm.weight": (H,), p + "eh_proj.weight": (H, 2 * H),
                           p + "final_layernorm.weight": (H,)})
        tensors.update(random_tensors(shapes, np.random.default_rng(seed + 1)))
    if fused_qkv:
        config["attention_projection_layout"] = "fused_qkv"
        tensors = fuse_qkv(tensors, config)
    return write_checkpoint(Path(path), config, tensors)
