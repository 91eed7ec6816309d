"""The draft-and-accept loop: the model drafts with its own MTP modules, one trunk pass verifies, exact acceptance.

Positions. Tokens t[0..P] are committed; the trunk cache holds positions 0..P-1 (t[P], the last emitted token, is fed
by the next trunk pass). MTP module j (depth j+1) at row i combines an input hidden state (the trunk's at i for
j = 0, module j-1's output at i otherwise) with the embedding of t[i+j+1] and predicts t[i+j+2]; its row P-1 gives
draft d[j+1] = t[P+j+1]. Rows whose token is not committed yet (i > P-j-1) are speculative: they are computed for
drafting and rolled back at once, then recomputed with the true tokens in the next round. Asking for more drafts
than there are modules continues with the last module recursively (row P, P+1, ...; its own output as hidden),
which is how single-module families draft k > 1 (vLLM's and SGLang's convention).

Prefill runs the trunk and then every MTP module over the prompt (MTPDrafter.prefill). Each round: draft k tokens ->
verify [t[P], d1..dk] in one trunk pass -> accept (sampling.Sampler.accept: the round's one host synchronisation) ->
roll the trunk caches back past the accepted prefix -> hand the accepted positions' hidden states to the drafter,
which folds them into its next call (no separate pass to extend the MTP caches). A round with k = 0 is the same
loop without the drafts, pipelined (decode's docstring); inside MTP decoding its hidden state waits for the drafter
like an accepted position's. Where more than DRAFT_ROWS of them wait, the next draft first runs the modules over all
but the last through their caches only (as in prefill); after FOLD_ROWS the modules catch up without a
synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx

from . import blas
from .cache import cache_arrays, can_rollback, copy_caches, rollback
from .models import moe_dispatch
from .sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512
# The deepest draft a round may ask for. A verify pass feeds 1 + k tokens, and the caches that cannot be trimmed
# arbitrarily (recurrent state, sliding window) keep cache.MAX_ROLLBACK = 16 positions for rollback, so k <= 15 is
# the hard limit; 8 is the deliberate bound: with acceptance 0.8 a 9th draft adds 0.8^9 = 0.13 expected tokens
# while every verify row costs bandwidth (and MTP modules drafting that deep are far outside their training).
MAX_DRAFT_TOKENS = 8
# Plain rounds inside MTP decoding leave the drafter this many trunk rows at most before its modules catch up
# (MTPDrafter.fold). Large, because the catch-up is cheaper per row in bigger batches (demo model, CPU: 19 us a row
# at 32 rows, 8 at 256) and auto's next probe usually runs it first, inside the probe's budget (tuning.py).
FOLD_ROWS = 256
# A draft's first step runs each module over at most this many pending rows with its attention, MLP and head; rows
# before them (after a run of plain rounds) go through the modules' caches only, as in prefill.
DRAFT_ROWS = MAX_DRAFT_TOKENS + 1


class MTPDrafter:
    """Drafts with a model's MTP modules; keeps every module's cache exactly at its committed rows."""

    def __init__(self, model, min_draft_prob: float = 0.0):
        self.model = model
        self.caches = model.make_mtp_cache()
        self.n = model.num_mtp_modules
        self.frontier = [0] * self.n  # first row not yet in module j's cache
        # inputs[j]: hidden states feeding module j at rows frontier[j] .. (module j-1's frontier) - 1
        # (for j = 0: the trunk's hidden states at rows frontier[0] .. P-1, with ``pending`` after them)
        self.inputs: list[Optional[mx.array]] = [None] * self.n
        self.pending: list[mx.array] = []  # trunk hidden states handed over since module 0's input was last joined
        self.pending_rows = 0
        self.min_draft_prob = min_draft_prob

    def copy(self) -> "MTPDrafter":
        c = MTPDrafter.__new__(MTPDrafter)
        c.__dict__.update(self.__dict__)
        c.caches, c.frontier, c.inputs = copy_caches(self.caches), list(self.frontier), list(self.inputs)
        c.pending = list(self.pending)
        return c

    def nbytes(self) -> int:
        """The bytes of the hidden states held for the modules (their caches not included)."""
        return sum(x.nbytes for x in self.inputs + self.pending if x is not None)

    def _join(self) -> None:
        """Module 0's input as one array: one concatenation for every hand-over since the last (not one a round)."""
        if self.pending:
            parts = ([self.inputs[0]] if self.inputs[0] is not None else []) + self.pending
            self.inputs[0] = mx.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
            self.pending, self.pending_rows = [], 0

    def trim_plan(self, F: int) -> Optional[list]:
        """How many rows each module's cache must forget so that the drafter continues from trunk position F
        (F <= every position it has seen; the rows a module keeps use only tokens t[..F + n - 1]). None when a
        cache cannot roll back that far."""
        drop = [max(0, f - F) for f in self.frontier]
        ok = all(can_rollback([c], d) for c, d in zip(self.caches, drop))
        return drop if ok else None

    def trim(self, F: int, drop: list) -> None:
        """Continue from trunk position F (see trim_plan). A module ahead of F is rolled back to row F and has
        nothing pending; a module at or behind F keeps its frontier and the pending input rows below its
        predecessor's new frontier (module 0: the trunk's hidden states of rows frontier..F-1)."""
        self._join()
        for j, d in enumerate(drop):
            if d:
                rollback([self.caches[j]], d)
                self.frontier[j], self.inputs[j] = F, None
            elif self.inputs[j] is not None:
                upto = (F if j == 0 else self.frontier[j - 1]) - self.frontier[j]
                self.inputs[j] = self.inputs[j][:, :upto] if upto > 0 else None

    def extend(self, hidden: mx.array) -> None:
        """Trunk hidden states [1, m, H] of newly committed positions."""
        self.pending.append(hidden)
        self.pending_rows += hidden.shape[1]

    def prefill(self, tokens: list[int], evaluate=mx.eval) -> None:
        """Run every module over the rows whose inputs are committed (``tokens``: the prompt), in chunks, leaving
        each module's last row (whose token is the one not sampled yet) for the first draft. Part of prefill: the
        first round then runs one row per module, whatever the prompt's length. Of these rows only the caches are
        kept, and the outputs that feed a next module: the last module runs only as far as its cache needs (its
        key and value projections, not its attention output or MLP)."""
        L = len(tokens)
        self._join()
        for j in range(self.n):
            f = self.frontier[j]
            have = (f + self.inputs[j].shape[1]) if self.inputs[j] is not None else f
            end = min(L - j - 1, have)  # row i needs t[i + j + 1], a prompt token
            if end <= f:
                continue
            feeds = j + 1 < self.n
            out = self._run(j, self.inputs[j][:, : end - f], mx.array([tokens[f + j + 1 : end + j + 1]]),
                            need_out=feeds)[0]
            evaluate(*([out] if feeds else []), *cache_arrays([self.caches[j]]))
            self.inputs[j] = self.inputs[j][:, end - f :] if have > end else None
            self.frontier[j] = end
            if feeds:
                nxt = self.inputs[j + 1]
                self.inputs[j + 1] = out if nxt is None else mx.concatenate([nxt, out], axis=1)

    def fold(self, tokens: list[int]) -> None:
        """During plain rounds (k = 0 inside MTP decoding) the trunk's hidden states pile up (``pending``); once
        FOLD_ROWS have, run the modules over them (queued with async_eval, no synchronisation), so the pending
        inputs stay bounded. ``tokens``: the committed ones."""
        if self.pending_rows + (self.inputs[0].shape[1] if self.inputs[0] is not None else 0) >= FOLD_ROWS:
            self.prefill(tokens, mx.async_eval)

    def draft(self, tokens: list[int], k: int, sampler: Sampler):
        """Up to k drafts after tokens[-1] (= t[P]): (an int32 [k'] device array or None, the distributions q they
        were drawn from, one per draft, None entries when greedy). Nothing is synchronised here (with the mlx
        sampler, or greedy); min_draft_prob > 0 stops drafting early at the cost of one synchronisation per draft."""
        P = len(tokens) - 1
        self._join()
        if P - self.frontier[0] > DRAFT_ROWS:  # after plain rounds: their rows into the caches, lazily, first
            self.prefill(tokens[:-1], evaluate=lambda *arrays: None)
        drafts, qs, ran = [], [], []  # ran: (first row, input hidden, output hidden) of each module run
        prev_out = None
        for depth in range(k):
            j = min(depth, self.n - 1)
            if depth < self.n:
                f = self.frontier[j]
                h = self.inputs[j] if j == 0 else (
                    prev_out if self.inputs[j] is None else mx.concatenate([self.inputs[j], prev_out], axis=1))
                # rows f..P-1 feed t[i + j + 1]: committed up to row P - j - 1, then this round's drafts
                parts = [mx.array(tokens[f + j + 1 : P + 1], dtype=mx.int32)] if f + j + 1 <= P else []
                toks = mx.concatenate(parts + drafts[max(f, P - j) + j - P : j])[None]
            else:  # recursion with the last module at rows P, P+1, ...: its own output as hidden
                h, toks = prev_out[:, -1:], drafts[-1][None]
            out, logits = self._run(j, h, toks)
            if depth < self.n:
                ran.append((f, h, out))
            prev_out = out
            last = logits[0, -1:]
            if depth > 0 and self.min_draft_prob > 0:
                sampler.syncs += 1
                if mx.softmax(last, axis=-1).max().item() < self.min_draft_prob:
                    break
            tok, q = sampler.draft(last)
            drafts.append(tok)
            qs.append(q)
        self._commit(P, ran)
        return (mx.concatenate(drafts) if drafts else None), qs

    def _run(self, j: int, h: mx.array, toks: mx.array, need_out: bool = True):
        """Module j over the given rows ([1, L] tokens); long inputs (a prompt) go in chunks. need_out=False: only
        the last chunk's output is returned (the earlier chunks are evaluated only as far as the cache needs)."""
        outs = []
        while toks.shape[1] > PREFILL_CHUNK:
            out, _ = self.model.mtp_forward(j, h[:, :PREFILL_CHUNK], toks[:, :PREFILL_CHUNK], self.caches[j])
            mx.eval(*([out] if need_out else []), *cache_arrays([self.caches[j]]))
            outs += [out] if need_out else []
            h, toks = h[:, PREFILL_CHUNK:], toks[:, PREFILL_CHUNK:]
        out, logits = self.model.mtp_forward(j, h, toks, self.caches[j])
        return (mx.concatenate(outs + [out], axis=1) if outs else out), logits

    def _commit(self, P: int, ran: list) -> None:
        """Keep each module's cache at its committed rows (those whose token t[i+j+1] is committed, i < P - j);
        roll back the speculative rows, which the next round recomputes from committed tokens."""
        for j, (f, h, out) in enumerate(ran):
            new_f = max(f, P - j)
            rollback([self.caches[j]], self.caches[j].offset - new_f)
            self.frontier[j] = new_f
            if j == 0:
                self.inputs[0] = None
            else:  # module j-1's committed output rows not yet consumed: [new_f, P - j + 1)
                end = max(new_f, P - j + 1) - f
                self.inputs[j] = h[:, new_f - f : end] if end > new_f - f else None
        m = len(ran)
        if 0 < m < self.n:  # module m did not run: module m-1's newly committed outputs wait for it
            f, _, out = ran[m - 1]
            end = max(f, P - m + 1) - f
            if end > 0:
                nxt = self.inputs[m]
                self.inputs[m] = out[:, :end] if nxt is None else mx.concatenate([nxt, out[:, :end]], axis=1)


