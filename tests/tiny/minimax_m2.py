"""A tiny MiniMax-M2 checkpoint in MiniMaxAI's layout: the trunk built by HF transformers' MiniMaxM2ForCausalLM
(random weights, fixed seed) written under the original names (``block_sparse_moe.experts.{e}.w1|w2|w3``,
``block_sparse_moe.e_score_correction_bias``) with the original config keys (``rotary_dim``, ``use_mtp``,
``num_mtp_modules``...). Like the published checkpoints it has no MTP weights: ``mtp`` has nothing to add.
``attach_heads=n`` writes n MTP heads in the layout mlxmtp accepts for heads trained later (minimax_m2.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.hf_layout import write_checkpoint
from tests.tiny.mimo import random_tensors

CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"],
    "model_type": "minimax_m2",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rotary_dim": 8,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "scoring_func": "sigmoid",
    "use_routing_bias": True,
    "use_qk_norm": True,
    "qk_norm_type": "per_layer",
    "shared_intermediate_size": 0,
    "use_mtp": True,
    "num_mtp_modules": 3,
    "mtp_transformer_layers": 1,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "eos_token_id": 0,
}


def reference(seed: int = 0, config: dict = CONFIG):
    """HF transformers' model (reading the original config keys) with the tiny checkpoint's weights."""
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rotary_dim", "rope_theta", "rms_norm_eps", "num_local_experts",
            "num_experts_per_tok", "max_position_embeddings", "tie_word_embeddings")
    hf_config = MiniMaxM2Config(**{k: config[k] for k in keys}, bos_token_id=None, eos_token_id=config["eos_token_id"],
                                attn_implementation="eager")
    model = MiniMaxM2ForCausalLM(hf_config)
    model = model.float().eval()
    state = {k: v.shape for k, v in model.state_dict().items()}
    weights = random_tensors(state, np.random.default_rng(seed))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model


def original_names(state: dict, intermediate: int) -> dict:
    """HF transformers' parameter names -> the checkpoint's (the inverse of HF's minimax_m2 conversion mapping)."""
    out = {}
    for k, v in state.items():
        v = v.detach().numpy()
        k = k.replace(".mlp.", ".block_sparse_moe.")
        if k.endswith("experts.gate_up_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('gate_up_proj')]}{e}.w1.weight"] = v[e, :intermediate]
                out[f"{k[: -len('gate_up_proj')]}{e}.w3.weight"] = v[e, intermediate:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('down_proj')]}{e}.w2.weight"] = v[e]
        else:
            out[k] = v
    return out


def make(path: Path, *, mtp: bool = True, seed: int = 0, attach_heads: int = 0) -> Path:
    config = dict(CONFIG)
    tensors = original_names(reference(seed).state_dict(), config["intermediate_size"])
    if attach_heads:
        L, H = config["num_hidden_layers"], config["hidden_size"]
        config["num_nextn_predict_layers"] = attach_heads
        shapes = {}
        for j in range(attach_heads):
            src, dst = f"model.layers.{L - 1}.", f"model.layers.{L + j}."
            shapes.update({dst + k[len(src):]: v.shape for k, v in tensors.items() if k.startswith(src)})
            shapes.update({dst + "enorm.weight": (H,), dst + "hnorm.weight": (H,), dst + "eh_proj.weight": (H, 2 * H),
                           dst + "shared_head.norm.weight": (H,)})
        tensors.update(random_tensors(shapes, np.random.default_rng(seed + 1)))
    return write_checkpoint(Path(path), config, tensors)
