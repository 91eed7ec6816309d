"""Use the system OpenBLAS for MLX's CPU back end on Linux.

The mlx-cpu wheel ships the reference (netlib) BLAS, about 2 GFLOP/s for float32 GEMM on the development machines;
loading the system OpenBLAS into the global symbol scope before mlx.core is imported makes MLX call it instead
(about 45 GFLOP/s). Debian package: libopenblas0-pthread. Set MLXMTP_NO_OPENBLAS=1 to keep the bundled BLAS.

OpenBLAS's thread count can be changed per phase (``using_threads``): with a small model, decoding on a 2-core
machine runs faster on one thread than on OpenBLAS's two, and the rounds after a drafting round no longer pay for
it (tuning.decode_threads chooses the count for a model's rounds).
"""

from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_loaded: str | None = None
_lib: Optional[ctypes.CDLL] = None
_too_late = False


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if this is Linux, it is installed, it is wanted, and mlx.core is not imported yet."""
    global _loaded, _lib, _too_late
    if _loaded or sys.platform != "linux" or os.environ.get("MLXMTP_NO_OPENBLAS"):
        return _loaded
    if "mlx.core" in sys.modules:
        _too_late = True
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            _lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            _loaded = path
            break
    return _loaded


def blas_in_use() -> str:
    """A short description of the BLAS MLX's CPU back end uses in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _loaded:
        return f"OpenBLAS ({_loaded})"
    if os.environ.get("MLXMTP_NO_OPENBLAS"):
        why = "MLXMTP_NO_OPENBLAS set"
    elif _too_late:
        why = "mlx.core was imported before mlxmtp"
    else:
        why = "system OpenBLAS not found: apt-get install libopenblas0-pthread"
    return f"reference BLAS bundled with mlx ({why})"


def reference_blas_hint() -> str | None:
    """What to do about the slow reference BLAS, when this Linux process uses it without having been told to."""
    if sys.platform != "linux" or _loaded or os.environ.get("MLXMTP_NO_OPENBLAS"):
        return None
    if _too_late:
        return ("MLX runs on its slow reference BLAS because mlx.core was imported before mlxmtp; import mlxmtp "
                "first to use OpenBLAS (~20x faster float32 matrix products)")
    return ("MLX runs on its slow reference BLAS; sudo apt-get install libopenblas0-pthread makes float32 matrix "
            "products ~20x faster, and mlxmtp loads it automatically")


def openblas_threads() -> Optional[int]:
    """OpenBLAS's thread count now, or None where MLX does not use OpenBLAS."""
    return _lib.openblas_get_num_threads() if _lib is not None else None


@contextmanager
def using_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with n OpenBLAS threads (None, or no OpenBLAS: unchanged), then restore the count. The count
    changes only while MLX is idle (mx.synchronize): OpenBLAS must not be reconfigured during a call."""
    before = openblas_threads()
    if n is None or before is None or n == before:
        yield
        return
    import mlx.core as mx

    mx.synchronize()
    _lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        mx.synchronize()
        _lib.openblas_set_num_threads(before)