class DecodeState:
    """The state one decoding sequence leaves behind, reusable by the next generation whose prompt extends it
    (a chat's next turn, a server's next request with the same prefix: see prompt_cache.py).

    - ``cache``: the trunk caches; they hold positions 0 .. ``n_cached`` - 1.
    - ``drafter``: the MTPDrafter with every MTP module's cache and the hidden states it has not consumed yet, or
      None for a state decoded without MTP (it cannot serve a generation that drafts).
    - ``tokens``: the ids the state depends on; a prompt continuing it must start with them. During decoding they
      are the committed tokens, the last of which (the last one emitted) is not in the trunk cache yet, and the
      MTP modules' rows have used all of them. Exception: while a generation is suspended after a pipelined plain
      round, the queued pass has already fed the last emitted token (n_cached = len(tokens)); trim and copy work
      from n_cached all the same, and closing the generation reads the queued token, restoring the rule above.
    - ``busy``: True while a round is in flight; a state whose decoding was interrupted mid-round (an exception
      inside a pass) is left busy and must not be reused.
    """

    def __init__(self, model, use_mtp: bool, drafter=None):
        self.model = model
        self.cache = model.make_cache()
        self.drafter = (drafter or MTPDrafter(model)) if use_mtp else None
        self.tokens: list[int] = []
        self.n_cached = 0
        self.busy = False

    def copy(self) -> "DecodeState":
        """A snapshot: decoding on with self (or trimming it) leaves the copy as it is."""
        c = DecodeState.__new__(DecodeState)
        c.__dict__.update(self.__dict__)
        c.cache, c.tokens = copy_caches(self.cache), list(self.tokens)
        c.drafter = self.drafter.copy() if self.drafter is not None else None
        return c

    def reusable(self, prompt: list[int]) -> int:
        """How many leading positions of ``prompt`` this state could keep (see trim); -1 if it cannot be trimmed
        to them (a recurrent or sliding-window cache cannot roll back that far, or the state is busy)."""
        plan = self._plan(prompt)
        return -1 if plan is None else plan[0]

    def trim(self, prompt: list[int]) -> int:
        """Keep only what a generation from ``prompt`` can reuse; return the number of prompt tokens kept (the
        trunk cache then holds prompt[:kept]; at least the last prompt token is always left to feed). With n the
        longest common prefix of ``tokens`` and ``prompt``, kept = min(n_cached, n - (MTP modules), len - 1): the
        rows an MTP module keeps use tokens up to t[kept + module depth - 1]. Raises ValueError when a cache
        cannot roll back that far (the caller falls back to a snapshot or a fresh state)."""
        plan = self._plan(prompt)
        if plan is None:
            raise ValueError("this decode state cannot be trimmed to the prompt's common prefix")
        F, drop = plan
        rollback(self.cache, self.n_cached - F)
        if self.drafter is not None:
            self.drafter.trim(F, drop)
        self.n_cached = F
        self.tokens = list(prompt[: F + (self.drafter.n if self.drafter is not None else 0)])
        return F

    def _plan(self, prompt):
        if self.busy:
            return None
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        lag = self.drafter.n if self.drafter is not None else 0
        F = max(0, min(self.n_cached, n - lag, len(prompt) - 1))
        if not can_rollback(self.cache, self.n_cached - F):
            return None
        drop = self.drafter.trim_plan(F) if self.drafter is not None else []
        return None if drop is None else (F, drop)


