"""The union-of-experts dispatch (mlxmtp/models/moe_dispatch.py) on every MoE family's tiny checkpoint, float32:
the reference union path and the sync-free sorted path equal the per-pair path for m = 1..16 tokens (random
routing, all tokens on the same experts, every token on other experts), whole-model logits agree, and greedy
decoding with MTP equals plain greedy decoding with each path on."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxmtp
from mlxmtp.models import moe_dispatch
from mlxmtp.models.layers import SwitchGLU
from mlxmtp.sampling import SamplingParams
from mlxmtp.speculative import RoundStats, decode
from tests.test_speculative import prompts, take


def switch_glus(model) -> list:
    return [m for _, m in model.named_modules() if isinstance(m, SwitchGLU)]


# the MoE families of issue #10, each with a tiny checkpoint maker in tests/tiny/
MOE_FAMILIES = ["deepseek_v3", "glm4_moe", "mimo_v2_flash", "minimax_m2", "qwen3_5_moe", "qwen3_next", "step3p5"]


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family_model(request, tmp_path_factory):
    maker = importlib.import_module(f"tests.tiny.{request.param}")
    model = mlxmtp.load_model(maker.make(tmp_path_factory.mktemp(request.param)), dtype=None)
    if not switch_glus(model):
        pytest.fail(f"{request.param}: a MoE config but no SwitchGLU in the model: the union path would not run")
    return request.param, model


def routings(n_experts: int, top_k: int, m: int, rng) -> dict:
    out = {"random": np.stack([rng.permutation(n_experts)[:top_k] for _ in range(m)]),
           "same": np.tile(rng.permutation(n_experts)[:top_k], (m, 1))}
    if m * top_k <= n_experts:
        out["distinct"] = rng.permutation(n_experts)[: m * top_k].reshape(m, top_k)
    return {k: mx.array(v.astype(np.uint32))[None] for k, v in out.items()}


def assert_union_equals_stock(glu, x, inds, what):
    call = SwitchGLU.__call__  # Step-3.5's MoE subclasses SwitchGLU with its router in __call__(x)
    with moe_dispatch.dispatch_mode("stock"):
        want = call(glu, x, inds)
    for mode in ("union", "sorted"):
        with moe_dispatch.dispatch_mode(mode):
            got = call(glu, x, inds)
        assert got.shape == want.shape
        # one GEMM per expert over its rows instead of one per pair: float32 summation order, within 1e-6 of scale
        diff, scale = mx.abs(got - want).max().item(), max(1.0, mx.abs(want).max().item())
        assert diff <= 1e-6 * scale, (mode, what, diff, scale)


def test_union_equals_per_pair_on_every_layer(family_model):
    name, model = family_model
    rng = np.random.default_rng(0)
    for layer, glu in enumerate(switch_glus(model)):
        E, D = glu.gate_proj.num_experts, glu.gate_proj.input_dims
        top_k = next(v for k, v in vars(model.args).items() if k in ("num_experts_per_tok", "moe_top_k"))
        for m in range(1, 17):
            x = mx.array(rng.standard_normal((1, m, D)).astype(np.float32))
            for kind, inds in routings(E, top_k, m, rng).items():
                assert_union_equals_stock(glu, x, inds, (name, layer, m, kind))
        distinct = routings(E, top_k, E // top_k, rng)["distinct"]  # the largest batch with no expert shared
        assert_union_equals_stock(glu, mx.zeros((1, E // top_k, D)) + 0.5, distinct, (name, layer, "distinct"))


def test_union_logits_equal_per_pair(family_model):
    """Every MoE block with its own router, shared experts and combine: the model's logits over m tokens."""
    name, model = family_model
    vocab = min(model.args.vocab_size, 256)
    for m in (1, 2, 5, 16):
        tokens = mx.array(np.random.default_rng(m).integers(0, vocab, (1, m)))
        with moe_dispatch.dispatch_mode("stock"):
            want = model(tokens)
        for mode in ("union", "sorted"):
            with moe_dispatch.dispatch_mode(mode):
                got = model(tokens)
            assert mx.abs(got - want).max().item() <= 1e-5, (name, mode, m)


