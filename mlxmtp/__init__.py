"""mlxmtp: run open LLMs on Apple Silicon with their own multi-token-prediction heads."""

from .blas import preload_openblas

preload_openblas()  # must precede the first `import mlx.core` (see blas.py)

from .errors import CheckpointError, MLXMTPError, UnsupportedModelError  # noqa: E402
from .loading import load, load_model, load_tokenizer  # noqa: E402

__version__ = "0.1.0"


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


__all__ = ["demo_model_path", "load", "load_model", "load_tokenizer", "generate", "stream_generate", "MLXMTPError", "CheckpointError",
           "UnsupportedModelError", "__version__"]
