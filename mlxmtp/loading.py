"""Path or repo id -> config.json -> family -> strict weight map -> model (+ tokenizer).

Only safetensors are read and no code shipped with a checkpoint is ever executed (no trust_remote_code).
Every tensor in the checkpoint is either loaded into a parameter or deliberately skipped by the family's
``sanitize`` (which records why); anything else is an error that names the tensor.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, MLXMTPError
from .models import get_family
from .safetensors_io import dequantize_fp8, load_file

log = logging.getLogger("mlxmtp")

# Files worth downloading from a hub repo: configs, weights, tokenizer. Never code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve(path_or_repo: Union[str, Path]) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id fetched through huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MLXMTPError(f"{p} is a file; pass the checkpoint directory that holds config.json")
        return p
    s = str(path_or_repo)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise MLXMTPError(f"model path {s!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: all end the same way
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else type(e).__name__
        raise MLXMTPError(
            f"cannot fetch {s!r} from the Hugging Face hub ({why}); download it elsewhere and pass its local path"
        ) from None


def read_config(path: Path) -> dict:
    """config.json, with a vision-language checkpoint's ``text_config`` merged over the top level."""
    f = path / "config.json"
    if not f.exists():
        raise MLXMTPError(f"no config.json in {path}")
    try:
        config = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MLXMTPError(f"{f} is not valid JSON ({e})") from None
    if "model_type" not in config:
        raise MLXMTPError(f"{f} has no model_type")
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"], "model_type": config["model_type"]}
    return config


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name} is unreadable ({e})") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index.name} names files that are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pth")) or any(path.glob("*.gguf")):
            raise CheckpointError(f"{path} has no safetensors weights (mlxmtp reads only safetensors)")
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return files


def _quantization_predicate(config: dict, weights: dict):
    q = config.get("quantization") or config.get("quantization_config")

    def predicate(path: str, module: nn.Module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    return q, predicate


def default_dtype():
    """float32 on the CPU (the only dtype with a BLAS path there, see README), else the checkpoint's own."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def load_model(path_or_repo: Union[str, Path], mtp: bool = True, dtype=None, lazy: bool = False):
    """Build the model of a checkpoint and load its weights strictly. Returns the model; ``model.config`` holds
    config.json and ``model.load_report`` what was loaded, skipped and why.

    Tensors are read lazily and evaluated one parameter at a time, so loading never holds a second copy of the
    model (only one tensor's transient: an FP8 decode, a dtype cast, one layer's experts being stacked).
    lazy=True leaves the parameters unevaluated (convert streams them to disk one by one)."""
    path = resolve(path_or_repo)
    config = read_config(path)
    if config.get("quantization_config", {}).get("quant_method") not in (None, "fp8"):
        raise CheckpointError(
            f"{path}: {config['quantization_config']['quant_method']} quantized checkpoints are not supported; "
            "use the original weights or one written by `mlxmtp convert`")
    family = get_family(config["model_type"])
    args = family.ModelArgs.from_dict(config)
    declared = args.mtp_modules()
    model = family.Model(args, num_mtp=declared)

    weights = {}
    for f in weight_files(path):
        for k, v in load_file(f).items():
            if k in weights:
                raise CheckpointError(f"tensor {k!r} is stored twice ({f.name})")
            weights[k] = v
    if any(k.endswith(".weight_scale_inv") for k in weights):
        weights = dequantize_fp8(weights)
    weights = model.sanitize(weights)

    mtp_names = [k for k in weights if k.startswith("mtp.")]
    warning = None
    if not mtp:
        model.skip("MTP modules not requested (mtp=False)", mtp_names)
        for k in mtp_names:
            del weights[k]
        model.mtp = []
    elif declared and not mtp_names:
        if config.get("mlxmtp", {}).get("mtp_modules") != 0:  # not left out on purpose by `convert --no-mtp`
            warning = f"{path.name}: checkpoint has no MTP weights; running without MTP (plain decoding)"
        model.mtp = []
    elif model.no_mtp_reason and not mtp_names:
        warning = f"{path.name}: {model.no_mtp_reason}"
    if warning:
        log.warning(warning)

    quant, predicate = (None, None)
    if config.get("quantization"):
        quant, predicate = _quantization_predicate(config, weights)
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"], mode=quant.get("mode", "affine"),
                    class_predicate=predicate)

    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing:
        raise CheckpointError(f"{path.name}: the checkpoint lacks tensor{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{path.name}: unexpected tensor{'s' if len(unexpected) > 1 else ''} "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for k, p in params.items():
        if weights[k].shape != p.shape:
            raise CheckpointError(f"{path.name}: tensor {k!r} has shape {tuple(weights[k].shape)}, "
                                  f"expected {tuple(p.shape)}")

    dtype = dtype if dtype is not None else default_dtype()
    if dtype is not None:
        weights = {k: (v.astype(mx.float32 if keeps_float32(model, k) else dtype)
                       if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    del weights
    if not lazy:
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
    model.eval()
    model.config = config
    model.load_report = {
        "path": str(path),
        "model_type": config["model_type"],
        "mtp_modules_declared": declared,
        "mtp_modules_loaded": model.num_mtp_modules,
        "skipped": {reason: len(names) for reason, names in model.skipped.items()},
        "quantization": quant,
        "warning": warning,
    }
    return model


def keeps_float32(model, name: str) -> bool:
    return any(name.endswith(s) for s in getattr(model, "float32_params", ()))


def _no_length_warning(record: logging.LogRecord) -> bool:
    """transformers warns about every prompt longer than model_max_length ("Token indices sequence length is longer
    than the specified maximum ..."); mlxmtp checks the context itself and says so in its own words."""
    return "Token indices sequence length is longer" not in record.getMessage()


def load_tokenizer(path_or_repo: Union[str, Path]):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template); EOS ids from generation_config.json."""
    from mlx_lm.tokenizer_utils import load as load_tok

    path = resolve(path_or_repo)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists() \
            and not any(path.glob("*.model")):
        raise MLXMTPError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    eos = None
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.exists():
            eos = json.loads(f.read_text()).get("eos_token_id", eos)
            if eos is not None:
                break
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_no_length_warning)
    try:
        return load_tok(path, eos_token_ids=eos)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file is a user-facing error
        raise MLXMTPError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e})") from None


def load(path_or_repo: Union[str, Path, None] = None, mtp: bool = True, dtype=None):
    """``model, tokenizer = mlxmtp.load(path_or_repo_id, mtp=True)``; with no argument, the bundled demo model."""
    if path_or_repo is None:
        path_or_repo = Path(__file__).parent / "demo_model"  # mlxmtp.demo_model_path()
    path = resolve(path_or_repo)
    model = load_model(path, mtp=mtp, dtype=dtype)
    return model, load_tokenizer(path)
