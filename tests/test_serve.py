"""`mlxmtp serve` as users run it: a live server on a free loopback port, the real `openai` client against it on
the bundled demo model (greedy output equal to mlxmtp.generate, the prompt cache on a follow-up turn), concurrent
clients, the queue bound, a client that leaves mid-stream, bad input, the API key. Every request loop is bounded
in count and time and goes only to 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from click.testing import CliRunner

import mlxmtp
from mlxmtp.cli.main import cli
from mlxmtp.conversation import conversation_ids


START_TIMEOUT_S = 120


class Server:
    def __init__(self, tmp_path, *flags):
        self.log = tmp_path / "serve.log"
        env = {**os.environ, "MLXMTP_CACHE_DIR": str(tmp_path)}
        self.proc = subprocess.Popen([sys.executable, "-m", "mlxmtp", "serve", "--port", "0", *flags],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", self.log.read_text())):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{m.group(1)}"
        while True:  # uvicorn accepts once its loop runs
            try:
                self.get("/health")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kw)

    def get(self, path, headers=None):
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers or {}), timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body, headers=None):
        """(status, headers, JSON body) of a POST with a raw body (bytes) or a JSON object."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def demo():
    return mlxmtp.load(mlxmtp.demo_model_path())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--draft-tokens", "2", "--max-tokens", "32")
    yield s
    s.stop()


def expected(demo, prompt, max_tokens, **kw):
    return mlxmtp.generate(*demo, prompt, max_tokens=max_tokens, draft_tokens=0, **kw)


def chat_expected(demo, messages, max_tokens):
    return expected(demo, conversation_ids(demo[1], messages), max_tokens)


def test_models_and_health(server):
    assert server.get("/health")["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo_model"]


def test_completions_equal_generate(server, demo):
    c = server.client()
    prompt = "def fibonacci(n):"
    want = expected(demo, prompt, 24)
    r = c.completions.create(model="demo_model", prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == want.stats.prompt_tokens and r.usage.completion_tokens == 24
    mtp = r.model_extra["mtp"]
    assert mtp["draft_tokens"] == 2 and mtp["tau"] >= 1 and 0 <= mtp["acceptance_rate"] <= 1
    pieces = list(c.completions.create(model="demo_model", prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"draft_tokens": 1}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want.text
    assert pieces[-1].usage.completion_tokens == 24 and pieces[-1].model_extra["mtp"]["draft_tokens"] == 1
    # token ids as the prompt, and a stop string
    ids = list(demo[1].encode(prompt))
    r = c.completions.create(model="x", prompt=ids, max_tokens=24, temperature=0, stop=[want.text[5:9]])
    assert r.choices[0].text == want.text[: want.text.find(want.text[5:9])] and r.choices[0].finish_reason == "stop"


def test_chat_equals_generate_and_follow_up_reuses_cache(server, demo):
    c = server.client()
    messages = [{"role": "user", "content": "class Stack:"}]
    want = chat_expected(demo, messages, 20)
    r = c.chat.completions.create(model="demo_model", messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model="demo_model", messages=messages, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again
    follow = messages + [{"role": "assistant", "content": want.text},
                         {"role": "user", "content": "    def push(self, x):"}]
    want2 = chat_expected(demo, follow, 16)
    r2 = c.chat.completions.create(model="demo_model", messages=follow, max_tokens=16, temperature=0)
    assert r2.choices[0].message.content == want2.text
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # The server re-encodes the reply's text (conversation.py), which need not give the ids it was generated as:
    # reuse reaches the first position where they differ, less the one the MTP module's rows still need.
    turn1, ids2 = conversation_ids(demo[1], messages) + want.tokens, conversation_ids(demo[1], follow)
    common = next((i for i, (a, b) in enumerate(zip(turn1, ids2)) if a != b), min(len(turn1), len(ids2)))
    assert 0 < cached == common - 1 < r2.usage.prompt_tokens


def test_concurrent_clients_all_complete(server, demo):
    prompts = ["import os", "def main():", "class Node:", "for i in range(10):"]
    want = {p: expected(demo, p, 12).text for p in prompts}
    got, errors = {}, []

    def ask(p):
        try:
            got[p] = _text(server.client(), p)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want


def _text(client, p):
    if p.startswith("d"):  # half of them stream
        return "".join(ch.choices[0].text for ch in client.completions.create(
            model="m", prompt=p, max_tokens=12, temperature=0, stream=True))
    return client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0).choices[0].text


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 1.5}, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 7}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "seed": "s"}, "seed"),
    ({"messages": [{"role": "user", "content": "x"}], "draft_tokens": 99}, "draft_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x " * 4000}]}, "messages"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_chat_request_is_400(server, body, param):
    status, _, err = server.post("/v1/chat/completions", body)
    assert status == 400 and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param


