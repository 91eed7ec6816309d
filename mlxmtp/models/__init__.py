"""Model families by Hugging Face ``model_type``: one module each, imported on first use.

A family module exposes ``ModelArgs`` (with ``from_dict`` and ``mtp_modules()``, the number of MTP modules the
config declares) and ``Model(args, num_mtp)`` (an ``MTPModel``).
"""

from __future__ import annotations

import importlib

from ..errors import UnsupportedModelError

FAMILIES = {
    "deepseek_v3": "deepseek_v3",
    "glm4_moe": "glm4_moe",
    "qwen3_next": "qwen3_next",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_text": "qwen3_5",  # text-only checkpoints saved by transformers
    "qwen3_5_moe_text": "qwen3_5",
    "mimo": "mimo",
    "mimo_v2_flash": "mimo_v2_flash",
    "step3p5": "step3p5",
    "minimax_m2": "minimax_m2",
}


def available() -> list[str]:
    """model_types whose family module is present in this installation."""
    return [t for t, m in FAMILIES.items() if importlib.util.find_spec(f"{__name__}.{m}") is not None]


def get_family(model_type: str):
    name = FAMILIES.get(model_type)
    if name is None or importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; mlxmtp supports: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")
