"""A tiny Qwen3.5 (dense) checkpoint in the released vision-language layout: config.json with ``text_config`` and
``vision_config``, tensors ``model.language_model.*`` (3 Gated DeltaNet layers, 1 gated full-attention layer), a
one-block vision tower ``model.visual.*``, the MTP layer ``mtp.*``, and tied embeddings (as the small Qwen3.5 models
ship; no ``lm_head.weight``). Tensors are named and shaped by transformers' Qwen3_5ForConditionalGeneration."""

from __future__ import annotations

from pathlib import Path

from tests.hf_layout import write_checkpoint
from tests.tiny.qwen3_next import mtp_tensors, randomized

TEXT_CONFIG = {
    "model_type": "qwen3_5_text",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "attn_output_gate": True,
    "attention_bias": False,
    "partial_rotary_factor": 0.25,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [2, 1, 1], "mrope_interleaved": True},
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "mamba_ssm_dtype": "float32",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "mtp_num_hidden_layers": 1,
    "mtp_use_dedicated_embeddings": False,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
}

VISION_CONFIG = {"model_type": "qwen3_5", "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                 "in_channels": 3, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2,
                 "out_hidden_size": 64, "num_position_embeddings": 16, "deepstack_visual_indexes": []}

CONFIG = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def vl_tensors(model_cls, config: dict, *, mtp: bool, seed: int) -> dict:
    """Random tensors of model_cls(config) (a Qwen3.5 ...ForConditionalGeneration) under their checkpoint names,
    with the MTP layer shaped as the trunk's full-attention layer (experts as transformers holds them: fused)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    tensors = randomized(model_cls(model_cls.config_class(**config)).state_dict(), gen)
    if config["tie_word_embeddings"]:  # the embedding is the head too: scaled as a matrix, for O(1) logits
        del tensors["lm_head.weight"]
        tensors["model.language_model.embed_tokens.weight"] /= config["text_config"]["hidden_size"] ** 0.5
    if mtp:
        last = config["text_config"]["num_hidden_layers"] - 1
        tensors.update(mtp_tensors(tensors, f"model.language_model.layers.{last}.",
                                   config["text_config"]["hidden_size"], gen))
    return tensors


def make(path: Path, *, mtp: bool = True, seed: int = 0) -> Path:
    from transformers import Qwen3_5ForConditionalGeneration

    return write_checkpoint(Path(path), CONFIG, vl_tensors(Qwen3_5ForConditionalGeneration, CONFIG, mtp=mtp, seed=seed))
