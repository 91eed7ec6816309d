"""SlidingWindowCache: the mask and keys it hands out equal sliding-window attention over the whole history, through
chunked updates and rollbacks; memory stays bounded; rollbacks it cannot honour exactly are refused."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxmtp.cache import SlidingWindowCache, rollback
from mlxmtp.models.layers import attend, causal_mask

H, D = 2, 4


def reference(q, keys, values, window):
    """Attention of the last q.shape[2] positions of the history keys/values, each over its window."""
    T, L = keys.shape[2], q.shape[2]
    pos_q = np.arange(T - L, T)[:, None]
    pos_k = np.arange(T)[None]
    mask = mx.array((pos_k <= pos_q) & (pos_k > pos_q - window))[None, None]
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.5, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(1, L, -1)


def kv(rng, n):
    return (mx.array(rng.standard_normal((1, H, n, D)).astype(np.float32)) for _ in range(3))


@pytest.mark.parametrize("window,room", [(8, 4), (3, 1), (5, 16)])
def test_chunks_and_rollbacks_match_full_history(window, room):
    rng = np.random.default_rng(window)
    cache = SlidingWindowCache(window, room)
    hist_k = mx.zeros((1, H, 0, D))
    hist_v = mx.zeros((1, H, 0, D))
    for step in range(60):
        n = int(rng.choice([1, 1, 2, 3, 4, 5, 13]))
        q, k, v = kv(rng, n)
        got = attend(q, k, v, 0.5, cache=cache)
        hist_k, hist_v = mx.concatenate([hist_k, k], axis=2), mx.concatenate([hist_v, v], axis=2)
        want = reference(q, hist_k, hist_v, window)
        assert mx.abs(got - want).max().item() < 1e-5, step
        assert cache.offset == hist_k.shape[2]
        assert cache.keys.shape[2] <= max(window - 1 + room, n)  # memory stays bounded
        if step % 3 == 2:
            r = int(rng.integers(1, min(room, 4) + 1))
            rollback([cache], r)
            hist_k, hist_v = hist_k[:, :, :-r], hist_v[:, :, :-r]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rollback_equals_never_seen(n):
    """After feeding n extra positions and rolling them back, the next output equals that of a cache that never
    saw them (the prompt is longer than the window)."""
    rng = np.random.default_rng(n)
    window, room = 6, 4
    prompt = list(kv(rng, 20))
    extra = list(kv(rng, n))
    nxt = list(kv(rng, 3))
    a, b = SlidingWindowCache(window, room), SlidingWindowCache(window, room)
    for c in (a, b):
        attend(*prompt, 0.5, cache=c)
    attend(*extra, 0.5, cache=a)
    a.rollback(n)
    assert a.offset == b.offset == 20
    out_a, out_b = attend(*nxt, 0.5, cache=a), attend(*nxt, 0.5, cache=b)
    assert mx.array_equal(out_a, out_b)


def test_refuses_what_it_cannot_roll_back():
    rng = np.random.default_rng(0)
    c = SlidingWindowCache(4, room=2)
    attend(*kv(rng, 3), 0.5, cache=c)
    c.rollback(3)  # nothing dropped yet: any rollback is exact
    attend(*kv(rng, 30), 0.5, cache=c)
    with pytest.raises(ValueError):
        c.rollback(3)
    c.rollback(2)
    with pytest.raises(ValueError):  # two rollbacks adding up to more than the room
        c.rollback(1)
    with pytest.raises(ValueError):
        c.rollback(-1)


def test_uncached_window_mask():
    assert causal_mask(1) is None and causal_mask(5) == "causal" and causal_mask(4, window=4) == "causal"
    m = np.array(causal_mask(6, window=3))
    assert m.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3] and not m[5, 2] and m[5, 3]
