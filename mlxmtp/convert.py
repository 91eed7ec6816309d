"""An original Hugging Face checkpoint, MTP modules included, -> a quantized mlxmtp checkpoint.

The output follows mlx-lm's convert (mlx_lm/utils.py: quantize_model, make_shards, save_model):
- config.json: the original plus ``quantization`` = {"group_size", "bits", "mode"} and, for each module whose
  precision differs from that default, {"group_size", "bits"} or False (kept in float), which is how
  ``quantize_model`` records mixed precision and what the loader's predicate reads; the same dict again as
  ``quantization_config`` (mlx-lm's convention; it replaces e.g. DeepSeek's FP8 entry, dequantized on loading);
  ``mlxmtp`` records where the checkpoint came from;
- the weights under the model's own parameter names (every family's ``sanitize`` passes those through), in
  safetensors shards of at most 5 GB, with model.safetensors.index.json;
- the tokenizer and generation-config files, and the other small files mlxmtp reads from a checkpoint
  (``heldout_files.txt``: the demo's held-out bench suite). Nothing else.

Precision is chosen per component (inspection.component): trunk, MTP modules (``mtp.*``: draft acceptance drops
when they are quantized too low, so 8 bits by default), embedding + output head. MoE routers and matrices whose
input dimension is not a multiple of the group size stay in float.

Streaming: the model is built lazily (mlx arrays reading nothing until evaluated), quantized lazily, and its output
tensors' shapes and sizes are known before any weight is read; each tensor is then evaluated, written and released
in turn (safetensors_io.save_file), so peak memory is one tensor's computation (a layer's stacked experts at most),
not the model. Before any weight is read, the output location is created and checked against the exact output size.
Everything is written to a temporary directory ``.OUT.<pid>-<hex>.partial`` beside OUT that is renamed to OUT once
complete; one left by a killed run is removed by the next conversion into the same directory.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import shutil
import signal
import socket
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import MLXMTPError
from .inspection import component, total_memory
from .loading import load_model, read_config, resolve
from .safetensors_io import save_file

log = logging.getLogger("mlxmtp")

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize does in "affine" mode
GROUP_SIZES = (32, 64, 128)
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
COPY_PATTERNS = ("tokenizer*.json", "*.model", "*.tiktoken", "special_tokens_map.json", "generation_config.json",
                 "chat_template*", "heldout_files.txt")
FREE_SPACE_MARGIN = 64 << 20  # headers, index, config and tokenizer files on top of the tensor bytes
# Peak of a conversion: the process, plus at most this many times its largest tensor (an FP8 layer's experts being
# stacked: decoded inputs, float32 products, the stacked tensor, its quantization), measured 4-5x on the synthetic
# FP8 checkpoints (tests/fp8_checkpoint.py).
PROCESS_BYTES = 512 << 20
PEAK_PER_LARGEST = 6
PARTIAL_MARKER = ".mlxmtp-partial"  # inside a partial directory: the pid of the conversion writing it
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


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a closed terminal, `kill`, a job scheduler) ends the conversion as Ctrl-C does: partial output
    removed, exit 130. Only the main thread can install signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _no_buffer_cache():
    """Free each tensor's memory as soon as it is written: MLX otherwise keeps freed buffers for reuse, which a
    conversion (every tensor a different size, used once) never gets."""
    previous = mx.set_cache_limit(0)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(parent: Path) -> None:
    """Remove the partial directories of conversions into ``parent`` that were killed (SIGKILL, power loss, a
    crash: no handler ran), found by the pid in their marker; report the ones that cannot be told apart."""
    for d in sorted(parent.glob(".*.partial")):
        if not d.is_dir() or d.is_symlink():
            continue
        marker = d / PARTIAL_MARKER
        try:
            pid, host = marker.read_text().split("@", 1)
            pid = int(pid)
        except (OSError, ValueError):
            log.warning(f"{d} looks like what an interrupted conversion left behind; remove it if no conversion "
                        "is running")
            continue
        if host != socket.gethostname() or _pid_alive(pid):
            log.warning(f"{d} is being written by another conversion (pid {pid} on {host}); left alone")
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        shutil.rmtree(d, ignore_errors=True)
        log.warning(f"removed {d.name} ({_size(size)}), left by a conversion that was killed (pid {pid})")


def open_partial(out: Path) -> Path:
    """Create the temporary directory beside ``out`` that becomes ``out`` once complete (checked writable before
    anything is read), after clearing what killed conversions left there."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MLXMTPError(f"cannot create the output directory {parent} ({e.strerror or e})") from None
    remove_stale_partials(parent)
    tmp = parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        tmp.mkdir()  # not mkdtemp: OUT gets the usual permissions
        (tmp / PARTIAL_MARKER).write_text(f"{os.getpid()}@{socket.gethostname()}")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MLXMTPError(f"cannot write in {parent} ({e.strerror or e})") from None
    return tmp


