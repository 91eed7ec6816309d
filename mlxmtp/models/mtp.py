"""The MTP ("NextN") module every family ships, with the family conventions as parameters.

DeepSeek-V3 (arXiv 2412.19437, sec. 2.2) and its followers:

    x = proj(concat(norm_e(Emb(t[i+1])), norm_h(h[i])))     # [embedding ; hidden], MiMo-7B: [hidden ; embedding]
    y = block(x)                                             # one decoder layer with its own cache
    logits = head(norm(y))                                   # predicts t[i+2]

Internal parameter names are the same for every family (``enorm``, ``hnorm``, ``eh_proj``, ``block``, ``norm``
and, where a module has its own output head, ``head``); each family's ``sanitize`` maps its checkpoint names onto
them, so conversion, quantization and inspection treat every family alike.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn


class MTPModule(nn.Module):
    def __init__(self, hidden: int, block: nn.Module, make_norm: Callable[[int], nn.Module], *,
                 hidden_first: bool = False, head_vocab: Optional[int] = None):
        super().__init__()
        self.enorm = make_norm(hidden)
        self.hnorm = make_norm(hidden)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.block = block
        self.norm = make_norm(hidden)
        if head_vocab is not None:
            self.head = nn.Linear(hidden, head_vocab, bias=False)
        self.hidden_first = hidden_first

    @property
    def has_own_head(self) -> bool:
        return "head" in self

    def __call__(self, emb: mx.array, hidden: mx.array, cache=None):
        """emb, hidden: [B, L, H] for L consecutive MTP positions. Returns (pre-norm, post-norm) outputs."""
        e, h = self.enorm(emb), self.hnorm(hidden)
        x = self.eh_proj(mx.concatenate([h, e] if self.hidden_first else [e, h], axis=-1))
        y = self.block(x, cache=cache)
        return y, self.norm(y)
