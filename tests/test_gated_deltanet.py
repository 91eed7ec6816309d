"""The shared Gated DeltaNet layer over RecurrentCache: the kept-states recurrence equals mlx-lm's
gated_delta_update, every way of feeding a sequence through the cache (token by token, verify-sized chunks, a long
prefill) equals one cache-less pass, rollback restores the recurrent state and the conv window exactly, and the two
families' projection layouts are the same layer."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gated_delta import compute_g, gated_delta_update, normalize_qk

from mlxmtp.cache import MAX_ROLLBACK, RecurrentCache
from mlxmtp.models import qwen3_5, qwen3_next
from mlxmtp.models.gated_deltanet import recurrent_steps

ARGS = dict(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
            linear_value_head_dim=8)
TOL = 1e-5


def random_layer(cls, seed: int = 0):
    """A layer with random weights that make every part matter (decay rates spread, norm gains away from 1)."""
    layer = cls(qwen3_next.ModelArgs(**ARGS))
    mx.random.seed(seed)
    params = {}
    for name, p in tree_flatten(layer.parameters()):
        x = mx.random.normal(p.shape)
        if name == "A_log":
            x = mx.log(mx.random.uniform(0.1, 3.0, p.shape))
        elif name == "dt_bias":
            x = 0.5 * x
        elif name == "norm.weight":
            x = 1 + 0.2 * x
        else:
            x = x / p.shape[-1] ** 0.5
        params[name] = x
    layer.update(tree_unflatten(list(params.items())))
    return layer


def feed(layer, x, cache, sizes):
    """Outputs of x fed through cache in consecutive chunks of the given sizes (cycled)."""
    outs, i, s = [], 0, 0
    while i < x.shape[1]:
        j = min(x.shape[1], i + sizes[s % len(sizes)])
        outs.append(layer(x[:, i:j], cache))
        i, s = j, s + 1
    return mx.concatenate(outs, axis=1)


def test_recurrence_keeps_the_states_gated_delta_update_computes():
    B, L, Hk, Hv, Dk, Dv = 2, 7, 2, 4, 8, 8
    mx.random.seed(1)
    q, k = normalize_qk(mx.random.normal((B, L, Hk, Dk)), mx.random.normal((B, L, Hk, Dk)), inv_scale=Dk**-0.5,
                        eps=1e-6)
    v, a, b = mx.random.normal((B, L, Hv, Dv)), mx.random.normal((B, L, Hv)), mx.random.normal((B, L, Hv))
    A_log, dt_bias = mx.log(mx.random.uniform(0.1, 3.0, (Hv,))), 0.5 * mx.random.normal((Hv,))
    state = 0.1 * mx.random.normal((B, Hv, Dv, Dk))
    out, states = recurrent_steps(q, k, v, compute_g(A_log, a, dt_bias), mx.sigmoid(b), state)
    assert len(states) == L + 1 and mx.array_equal(states[0], state)
    for t in (1, 4, L):
        ref_out, ref_state = gated_delta_update(q[:, :t], k[:, :t], v[:, :t], a[:, :t], b[:, :t], A_log, dt_bias,
                                                state)
        assert mx.abs(out[:, :t] - ref_out).max().item() < TOL
        assert mx.abs(states[t] - ref_state).max().item() < TOL


@pytest.mark.parametrize("sizes", [[1], [3, 4], [5, 3, 4], [20, 1, 3], [40]])
def test_every_cache_path_equals_one_pass(sizes):
    """[20, ...] and [40] take the long-prefill path (more than MAX_ROLLBACK positions in one call)."""
    layer = random_layer(qwen3_5.GatedDeltaNet)
    x = mx.random.normal((1, 40, ARGS["hidden_size"]))
    cache = RecurrentCache()
    diff = mx.abs(feed(layer, x, cache, sizes) - layer(x)).max().item()
    assert diff < TOL and cache.offset == 40, (sizes, diff)


@pytest.mark.parametrize("m", [1, 4, MAX_ROLLBACK])
def test_rollback_is_exact(m):
    layer = random_layer(qwen3_5.GatedDeltaNet, seed=2)
    x = mx.random.normal((1, 40, ARGS["hidden_size"]))
    P = 20  # a long prefill first: the rolled-back call is the short one after it
    for n in range(1, m + 1):
        rolled, fresh = RecurrentCache(), RecurrentCache()
        feed(layer, x[:, : P + m], rolled, [P, m])
        rolled.rollback(n)
        feed(layer, x[:, : P + m - n], fresh, [P, m - n] if m > n else [P])
        assert rolled.offset == fresh.offset == P + m - n
        assert mx.abs(rolled.conv_state - fresh.conv_state).max().item() < TOL  # (matmuls of other row counts)
        assert mx.abs(rolled.state - fresh.state).max().item() < TOL
        nxt = x[:, P + m - n : P + m - n + 3]
        assert mx.abs(layer(nxt, rolled) - layer(nxt, fresh)).max().item() < TOL, (m, n)


def test_repeated_rollback_and_its_limits():
    layer = random_layer(qwen3_5.GatedDeltaNet, seed=3)
    x = mx.random.normal((1, 30, ARGS["hidden_size"]))
    once, twice = RecurrentCache(), RecurrentCache()
    for c in (once, twice):
        feed(layer, x[:, :24], c, [20, 4])
    once.rollback(3)
    twice.rollback(1)
    twice.rollback(2)
    assert mx.array_equal(once.state, twice.state) and mx.array_equal(once.conv_state, twice.conv_state)
    with pytest.raises(ValueError):
        twice.rollback(2)  # only 1 position of the last update is left
    prefilled = RecurrentCache()
    layer(x[:, :20], prefilled)
    with pytest.raises(ValueError):
        prefilled.rollback(1)  # a long prefill keeps only its final state


def test_qwen3_next_layout_is_a_permutation_of_qwen3_5():
    """in_proj_qkvz / in_proj_ba grouped by key head (Qwen3-Next) hold the same rows as in_proj_qkv / z / b / a."""
    nxt = random_layer(qwen3_next.GatedDeltaNet, seed=4)
    H, nk, dk, dv = ARGS["hidden_size"], nxt.n_k_heads, nxt.k_dim, nxt.v_dim
    r = nxt.n_v_heads // nk
    qkvz = nxt.in_proj_qkvz.weight.reshape(nk, -1, H)
    q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
    b, a = mx.split(nxt.in_proj_ba.weight.reshape(nk, 2 * r, H), 2, axis=1)
    rows = lambda t: t.reshape(-1, H)  # noqa: E731
    q35 = qwen3_5.GatedDeltaNet(qwen3_next.ModelArgs(**ARGS))
    q35.update({k_: v_ for k_, v_ in nxt.parameters().items() if k_ not in ("in_proj_qkvz", "in_proj_ba")})
    q35.in_proj_qkv.weight = mx.concatenate([rows(q), rows(k), rows(v)])
    q35.in_proj_z.weight, q35.in_proj_b.weight, q35.in_proj_a.weight = rows(z), rows(b), rows(a)
    x = mx.random.normal((1, 9, H))
    assert mx.abs(nxt(x) - q35(x)).max().item() < TOL