@dataclass
class RoundStats:
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    drafted_by_depth: list = field(default_factory=list)
    accepted_by_depth: list = field(default_factory=list)
    rounds_by_k: list = field(default_factory=list)  # rounds_by_k[k]: rounds that drafted k tokens
    syncs: int = 0  # host synchronisations, the prefill's and the MoE union path's included
    host_bytes: int = 0  # bytes copied from device arrays to the host

    def record(self, n_drafted: int, n_accepted: int) -> None:
        self.target_forwards += 1
        self.drafted += n_drafted
        self.accepted += n_accepted
        while len(self.drafted_by_depth) < n_drafted:
            self.drafted_by_depth.append(0)
            self.accepted_by_depth.append(0)
        while len(self.rounds_by_k) <= n_drafted:
            self.rounds_by_k.append(0)
        self.rounds_by_k[n_drafted] += 1
        for d in range(n_drafted):
            self.drafted_by_depth[d] += 1
            self.accepted_by_depth[d] += d < n_accepted


def _trunk(model, tokens: mx.array, cache, want_hidden: bool):
    """tokens: int32 [L] (device or host built)."""
    pre, post = model.trunk(tokens[None], cache)
    logits = model.lm_head(post)
    return logits, (model.select_hidden(pre, post) if want_hidden else None)