@pytest.mark.parametrize("mode", ["union", "sorted"])
def test_greedy_mtp_equals_plain_with_union(family_model, tmp_path, monkeypatch, mode):
    name, model = family_model
    monkeypatch.setattr("mlxmtp.tuning.CACHE_FILE", tmp_path / "costs.json")
    drafted = 0
    with moe_dispatch.dispatch_mode(mode):
        for p in prompts(min(model.args.vocab_size, 256), n=3, seed=5):
            plain = take(decode(model, p, SamplingParams(), draft_tokens=0), 10)
            for k in (1, 3):
                st = RoundStats()
                assert take(decode(model, p, SamplingParams(), draft_tokens=k, stats=st), 10) == plain, (name, p, k)
                drafted += st.drafted
    assert drafted > 0 or not model.num_mtp_modules


def test_syncs_count_the_union_paths_host_reads(family_model):
    """The reference union path reads each MoE layer's routing to the host: the statistics count those reads as
    synchronisations (at least one per trunk MoE layer and verify pass), and the sync-free paths add none."""
    name, model = family_model
    n_moe = sum(1 for layer in model.model.layers for _, m in layer.named_modules() if isinstance(m, SwitchGLU))
    p = prompts(min(model.args.vocab_size, 256), n=1, seed=6)[0]
    for mode in ("union", "sorted", "auto"):  # auto on the CPU: the sorted path for these cache-sized experts
        st = RoundStats()
        with moe_dispatch.dispatch_mode(mode):
            take(decode(model, p, SamplingParams(), draft_tokens=2, stats=st), 10)
        # beyond the prefill's and one per round (and, without MTP modules, the pipelined plain rounds' last read)
        extra = st.syncs - 1 - st.target_forwards - (model.num_mtp_modules == 0)
        if mode == "union":
            assert extra >= n_moe * st.target_forwards > 0, (name, extra)
        else:
            assert extra == 0, (name, mode, extra)


@pytest.mark.parametrize("bits", [4, 8])
def test_union_equals_per_pair_quantized(bits):
    """gather_qmm with one index per unique expert over [U, R, D] rows: the converted checkpoints' path."""
    mx.random.seed(bits)
    glu = SwitchGLU(64, 32, 16)
    nn.quantize(glu, group_size=32, bits=bits)
    rng = np.random.default_rng(bits)
    for m in (1, 3, 8, 16):
        x = mx.random.normal((1, m, 64))
        for kind, inds in routings(16, 4, m, rng).items():
            assert_union_equals_stock(glu, x, inds, (bits, m, kind))


def test_union_equals_per_pair_with_bias():
    """Projection biases (SwitchGLU(bias=True)) are added per expert in the weights-left layout too."""
    mx.random.seed(2)
    glu = SwitchGLU(64, 32, 16, bias=True)
    glu.update({n: {"bias": mx.random.normal(getattr(glu, n).bias.shape)} for n in ("gate_proj", "up_proj", "down_proj")})
    rng = np.random.default_rng(2)
    for m in (1, 3, 8):
        for kind, inds in routings(16, 4, m, rng).items():
            assert_union_equals_stock(glu, mx.random.normal((1, m, 64)), inds, ("bias", m, kind))


def test_plan_layout():
    """Two tokens sharing expert 3: one segment of two rows; every pair finds its own row back."""
    plan = moe_dispatch.plan_union(np.array([[3, 1], [2, 3]]))
    assert plan.experts.tolist() == [1, 2, 3] and plan.max_rows == 2
    assert plan.rows.tolist() == [[0, 0], [1, 1], [0, 1]]  # experts 1 and 2 padded with their one token
    assert plan.pairs.tolist() == [4, 0, 2, 5]  # (t0, 3) -> expert 3 slot 0; (t0, 1); (t1, 2); (t1, 3) slot 1


