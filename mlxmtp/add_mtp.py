"""MTP heads for the quantized checkpoints people already have: ``mlxmtp convert QUANT --add-mtp ORIGINAL -o OUT``.

mlx-community's conversions (mlx-lm's convert) drop the MTP tensors. This takes from ORIGINAL (a directory or hub
repo id) only the safetensors files that hold MTP tensors (the index's weight_map says which; each fetched with
huggingface_hub's hf_hub_download), checks that ORIGINAL and QUANT are the same model, quantizes the MTP modules
at their own precision (``--mtp-bits``, 8 by default, group size of QUANT) and writes OUT: QUANT's files
(hard-linked where the file system allows, else copied), one more shard ``model-mtp.safetensors`` with the modules
under the model's own names (``mtp.{j}.*``), the index extended, and config.json's ``quantization`` recording the
modules' precision (mlx-lm's per-module convention, see convert.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import __version__
from .convert import (BITS, DTYPES, ROUTERS, check_choice, check_free_space, check_out, finish, partial_output,
                      sigterm_as_interrupt, source_dtype, source_name)
from .errors import CheckpointError, MLXMTPError
from .inspection import mtp_index
from .loading import keeps_float32, read_config, resolve, weight_files
from .models import get_family
from .safetensors_io import dequantize_fp8, load_file, read_header, save_file

# What must agree for the heads of one checkpoint to fit the trunk of another.
SAME_MODEL = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
MTP_SHARD = "model-mtp.safetensors"


def _weight_map(path: Path) -> dict:
    """Tensor name -> file of a local checkpoint (from its index, else from the headers)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_files(path)  # checks the index and that its files exist
        return json.loads(index.read_text())["weight_map"]
    return {name: f.name for f in weight_files(path) for name in read_header(f)}


def fetch_mtp_files(original: Union[str, Path]) -> tuple[Path, dict, list[Path]]:
    """(directory, merged config, files holding MTP tensors) of ORIGINAL; for a repo id only config.json, the index
    and those files are downloaded."""
    p = Path(original).expanduser()
    if p.exists():
        path = resolve(p)
        config = read_config(path)
        n = config["num_hidden_layers"]
        names = sorted({f for k, f in _weight_map(path).items() if mtp_index(k, n) is not None})
        return path, config, [path / f for f in names]
    s = str(original)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        resolve(s)  # not a repo id either: resolve's "does not exist"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        path = Path(hf_hub_download(s, "config.json")).parent
        config = read_config(path)
        n = config["num_hidden_layers"]
        try:
            index = json.loads(Path(hf_hub_download(s, "model.safetensors.index.json")).read_text())
            names = sorted({f for k, f in index["weight_map"].items() if mtp_index(k, n) is not None})
        except EntryNotFoundError:
            names = ["model.safetensors"]
        files = [Path(hf_hub_download(s, f)) for f in names]
    except MLXMTPError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repo: one line
        why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") else f"{type(e).__name__}: {e}"
        raise MLXMTPError(f"cannot fetch the MTP files of {s!r} from the Hugging Face hub ({why})") from None
    return path, config, files


def check_same_model(original: dict, quant: dict, names: tuple[str, str]) -> None:
    a, b = (original.get("architectures") or [None])[0], (quant.get("architectures") or [None])[0]
    diffs = [f"architecture {a} vs {b}"] if a and b and a != b else []
    diffs += [f"{k} {original.get(k)} vs {quant.get(k)}" for k in SAME_MODEL if original.get(k) != quant.get(k)]
    if diffs:
        raise MLXMTPError(f"{names[0]} and {names[1]} are not the same model: {'; '.join(diffs)}")


