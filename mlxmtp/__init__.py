"""mlxmtp: run open LLMs on Apple Silicon with their own multi-token-prediction heads.

Importing the package is cheap (it loads no MLX, numpy or mlx-lm): `mlxmtp --help` pays only for click. The API
below is imported on first use (PEP 562 module __getattr__).
"""

from .blas import preload_openblas

preload_openblas()  # must precede the first `import mlx.core` (see blas.py)

from .errors import CheckpointError, MLXMTPError, UnsupportedModelError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"load": "loading", "load_model": "loading", "load_tokenizer": "loading"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def demo_model_path():
    """The bundled demo checkpoint (a small DeepSeek-V3-architecture model with a trained MTP head)."""
    from pathlib import Path

    return Path(__file__).parent / "demo_model"


def generate(*args, **kwargs):
    """See mlxmtp.generation.generate."""
    from .generation import generate as _generate

    return _generate(*args, **kwargs)


def stream_generate(*args, **kwargs):
    """See mlxmtp.generation.stream_generate."""
    from .generation import stream_generate as _stream

    return _stream(*args, **kwargs)


__all__ = ["demo_model_path", "load", "load_model", "load_tokenizer", "generate", "stream_generate", "MLXMTPError",
           "CheckpointError", "UnsupportedModelError", "__version__"]
