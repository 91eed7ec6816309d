"""What a checkpoint holds and what it needs, from config.json and the safetensors headers alone (no tensor is read):
family, MTP modules, deliberately skipped tensors, precision per component, parameter counts, and a memory estimate
(weights as the loader will hold them + KV cache) against this machine's memory. ``mlxmtp inspect`` prints it;
generate / chat / bench call ``check_fits`` before loading a model.

Tensor names may be a checkpoint's original ones or an mlxmtp conversion's (the model's own, ``mtp.{j}.*``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .errors import MLXMTPError
from .loading import default_dtype, read_config, resolve, weight_files
from .models import get_family
from .safetensors_io import read_header

GB = 2**30
DEFAULT_CONTEXT = 4096
MACOS_WORKING_SET = 0.75  # Metal's recommended working set is about 75% of RAM (mx.metal.device_info())

# MTP module j of each layout: mlxmtp's own, Qwen3-Next / 3.5, MiMo-7B, MiMo-V2-Flash; DeepSeek, GLM and Step-3.5
# store it as model.layers.{num_hidden_layers + j}; Qwen's mtp.fc / mtp.norm / ... belong to its module 0.
_MTP = [re.compile(p) for p in (r"mtp\.(\d+)\.", r"mtp\.layers\.(\d+)\.", r"model\.mtp_layers\.(\d+)\.",
                                r"model\.mtp\.layers\.(\d+)\.")]
_MTP_SHARED = re.compile(r"(model\.)?mtp\.")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model|multi_modal_projector|mm_projector)\.")
# Routed experts (not shared_experts): one by one, fused or stacked (Step-3.5: moe.{gate,up,down}_proj).
_ROUTED = re.compile(r"\.(experts|switch_mlp)\.|\.moe\.(gate|up|down)_proj\.")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_CONFIG_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def component(name: str) -> str:
    """"mtp", "embed_head" or "trunk" for a module path or tensor name in the model's own naming."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return "mtp"
    return "embed_head" if "embed_tokens" in parts or "lm_head" in parts else "trunk"


def mtp_index(name: str, num_hidden_layers: int) -> Optional[int]:
    """The MTP module a tensor belongs to, or None for the trunk."""
    for p in _MTP:
        if m := p.match(name):
            return int(m[1])
    if _MTP_SHARED.match(name):
        return 0
    m = _LAYER.match(name)
    return int(m[1]) - num_hidden_layers if m and int(m[1]) >= num_hidden_layers else None


def skip_reason(name: str, in_mtp: bool, config: dict) -> Optional[str]:
    """Why the families' sanitize drops a tensor on loading, or None."""
    if _VISION.search(name):
        return "vision tower (mlxmtp runs the text model)"
    if name.endswith("rotary_emb.inv_freq"):
        return "precomputed rope frequencies (recomputed)"
    if in_mtp and name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
        return "MTP copies of the trunk's embedding / lm_head (shared)"
    if config.get("tie_word_embeddings") and name.startswith("lm_head."):
        return "lm_head tied to the embedding"
    return None


def _scan(path_or_repo) -> tuple[Path, dict, dict]:
    path = resolve(path_or_repo)
    config = read_config(path)
    tensors = {}
    for f in weight_files(path):
        tensors.update(read_header(f))
    return path, config, tensors


def _family_args(config: dict):
    family = get_family(config["model_type"])
    try:
        return family, family.ModelArgs.from_dict(config)
    except TypeError as e:  # a required config key is missing
        raise MLXMTPError(f"config.json does not describe a {config['model_type']} model ({e})") from None


def _quant_bits(q: dict, module: str) -> int:
    entry = q.get(module)
    return entry["bits"] if isinstance(entry, dict) else q["bits"]