def test_bad_completion_requests_and_routes(server):
    for body in [{"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": [1, -1]}, {"prompt": 5}, {}]:
        status, _, err = server.post("/v1/completions", body)
        assert status == 400 and err["error"]["param"] == "prompt", body
    status, _, err = server.post("/v1/completions", {"prompt": "x " * 4000})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/v1/nothing")
    assert e.value.code == 404 and "error" in json.loads(e.value.read())
    assert server.get("/health")["status"] == "ok"  # still serving


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve1"), "--queue-size", "1", "--api-key", "sekrit", "--draft-tokens", "0")
    yield s
    s.stop()


def test_api_key(small_queue):
    assert small_queue.get("/health")["status"] == "ok"  # open: for load balancers and scripts
    status, _, err = small_queue.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        small_queue.client(api_key="wrong").models.list()
    assert small_queue.client(api_key="sekrit").completions.create(model="m", prompt="x", max_tokens=2).choices


def test_queue_bound_and_disconnect(small_queue, demo):
    auth = {"Authorization": "Bearer sekrit"}
    c = small_queue.client(api_key="sekrit")
    long = c.completions.create(model="m", prompt="import sys", max_tokens=1500, temperature=0, stream=True)
    next(iter(long))  # decoding now
    queued = {}
    t = threading.Thread(target=lambda: queued.update(r=small_queue.post(
        "/v1/completions", {"prompt": "import os", "max_tokens": 8, "temperature": 0}, auth)))
    t.start()
    deadline = time.monotonic() + 30
    while small_queue.get("/health")["queued"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, headers, err = small_queue.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, auth)
    assert status == 503 and headers["Retry-After"] and err["error"]["code"] == "queue_full"
    long.close()  # the client leaves mid-stream: its generation stops, the queued request runs
    t.join(60)
    status, _, body = queued["r"]
    assert status == 200 and body["choices"][0]["text"] == expected(demo, "import os", 8).text
    log = small_queue.log.read_text()
    assert "finish cancelled" in log and re.search(r"\b1500 generated", log) is None
    r = c.completions.create(model="m", prompt="def f():", max_tokens=8, temperature=0)
    assert r.choices[0].text == expected(demo, "def f():", 8).text


def test_cli_errors_and_public_host_warning(monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    r = CliRunner().invoke(cli, ["serve", "--port", str(busy.getsockname()[1])])
    assert r.exit_code == 1 and r.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert len(r.stderr.strip().splitlines()) == 1
    busy.close()
    r = CliRunner().invoke(cli, ["serve", "--port", "70000"])
    assert r.exit_code != 0 and r.stderr.startswith("error: ")

    from mlxmtp.serve import app

    def loopback(host, port):  # the warning depends on --host only: never listen beyond loopback in a test
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        return s

    monkeypatch.setattr(app, "listen", loopback)
    monkeypatch.setattr(app, "run", lambda *a: None)
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and "warning: listening on 0.0.0.0 without --api-key" in r.stderr
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--api-key", "k"])
    assert r.exit_code == 0 and "warning" not in r.stderr
