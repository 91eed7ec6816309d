"""Choosing the draft depth from what this machine pays for a verify pass (draft_tokens="auto").

A verify pass of m tokens costs cost(m) and a draft step costs c_draft, both measured once per model and machine
(``measure_costs``, kept in ~/.cache/mlxmtp/costs.json). With per-depth acceptance estimates a_1..a_K (the chance
that draft d is accepted given that d-1 were), k drafts yield E(k) = 1 + sum_{i<=k} prod_{d<=i} a_d tokens per
round, so the policy picks argmax_k E(k) / (cost(k+1) + k * c_draft), with k = 0 (plain decoding, E = 1 per cost(1))
whenever drafting does not pay. Memory-bound hardware makes cost(m) nearly flat in m (field-notes.md); a
compute-bound back end (the reference BLAS on Linux) makes it linear and the policy then chooses k = 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import rollback

CACHE_FILE = Path(os.environ.get("MLXMTP_CACHE_DIR", Path.home() / ".cache" / "mlxmtp")) / "costs.json"


def _model_key(model) -> str:
    cfg = json.dumps(getattr(model, "config", {}), sort_keys=True, default=str)
    dtype = str(tree_flatten(model.parameters())[0][1].dtype)
    machine = f"{platform.system()}-{platform.machine()}-{mx.default_device()}-mlx{mx.__version__}"
    from .blas import blas_in_use

    return hashlib.sha256(f"{cfg}|{dtype}|{machine}|{blas_in_use()}".encode()).hexdigest()[:24]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure_costs(model, max_tokens: int = 5, context: int = 64, repeats: int = 5, use_cache: bool = True) -> dict:
    """{"verify": [cost(1), ..., cost(max_tokens)] relative to cost(1), "draft": c_draft relative to cost(1)}."""
    key = _model_key(model)
    if use_cache and CACHE_FILE.exists():
        try:
            stored = json.loads(CACHE_FILE.read_text()).get(key)
            if stored and len(stored["verify"]) >= max_tokens:
                return stored
        except (json.JSONDecodeError, KeyError):
            pass
    cache = model.make_cache()
    vocab = getattr(model.args, "vocab_size", 256)
    prompt = mx.array([[i % vocab for i in range(context)]])
    mx.eval(model(prompt, cache))
    times = {m: [] for m in range(1, max_tokens + 1)}
    for _ in range(repeats + 1):  # the first sweep warms up
        for m in range(1, max_tokens + 1):
            t0 = time.perf_counter()
            mx.eval(model(prompt[:, :m], cache))
            times[m].append(time.perf_counter() - t0)
            rollback(cache, m)
    base = _median(times[1][1:])
    result = {"verify": [_median(times[m][1:]) / base for m in range(1, max_tokens + 1)], "draft": 0.0}
    if model.num_mtp_modules:
        mcache = model.make_mtp_cache()
        hidden = mx.zeros_like(model.embed(prompt[:, :1]))
        draft_times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            mx.eval(model.mtp_forward(0, hidden, prompt[:, :1], mcache[0]))
            draft_times.append(time.perf_counter() - t0)
        result["draft"] = _median(draft_times[1:]) / base
    if use_cache:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(CACHE_FILE.read_text()) if CACHE_FILE.exists() else {}
        except json.JSONDecodeError:
            stored = {}
        stored[key] = result
        tmp = CACHE_FILE.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(CACHE_FILE)
    return result


class DepthPolicy:
    """Per-round choice of k from running acceptance estimates and round times.

    Acceptance: running counts per depth with a prior of ``prior`` worth ``prior_weight`` rounds. Time: a round with
    k drafts is predicted from the measured cost curve until ``min_obs`` rounds of that k have been timed; from then
    on its observed mean time (Python overhead, sampling and all) is used, so k = 0 wins whenever drafting does not
    pay in practice. The first ``min_obs`` rounds are plain (to time them), and while plain decoding wins every
    ``probe_every``-th round drafts one token so the estimates can recover.
    """

    def __init__(self, costs: dict, max_depth: Optional[int] = None, prior: float = 0.7, prior_weight: float = 4.0,
                 probe_every: int = 16, margin: float = 1.02, min_obs: int = 3):
        verify = costs["verify"]
        self.cost = verify
        self.c_draft = costs.get("draft", 0.0)
        self.max_depth = min(max_depth or len(verify) - 1, len(verify) - 1)
        self.accepted = [prior * prior_weight] * self.max_depth
        self.tried = [prior_weight] * self.max_depth
        self.probe_every, self.margin, self.min_obs = probe_every, margin, min_obs
        self.seconds = [0.0] * (self.max_depth + 1)  # total observed seconds of rounds with k drafts requested
        self.rounds = [0] * (self.max_depth + 1)
        self._plain_rounds = 0
        self.last_k = 0

    def _model_cost(self, k: int) -> float:
        return self.cost[k] + k * self.c_draft

    def round_time(self, k: int) -> float:
        """Predicted time of a round with k drafts (seconds once any round was timed, else units of cost(1))."""
        if self.rounds[k] >= self.min_obs:
            return self.seconds[k] / self.rounds[k]
        timed = [j for j in range(self.max_depth + 1) if self.rounds[j] >= self.min_obs]
        if not timed:
            return self._model_cost(k)
        j = max(timed, key=lambda j: self.rounds[j])
        return self._model_cost(k) * (self.seconds[j] / self.rounds[j]) / self._model_cost(j)

    def expected_rate(self, k: int) -> float:
        """Expected tokens per unit of time with k drafts."""
        tokens, run = 1.0, 1.0
        for d in range(k):
            run *= self.accepted[d] / self.tried[d]
            tokens += run
        return tokens / self.round_time(k)

    def choose(self) -> int:
        if self.rounds[0] < self.min_obs:
            best = 0
        else:
            best = max(range(self.max_depth + 1), key=self.expected_rate)
            if best > 0 and self.expected_rate(best) < self.margin * self.expected_rate(0):
                best = 0
            if best == 0:
                self._plain_rounds += 1
                if self.max_depth and self._plain_rounds % self.probe_every == 0:
                    best = 1
        self.last_k = best
        return best

    def observe(self, k: int, drafted: int, accepted: int, seconds: float) -> None:
        """A round that asked for k drafts, drafted `drafted`, had `accepted` of them accepted and took `seconds`."""
        self.rounds[k] += 1
        self.seconds[k] += seconds
        for d in range(drafted):
            self.tried[d] += 1
            self.accepted[d] += d < accepted
