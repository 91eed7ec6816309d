"""Reading and writing safetensors files one tensor at a time. Reading is defensive (the header is checked against
the file before any tensor is touched) and lazy; DeepSeek's FP8 (E4M3) block-scaled weights are dequantized on the
way in, tensor by tensor.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then the tensor bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_SAFETENSORS_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64", mx.int32: "I32",
                      mx.int16: "I16", mx.int8: "I8", mx.uint8: "U8", mx.uint32: "U32", mx.bool_: "BOOL"}
_FP8_BLOCK = 128  # DeepSeek-V3's FP8 weights carry one weight_scale_inv per 128x128 block (README_WEIGHTS.md)


def read_header(path: Path) -> dict:
    """The tensor table of a safetensors file, after checking that the file holds every byte it promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path.name}: truncated or not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path.name}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        if not isinstance(t, dict) or t.get("dtype") not in _ITEMSIZE or "data_offsets" not in t:
            raise CheckpointError(f"{path.name}: tensor {name!r} has an unreadable entry in the header")
        start, end = t["data_offsets"]
        expected = int(np.prod(t["shape"], dtype=np.int64)) * _ITEMSIZE[t["dtype"]]
        if end - start != expected:
            raise CheckpointError(f"{path.name}: tensor {name!r} has {end - start} bytes for shape {t['shape']}")
        if end > data:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data}")
    return header


def load_file(path: Path) -> dict[str, mx.array]:
    """All tensors of one file as lazy MLX arrays: mx.load reads nothing until a tensor is evaluated, and then only
    that tensor's bytes, so a checkpoint is never in memory at once. FP8 E4M3 tensors (which mx.load returns as
    their uint8 codes) are decoded exactly to bfloat16 by mx.from_fp8, lazily too, still scaled (see
    dequantize_fp8)."""
    header = read_header(path)
    odd = next((k for k, t in header.items() if t["dtype"] == "F8_E5M2"), None)
    if odd is not None:
        raise CheckpointError(f"{path.name}: tensor {odd!r} has unsupported dtype F8_E5M2")
    try:
        arrays = mx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here is a broken file
        raise CheckpointError(f"{path.name}: cannot read safetensors file ({e})") from None
    for k, t in header.items():
        if t["dtype"] == "F8_E4M3":  # every E4M3 value is exactly a bfloat16 value: half float32's memory
            arrays[k] = mx.from_fp8(arrays[k], mx.bfloat16)
    return arrays


def save_file(path: Path, tensors: dict[str, mx.array], metadata: Optional[dict] = None,
              on_tensor: Optional[Callable[[str], None]] = None) -> None:
    """Write a safetensors file one tensor at a time: the header is computed from the (lazy) arrays' shapes and
    dtypes up front, then each tensor is evaluated, written and dropped from ``tensors`` (which this empties) before
    the next, so memory is bounded by the largest tensor's computation, not by the file (mx.save_safetensors and
    safetensors' save_file hold every tensor at once). Tensors are stored in name order, the header padded with
    spaces to 8 bytes as safetensors' own writer does."""
    names = sorted(tensors)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for k in names:
        v = tensors[k]
        if v.dtype not in _SAFETENSORS_DTYPE:
            raise ValueError(f"tensor {k!r}: cannot store dtype {v.dtype} in safetensors")
        header[k] = {"dtype": _SAFETENSORS_DTYPE[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in names:
            v = mx.contiguous(tensors.pop(k))
            mx.eval(v)
            f.write(memoryview(v))
            del v
            if on_tensor is not None:
                on_tensor(k)


def dequantize_fp8(weights: dict[str, mx.array], dtype=mx.bfloat16) -> dict[str, mx.array]:
    """Apply DeepSeek's block scales: w[i, j] * weight_scale_inv[i // 128, j // 128]; drops the scale tensors."""
    for name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        scale = weights.pop(name)
        wname = name[: -len("_scale_inv")]
        if wname not in weights:
            raise CheckpointError(f"scale {name!r} has no weight {wname!r}")
        w = weights[wname]
        rows, cols = w.shape
        blocks = (-(-rows // _FP8_BLOCK), -(-cols // _FP8_BLOCK))
        if tuple(scale.shape) != blocks:
            raise CheckpointError(f"scale {name!r} has shape {tuple(scale.shape)}, expected {blocks} "
                                  f"(one per {_FP8_BLOCK}x{_FP8_BLOCK} block of {wname!r})")
        # float32 products, one rounding to dtype. Where the blocks tile the weight, the scale is broadcast over
        # [rows/128, 128, cols/128, 128] rather than repeated to the weight's size (less transient memory).
        if rows % _FP8_BLOCK == 0 and cols % _FP8_BLOCK == 0:
            blocked = w.reshape(blocks[0], _FP8_BLOCK, blocks[1], _FP8_BLOCK)
            deq = (blocked * scale.astype(mx.float32)[:, None, :, None]).reshape(rows, cols)
        else:
            s = mx.repeat(mx.repeat(scale, _FP8_BLOCK, axis=0), _FP8_BLOCK, axis=1)[:rows, :cols]
            deq = w.astype(mx.float32) * s
        weights[wname] = deq.astype(dtype)
    return weights
