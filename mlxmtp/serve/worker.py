"""One decoding thread in front of the model: requests run one at a time, in arrival order.

Requests beyond the one being decoded wait in a queue of at most ``max_queue``; ``submit`` refuses more (the server
answers 503 with Retry-After). Each job streams its events back to the asyncio loop that submitted it; a job whose
client went away is cancelled, and the thread stops its generation at the next token (or skips it, if it has not
started), so the model is free for the next request. The prompt cache (prompt_cache.PromptCache) belongs to this
thread: each generation starts from the state that shares the longest prefix with its prompt and leaves its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
import traceback
from typing import Callable

from ..generation import stream_generate
from ..prompt_cache import PromptCache, uses_mtp
from .api import Request


class QueueFull(Exception):
    pass


class Job:
    """A request and the channel back to its handler: events ("text", piece, finish, stats) and ("error", message)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    def __init__(self, model, tokenizer, cache: PromptCache, max_queue: int, log: Callable[[str], None] = None):
        self.model, self.tokenizer, self.cache, self.max_queue = model, tokenizer, cache, max_queue
        self.log = log or (lambda line: None)
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.waiting = 0
        self.decoding = False
        self.served = 0
        threading.Thread(target=self._run, name="mlxmtp-decode", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.waiting >= self.max_queue:
                raise QueueFull
            self.waiting += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                self.waiting -= 1
                self.decoding = True
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            except Exception as e:  # nothing a request does may end the thread
                self.log(f"error in generation: {e!r}\n{traceback.format_exc()}")
                job.post("error", f"generation failed: {e}")
            finally:
                with self._lock:
                    self.decoding = False
                    self.served += 1

    def _generate(self, job: Job) -> None:
        r, t0 = job.request, time.perf_counter()
        state = self.cache.fetch(r.prompt, uses_mtp(self.model, r.draft_tokens))
        steps = stream_generate(self.model, self.tokenizer, r.prompt, max_tokens=r.max_tokens,
                                temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed,
                                draft_tokens=r.draft_tokens, stop=r.stop, state=state)
        stats, finish = None, None
        try:
            for inc in steps:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                stats, finish = inc.stats, inc.finish_reason
                job.post("text", inc.text, finish, dataclasses.replace(stats) if finish else None)
        finally:
            steps.close()
            self.cache.store(state)  # dropped there if a pass was interrupted mid-round
        if stats is not None:
            self.log(f"{r.kind} {r.id}: prompt {stats.prompt_tokens} tok ({stats.cached_tokens} cached), "
                     f"{stats.generated_tokens} generated, tau {stats.mean_accepted_length:.2f}, "
                     f"{time.perf_counter() - t0:.2f} s, finish {finish}")
