"""mlxmtp: run open LLMs on Apple Silicon with their own multi-token-prediction heads."""

from .blas import preload_openblas

preload_openblas()  # must precede the first `import mlx.core` (see blas.py)

from .errors import CheckpointError, MLXMTPError, UnsupportedModelError  # noqa: E402
from .loading import load, load_model, load_tokenizer  # noqa: E402

__version__ = "0.1.0"


def generate(*args, **kwargs):
    """See mlxmtp.generation.generate."""
    from .generation import generate as _generate

    return _generate(*args, **kwargs)


def stream_generate(*args, **kwargs):
    """See mlxmtp.generation.stream_generate."""
    from .generation import stream_generate as _stream

    return _stream(*args, **kwargs)


__all__ = ["load", "load_model", "load_tokenizer", "generate", "stream_generate", "MLXMTPError", "CheckpointError",
           "UnsupportedModelError", "__version__"]