def _float_dtype(dtype) -> Optional[str]:
    """The float dtype the loader gives the model: dtype, else its default; None: each tensor's own."""
    dtype = dtype if dtype is not None else default_dtype()
    return None if dtype is None else {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


def _layer_kinds(c: dict, n: int) -> list[str]:
    """"full", "sliding" or "linear" for each of the first n layers (trunk, then MTP); "full" where unknown."""
    if isinstance(c.get("layer_types"), list):  # HF: full_attention / sliding_attention / linear_attention
        kinds = ["linear" if "linear" in t else "sliding" if "sliding" in t else "full" for t in c["layer_types"]]
    elif isinstance(c.get("hybrid_layer_pattern"), list):  # MiMo-V2: 1 = sliding window
        kinds = ["sliding" if t == 1 else "full" for t in c["hybrid_layer_pattern"]]
    elif c.get("full_attention_interval"):  # Qwen3-Next: every k-th layer full attention, the rest Gated DeltaNet
        k = c["full_attention_interval"]
        kinds = ["full" if (i + 1) % k == 0 else "linear" for i in range(c["num_hidden_layers"])]
    else:
        kinds = []
    return (kinds + ["full"] * n)[:n]


def kv_cache(c: dict, num_mtp: int, context: int, itemsize: int) -> tuple[int, str]:
    """Bytes of the trunk's and the MTP modules' caches at ``context`` tokens (an MTP layer whose kind the config
    does not give counts as full attention) and a description of what they hold."""
    kinds = _layer_kinds(c, c["num_hidden_layers"] + num_mtp)
    other = c.get("attention_other_setting") or {}  # Step-3.5: the sliding layers' head counts
    if c.get("kv_lora_rank"):  # MLA (DeepSeek-V2/V3): the normed latent and the shared rope key
        full = swa = c["kv_lora_rank"] + c.get("qk_rope_head_dim", 0)
        desc = f"MLA latent ({c['kv_lora_rank']} + {c.get('qk_rope_head_dim', 0)} rope values per token and layer)"
    else:
        heads = c.get("num_key_value_heads") or c.get("num_attention_groups") or c["num_attention_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        vd = c.get("v_head_dim") or hd
        full = heads * (hd + vd)
        swa_heads = c.get("swa_num_key_value_heads") or other.get("num_attention_groups") or heads
        swa = swa_heads * ((c.get("swa_head_dim") or other.get("head_dim") or hd) + (c.get("swa_v_head_dim") or vd))
        desc = f"GQA ({heads} KV heads, keys {hd} + values {vd} per head)"
    window = c["sliding_window_size"] + 1 if c.get("sliding_window_size") else c.get("sliding_window") or context
    linear = 0
    if "linear" in kinds:  # Gated DeltaNet: a [Hv, dk, dv] state and a short convolution window, whatever the length
        hk, hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
        dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
        linear = hv * dk * dv + (c.get("linear_conv_kernel_dim", 4) - 1) * (2 * hk * dk + hv * dv)
    per_kind = {"full": full * context, "sliding": swa * min(window, context), "linear": linear}
    n = {k: kinds.count(k) for k in per_kind}
    if n["sliding"]:
        desc += f", sliding window of {window} on {n['sliding']} of {len(kinds)} layers"
    if n["linear"]:
        desc += f", fixed-size linear-attention state on {n['linear']} of {len(kinds)} layers"
    return sum(per_kind[k] for k in kinds) * itemsize, desc


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> tuple[int, str]:
    """Bytes a model may use here, and what that figure is."""
    total = total_memory()
    if sys.platform == "darwin":
        return int(total * MACOS_WORKING_SET), (f"{MACOS_WORKING_SET:.0%} of {total / GB:.0f} GB RAM, "
                                                "about the recommended Metal working set")
    return total, "total RAM"


def _analyse(path_or_repo, context: int = DEFAULT_CONTEXT, dtype=None) -> dict:
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a whole number of tokens >= 1, got {context!r}")
    path, config, tensors = _scan(path_or_repo)
    family, args = _family_args(config)
    n_layers, q = config["num_hidden_layers"], config.get("quantization") or {}
    keep_fp32 = family.Model.float32_params
    target = _float_dtype(dtype)
    params = {"trunk": 0, "mtp": 0, "embed_head": 0}
    routed = dict.fromkeys(params, 0)
    precision = {c: {} for c in params}
    skipped, mtp_found, weight_bytes = {}, set(), 0
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        j = mtp_index(name, n_layers)
        reason = skip_reason(name, j is not None, config)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if j is not None:
            mtp_found.add(j)
        if leaf == "weight_scale_inv":  # FP8 block scales: applied on loading, then dropped
            continue
        numel = math.prod(t["shape"])
        fp8 = t["dtype"].startswith("F8")
        if t["dtype"] not in _ITEMSIZE:  # integers (packed quantized weights) stay as they are
            weight_bytes += t["data_offsets"][1] - t["data_offsets"][0]
        elif target is None:  # kept as stored; FP8 is dequantized to bfloat16
            weight_bytes += 2 * numel if fp8 else t["data_offsets"][1] - t["data_offsets"][0]
        else:
            weight_bytes += numel * (4 if name.endswith(keep_fp32) else _CONFIG_ITEMSIZE[target])
        if leaf in ("scales", "biases") and f"{module}.scales" in tensors:
            continue  # quantization metadata, not parameters
        quantized = t["dtype"] == "U32" and f"{module}.scales" in tensors
        if quantized:
            bits = _quant_bits(q, module)
            numel = numel * 32 // bits
        comp = "mtp" if j is not None else component(name)
        params[comp] += numel
        if _ROUTED.search(name):
            routed[comp] += numel
        if leaf == "weight" and len(t["shape"]) >= 2:
            label = (f"{bits}-bit" if quantized else "float8 (block-scaled)" if fp8
                     else _DTYPE_NAME.get(t["dtype"], t["dtype"]))
            precision[comp][label] = precision[comp].get(label, 0) + numel

    declared = args.mtp_modules()
    if not mtp_found and family.Model.no_mtp_reason:
        note = family.Model.no_mtp_reason
    elif declared and not mtp_found:
        note = "checkpoint has no MTP weights; it runs without MTP (plain decoding)"
    elif not declared:
        note = "the config declares no MTP modules"
    elif len(mtp_found) != declared:
        note = "the config and the weights disagree; loading will fail"
    elif ((config.get("mlxmtp") or {}).get("mtp_heads") or {}).get("trained_by"):
        note = f"trained by {config['mlxmtp']['mtp_heads']['trained_by']}"  # recipe: config.json mlxmtp.mtp_heads
    else:
        note = None

    experts = next((config[k] for k in ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
                    if config.get(k)), None)
    top_k = next((config[k] for k in ("num_experts_per_tok", "moe_top_k") if config.get(k)), None)
    base = params["trunk"] + params["embed_head"]
    moe = bool(routed["trunk"] and experts and top_k)
    active = round(base - routed["trunk"] * (1 - top_k / experts)) if moe else None

    float_dtype = target or config.get("torch_dtype") or config.get("dtype")
    float_dtype = float_dtype if float_dtype in _CONFIG_ITEMSIZE else "bfloat16"
    kv_bytes, kv_desc = kv_cache(config, len(mtp_found), context, _CONFIG_ITEMSIZE[float_dtype])
    budget, budget_note = memory_budget()
    memory = {"weights_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "kv_cache": kv_desc, "context": context,
              "dtype": float_dtype, "total_bytes": weight_bytes + kv_bytes, "machine_bytes": total_memory(),
              "budget_bytes": budget, "budget": budget_note, "fits": weight_bytes + kv_bytes <= budget}
    return {
        "path": str(path),
        "model_type": config["model_type"],
        "architecture": (config.get("architectures") or [None])[0],
        "converted_from": (config.get("mlxmtp") or {}).get("converted_from"),
        "mtp": {"declared": declared, "found": len(mtp_found), "note": note},
        "skipped": skipped,
        "quantization": {k: q[k] for k in ("bits", "group_size", "mode") if k in q} or None,
        "precision": precision,
        "parameters": {"total": sum(params.values()), **params, "active_per_token": active,
                       "experts": {"routed": experts, "per_token": top_k} if moe else None},
        "memory": memory,
    }


def inspect_checkpoint(path_or_repo: Union[str, Path], context: int = DEFAULT_CONTEXT) -> dict:
    """Everything ``mlxmtp inspect`` reports, as a JSON-serialisable dict."""
    from .blas import blas_in_use

    return {**_analyse(path_or_repo, context), "blas": blas_in_use()}


def estimate_memory(path_or_repo: Union[str, Path], context: int = DEFAULT_CONTEXT, dtype=None) -> dict:
    """Memory the loaded model needs (weights in the dtype the loader will use + KV cache at ``context`` tokens),
    this machine's budget and whether it fits; see ``inspect_checkpoint()["memory"]``."""
    return _analyse(path_or_repo, context, dtype)["memory"]


def check_fits(path_or_repo: Union[str, Path], override: bool = False, context: int = DEFAULT_CONTEXT,
               dtype=None) -> dict:
    """Raise MLXMTPError before loading a model that cannot fit in memory (unless override); returns the estimate."""
    m = estimate_memory(path_or_repo, context, dtype)
    if not m["fits"] and not override:
        raise MLXMTPError(f"model needs ~{m['total_bytes'] / GB:.1f} GB (weights + KV cache for {context} tokens), "
                          f"this machine has {m['budget_bytes'] / GB:.1f} GB ({m['budget']}); "
                          "pass --force-load to try anyway")
    return m
