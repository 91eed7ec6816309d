"""The public generation API: text in, text out, with the statistics every surface reports.

``stream_generate`` drives speculative.decode and applies the stop conditions token by token, so EOS, stop strings,
max_tokens and the context length take effect in the middle of a round: nothing after them is emitted.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx

from .sampling import SamplingParams
from .speculative import MAX_DRAFT_TOKENS, DecodeState, RoundStats, decode
from .tuning import DepthPolicy, decode_threads, load_learned, measure_costs, policy_key, save_learned

AUTO_MAX_DEPTH = 4


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from a reused DecodeState instead of being prefilled
    prefill_tokens_per_s: float = 0.0
    generated_tokens: int = 0
    decode_tokens_per_s: float = 0.0
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    # [d]: of the rounds that drafted more than d tokens, the share whose first d + 1 were all accepted (per position,
    # unconditional, as vLLM's per-position acceptance rate)
    acceptance_by_depth: list = field(default_factory=list)
    syncs_per_round: float = 0.0  # host synchronisations per decoding round (1 on the device path)
    rounds_by_depth: list = field(default_factory=list)  # rounds_by_depth[k]: rounds that drafted k (what auto chose)
    peak_memory_gb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    tokens: list
    stats: GenerationStats
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "context" (context full)


@dataclass
class GenerationIncrement:
    text: str
    tokens: list
    stats: GenerationStats
    finish_reason: Optional[str] = None


_POLICIES: dict = {}


def _shared_policy(model, params: SamplingParams) -> DepthPolicy:
    """One depth policy per model and sampling settings (whose acceptance differs), kept across generations and,
    through tuning.policy_file(), across processes: a generation starts from what the last one learned."""
    key = (id(model), params)
    if key not in _POLICIES:
        store = policy_key(model, params)
        policy = DepthPolicy(measure_costs(model, AUTO_MAX_DEPTH + 1), AUTO_MAX_DEPTH, learned=load_learned(store))
        policy.store_key = store
        _POLICIES[key] = policy
        weakref.finalize(model, _POLICIES.pop, key, None)
    return _POLICIES[key]


class ContinuationText:
    """The text of generated ids as a continuation of the prompt, built incrementally (vLLM's incremental
    detokenization): each piece is decode(context + ids)[len(decode(context)):] with the last few prompt ids as
    the first context, so the piece a tokenizer would lose at the start of a string (mlx-lm's streaming
    detokenizers drop a reply's leading space) is kept, and an incomplete UTF-8 character waits for its bytes."""

    CONTEXT = 4

    def __init__(self, tokenizer, prompt: list):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-self.CONTEXT :])
        self.prefix = 0  # ids[prefix:read] decode to the end of the text already out
        self.read = len(self.ids)
        self.text = ""

    def _flush(self, final: bool) -> None:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if len(now) > len(done) and (final or not now.endswith("\ufffd")):
            self.text += now[len(done) :]
            self.prefix, self.read = self.read, len(self.ids)

    def add_token(self, token: int) -> None:
        self.ids.append(token)
        self._flush(False)

    def finalize(self) -> None:
        self._flush(True)


def _validate_draft_tokens(draft_tokens):
    if draft_tokens == "auto":
        return draft_tokens
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 0 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens must be 'auto' or an integer from 0 to {MAX_DRAFT_TOKENS}, got {draft_tokens!r}")
    return draft_tokens


def context_length(model) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def encode_prompt(tokenizer, prompt: Union[str, Sequence[int]]) -> list[int]:
    return list(prompt) if not isinstance(prompt, str) else list(tokenizer.encode(prompt))


