"""`mlxmtp serve`: an OpenAI-compatible HTTP server (chat completions, completions, models, health) on one model.

The sampling options set the defaults of requests that do not send their own. Binds to 127.0.0.1 unless --host
says otherwise; the API has no authentication unless --api-key is given (then 'Authorization: Bearer KEY').
"""

from __future__ import annotations

import click

from ..errors import MLXMTPError
from .generate import Command, force_option, load_checked, model_option, sampling_options


@click.command(cls=Command)
@model_option
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port")
@click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
@click.option("--queue-size", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait behind the one being decoded; more get 503")
@click.option("--cache-states", type=click.IntRange(min=0), default=4, show_default=True,
              help="decode states the prompt cache keeps (0: no reuse across requests)")
@click.option("--cache-gb", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="memory bound of the prompt cache")
@sampling_options
@force_option
def command(model, host, port, api_key, queue_size, cache_states, cache_gb, max_tokens, temp, top_p, top_k, seed,
            draft_tokens, force_load):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from ..generation import context_length
    from ..prompt_cache import PromptCache
    from ..serve.app import LOOPBACK, listen, make_app, run
    from ..serve.worker import Worker

    if seed is not None:
        raise MLXMTPError("--seed is per request in serve: send \"seed\" in the request body")
    if api_key is not None and not api_key.strip():
        raise MLXMTPError("--api-key is empty")
    sock = listen(host, port)  # before loading: a busy port fails fast
    path, m, tokenizer = load_checked(model, force_load)
    cache = PromptCache(m, max_states=cache_states, max_bytes=int(cache_gb * 1e9))
    worker = Worker(m, tokenizer, cache, queue_size, log=lambda line: click.echo(line, err=True))
    defaults = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, draft_tokens=draft_tokens)
    app = make_app(worker, path.name, defaults, context_length(m), m.args.vocab_size, api_key)
    bound_host, bound_port = sock.getsockname()[:2]
    if host not in LOOPBACK and api_key is None:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use "
                   "the API", err=True)
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"serving {path.name} ({m.num_mtp_modules} MTP module(s), draft tokens {draft_tokens}) on "
               f"http://{url_host}:{bound_port}/v1", err=True)
    run(app, sock)
