"""A tiny Qwen3-Next checkpoint in the original layout: 3 Gated DeltaNet layers and 1 gated full-attention layer,
MoE with a shared expert (experts stored one by one, as Qwen/Qwen3-Next-80B-A3B ships them) and one dense layer,
and the MTP layer under ``mtp.*``. Trunk tensors are named and shaped by transformers' Qwen3NextForCausalLM.
Also the weight recipe and MTP-layer helper that tests/tiny/qwen3_5*.py share."""

from __future__ import annotations

from pathlib import Path

from tests.hf_layout import write_checkpoint

CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],  # one dense layer, to cover both MLP kinds
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 512,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def random_tensor(name: str, shape, gen):
    """Weights that keep activations and logits O(1) and make every parameter matter: zero-centred norm weights
    well away from 0 (stored w, applied as 1 + w), the GDN output norm's plain weight around 1, decay rates spread
    over fast and slow heads, matrices N(0, 1/fan_in), embeddings N(0, 1)."""
    import torch

    x = torch.randn(tuple(shape), generator=gen)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("linear_attn.norm.weight"):
        return 1 + 0.2 * x
    if "norm" in name.rsplit(".", 2)[-2] and leaf == "weight":
        return 0.2 * x
    if leaf == "A_log":
        return torch.log(0.1 + 3 * torch.rand(tuple(shape), generator=gen))
    if leaf == "dt_bias":
        return 0.5 * x
    if "embed" in name:
        return x
    return x / shape[-1] ** 0.5


def randomized(state_dict: dict, gen) -> dict:
    return {k: random_tensor(k, v.shape, gen) for k, v in state_dict.items()}


def unfuse_experts(tensors: dict) -> dict:
    """transformers 5 fuses experts (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]); write them one
    by one (experts.{e}.gate_proj.weight, ...), as the original checkpoints do."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e]
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e]
        elif k.endswith(".experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e]
        else:
            out[k] = v
    return out


def mtp_tensors(tensors: dict, full_attention_layer: str, hidden: int, gen) -> dict:
    """The MTP layer: a full-attention decoder layer shaped as the trunk's (its tensors under
    full_attention_layer, e.g. "model.layers.3.") with fresh weights, and fc / pre_fc_norm_* / norm."""
    layer = {"mtp.layers.0." + k[len(full_attention_layer):]: v.shape
             for k, v in tensors.items() if k.startswith(full_attention_layer)}
    layer.update({"mtp.fc.weight": (hidden, 2 * hidden), "mtp.pre_fc_norm_embedding.weight": (hidden,),
                  "mtp.pre_fc_norm_hidden.weight": (hidden,), "mtp.norm.weight": (hidden,)})
    return {k: random_tensor(k, shape, gen) for k, shape in layer.items()}


def make(path: Path, *, mtp: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    gen = torch.Generator().manual_seed(seed)
    tensors = randomized(Qwen3NextForCausalLM(Qwen3NextConfig(**CONFIG)).state_dict(), gen)
    if mtp:
        tensors.update(mtp_tensors(tensors, "model.layers.3.", CONFIG["hidden_size"], gen))
    return write_checkpoint(Path(path), CONFIG, unfuse_experts(tensors))
