"""A tiny GLM-4.5 checkpoint in the original layout: GQA with q/k/v bias, QK-norm, partial rotary, one dense and two
MoE layers, and the MTP layer at model.layers.{num_hidden_layers}. Trunk weights come from transformers'
Glm4MoeForCausalLM."""

from __future__ import annotations

from pathlib import Path

from tests.hf_layout import write_checkpoint
from tests.tiny.deepseek_v3 import hf_checkpoint_tensors

CONFIG = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 16,  # heads * head_dim != hidden_size, as in GLM-4.5
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "use_qk_norm": True,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "initializer_range": 0.1,
    "torch_dtype": "float32",
    "eos_token_id": 0,
}


def make(path: Path, *, mtp: bool = True, seed: int = 0, shards: int = 1, **config) -> Path:
    """Write the checkpoint; keyword arguments override config.json entries (e.g. use_qk_norm=False)."""
    from transformers import Glm4MoeForCausalLM

    config = {**CONFIG, **config}
    tensors = hf_checkpoint_tensors(Glm4MoeForCausalLM, config, mtp=mtp, seed=seed)
    return write_checkpoint(Path(path), config, tensors, shards=shards)
