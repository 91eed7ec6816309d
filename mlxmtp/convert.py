"""An original Hugging Face checkpoint, MTP modules included, -> a quantized mlxmtp checkpoint.

The output follows mlx-lm's convert (mlx_lm/utils.py: quantize_model, make_shards, save_model):
- config.json: the original plus ``quantization`` = {"group_size", "bits", "mode"} and, for each module whose
  precision differs from that default, {"group_size", "bits"} or False (kept in float), which is how
  ``quantize_model`` records mixed precision and what the loader's predicate reads; the same dict again as
  ``quantization_config`` (mlx-lm's convention; it replaces e.g. DeepSeek's FP8 entry, dequantized on loading);
  ``mlxmtp`` records where the checkpoint came from;
- the weights under the model's own parameter names (every family's ``sanitize`` passes those through), in
  safetensors shards of at most 5 GB, with model.safetensors.index.json;
- the tokenizer and generation-config files. Nothing else.

Precision is chosen per component (inspection.component): trunk, MTP modules (``mtp.*``: draft acceptance drops
when they are quantized too low, so 8 bits by default), embedding + output head. MoE routers and matrices whose
input dimension is not a multiple of the group size stay in float. Everything is written to a temporary directory
beside OUT that is renamed to OUT once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import MLXMTPError
from .inspection import component
from .loading import load_model, read_config, resolve

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize does in "affine" mode
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
COPY_PATTERNS = ("tokenizer*.json", "*.model", "*.tiktoken", "special_tokens_map.json", "generation_config.json",
                 "chat_template*")
ROUTERS = ("gate", "router", "shared_expert_gate")  # leaf names of MoE routers: few outputs, precision-critical


def check_choice(option: str, value, allowed) -> None:
    if value not in allowed:
        raise MLXMTPError(f"{option} {value}: choose one of {', '.join(map(str, allowed))}")


def quantize(model: nn.Module, bits: int, group_size: int, mtp_bits: int, embed_bits: int) -> dict:
    """Quantize the model in place (lazily) and return its config's ``quantization`` entry."""
    q = {"group_size": group_size, "bits": bits, "mode": "affine"}
    wanted = {"trunk": bits, "mtp": mtp_bits, "embed_head": embed_bits}

    def predicate(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False
        router = path.rsplit(".", 1)[-1] in ROUTERS
        b = 0 if router or module.weight.shape[-1] % group_size else wanted[component(path)]
        if b == bits:
            return True
        q[path] = {"group_size": group_size, "bits": b} if b else False
        return q[path]

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return q


def source_dtype(config: dict) -> str:
    """The checkpoint's own float dtype (bfloat16 for FP8 checkpoints, which are dequantized to it)."""
    d = config.get("torch_dtype") or config.get("dtype")
    return d if d in DTYPES else "bfloat16"


def make_shards(weights: dict) -> list[dict]:
    shards, size = [{}], 0
    for k, v in weights.items():
        if size + v.nbytes > MAX_SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    return shards


def _progress(show: bool) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not show)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename tmp to out; an existing out (only with force) is set aside first and removed once tmp is in place."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:
        raise MLXMTPError(f"{out} exists; pass --force to replace it")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def convert(src: Union[str, Path], out: Union[str, Path], *, bits: int = 4, group_size: int = 64,
            mtp_bits: Optional[int] = None, embed_bits: Optional[int] = None, dtype: Optional[str] = None,
            mtp: bool = True, force: bool = False, show_progress: bool = False) -> Path:
    """Convert ``src`` (a checkpoint directory or hub repo id) into ``out``; returns ``out``.

    mtp_bits: bits of the MTP modules (default 8; 0 keeps them in float); embed_bits: bits of the embedding and
    output head (default ``bits``, as mlx-lm; 0 keeps them in float); dtype: float dtype of what is not quantized
    (default: the checkpoint's own); mtp=False leaves the MTP modules out.
    """
    mtp_bits = 8 if mtp_bits is None else mtp_bits
    embed_bits = bits if embed_bits is None else embed_bits
    check_choice("--bits", bits, BITS)
    check_choice("--group-size", group_size, GROUP_SIZES)
    check_choice("--mtp-bits", mtp_bits, (0, *BITS))
    check_choice("--embed-bits", embed_bits, (0, *BITS))
    if dtype is not None:
        check_choice("--dtype", dtype, tuple(DTYPES))
    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise MLXMTPError(f"{out} exists; pass --force to replace it")
    path = resolve(src)
    if path.resolve() == out.resolve():
        raise MLXMTPError(f"{out} is the source checkpoint; write the conversion elsewhere")
    if read_config(path).get("quantization"):
        raise MLXMTPError(f"{path} is already quantized; convert the original checkpoint")
    config = json.loads((path / "config.json").read_text())  # as published: text_config stays nested
    dtype = dtype or source_dtype(config)

    with _progress(show_progress) as progress:
        task = progress.add_task(f"loading {path.name} ({dtype})", total=None)
        model = load_model(path, mtp=mtp, dtype=DTYPES[dtype])
        progress.update(task, total=1, completed=1)

        quant = quantize(model, bits, group_size, mtp_bits, embed_bits)
        config.update(quantization=quant, quantization_config=quant,
                      mlxmtp={"converted_from": str(src), "version": __version__,
                              "mtp_modules": model.num_mtp_modules})
        weights = dict(tree_flatten(model.parameters()))
        shards = make_shards(weights)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
        tmp.mkdir()  # not mkdtemp: OUT gets the usual permissions
        try:
            task = progress.add_task(f"quantizing and writing {out.name}", total=len(weights))
            weight_map = {}
            n = len(shards)
            for i, shard in enumerate(shards):
                name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                for k, v in shard.items():
                    mx.eval(v)
                    weight_map[k] = name
                    progress.advance(task)
                mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for f in sorted({f for p in COPY_PATTERNS for f in path.glob(p) if f.is_file()}):
                shutil.copy2(f, tmp / f.name)
            _move_into_place(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
