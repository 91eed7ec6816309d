"""Every cache a trunk or an MTP module keeps, behind one protocol.

A cache holds the state of ``offset`` positions and can forget its last ``n`` positions exactly with
``rollback(n)``: afterwards the next forward pass computes what it would have computed had those positions never
been fed. The speculative loop (speculative.py) relies on nothing else.

- ``KVCache``: keys and values of full attention. DeepSeek's MLA keeps its compressed latent and the shared rope
  key in the same structure (keys = latent ``[B, 1, T, kv_lora_rank]``, values = ``k_pe [B, 1, T, rope_dim]``).
- ``SlidingWindowCache``: keys and values of sliding-window attention, keeping ``room`` positions beyond the window
  so that a rollback of up to ``room`` positions never needs a key that has already been dropped.
- ``RecurrentCache``: the conv window and recurrent state of a linear-attention layer (Gated DeltaNet). Its state
  after every position of the last multi-token update is kept, so rollback selects one of them (no recompute).
"""

from __future__ import annotations

import copy
from typing import Optional

import mlx.core as mx

# Longest update whose per-position recurrent states are kept (a verify pass is 1 + draft depth tokens).
MAX_ROLLBACK = 16


class KVCache:
    """Growing key/value buffer (the layout mlx-lm's KVCache uses: [B, heads, T, dim], grown in steps)."""

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.offset = prev + n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, n: int):
        """Causal mask for n new queries against every cached key (mx.fast SDPA aligns "causal" bottom-right)."""
        return None if n == 1 else "causal"

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot roll back {n} of {self.offset} positions")
        self.offset -= n

    def can_rollback(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def copy(self) -> "KVCache":
        """A snapshot that later updates of self do not change. update_and_fetch writes into its buffer in place,
        so the copy holds its own (lazy) slice of the buffer rather than the same array object."""
        c = copy.copy(self)
        if self.keys is not None:
            c.keys, c.values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return c

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def arrays(self) -> list:
        return [] if self.keys is None else [self.keys, self.values]


class SlidingWindowCache:
    """Keys and values of the last ``window - 1 + room`` positions (plus the ones being added).

    A query at absolute position p attends to keys at positions (p - window, p]. ``start`` is the absolute position
    of the first key that ``update_and_fetch`` returns; ``make_mask`` builds the matching boolean mask.
    """

    def __init__(self, window: int, room: int = MAX_ROLLBACK):
        self.window, self.room = window, room
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.start = 0  # absolute position of self.keys[..., 0, :]
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            end = self.offset - self.start
            self.keys = mx.concatenate([self.keys[..., :end, :], keys], axis=2)
            self.values = mx.concatenate([self.values[..., :end, :], values], axis=2)
        self.offset += keys.shape[2]
        k, v = self.keys, self.values
        # Keep what a later query, after a rollback of up to `room` positions, can still see.
        keep = self.window - 1 + self.room
        drop = (self.offset - self.start) - keep
        if drop > 0:
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.start += drop
        return k, v

    def make_mask(self, n: int):
        """Mask for n queries at the positions about to be added, against the keys update_and_fetch returns."""
        start = self.start
        q = mx.arange(self.offset, self.offset + n)[:, None]
        k = mx.arange(start, self.offset + n)[None]
        return (k <= q) & (k > q - self.window)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.offset:
            raise ValueError(f"cannot roll back {n} of {self.offset} positions")
        # The next query, at position offset - n, needs every key from offset - n - window + 1 on. (Checking this
        # rather than n <= room also refuses repeated rollbacks that add up to more than the room kept.)
        if not self.can_rollback(n):
            raise ValueError(f"sliding-window cache cannot roll back {n} more positions: it keeps {self.room} "
                             "beyond its window since its last update")
        self.offset -= n

    def can_rollback(self, n: int) -> bool:
        return 0 <= n <= self.offset and self.start <= max(0, self.offset - n - self.window + 1)

    def copy(self) -> "SlidingWindowCache":
        return copy.copy(self)  # updates replace keys/values (concatenate), never write into them

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def arrays(self) -> list:
        return [] if self.keys is None else [self.keys, self.values]


class RecurrentCache:
    """Conv window and recurrent state of a linear-attention layer, with exact rollback.

    The layer reads ``conv_state`` ([B, K-1, C] or None) and ``state``, then calls ``update`` with the full conv
    input ``[B, K-1+L, C]`` (old window followed by the L new inputs) and the recurrent states: all L+1 of them
    (initial, after token 1, ..., after token L) when it kept them, or just the final one. ``rollback(n)`` restores
    the state after token L-n of the last update, which needs the per-position states (kept when L <= MAX_ROLLBACK).
    """

    def __init__(self):
        self.conv_state: Optional[mx.array] = None
        self.state: Optional[mx.array] = None
        self.offset = 0
        self._conv_input: Optional[mx.array] = None
        self._states: list = []

    def update(self, conv_input: mx.array, states: list, n_new: int) -> None:
        k1 = conv_input.shape[1] - n_new  # kernel size - 1
        self.conv_state = conv_input[:, n_new:]
        self.state = states[-1]
        self.offset += n_new
        self._kernel_minus_1 = k1
        self._conv_input = conv_input
        self._states = states if len(states) == n_new + 1 else []

    def rollback(self, n: int) -> None:
        if n == 0:
            return
        if not self.can_rollback(n):
            raise ValueError(f"recurrent cache can roll back only within its last update, not {n} positions")
        keep = len(self._states) - 1 - n  # tokens of the last update that stay
        self.state = self._states[keep]
        self.conv_state = self._conv_input[:, keep : keep + self._kernel_minus_1]
        self._states = self._states[: keep + 1]
        self._conv_input = self._conv_input[:, : keep + self._kernel_minus_1]
        self.offset -= n

    def can_rollback(self, n: int) -> bool:
        return n == 0 or (bool(self._states) and n < len(self._states))

    def copy(self) -> "RecurrentCache":
        c = copy.copy(self)  # updates replace the state arrays, never write into them
        c._states = list(self._states)
        return c

    def make_mask(self, n: int):
        return None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv_state, self.state) if a is not None)

    @property
    def arrays(self) -> list:
        """The state and what rollback selects from (the last update's conv input and per-position states)."""
        return [a for a in (self.conv_state, self.state, self._conv_input, *self._states) if a is not None]


