"""Reusing decode states across generations: a chat's next turn, a server's next request with the same prefix.

A ``speculative.DecodeState`` holds the trunk caches, every MTP module's cache and the tokens they depend on;
``DecodeState.trim`` keeps the longest common prefix with a new prompt, exactly, where every cache can roll back
that far, so a generation from a reused state equals one from a fresh prefill. What can be reused, per cache type:

- KV and MLA latent caches (DeepSeek-V3, GLM-4.5, MiMo, MiniMax-M2, and the full-attention layers and MTP modules
  of every family): any prefix of what the state holds.
- Sliding-window caches (MiMo-V2-Flash, Step-3.5-Flash): a prefix only within ``cache.MAX_ROLLBACK`` positions of
  the state's end (the keys beyond the window are gone).
- Gated DeltaNet conv + recurrent state (Qwen3-Next, Qwen3.5 / 3.6): only the state's end, or a position inside
  its last update (a verify pass: a few positions).

So a state always serves a prompt that extends it (a conversation's next turn). For models with sliding-window or
recurrent caches, ``PromptCache`` keeps the state it hands out and decodes on a copy: the state at the end of each
turn stays as a snapshot, which serves a later prompt that branches off after it (a regenerated reply, an edited
last message) where the newer state cannot roll back. For KV-only models a state is taken out and replaced by the
longer one it becomes, and copied only when the prompt leaves it before its end (another branch may want it).

``PromptCache`` is an LRU of a few states under a memory bound (mlx-lm's server keeps its prompt caches the same
way: nearest prefix, least recently used evicted first).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .cache import RecurrentCache, SlidingWindowCache, cache_nbytes
from .speculative import DecodeState


def _flat(caches):
    for c in caches:
        if isinstance(c, (list, tuple)):
            yield from _flat(c)
        elif c is not None:
            yield c


def limited_rollback(model) -> bool:
    """Whether any of the model's caches (trunk or MTP) can roll back only a few positions."""
    caches = list(model.make_cache()) + (list(model.make_mtp_cache()) if model.num_mtp_modules else [])
    return any(isinstance(c, (RecurrentCache, SlidingWindowCache)) for c in _flat(caches))


def state_nbytes(state: DecodeState) -> int:
    n = cache_nbytes(state.cache)
    if state.drafter is not None:
        n += cache_nbytes(state.drafter.caches) + state.drafter.nbytes()
    return n


def uses_mtp(model, draft_tokens) -> bool:
    """Whether a generation with this draft_tokens setting decodes with the MTP drafter (speculative.decode's rule)."""
    return model.num_mtp_modules > 0 and (draft_tokens == "auto" or draft_tokens > 0)


class PromptCache:
    """A few DecodeStates of one model, least recently used first, under ``max_states`` and ``max_bytes``.

    ``fetch(prompt, use_mtp)`` returns a state trimmed to the longest prefix of ``prompt`` any held state can serve
    (its ``n_cached`` tokens; a fresh state when none serves any); decode from it with ``state=``, then ``store`` it.
    Not thread-safe: one decoding thread owns it.
    """

    def __init__(self, model, max_states: int = 4, max_bytes: Optional[int] = None):
        if max_states < 0:
            raise ValueError(f"max_states must be >= 0, got {max_states}")
        self.model, self.max_states, self.max_bytes = model, max_states, max_bytes
        self.snapshots = limited_rollback(model)
        self.states: list[DecodeState] = []

    def __len__(self) -> int:
        return len(self.states)

    @property
    def nbytes(self) -> int:
        return sum(state_nbytes(s) for s in self.states)

    def fetch(self, prompt: Sequence[int], use_mtp: bool) -> DecodeState:
        prompt = [int(t) for t in prompt]
        best, best_n = None, 0
        for s in self.states:
            if (s.drafter is not None) == use_mtp:
                n = s.reusable(prompt)
                if n > best_n:
                    best, best_n = s, n
        if best is None:
            return DecodeState(self.model, use_mtp)
        self.states.remove(best)
        if self.snapshots or best_n < best.n_cached:
            self.states.append(best)  # kept (most recently used) as it is; the generation decodes on a copy
            best = best.copy()
        best.trim(prompt)
        return best

    def store(self, state: DecodeState) -> None:
        """Keep a state after its generation; a state left mid-round (busy) or empty is dropped."""
        if state.busy or state.n_cached == 0 or any(s is state for s in self.states):
            return
        if not self.snapshots:  # a KV-only state serves every prompt that a state it extends serves
            self.states = [s for s in self.states if not _extends(state, s)]
        self.states.append(state)
        while self.states and (len(self.states) > self.max_states
                               or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            self.states.pop(0)

    def clear(self) -> None:
        self.states = []


def _extends(new: DecodeState, old: DecodeState) -> bool:
    return ((new.drafter is None) == (old.drafter is None) and old.n_cached <= new.n_cached
            and new.tokens[: len(old.tokens)] == old.tokens)
