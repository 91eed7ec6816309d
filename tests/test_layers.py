"""The CPU back end's fused norms and rope (models/layers.py) give what the plain mx.fast calls give."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlxmtp  # noqa: F401
from mlxmtp.models import layers

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 64, "short_factor": [1.0] * 8,
                 "long_factor": [2.0] * 8},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def plain_and_fused(fn):
    out = []
    for fuse in (False, True):
        layers.FUSE_FALLBACKS = fuse
        try:
            out.append(np.array(fn()))
        finally:
            layers.FUSE_FALLBACKS = True
    return out


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_rope_fused_equals_plain(scaling, traditional):
    rope = layers.make_rope(16, 10000.0, SCALINGS[scaling], max_pos=256, traditional=traditional)
    assert isinstance(rope, layers.FusedRoPE) == (scaling != "dynamic")  # dynamic computes with its offset
    x = mx.random.normal((1, 3, layers.FUSED_ROWS + 8, 24), key=mx.random.key(0))
    # decode and verify lengths (fused), and one past FUSED_ROWS (plain in both), at several offsets
    for L, offset in ((1, 0), (1, 77), (5, 200), (layers.FUSED_ROWS, 3), (layers.FUSED_ROWS + 1, 9)):
        plain, fused = plain_and_fused(lambda: rope(x[:, :, :L], offset=offset))
        np.testing.assert_allclose(fused, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rms_norm_fused_equals_plain_for_every_shape(dtype):
    """One shapeless trace per (dims, eps): leading shapes change freely, and another dims gets its own trace."""
    for shape in [(1, 1, 64), (1, 7, 64), (2, 3, 4, 64), (1, 1, 48), (300, 48)]:
        x = mx.random.normal(shape, key=mx.random.key(len(shape))).astype(dtype)
        w = mx.random.normal(shape[-1:], key=mx.random.key(1)).astype(dtype)
        plain, fused = plain_and_fused(lambda: layers.rms_norm(x, w, 1e-6).astype(mx.float32))
        np.testing.assert_allclose(fused, plain, rtol=1e-6, atol=1e-6)
        norm = layers.RMSNorm(shape[-1], eps=1e-5)
        norm.weight = w
        plain, fused = plain_and_fused(lambda: norm(x).astype(mx.float32))
        np.testing.assert_allclose(fused, plain, rtol=1e-6, atol=1e-6)


@pytest.fixture
def on_cpu():
    """The CPU as default device for one test (the fallbacks exist only there), whatever device the tests run on."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def test_fused_graphs_have_fewer_nodes(tmp_path, on_cpu):
    """On the CPU back end the fallbacks' elementwise chains become Compiled kernels (the point of fusing)."""
    rope, norm = layers.make_rope(16, 10000.0), layers.RMSNorm(64)
    x = mx.random.normal((1, 2, 1, 16), key=mx.random.key(0))
    h = mx.random.normal((1, 1, 64), key=mx.random.key(1))
    counts = []
    for fuse in (False, True):
        layers.FUSE_FALLBACKS = fuse
        try:
            mx.export_to_dot(str(tmp_path / "g.dot"), rope(x, offset=5).sum() + norm(h).sum())
        finally:
            layers.FUSE_FALLBACKS = True
        dot = (tmp_path / "g.dot").read_text()
        counts.append((dot.count("shape=rectangle"), dot.count('label ="Compiled')))
    (plain_nodes, plain_compiled), (fused_nodes, fused_compiled) = counts
    assert plain_compiled == 0 and fused_compiled >= 2 and fused_nodes < plain_nodes, counts
