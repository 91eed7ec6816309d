"""The OpenAI API's request fields and response shapes, as `mlxmtp serve` speaks them.

Requests: https://platform.openai.com/docs/api-reference/chat/create and .../completions/create. The fields read are
model, messages / prompt, max_tokens / max_completion_tokens, temperature, top_p, top_k (as mlx-lm's and vLLM's
servers accept it), seed, stop, stream, stream_options.include_usage, n (1 only), and the extension draft_tokens
(0..8 or "auto"). Other fields are ignored, as OpenAI-compatible servers do. Every bad value is an APIError: the
status and OpenAI's error object ({"error": {"message", "type", "param", "code"}}).

Responses carry OpenAI's ``usage`` (with ``prompt_tokens_details.cached_tokens``, the prompt tokens taken from the
prompt cache) and the extension field ``mtp``: draft depth setting, tau (tokens per verify pass), acceptance.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Union

from ..conversation import conversation_ids
from ..generation import GenerationStats
from ..speculative import MAX_DRAFT_TOKENS

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's bound on stop sequences


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.param, self.type, self.code, self.headers = status, param, type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str  # "chat" or "completion"
    prompt: list  # token ids
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    draft_tokens: Union[int, str]
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    id: str = ""
    created: int = 0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get(body: dict, name: str, check, what: str, default):
    v = body.get(name)
    if v is None:
        return default
    if not check(v):
        raise APIError(f"'{name}' must be {what}, got {json.dumps(v)[:60]}", param=name)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            return "".join(p["text"] for p in c)
        raise APIError(f"messages[{i}].content: only text content parts are supported", param="messages")
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(f"messages[{i}] must be an object with a role ({', '.join(ROLES)})", param="messages")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def _prompt_ids(body: dict, tokenizer, vocab_size: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return list(tokenizer.encode(p))
    if isinstance(p, list) and p and all(_is_int(t) and 0 <= t < vocab_size for t in p):
        return list(p)
    raise APIError("'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
                   param="prompt")


def parse_request(raw: bytes, kind: str, tokenizer, defaults: dict, context: Optional[int],
                  vocab_size: int) -> Request:
    """A validated Request from a request body; defaults: the server's max_tokens, temperature, top_p, top_k,
    draft_tokens. Raises APIError."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    _get(body, "model", lambda v: isinstance(v, str), "a string", None)
    if _get(body, "n", _is_int, "an integer", 1) != 1:
        raise APIError("only n = 1 is supported", param="n")
    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer", None)
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer", defaults["max_tokens"])
    if max_tokens <= 0:
        raise APIError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    temperature = _get(body, "temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0",
                       defaults["temperature"])
    top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", defaults["top_p"])
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)", defaults["top_k"])
    seed = _get(body, "seed", _is_int, "an integer", None)
    draft = _get(body, "draft_tokens", lambda v: v == "auto" or (_is_int(v) and 0 <= v <= MAX_DRAFT_TOKENS),
                 f"an integer from 0 to {MAX_DRAFT_TOKENS} or \"auto\"", defaults["draft_tokens"])
    stop = _get(body, "stop", lambda v: isinstance(v, str) or (
        isinstance(v, list) and len(v) <= MAX_STOP and all(isinstance(s, str) for s in v)),
        f"a string or a list of at most {MAX_STOP} strings", [])
    stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _get(options, "include_usage", lambda v: isinstance(v, bool), "true or false", False)

    if kind == "chat":
        messages = _messages(body)
        try:
            ids = conversation_ids(tokenizer, messages)
        except Exception as e:  # a template that rejects the conversation (roles out of order, ...)
            raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None
    else:
        ids = _prompt_ids(body, tokenizer, vocab_size)
    if not ids:
        raise APIError("the prompt is empty", param="messages" if kind == "chat" else "prompt")
    if context is not None and len(ids) >= context:
        raise APIError(f"the prompt has {len(ids)} tokens; the model's context is {context}",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Request(kind, ids, max_tokens, float(temperature), float(top_p), top_k, seed, draft, stop, stream,
                   include_usage, prefix + uuid.uuid4().hex[:24], int(time.time()))


def finish_reason(finish: Optional[str]) -> Optional[str]:
    return {"context": "length"}.get(finish, finish)  # a full context reads as "length", as in OpenAI's API


def usage(req: Request, stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def mtp_stats(req: Request, stats: GenerationStats) -> dict:
    return {"draft_tokens": req.draft_tokens, "tau": round(stats.mean_accepted_length, 4),
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "acceptance_by_depth": [round(a, 4) for a in stats.acceptance_by_depth],
            "drafted": stats.drafted, "accepted": stats.accepted, "verify_passes": stats.target_forwards,
            "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 1),
            "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1)}


def _head(req: Request, model: str, obj: str) -> dict:
    return {"id": req.id, "object": obj, "created": req.created, "model": model}


def response(req: Request, model: str, text: str, finish: str, stats: GenerationStats) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason(finish)}
        out = _head(req, model, "chat.completion")
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(finish)}
        out = _head(req, model, "text_completion")
    return {**out, "choices": [choice], "usage": usage(req, stats), "mtp": mtp_stats(req, stats)}


def chunk(req: Request, model: str, text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
    """One streamed chunk; ``role`` marks a chat stream's first chunk (the assistant role, no text yet)."""
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason(finish)}
        return {**_head(req, model, "chat.completion.chunk"), "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason(finish)}
    return {**_head(req, model, "text_completion"), "choices": [choice]}


def usage_chunk(req: Request, model: str, stats: GenerationStats) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage (and mtp)."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {**_head(req, model, obj), "choices": [], "usage": usage(req, stats), "mtp": mtp_stats(req, stats)}
