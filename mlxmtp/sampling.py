"""Logits -> the final sampling distribution, and the exact speculative acceptance rule.

Both the target's and the drafter's logits go through the same ``SamplingParams.distribution`` (temperature,
top-k, top-p), so the rejection sampler compares the distributions the user actually asked for.
Randomness comes from one seeded ``numpy.random.Generator`` per generation, so seeded runs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise ValueError(f"temperature and top_p must be finite numbers, got {self.temperature}, {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def distribution(self, logits: mx.array) -> np.ndarray:
        """[N, V] logits -> [N, V] float64 probabilities after temperature, top-k and top-p (in that order, as HF's
        and mlx-lm's samplers apply them). Greedy -> one-hot on the argmax."""
        x = np.asarray(logits.astype(mx.float32), dtype=np.float64)
        if self.greedy:
            out = np.zeros_like(x)
            out[np.arange(len(x)), x.argmax(-1)] = 1.0
            return out
        x = x / self.temperature
        if 0 < self.top_k < x.shape[-1]:
            kth = np.partition(x, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(p, order, -1)
            # keep the smallest prefix whose mass reaches top_p (the token that crosses the threshold stays)
            drop_sorted = (np.cumsum(sorted_p, -1) - sorted_p) >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(-1, keepdims=True)
        return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability vector (inverse CDF on a float64 uniform)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def accept_drafts(drafts: list[int], q: Optional[np.ndarray], p: np.ndarray, rng: Optional[np.random.Generator],
                  greedy: bool) -> tuple[int, int]:
    """Speculative acceptance (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318).

    drafts: k drafted tokens; q: [k, V] the distributions they were drawn from; p: [k+1, V] the target's final
    distributions at the k+1 verified positions. Returns (number of drafts accepted, the next token): the
    correction drawn from norm(max(0, p - q)) at the first rejection, or the bonus token from p[k] when all pass.
    Greedy: accept while the draft is the target's argmax (p is one-hot there, so this is the same rule).
    """
    for i, d in enumerate(drafts):
        if greedy:
            if p[i, d] == 1.0:
                continue
            return i, int(p[i].argmax())
        if rng.random() * q[i, d] < p[i, d]:  # accept with probability min(1, p/q)
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        return i, sample(residual if residual.sum() > 0 else p[i], rng)
    k = len(drafts)
    return k, (int(p[k].argmax()) if greedy else sample(p[k], rng))
