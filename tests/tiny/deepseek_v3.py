"""A tiny DeepSeek-V3 checkpoint in the original layout: MLA, one dense and two MoE layers, YaRN rope, and the MTP
layer at model.layers.{num_hidden_layers}. Trunk weights come from transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

from pathlib import Path

from tests.hf_layout import write_checkpoint

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 192,  # > 128: the FP8 test gets a weight of two 128-row blocks
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "qk_nope_head_dim": 16,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
    "attention_bias": False,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "initializer_range": 0.1,  # large enough for non-degenerate logits and routing
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def hf_checkpoint_tensors(model_cls, config: dict, *, mtp: bool, seed: int) -> dict:
    """Tensors under the original checkpoint names of a random model of a DeepSeek-style family: the trunk of
    model_cls(config), and with mtp the MTP layer model.layers.{n}.* (its decoder block is a further MoE layer of
    the same model, plus enorm / hnorm / eh_proj / shared_head.norm and the duplicated embedding and head)."""
    import torch

    n = config["num_hidden_layers"]
    torch.manual_seed(seed)
    hf = model_cls(model_cls.config_class(**{**config, "num_hidden_layers": n + 1}))
    H = config["hidden_size"]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):  # random norm gains so that a misplaced norm shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
            if name.endswith("bias") and "e_score_correction" not in name:
                p.copy_(0.1 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):  # non-zero, so the bias-corrected choice matters
                b.copy_(0.3 * torch.rand_like(b))
    tensors = {}
    for k, v in hf.state_dict().items():
        if k.endswith(".mlp.experts.gate_up_proj"):  # transformers fuses experts; checkpoints store them one by one
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                tensors[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                tensors[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif k.endswith(".mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                tensors[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            tensors[k] = v.clone()
    p = f"model.layers.{n}."
    if not mtp:
        return {k: v for k, v in tensors.items() if not k.startswith(p)}
    tensors[p + "enorm.weight"] = 1 + 0.2 * torch.randn(H)
    tensors[p + "hnorm.weight"] = 1 + 0.2 * torch.randn(H)
    tensors[p + "eh_proj.weight"] = config["initializer_range"] * torch.randn(H, 2 * H)
    tensors[p + "shared_head.norm.weight"] = 1 + 0.2 * torch.randn(H)
    tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return tensors


def make(path: Path, *, mtp: bool = True, seed: int = 0, shards: int = 1, **config) -> Path:
    """Write the checkpoint; keyword arguments override config.json entries (e.g. q_lora_rank=None)."""
    from transformers import DeepseekV3ForCausalLM

    config = {**CONFIG, **config}
    tensors = hf_checkpoint_tensors(DeepseekV3ForCausalLM, config, mtp=mtp, seed=seed)
    return write_checkpoint(Path(path), config, tensors, shards=shards)