def test_choose_path_per_device(monkeypatch):
    """auto: CPU float experts take the union for 2..16 tokens from UNION_CPU_BATCH_BYTES, else the sorted path,
    and for 1 token from UNION_CPU_ONE_TOKEN_BYTES, else stock; quantized stay stock; a GPU takes the kernel where
    it passed its self-check, else the sync-free sorted path, for 2..16 tokens; prefill is stock everywhere."""
    monkeypatch.setattr(moe_dispatch, "_mode", "auto")
    glu, qglu = SwitchGLU(64, 32, 8), SwitchGLU(64, 32, 8)
    nn.quantize(qglu, group_size=32, bits=4)
    sizes = (1, 2, 16, 17, 512)

    def paths(g, **kw):
        return [moe_dispatch.choose_path(g, m, **kw) for m in sizes]

    assert paths(glu, gpu=False) == ["stock", "sorted", "sorted", "stock", "stock"]  # cache-sized experts
    mid = SwitchGLU(512, 1024, 2)  # 2 MiB per expert projection: one token takes the union path, a batch not yet
    assert paths(mid, gpu=False) == ["union", "sorted", "sorted", "stock", "stock"]
    big = SwitchGLU(1024, 1024, 2)  # 4 MiB: the union path for every small batch
    assert paths(big, gpu=False) == ["union", "union", "union", "stock", "stock"]
    assert paths(qglu, gpu=False) == ["stock"] * 5
    assert paths(qglu, gpu=True, kernel_ok=lambda: False) == ["stock", "sorted", "sorted", "stock", "stock"]
    assert paths(qglu, gpu=True, kernel_ok=lambda: True) == ["stock", "kernel", "kernel", "stock", "stock"]
    with moe_dispatch.dispatch_mode("union"):
        assert paths(qglu, gpu=True, kernel_ok=lambda: False) == ["union"] * 5
        assert paths(qglu, gpu=False, kernel_ok=lambda: True) == ["kernel"] * 5
    for mode in ("sorted", "stock"):
        with moe_dispatch.dispatch_mode(mode):
            assert paths(glu, gpu=True, kernel_ok=lambda: True) == [mode] * 5
    with pytest.raises(ValueError, match="MoE dispatch mode"):
        moe_dispatch.set_dispatch_mode("fast")


@pytest.mark.parametrize("bits", [None, 4])
def test_sorted_path_is_sync_free(bits):
    """The sorted path compiles (mx.compile refuses any host read of an array), the host-plan union does not."""
    glu = SwitchGLU(64, 32, 16)
    if bits:
        nn.quantize(glu, group_size=32, bits=bits)
    x, inds = mx.random.normal((1, 5, 64)), routings(16, 4, 5, np.random.default_rng(1))["random"]
    got = mx.compile(lambda a, i: moe_dispatch.sorted_switch_glu(glu, a, i))(x, inds)
    with moe_dispatch.dispatch_mode("stock"):
        assert mx.abs(got - glu(x, inds)).max().item() <= 1e-6
    with pytest.raises(ValueError, match="eval"):
        mx.compile(lambda a, i: moe_dispatch.union_switch_glu(glu, a, i))(x, inds)


def test_auto_keeps_quantized_experts_on_the_stock_path_on_cpu(monkeypatch):
    """CPU quantized matmul is compute-bound: the padded union block would only add rows (moe_dispatch docstring)."""
    def fail(*a):
        raise AssertionError("the union path ran")

    monkeypatch.setattr(moe_dispatch, "union_switch_glu", fail)
    glu = SwitchGLU(64, 32, 8)
    x, inds = mx.random.normal((1, 4, 64)), mx.array([[[0, 1], [1, 2], [2, 3], [3, 0]]], dtype=mx.uint32)
    nn.quantize(glu, group_size=32, bits=4)
    with moe_dispatch.dispatch_mode("auto"):
        mx.eval(glu(x, inds))
    with moe_dispatch.dispatch_mode("union"), pytest.raises(AssertionError, match="union path ran"):
        glu(x, inds)
