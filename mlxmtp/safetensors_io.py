"""Reading safetensors files defensively: the header is checked against the file before any tensor is touched,
and DeepSeek's FP8 (E4M3) block-scaled weights are dequantized on the way in.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then the tensor bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import CheckpointError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U32": np.uint32, "BOOL": np.bool_}
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


def _fp8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 E4M3FN codes (1 sign, 4 exponent bits with bias 7, 3 mantissa bits;
    no infinities, 0x7f/0xff are NaN)."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    table = sign * np.where(exp == 0, subnormal, normal)
    table[(codes & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


def _read_raw(path: Path, header_len: int, t: dict) -> np.ndarray:
    start, end = t["data_offsets"]
    return np.fromfile(path, dtype=np.uint8, count=end - start, offset=8 + header_len + start)


def load_file(path: Path) -> dict[str, mx.array]:
    """All tensors of one file as MLX arrays; FP8 tensors come back as float32 (still scaled: see dequantize_fp8)."""
    header = read_header(path)
    fp8 = [k for k, t in header.items() if t["dtype"].startswith("F8")]
    if not fp8:
        try:
            return mx.load(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here is a broken file
            raise CheckpointError(f"{path.name}: cannot read safetensors file ({e})") from None
    # mx.load does not read FP8: read every tensor of such a file from its raw bytes.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    out = {}
    for k, t in header.items():
        raw = _read_raw(path, n, t)
        if t["dtype"] == "F8_E4M3":
            arr = _fp8_e4m3_table()[raw]
        elif t["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in _NUMPY:
            arr = raw.view(_NUMPY[t["dtype"]])
        else:
            raise CheckpointError(f"{path.name}: tensor {k!r} has unsupported dtype {t['dtype']}")
        out[k] = mx.array(arr.reshape(t["shape"]))
    return out


def dequantize_fp8(weights: dict[str, mx.array], dtype=mx.bfloat16) -> dict[str, mx.array]:
    """Apply DeepSeek's block scales: w[i, j] * weight_scale_inv[i // 128, j // 128]; drops the scale tensors."""
    for name in [k for k in weights if k.endswith(".weight_scale_inv")]:
        scale = weights.pop(name)
        wname = name[: -len("_scale_inv")]
        if wname not in weights:
            raise CheckpointError(f"scale {name!r} has no weight {wname!r}")
        w = weights[wname]
        rows, cols = w.shape
        s = mx.repeat(mx.repeat(scale, _FP8_BLOCK, axis=0), _FP8_BLOCK, axis=1)[:rows, :cols]
        weights[wname] = (w.astype(mx.float32) * s).astype(dtype)
    return weights