def decode(model, prompt: list[int], params: SamplingParams, *, draft_tokens=0, policy=None, seed=None,
           stats: Optional[RoundStats] = None, min_draft_prob: float = 0.0, drafter=None,
           state: Optional[DecodeState] = None, sampler: Optional[Sampler] = None,
           max_new_tokens: Optional[int] = None, threads: Optional[int] = None) -> Iterator[list[int]]:
    """Yield the generated tokens, a list per trunk pass (the prefill's first token, then each round's accepted
    drafts plus the correction or bonus token). Runs until the caller stops iterating.

    draft_tokens: an int k (0 = plain decoding) or "auto" with ``policy`` (tuning.DepthPolicy: ``start()``,
    ``choose()`` -> k, ``observe(k, drafted, accepted, seconds)``, seconds None for a round whose time is no sample
    of its depth's) choosing k per round. drafter: anything with
    MTPDrafter's ``extend`` and ``draft`` (default: an MTPDrafter over the model's modules). state: a DecodeState to
    continue (only the prompt tokens after its ``n_cached`` are prefilled; the prompt must start with its
    ``tokens``) and to leave updated for the next generation; default: a fresh one. sampler: a sampling.Sampler
    (default: one for ``params`` and ``seed`` on the default backend). max_new_tokens: where the caller will stop (a
    hint): no pass is queued ahead for a token past it, so a generation that ends at its length, as mlx-lm's
    generate_step does, leaves no wasted pass behind (iterating on past it still works, unpipelined). threads: the
    OpenBLAS thread count for the rounds (tuning.decode_threads; None: unchanged); the prefill keeps the current one.

    One loop for every k. One host synchronisation per round (greedy, or the mlx sampler): drafts, the verify input,
    the distributions and the acceptance rule stay device arrays, and only [accepted count, next token, drafts]
    come back. A round with k = 0 (plain decoding, or a plain round chosen by auto) is pipelined as mlx-lm's
    generate_step is, when the sampler allows it: its trunk pass is queued (mx.async_eval) on the previous round's
    token, still a device array, before that token is read and handed out; with MTP its hidden state goes to the
    drafter lazily. Round times (for the policy) run from one hand-out to the next; a plain round handed out before
    a drafting one is untimed: no next pass was built behind it, so its time is short of a plain round's.
    """
    prompt = [int(t) for t in prompt]
    sampler = sampler or Sampler(params, seed)
    stats = stats if stats is not None else RoundStats()
    auto = draft_tokens == "auto"
    use_mtp = (drafter is not None or model.num_mtp_modules > 0) and (auto or draft_tokens > 0)
    if state is None:
        state = DecodeState(model, use_mtp, drafter)
    else:
        if state.busy or len(prompt) <= state.n_cached or prompt[: len(state.tokens)] != state.tokens:
            raise ValueError("the prompt does not continue this decode state (trim it to the prompt first)")
        if use_mtp and state.drafter is None:
            raise ValueError("this decode state was built without MTP; it cannot serve a generation that drafts")
        if not use_mtp:
            state.drafter = None  # it would fall behind the trunk: the state now serves plain decoding only
    drafter, cache = state.drafter, state.cache
    if drafter is not None:
        drafter.min_draft_prob = min_draft_prob
    observe = policy.observe if auto and use_mtp else None
    if observe:
        policy.start()

    moe_reads = moe_dispatch.host_reads  # the union path's host reads before this generation (one decode at a time)

    def sync_stats():
        stats.syncs = sampler.syncs + moe_dispatch.host_reads - moe_reads
        stats.host_bytes = sampler.host_bytes

    # Prefill in chunks; the drafter receives every prompt position's hidden state and runs its modules over them.
    state.busy = True
    for s in range(state.n_cached, len(prompt), PREFILL_CHUNK):
        logits, hidden = _trunk(model, mx.array(prompt[s : s + PREFILL_CHUNK], dtype=mx.int32), cache, use_mtp)
        if use_mtp:
            drafter.extend(hidden)
        mx.eval(logits, hidden if use_mtp else logits)
    if use_mtp and hasattr(drafter, "prefill"):
        drafter.prefill(prompt)
    tokens = list(prompt)
    state.tokens, state.n_cached = tokens, len(prompt)
    # lazy: the next token as a device array the host has not read, its trunk pass not queued yet (or, while
    # suspended in a pipelined round, already queued: then the trunk cache holds every token in ``tokens``)
    lazy, lazy_round = None, False  # lazy_round: lazy comes from a round (not from the prefill)
    if sampler.pipelined:
        lazy = sampler.lazy_next(logits[0, -1:])
    else:
        _, first, _ = sampler.accept(None, [], logits[0, -1:])
        tokens.append(first)
        sync_stats()
        state.busy = False
        yield [first]
    t_out = time.perf_counter()  # the last hand-out

    def hand_out_lazy(timed=True):
        nonlocal t_out
        tokens.append(sampler.fetch(lazy)[0])
        if lazy_round:
            stats.record(0, 0)
            if observe:
                observe(0, 0, 0, time.perf_counter() - t_out if timed else None)
        sync_stats()
        t_out = time.perf_counter()
        return [tokens[-1]]

    with blas.using_threads(threads):  # the round's, after the prefill's
        try:
            while True:
                k = 0 if not use_mtp else (policy.choose() if auto else draft_tokens)
                state.busy = True
                ahead = len(tokens) - len(prompt) + (1 if lazy is None else 2)  # the token a queued pass would give
                if k == 0 and sampler.pipelined and (max_new_tokens is None or ahead <= max_new_tokens):
                    logits, hidden = _trunk(model, mx.array(tokens[-1:], dtype=mx.int32) if lazy is None else lazy,
                                            cache, use_mtp)
                    nxt = sampler.lazy_next(logits[0, -1:])
                    if use_mtp:
                        drafter.extend(hidden)
                        mx.async_eval(nxt, hidden)
                        if hasattr(drafter, "fold"):
                            drafter.fold(tokens)
                    else:
                        mx.async_eval(nxt)
                    state.n_cached += 1
                    if lazy is None:  # its input was on the host (after the prefill or a drafting round): nothing
                        # to hand out yet
                        lazy, lazy_round = nxt, True
                        continue
                    new = hand_out_lazy()
                    lazy, lazy_round = nxt, True
                    state.busy = False
                    yield new
                    continue
                if lazy is not None:  # the last plain round's token: read it before drafting from it
                    new = hand_out_lazy(timed=False)
                    lazy = None
                    state.busy = False
                    yield new
                    state.busy = True
                drafts, qs = drafter.draft(tokens, k, sampler) if k > 0 else (None, [])
                last = mx.array([tokens[-1]], dtype=mx.int32)
                verify_in = last if drafts is None else mx.concatenate([last, drafts])
                logits, hidden = _trunk(model, verify_in, cache, use_mtp)
                n_acc, nxt, drafted = sampler.accept(drafts, qs, logits[0])  # the round's one synchronisation
                rollback(cache, len(drafted) - n_acc)
                if use_mtp:
                    drafter.extend(hidden[:, : n_acc + 1])
                stats.record(len(drafted), n_acc)
                sync_stats()
                if observe:
                    observe(k, len(drafted), n_acc, time.perf_counter() - t_out)
                t_out = time.perf_counter()
                new = drafted[:n_acc] + [nxt]
                tokens.extend(new)
                state.n_cached += n_acc + 1
                if use_mtp and k == 0 and hasattr(drafter, "fold"):  # a plain round the sampler could not pipeline:
                    drafter.fold(tokens[:-1])  # the last row is left for the next draft, as in a draft's catch-up
                state.busy = False
                yield new
        finally:
            if lazy is not None and not state.busy:  # stopped while a queued pass's token waits: it becomes the last
                tokens.append(sampler.fetch(lazy)[0])
                sync_stats()
