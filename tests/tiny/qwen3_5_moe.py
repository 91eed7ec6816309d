"""A tiny Qwen3.5-MoE checkpoint in the released vision-language layout (as Qwen/Qwen3.5-35B-A3B): trunk experts
fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``), the MTP layer's experts stored one by
one (Qwen3.5) or, with ``fused_mtp_experts``, fused (Qwen3.6), a gated shared expert, untied head. Tensors are named
and shaped by transformers' Qwen3_5MoeForConditionalGeneration."""

from __future__ import annotations

from pathlib import Path

from tests.hf_layout import write_checkpoint
from tests.tiny.qwen3_5 import TEXT_CONFIG, VISION_CONFIG, vl_tensors
from tests.tiny.qwen3_next import unfuse_experts

MOE_TEXT_CONFIG = {k: v for k, v in TEXT_CONFIG.items() if k != "intermediate_size"}
MOE_TEXT_CONFIG.update({"model_type": "qwen3_5_moe_text", "num_experts": 8, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                        "tie_word_embeddings": False})

CONFIG = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "text_config": MOE_TEXT_CONFIG,
    "vision_config": {**VISION_CONFIG, "model_type": "qwen3_5_moe"},
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def make(path: Path, *, mtp: bool = True, seed: int = 0, fused_mtp_experts: bool = False) -> Path:
    from transformers import Qwen3_5MoeForConditionalGeneration

    tensors = vl_tensors(Qwen3_5MoeForConditionalGeneration, CONFIG, mtp=mtp, seed=seed)
    if not fused_mtp_experts:
        tensors.update(unfuse_experts({k: tensors.pop(k) for k in list(tensors) if k.startswith("mtp.")}))
    return write_checkpoint(Path(path), CONFIG, tensors)