def mtp_modules(config: dict, files: list[Path], dtype) -> tuple[nn.Module, dict]:
    """The family model of ``config`` with its MTP modules' weights loaded (lazily) from ``files``, strictly;
    returns (model, {name: array} of the mtp.* parameters)."""
    family = get_family(config["model_type"])
    args = family.ModelArgs.from_dict(config)
    declared = args.mtp_modules()
    if not declared:
        raise MLXMTPError(f"the config of {config['model_type']} declares no MTP modules")
    model = family.Model(args, num_mtp=declared)
    n = config["num_hidden_layers"]
    weights = {}
    for f in files:
        weights.update({k: v for k, v in load_file(f).items() if mtp_index(k, n) is not None})
    if not weights:
        raise MLXMTPError("the original checkpoint has no MTP weights")
    if any(k.endswith(".weight_scale_inv") for k in weights):
        weights = dequantize_fp8(weights)
    weights = model.sanitize(weights)
    params = {k: v for k, v in tree_flatten(model.parameters()) if k.startswith("mtp.")}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        what = (f"lacks tensor {', '.join(missing[:3])}" if missing else
                f"has unexpected tensor {', '.join(unexpected[:3])}")
        raise CheckpointError(f"the original's MTP layer {what}")
    for k, p in params.items():
        if weights[k].shape != p.shape:
            raise CheckpointError(f"tensor {k!r} has shape {tuple(weights[k].shape)}, expected {tuple(p.shape)}")
    weights = {k: (v.astype(mx.float32 if keeps_float32(model, k) else dtype) if mx.issubdtype(v.dtype, mx.floating)
                   else v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    return model, weights


def add_mtp(original: Union[str, Path], quant: Union[str, Path], out: Union[str, Path], *,
            mtp_bits: Optional[int] = None, force: bool = False, show_progress: bool = False) -> Path:
    """Write OUT: the checkpoint QUANT plus the MTP modules of ORIGINAL quantized at ``mtp_bits`` (default 8,
    0 keeps them in float). Returns OUT."""
    mtp_bits = 8 if mtp_bits is None else mtp_bits
    check_choice("--mtp-bits", mtp_bits, (0, *BITS))
    out = check_out(out, force)
    qpath = resolve(quant)
    if qpath.resolve() == out.resolve():
        raise MLXMTPError(f"{out} is the quantized checkpoint; write the result elsewhere")
    qconfig = read_config(qpath)
    qmap = _weight_map(qpath)
    if any(k.startswith("mtp.") or mtp_index(k, qconfig["num_hidden_layers"]) is not None for k in qmap):
        raise MLXMTPError(f"{qpath} already has MTP weights")
    opath, oconfig, files = fetch_mtp_files(original)
    check_same_model(oconfig, qconfig, (str(original), str(quant)))
    raw = json.loads((qpath / "config.json").read_text())  # as published: text_config stays nested
    q = dict(raw.get("quantization") or {})
    group_size = q.get("group_size", 64)

    with sigterm_as_interrupt():
        with partial_output(out) as tmp:
            model, _ = mtp_modules(oconfig, files, DTYPES[source_dtype(raw)])

            def predicate(path: str, module: nn.Module):
                if not path.startswith("mtp.") or not hasattr(module, "to_quantized"):
                    return False
                float_only = path.rsplit(".", 1)[-1] in ROUTERS or module.weight.shape[-1] % group_size
                q[path] = False if float_only or not mtp_bits else {"group_size": group_size, "bits": mtp_bits}
                return q[path]

            nn.quantize(model, group_size=group_size, bits=mtp_bits or 8, class_predicate=predicate)
            tensors = {k: v for k, v in tree_flatten(model.parameters()) if k.startswith("mtp.")}
            n_mtp = model.num_mtp_modules
            del model
            linked = [f for f in qpath.iterdir() if f.is_file() and f.name not in
                      ("config.json", "model.safetensors.index.json", MTP_SHARD)]
            needed = sum(v.nbytes for v in tensors.values())
            for i, f in enumerate(linked):
                try:
                    os.link(f.resolve(), tmp / f.name)  # the hub cache's files are symlinks to blobs
                except OSError:  # another file system: copy what is left, if it fits
                    check_free_space(out, tmp.parent, needed + sum(g.stat().st_size for g in linked[i:]))
                    for g in linked[i:]:
                        shutil.copy2(g, tmp / g.name)
                    break
            check_free_space(out, tmp.parent, needed)
            weight_map = {**qmap, **dict.fromkeys(tensors, MTP_SHARD)}
            save_file(tmp / MTP_SHARD, tensors, metadata={"format": "mlx"})
            total = sum(t["data_offsets"][1] - t["data_offsets"][0] for f in sorted(set(weight_map.values()))
                        for t in read_header(tmp / f).values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            if raw.get("quantization"):
                raw.update(quantization=q, quantization_config=q)
            else:  # a float checkpoint: only the MTP modules are quantized
                raw.update(quantization={"group_size": group_size, "bits": mtp_bits or 8, "mode": "affine", **q})
                raw["quantization_config"] = raw["quantization"]
            raw["mlxmtp"] = {**(raw.get("mlxmtp") or {}), "mtp_modules": n_mtp, "mtp_from": source_name(original),
                             "version": __version__}
            (tmp / "config.json").write_text(json.dumps(raw, indent=2))
            finish(tmp, out, force)
    return out
