import mlxmtp  # noqa: F401  - first, so OpenBLAS is loaded before mlx.core (mlxmtp/blas.py)
import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