def check_free_space(out: Path, directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + FREE_SPACE_MARGIN:
        raise MLXMTPError(f"{out.name} needs {_size(needed + FREE_SPACE_MARGIN)} of disk, {directory} has "
                          f"{_size(free)} free")


def check_memory(model: nn.Module) -> None:
    """Warn before any weight is read when this machine's memory is below the conversion's projected peak: the
    process plus PEAK_PER_LARGEST times the largest tensor (tests/test_convert_streaming.py measures it)."""
    largest = max((v.nbytes for _, v in tree_flatten(model.parameters())), default=0)
    need, have = PROCESS_BYTES + PEAK_PER_LARGEST * largest, total_memory()
    if need > have:
        log.warning(f"converting needs about {_size(need)} of memory at its peak ({PEAK_PER_LARGEST}x the largest "
                    f"tensor, {_size(largest)}); this machine has {_size(have)}")


@contextmanager
def partial_output(out: Path):
    """The partial directory an output is written into (open_partial); any failure removes it, and an OSError
    (disk full, permissions) becomes one line (write_error)."""
    tmp = open_partial(out)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_error(e: OSError, out: Path) -> MLXMTPError:
    """An OSError while converting (disk full, I/O error, a file that vanished) as one line for the user."""
    why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    where = f" ({e.filename})" if e.filename else ""
    return MLXMTPError(f"writing {out} failed: {why}{where}; the partial output was removed")


def write_weights(directory: Path, weights: dict, on_tensor=None) -> None:
    """Write ``weights`` (lazy arrays; the dict is emptied, so each tensor is released once written) as shards of
    at most MAX_SHARD_BYTES with model.safetensors.index.json, mlx-lm's layout."""
    shards = make_shards(weights)
    total = sum(v.nbytes for v in weights.values())
    weights.clear()
    weight_map, n = {}, len(shards)
    for i, shard in enumerate(shards):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        weight_map.update(dict.fromkeys(shard, name))
        save_file(directory / name, shard, metadata={"format": "mlx"}, on_tensor=on_tensor)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, directory: Path) -> None:
    for f in sorted({f for p in COPY_PATTERNS for f in src.glob(p) if f.is_file()}):
        shutil.copy2(f, directory / f.name)


def finish(tmp: Path, out: Path, force: bool) -> None:
    (tmp / PARTIAL_MARKER).unlink()
    _move_into_place(tmp, out, force)


def source_name(src: Union[str, Path]) -> str:
    """What config.json records as converted_from: a local directory's absolute path, else the repo id."""
    p = Path(src).expanduser()
    return str(p.absolute()) if p.exists() else str(src)


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


def check_out(out: Union[str, Path], force: bool) -> Path:
    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        raise MLXMTPError(f"{out} exists; pass --force to replace it")
    return out


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
    out = check_out(out, force)
    path = resolve(src)
    if path.resolve() == out.resolve():
        raise MLXMTPError(f"{out} is the source checkpoint; write the conversion elsewhere")
    if read_config(path).get("quantization"):
        raise MLXMTPError(f"{path} is already quantized; convert the original checkpoint")
    config = json.loads((path / "config.json").read_text())  # as published: text_config stays nested
    dtype = dtype or source_dtype(config)

    with sigterm_as_interrupt(), _no_buffer_cache(), _progress(show_progress) as progress:
        with partial_output(out) as tmp:
            # Lazy: this reads the safetensors headers only; every size below is known before any weight is read.
            model = load_model(path, mtp=mtp, dtype=DTYPES[dtype], lazy=True)
            check_memory(model)
            quant = quantize(model, bits, group_size, mtp_bits, embed_bits)
            config.update(quantization=quant, quantization_config=quant,
                          mlxmtp={"converted_from": source_name(src), "version": __version__,
                                  "mtp_modules": model.num_mtp_modules})
            weights = dict(tree_flatten(model.parameters()))
            del model  # the flat dict is then the only owner of each tensor: written, then released
            gc.collect()
            check_free_space(out, tmp.parent, sum(v.nbytes for v in weights.values()))
            task = progress.add_task(f"quantizing and writing {out.name} ({dtype} where not quantized)",
                                     total=len(weights))
            write_weights(tmp, weights, on_tensor=lambda _: progress.advance(task))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            copy_side_files(path, tmp)
            finish(tmp, out, force)
    return out