def stream_generate(model, tokenizer, prompt: Union[str, Sequence[int]], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: Optional[int] = None,
                    draft_tokens="auto", mtp: bool = True, stop: Sequence[str] = (),
                    policy: Optional[DepthPolicy] = None,
                    state: Optional[DecodeState] = None) -> Iterator[GenerationIncrement]:
    """Yield increments (new text, new token ids, running stats) as tokens are accepted.

    draft_tokens: "auto" (depth chosen per round from measured costs and acceptance), or k >= 0 (0 = plain decoding
    through the same code path). A seeded sample repeats exactly for a fixed k; under auto, whose choices follow
    round times, it has the same distribution but not the same draws. mtp=False is plain decoding. The last
    increment has ``finish_reason`` set.
    state: continue from this DecodeState (trimmed to the prompt: speculative.DecodeState.trim) and leave it
    updated; only the prompt tokens it does not hold are prefilled.
    """
    params = SamplingParams(temperature, top_p, top_k)
    draft_tokens = _validate_draft_tokens(draft_tokens) if mtp else 0
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    ctx = context_length(model)
    if ctx is not None and len(ids) >= ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {ctx}")
    if draft_tokens == "auto" and model.num_mtp_modules:
        policy = policy or _shared_policy(model, params)  # before the clock starts: measure_costs runs once here
    elif draft_tokens == "auto":
        draft_tokens = 0

    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
    detok = ContinuationText(tokenizer, ids)
    stats, rounds = GenerationStats(prompt_tokens=len(ids), cached_tokens=state.n_cached if state else 0), RoundStats()
    mx.reset_peak_memory()
    hold = max((len(s) for s in stop), default=1) - 1  # characters held back while a stop string may be forming
    text, sent, out_tokens = "", 0, []
    t_start = time.perf_counter()
    t_first = None
    finish = None
    steps = decode(model, ids, params, draft_tokens=draft_tokens, policy=policy, seed=seed, stats=rounds,
                   state=state, max_new_tokens=min(max_tokens, ctx - len(ids)) if ctx else max_tokens,
                   threads=decode_threads(model))
    try:
        for new in steps:
            if t_first is None:
                t_first = time.perf_counter()
            emitted = []
            for tok in new:
                if tok in eos:
                    finish = "stop"
                    break
                emitted.append(tok)
                detok.add_token(tok)
                if len(out_tokens) + len(emitted) >= max_tokens:
                    finish = "length"
                    break
                if ctx is not None and len(ids) + len(out_tokens) + len(emitted) >= ctx:
                    finish = "context"
                    break
            out_tokens.extend(emitted)
            if finish is not None:
                detok.finalize()
            text = detok.text
            for s in stop:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
            end = len(text) if finish is not None else max(sent, len(text) - hold)
            _fill_stats(stats, rounds, out_tokens, t_start, t_first)
            piece, sent = text[sent:end], end
            if piece or emitted or finish:
                yield GenerationIncrement(piece, emitted, stats, finish)
            if finish is not None:
                return
    finally:
        steps.close()
        if getattr(policy, "store_key", None):  # what this generation taught auto, for the next one
            save_learned(policy.store_key, policy.learned())


def _fill_stats(stats: GenerationStats, rounds: RoundStats, tokens: list, t_start: float, t_first: float) -> None:
    now = time.perf_counter()
    stats.prefill_tokens_per_s = (stats.prompt_tokens - stats.cached_tokens) / max(t_first - t_start, 1e-9)
    stats.generated_tokens = len(tokens)
    decode_time = now - t_first
    stats.decode_tokens_per_s = (len(tokens) - 1) / decode_time if len(tokens) > 1 and decode_time > 0 else 0.0
    stats.target_forwards = rounds.target_forwards
    stats.drafted, stats.accepted = rounds.drafted, rounds.accepted
    stats.acceptance_rate = rounds.accepted / rounds.drafted if rounds.drafted else 0.0
    stats.mean_accepted_length = 1 + rounds.accepted / rounds.target_forwards if rounds.target_forwards else 0.0
    stats.acceptance_by_depth = [a / d for a, d in zip(rounds.accepted_by_depth, rounds.drafted_by_depth)]
    stats.rounds_by_depth = list(rounds.rounds_by_k)
    # the prefill's first token takes one synchronisation of its own
    stats.syncs_per_round = (rounds.syncs - 1) / rounds.target_forwards if rounds.target_forwards else 0.0
    stats.peak_memory_gb = mx.get_peak_memory() / 1e9


def generate(model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """Generate to completion; same arguments as stream_generate."""
    text, tokens, stats, finish = [], [], None, None
    for inc in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(inc.text)
        tokens.extend(inc.tokens)
        stats, finish = inc.stats, inc.finish_reason
    return GenerationResult("".join(text), tokens, stats, finish)