def rollback(caches, n: int) -> None:
    """Forget the last n positions of every cache in a (nested) list of caches."""
    if n == 0:
        return
    for c in caches:
        if isinstance(c, (list, tuple)):
            rollback(c, n)
        elif c is not None:
            c.rollback(n)


def can_rollback(caches, n: int) -> bool:
    """Whether rollback(caches, n) would succeed (it changes nothing)."""
    return all(can_rollback(c, n) if isinstance(c, (list, tuple)) else (c is None or c.can_rollback(n))
               for c in caches)


def copy_caches(caches) -> list:
    """Snapshot of a (nested) list of caches: decoding on with the originals leaves the copies as they are."""
    return [copy_caches(c) if isinstance(c, (list, tuple)) else (None if c is None else c.copy()) for c in caches]


def cache_arrays(caches) -> list:
    """The arrays a (nested) list of caches holds (each cache's ``arrays``): evaluating them runs a pass only as far
    as its caches need (MLX is lazy), e.g. the key and value projections of a layer whose output nobody reads."""
    out = []
    for c in caches:
        out += cache_arrays(c) if isinstance(c, (list, tuple)) else (c.arrays if c is not None else [])
    return out


def cache_nbytes(caches) -> int:
    total = 0
    for c in caches:
        total += cache_nbytes(c) if isinstance(c, (list, tuple)) else (c.nbytes if c is not None else 0)
    return total
