"""The HTTP side of `mlxmtp serve`: Starlette routes on uvicorn, OpenAI's endpoints, server-sent events.

Starlette + uvicorn (the ASGI stack vLLM's and SGLang's OpenAI servers run on, through FastAPI) rather than
hand-written HTTP: uvicorn parses HTTP/1.1 (h11), keeps connections alive and reports a client that went away
(a write to it fails), and Starlette streams a response from an async generator and closes it when that happens.
The model runs on one thread of its own (worker.py); the event loop only parses, queues and streams.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Errors are OpenAI error
objects with their status: 400 bad request, 401 missing or wrong API key, 404 unknown route, 503 queue full (with
Retry-After), 500 a generation that failed (the server goes on).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import api
from .worker import Job, QueueFull, Worker

KEEPALIVE_S = 1.0  # an SSE comment this often while a stream waits (queued): a client that left is noticed
RETRY_AFTER_S = 2
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def error_response(e: api.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def make_app(worker: Worker, model_name: str, defaults: dict, context: Optional[int], vocab_size: int,
             api_key: Optional[str] = None) -> Starlette:
    tokenizer = worker.tokenizer

    def authorized(request: HTTPRequest) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_name, "decoding": int(worker.decoding),
                             "queued": worker.waiting, "queue_size": worker.max_queue,
                             "prompt_cache_states": len(worker.cache)})

    async def models(request):
        if not authorized(request):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "mlxmtp"}]})

    def unauthorized():
        return error_response(api.APIError("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                           status=401, code="invalid_api_key"))

    async def complete(request: HTTPRequest, kind: str):
        if not authorized(request):
            return unauthorized()
        try:
            req = api.parse_request(await request.body(), kind, tokenizer, defaults, context, vocab_size)
        except api.APIError as e:
            return error_response(e)
        job = Job(req, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull:
            return error_response(api.APIError(
                f"the server is busy: {worker.max_queue} requests are already waiting; retry later", status=503,
                type="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}))
        if req.stream:
            return StreamingResponse(stream(job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, job)

    async def whole(request: HTTPRequest, job: Job):
        parts = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the job is cancelled below
                    continue
                if event[0] == "error":
                    return error_response(api.APIError(event[1], status=500, type="server_error"))
                _, text, finish, stats = event
                parts.append(text)
                if finish is not None:
                    return JSONResponse(api.response(job.request, model_name, "".join(parts), finish, stats))
        finally:
            job.cancel()  # no-op once finished; stops the generation of a client that went away

    async def stream(job: Job):
        req = job.request
        try:
            if req.kind == "chat":
                yield sse(api.chunk(req, model_name, None, role=True))
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if event[0] == "error":
                    yield sse(api.APIError(event[1], status=500, type="server_error").body())
                    return
                _, text, finish, stats = event
                if text:
                    yield sse(api.chunk(req, model_name, text))
                if finish is not None:
                    final = api.chunk(req, model_name, None if req.kind == "chat" else "", finish)
                    final["mtp"] = api.mtp_stats(req, stats)
                    yield sse(final)
                    if req.include_usage:
                        yield sse(api.usage_chunk(req, model_name, stats))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()

    async def chat_completions(request):
        return await complete(request, "chat")

    async def completions(request):
        return await complete(request, "completion")

    async def http_error(request, exc: HTTPException):
        return error_response(api.APIError(exc.detail, status=exc.status_code,
                                           code="not_found" if exc.status_code == 404 else None))

    async def server_error(request, exc: Exception):
        return error_response(api.APIError(f"internal error: {exc}", status=500, type="server_error"))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (bind errors become one clear line before anything else starts)."""
    from ..errors import MLXMTPError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise MLXMTPError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(app: Starlette, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                            lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
