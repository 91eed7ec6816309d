"""A tiny MiMo-7B checkpoint: the trunk's tensors named and shaped by mlx-lm's mimo model (there is no HF class),
one MTP layer under ``model.mtp_layers.0.*`` as XiaomiMiMo ships it. Also the random-weight recipe the other
tiny families share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

from tests.hf_layout import write_checkpoint

CONFIG = {
    "architectures": ["MiMoForCausalLM"],
    "model_type": "mimo",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "torch_dtype": "float32",
    "eos_token_id": 0,
}


def random_tensors(shapes: dict, rng: np.random.Generator, zero_centred_norms: bool = False) -> dict:
    """Float32 weights for the given name -> shape map, scaled so activations and logits stay O(1): norms near
    1 (near 0 when stored zero-centred, 1 + w), small biases, matrices N(0, 1/fan_in), embeddings N(0, 1)."""
    out = {}
    for name, shape in shapes.items():
        *_, module, leaf = ("." + name).split(".")
        x = rng.standard_normal(tuple(shape)).astype(np.float32)
        if "norm" in module and leaf == "weight":
            x = 0.1 * x + (0.0 if zero_centred_norms else 1.0)
        elif leaf.endswith("bias") and "sink" not in leaf:
            x = 0.1 * x
        elif "embed" not in name and "sink" not in leaf:
            x = x / np.sqrt(shape[-1])
        out[name] = x.astype(np.float32)
    return out


def shapes_of(module, prefix: str = "") -> dict:
    return {prefix + k: v.shape for k, v in tree_flatten(module.parameters())}


def make(path: Path, *, mtp: bool = True, seed: int = 0) -> Path:
    from mlx_lm.models import mimo

    args = mimo.ModelArgs.from_dict(CONFIG)
    shapes = shapes_of(mimo.Model(args))
    if mtp:
        p = "model.mtp_layers.0."
        shapes.update(shapes_of(mimo.TransformerBlock(args), p))
        H = args.hidden_size
        shapes.update({p + "token_layernorm.weight": (H,), p + "hidden_layernorm.weight": (H,),
                       p + "input_proj.weight": (H, 2 * H), p + "final_layernorm.weight": (H,)})
    return write_checkpoint(Path(path), CONFIG, random_tensors(shapes, np.random.default_rng(seed)))
