"""Choosing the draft depth per round from what rounds cost on this machine (draft_tokens="auto").

With per-depth acceptance estimates a_1..a_K (the chance that draft d is accepted given that d-1 were), k drafts
yield E(k) = 1 + sum_{i<=k} prod_{d<=i} a_d tokens per round; a round with k drafts takes ratio(k) times a plain
round. The policy picks argmax_k E(k) / ratio(k), k = 0 (plain decoding) whenever drafting does not pay.

ratio(k) starts from the verify cost curve and draft cost measured once per model and machine (``measure_costs``,
~/.cache/mlxmtp/costs.json; memory-bound hardware makes it nearly flat, field-notes.md, a compute-bound CPU
linear) and is then replaced by observed round times. What a generation learned (ratios and acceptance) is kept
per model, machine and sampling settings in ~/.cache/mlxmtp/policy.json, so the next generation, in this process
or the next, starts on the depth that paid instead of re-learning it. The other depths are probed now and then,
within a budget: a probe costs the tokens the best depth would have made in its time (its rounds' and the next
round's, which pays for switching back), and probes may cost at most ``budget`` (1%) of the tokens generated.

The first round after a change of depth is not a sample of its depth's cost: a drafting round after plain ones
first runs the MTP modules over the rows the plain rounds left them (up to speculative.FOLD_ROWS), and a plain
round after a drafting one cannot be pipelined behind the previous pass. So a probe is a run of PROBE_ROUNDS
rounds, and only the rounds after a run's first are timed: a depth that pays in steady state by a few percent is
not lost to what switching to it costs once.

Round times are compared only under the same conditions. The machine's speed drifts (other load, thermal state:
on the shared development machines plain rounds moved 2.3 -> 3.1 ms between two passes over the same prompts),
and once auto drafts, its plain rounds are only probes, far apart. So a probe is timed against the rounds of the
incumbent (the depth the policy ran before it) just before it: a probe of plain decoding measures the incumbent's
ratio, a probe of another depth that depth's ratio relative to the incumbent's. Plain rounds stay the anchor: the
incumbent is the depth whose estimate came out best, so its ratio tends to have come out low (the winner's curse),
and ratios passed on from depth to depth would sink together (auto would then keep drafting where drafting loses).
So while auto drafts every other probe is of plain decoding, and another depth's ratio is derived from the
incumbent's as timed against plain rounds only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import weakref
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import blas
from .cache import rollback

ONE_THREAD_BYTES = 64 << 20  # trunk weights under which decoding rounds run on one OpenBLAS thread (decode_threads)
CACHE_FILE = Path(os.environ.get("MLXMTP_CACHE_DIR", Path.home() / ".cache" / "mlxmtp")) / "costs.json"


def _model_key(model) -> str:
    cfg = json.dumps(getattr(model, "config", {}), sort_keys=True, default=str)
    dtype = str(tree_flatten(model.parameters())[0][1].dtype)
    machine = f"{platform.system()}-{platform.machine()}-{mx.default_device()}-mlx{mx.__version__}"
    blas_setup = f"{blas.blas_in_use()}|decoding threads {decode_threads(model)}"
    return hashlib.sha256(f"{cfg}|{dtype}|{machine}|{blas_setup}".encode()).hexdigest()[:24]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _stored(key: str, path: Optional[Path] = None):
    """The entry for key in a JSON cache file (default costs.json), or None (also for a missing or unreadable file)."""
    try:
        stored = json.loads((path or CACHE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored.get(key) if isinstance(stored, dict) else None


def _store(key: str, value, path: Optional[Path] = None) -> None:
    path = path or CACHE_FILE
    try:
        stored = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    stored[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache directory costs only the re-measuring or re-learning


_TRUNK_BYTES: dict = {}  # per model (by id, dropped with it)


def decode_threads(model) -> Optional[int]:
    """The OpenBLAS thread count for decoding rounds (speculative.decode's ``threads``), or None to keep OpenBLAS's.

    One thread where MLX uses OpenBLAS with more and the trunk's weights (what a plain round reads, at most) are
    under ONE_THREAD_BYTES. Measured on the 2-core development machines, whole generations, the thread counts
    interleaved: the demo model (23 MB of trunk) decodes ~18% faster on one thread, plain and k = 3 alike, and on
    two its plain rounds just after drafting ones run up to 19% slow for ~20 rounds (which misled auto's plain
    probes); the small stand-in of bench_overhead (166 MB: its 151,936-token head) decodes 1.58x faster on two,
    the Qwen3.6-27B-shaped one ~2x. Short alternating runs do not show the difference (the machine settles into
    each count over ~0.1 s), so this is a rule drawn from those measurements rather than a measurement of its own.
    The prefill keeps OpenBLAS's count (7-11% faster on two threads for the demo).
    """
    default = blas.openblas_threads()
    if default is None or default <= 1:
        return None
    if id(model) not in _TRUNK_BYTES:
        _TRUNK_BYTES[id(model)] = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if not k.startswith("mtp."))
        weakref.finalize(model, _TRUNK_BYTES.pop, id(model), None)
    return 1 if _TRUNK_BYTES[id(model)] < ONE_THREAD_BYTES else None


def measure_costs(model, max_tokens: int = 5, context: int = 64, repeats: int = 5, use_cache: bool = True) -> dict:
    """{"verify": [cost(1), ..., cost(max_tokens)] relative to cost(1), "draft": c_draft relative to cost(1)},
    measured with the decoding rounds' OpenBLAS threads (decode_threads)."""
    key = _model_key(model)
    stored = _stored(key) if use_cache else None
    if isinstance(stored, dict) and len(stored.get("verify", ())) >= max_tokens:
        return stored
    with blas.using_threads(decode_threads(model)):
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
        _store(key, result)
    return result


def policy_file() -> Path:
    return CACHE_FILE.with_name("policy.json")


def policy_key(model, params) -> str:
    """The model and machine (as for costs.json) and the sampling settings, which set the acceptance."""
    return f"{_model_key(model)}|T{params.temperature}|p{params.top_p}|k{params.top_k}"


def load_learned(key: str) -> Optional[dict]:
    """What an earlier generation stored under ``key``, or None (also for a missing or unreadable file)."""
    learned = _stored(key, policy_file())
    return learned if isinstance(learned, dict) else None


def save_learned(key: str, learned: dict) -> None:
    _store(key, learned, policy_file())


class DepthPolicy:
    """Per-round choice of k (see the module docstring).

    Round times: with t the median of the incumbent i's last RECENT timed rounds (at least MIN_REF), a probe round
    of plain decoding taking s seconds is a sample t / s of ratio(i), and one of k > 0 a sample r * s / t of
    ratio(k), r being 1 for i = 0 and otherwise the median of ratio(i)'s samples timed against plain rounds (the
    ``direct`` ones; ratio(i) until there is one); an incumbent still on the cost curve's value takes its first
    sample from its own rounds against the last plain rounds. ratio(k) is the median of its last RECENT samples (the
    curve's value until the first), so one stalled round (another process, a page fault) moves nothing; the first
    round after a change of depth is no sample (module docstring). Probes (runs of PROBE_ROUNDS rounds, one more for
    plain decoding from a drafting incumbent, since decode cannot time the plain round right before a drafting one)
    go to the depth unseen longest (while drafting, every other one to plain decoding), whenever what probes have
    cost so far (each of their rounds, and the round returning from one, charged after it ran: the tokens the best
    depth would have made in its time, minus its own) plus the next probe's expected cost (at most one token a
    round) is within ``budget`` of the tokens generated. Acceptance: per depth, of the drafts the rule reached,
    counts decayed over ``window_acc`` drafts, with a prior of ``prior`` worth ``prior_weight`` drafts. ``learned``
    (from ``learned()``, e.g. via load_learned) replaces the priors.
    """

    RECENT = 9
    MIN_REF = 3
    PROBE_ROUNDS = 3

    def __init__(self, costs: dict, max_depth: Optional[int] = None, *, prior: float = 0.7, prior_weight: float = 4.0,
                 budget: float = 0.01, window_acc: int = 256, learned: Optional[dict] = None):
        verify = costs["verify"]
        self.max_depth = min(max_depth or len(verify) - 1, len(verify) - 1)
        K = self.max_depth
        self.curve = [verify[k] / verify[0] + k * costs.get("draft", 0.0) for k in range(K + 1)]
        self.samples: list = [[] for _ in range(K + 1)]  # ratio samples per k (none for k = 0: ratio 1)
        self.ratio = list(self.curve)
        self.ratio[0] = 1.0
        self.accepted = [prior * prior_weight] * K
        self.tried = [prior_weight] * K
        self.budget, self.decay = budget, 1 - 1 / window_acc
        self.times: list = [[] for _ in range(K + 1)]  # seconds of each k's last timed rounds
        self.incumbent = 0  # the depth of the last round that was no probe: the reference for round times
        self.last_probed = 0  # the depth of the last probe
        self.direct: list = [[] for _ in range(K + 1)]  # the samples of ratio(k) timed against plain rounds
        self.tokens = 0  # tokens generated under this policy, and what its probes cost in tokens
        self.probe_cost = 0.0
        self.last_round = [0] * (K + 1)  # the round each k last ran
        self.round = 0
        self.last_k, self.last_probe = 0, False
        self.probe_left = 0  # rounds left in the current probe
        # (charged?, best rate, first of a run?, incumbent) of the rounds chosen and not observed yet
        self.pending: list = []
        if learned:
            self._load(learned)

    def _load(self, learned: dict) -> None:
        K = self.max_depth
        try:
            samples = [[float(x) for x in row] for row in learned["samples"]]
            accepted, tried = [float(x) for x in learned["accepted"]], [float(x) for x in learned["tried"]]
        except (KeyError, TypeError, ValueError):
            return
        if len(samples) != K + 1 or len(accepted) != K or len(tried) != K:
            return
        if not all(0 < x < float("inf") for row in samples for x in row) or samples[0]:
            return
        if not all(0 <= a <= t for a, t in zip(accepted, tried)):
            return
        self.samples = [row[-self.RECENT :] for row in samples]
        self.accepted, self.tried = accepted, tried
        for k in range(1, K + 1):
            if self.samples[k]:
                self.ratio[k] = _median(self.samples[k])

    def learned(self) -> dict:
        return {"samples": [list(row) for row in self.samples], "accepted": list(self.accepted),
                "tried": list(self.tried)}

    def expected_tokens(self, k: int) -> float:
        tokens, run = 1.0, 1.0
        for d in range(k):
            run *= self.accepted[d] / self.tried[d]
            tokens += run
        return tokens

    def expected_rate(self, k: int) -> float:
        """Expected tokens per plain round's time with k drafts."""
        return self.expected_tokens(k) / self.ratio[k]

    def choose(self) -> int:
        rates = [self.expected_rate(k) for k in range(self.max_depth + 1)]
        k = max(range(len(rates)), key=rates.__getitem__)
        probe = False
        if self.probe_left:
            k, probe = self.last_k, True
            self.probe_left -= 1
        elif self.max_depth:
            j = min((j for j in range(len(rates)) if j != k), key=self.last_round.__getitem__)
            if k and self.last_probed:  # a drafting incumbent: every other probe is of plain decoding, the anchor
                j = 0
            # decode cannot time a plain round right before a drafting one: a plain probe's last round is untimed
            rounds = self.PROBE_ROUNDS + (j == 0 and k > 0)
            # its expected cost, at most one token a round (an estimate off after a stall must not stop the probing)
            cost = rounds * min(1.0, max(0.0, rates[k] * self.ratio[j] - self.expected_tokens(j)))
            if self.probe_cost + cost <= self.budget * self.tokens:
                k, probe = j, True
                self.probe_left, self.last_probed = rounds - 1, j
        self.round += 1
        self.last_round[k] = self.round
        if not probe and k != self.incumbent:  # a new reference: its times from before (probes, long ago) go
            self.incumbent, self.times[k] = k, []
        # charged: a probe's rounds, and the round that returns from a probe (what switching back costs)
        charged = probe or (self.last_probe and k != self.last_k)
        self.pending.append((charged, max(rates), k != self.last_k, self.incumbent))
        self.last_k, self.last_probe = k, probe
        return k

    def _push(self, window: list, x: float) -> None:
        """Append x to a window of the last RECENT values."""
        window.append(x)
        del window[: -self.RECENT]

    def start(self) -> None:
        """A new generation: rounds chosen but never run (the last one queued when a generation stopped) drop out."""
        self.pending = []

    def observe(self, k: int, drafted: int, accepted: int, seconds: Optional[float]) -> None:
        """A round that asked for k drafts, drafted ``drafted``, had ``accepted`` of them accepted, took ``seconds``
        (None: a time that is no sample of its depth's, such as decode's last plain round before a drafting one)."""
        self.tokens += accepted + 1
        # a_d is conditional: draft d counts as tried only where the rule reached it (drafts before it accepted), so
        # that the product in expected_tokens is P(first i drafts accepted); counting every drafted d would make
        # each a_d the unconditional rate and undercount the deeper drafts' tokens
        for d in range(min(drafted, accepted + 1)):
            self.tried[d] = self.tried[d] * self.decay + 1
            self.accepted[d] = self.accepted[d] * self.decay + (d < accepted)
        charged, best_rate, first, ref = self.pending.pop(0) if self.pending else (False, 0.0, False, self.incumbent)
        base = _median(self.times[ref]) if seconds is not None and len(self.times[ref]) >= self.MIN_REF else None
        ratio = self.ratio[ref] * seconds / base if base else self.ratio[k]  # this round's, in plain rounds
        if seconds is not None and not first:
            j = sample = None
            if base and k != ref:  # a probe, timed against the incumbent's rounds just before it
                if k == 0 or ref == 0:
                    j, sample = (ref, base / seconds) if k == 0 else (k, ratio)
                    self._push(self.direct[j], sample)
                else:  # through the incumbent's ratio as timed against plain rounds (not through chained samples)
                    j = k
                    sample = (_median(self.direct[ref]) if self.direct[ref] else self.ratio[ref]) * seconds / base
            elif k == ref and k and not self.samples[k] and self.times[0]:  # an incumbent still on its prior
                j, sample = k, seconds / _median(self.times[0])
            if j is not None:
                self._push(self.samples[j], sample)
                self.ratio[j] = _median(self.samples[j])
            self._push(self.times[k], seconds)
        if charged:  # the tokens the best depth would have made in this round's time, minus its own
            self.probe_cost += max(0.0, best_rate * ratio - (accepted + 1))
