"""Use the system OpenBLAS for MLX's CPU back end on Linux.

The mlx-cpu wheel ships the reference (netlib) BLAS, about 2 GFLOP/s for float32 GEMM on the development machines;
loading the system OpenBLAS into the global symbol scope before mlx.core is imported makes MLX call it instead
(about 45 GFLOP/s). Debian package: libopenblas0-pthread. Set MLXMTP_NO_OPENBLAS=1 to keep the bundled BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

_loaded: str | None = None
_too_late = False


def preload_openblas() -> str | None:
    """Load OpenBLAS globally if this is Linux, it is installed, it is wanted, and mlx.core is not imported yet."""
    global _loaded, _too_late
    if _loaded or sys.platform != "linux" or os.environ.get("MLXMTP_NO_OPENBLAS"):
        return _loaded
    if "mlx.core" in sys.modules:
        _too_late = True
        return None
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
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
