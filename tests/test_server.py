"""serve.py's HTTP API over real sockets on 127.0.0.1: OpenAI-style completions and chat, streaming,
errors, client disconnects, metrics, the chat page in headless Chromium, and the command line."""
import base64
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine import Engine
from gpt import GPT, GPTConfig
from inference import generate
import openai_api
from sampling import SamplingParams
from serve import make_server
from tokenizer import EOT, encode_prompt, get_tokenizer
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256)).eval()
    engine = Engine(model, max_num_seqs=64)
    srv = make_server(engine, port=0, model_name="tiny", max_waiting=64)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.api.loop.stop()


def call(srv, method, path, body=None, headers=None, raw=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    ctype = r.getheader("Content-Type", "")
    return r.status, (json.loads(payload) if "json" in ctype else payload.decode())


def sse_events(text):
    """The JSON payloads of an SSE body; asserts it is well formed and ends with [DONE]."""
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def wait_until(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def idle(srv):
    e = srv.api.loop.engine
    return not e.has_work() and e.blocks.num_free == len(e.blocks.blocks)


def test_completion_schema_usage_and_logprobs(server):
    status, r = call(server, "POST", "/v1/completions",
                     {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "logprobs": 2})
    assert status == 200, r
    assert r["object"] == "text_completion" and r["model"] == "tiny" and r["id"].startswith("cmpl-")
    c = r["choices"][0]
    assert c["index"] == 0 and c["finish_reason"] == "length"  # (this random model never ends this early)
    n = r["usage"]["completion_tokens"]
    assert n == 5 and r["usage"]["prompt_tokens"] == 4 and r["usage"]["total_tokens"] == 4 + n
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == c["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    for tok, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen <= 0 and top[tok] == chosen and chosen == max(top.values())  # greedy: the best


def test_stream_equals_non_stream_and_n_choices(server):
    body = {"prompt": [[464, 2068, 7586], "Hello"], "max_tokens": 12, "temperature": 0, "n": 2}
    status, full = call(server, "POST", "/v1/completions", body)
    assert status == 200 and len(full["choices"]) == 4
    assert full["choices"][0]["text"] == full["choices"][1]["text"]  # greedy: both samples agree
    status, text = call(server, "POST", "/v1/completions",
                        {**body, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(text)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert all(ev["usage"] is None for ev in events[:-1])  # include_usage: null until the last chunk
    assert full["usage"]["prompt_tokens"] == 3 + 1  # each prompt counted once, whatever n is ("Hello" is 1 token)
    texts, reasons = ["", "", "", ""], [None] * 4
    for ev in events[:-1]:
        for c in ev["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                assert reasons[c["index"]] is None
                reasons[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in full["choices"]]
    assert reasons == [c["finish_reason"] for c in full["choices"]]


def test_chat_completion_stream_and_non_stream(server):
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
            "max_tokens": 10, "temperature": 0}
    status, r = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and r["object"] == "chat.completion"
    msg = r["choices"][0]["message"]
    # the answer generate.py gives to the chat template's prompt for these messages, system prompt included
    ids = encode_prompt(body["messages"], "chat", server.api.enc)
    want = "".join(generate(server.api.loop.engine.model, ids, SamplingParams(max_tokens=10, temperature=0.0),
                            server.api.enc)).lstrip()
    assert msg["role"] == "assistant" and msg["content"] == want and want
    assert r["usage"]["prompt_tokens"] == len(ids)
    status, text = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    events = sse_events(text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == msg["content"]
    assert events[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]


def test_chat_answer_has_no_leading_whitespace(server, monkeypatch):
    """The template cues the answer after "Assistant:" and the model answers " Hi": the API gives "Hi",
    in the message and in the first streamed delta, skipping a piece that is whitespace only."""
    enc = server.api.enc
    script = [enc.encode(" ")[0], enc.encode(" Hi")[0], enc.encode(" there")[0]]  # " ", " Hi", " there", ...
    scripted_model(server, monkeypatch, script)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
    status, r = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and r["choices"][0]["message"]["content"] == "Hi there there"
    status, text = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    deltas = [e["choices"][0]["delta"].get("content") for e in sse_events(text)[1:]]
    assert [d for d in deltas if d] == ["Hi", " there", " there"]


def test_a_client_that_stops_sending_its_body_times_out(server, monkeypatch):
    import serve
    assert serve.Handler.timeout and serve.Handler.timeout <= 300  # by default, a bounded wait
    monkeypatch.setattr(serve.Handler, "timeout", 0.5)  # (shortened for the test)
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        reply = s.recv(4096)  # the 100 bytes never come: the server gives up rather than wait forever
    assert reply.startswith(b"HTTP/1.0 408"), reply


def drip(server, data, every=0.05):
    """Send `data` a byte at a time, `every` seconds apart (until the server answers); its answer and
    how long it took."""
    start = time.monotonic()
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        for byte in data:
            if select.select([s], [], [], every)[0]:
                break  # the server has answered (or closed)
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
        return s.makefile("rb").read(), time.monotonic() - start


@pytest.mark.parametrize("data", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200,  # the headers never end
    b"POST /v1/completions HTTP/1.1\r\nContent-Length: 200\r\n\r\n" + b" " * 200,  # nor does the body
])
def test_a_request_dripped_a_byte_at_a_time_gets_408_at_the_deadline(server, monkeypatch, data):
    assert server.request_timeout == 30.0  # the default: a whole request, headers and body
    monkeypatch.setattr(server, "request_timeout", 0.5)  # (shortened for the test: each byte comes in time)
    reply, seconds = drip(server, data)
    assert reply.startswith(b"HTTP/1.0 408") and b"--request-timeout" in reply, reply
    assert seconds < 3, seconds  # (a per-read timeout alone would wait for as long as bytes keep coming)
    assert call(server, "GET", "/health")[0] == 200


def test_connections_beyond_the_cap_get_a_quick_503(server, monkeypatch):
    assert server.max_connections == 512  # the default
    assert wait_until(lambda: server.num_connections == 0)
    monkeypatch.setattr(server, "max_connections", 2)
    idle_sockets = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(2)]
    try:
        assert wait_until(lambda: server.num_connections == 2)
        start = time.monotonic()
        status, r = call(server, "GET", "/health")
        assert status == 503 and r["error"]["code"] == "too_many_connections", r
        assert "--max-connections" in r["error"]["message"] and time.monotonic() - start < 2
    finally:
        for s in idle_sockets:
            s.close()
    assert wait_until(lambda: server.num_connections == 0)  # each closed connection counted out
    assert call(server, "GET", "/health")[0] == 200


def test_help_shows_defaults(capsys):
    import serve
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "(default: 8000)" in out and "(default: 64)" in out


def test_64_concurrent_streaming_clients(server):
    prompts = [f"Story number {i}:" for i in range(64)]
    expected = {}
    for p in prompts[:4]:  # what each prompt gives alone, for a few of them
        expected[p] = call(server, "POST", "/v1/completions", {"prompt": p, "max_tokens": 16, "temperature": 0})[1]

    def client(p):
        status, text = call(server, "POST", "/v1/completions",
                            {"prompt": p, "max_tokens": 16, "temperature": 0, "stream": True,
                             "stream_options": {"include_usage": True}})
        assert status == 200
        events = sse_events(text)
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert reasons == ["length"] and events[-1]["usage"]["completion_tokens"] == 16  # (no <|endoftext|> here)
        return "".join(c["text"] for e in events for c in e["choices"])

    with ThreadPoolExecutor(64) as pool:
        texts = list(pool.map(client, prompts))
    for p, t in zip(prompts, texts):
        if p in expected:
            assert t == expected[p]["choices"][0]["text"]  # batched with 63 others, same tokens
    assert wait_until(lambda: idle(server))


def scripted_model(server, monkeypatch, script):
    """Make the engine's model say `script` (token ids): the k-th token of every sequence is
    script[k], the last one repeated once the script runs out."""
    runner = server.api.loop.engine.runner

    def scripted(batch):  # logits that pick script[k] as the k-th token of every sequence
        logits = torch.zeros(len(batch), runner.model.config.vocab_size)
        for i, seq in enumerate(batch):
            logits[i, script[min(len(seq.output_ids), len(script) - 1)]] = 1.0
        return logits
    monkeypatch.setattr(runner, "run", scripted)


def slow_engine(server, monkeypatch, delay=0.02):
    """Slow each engine step down, so a long request is surely still running when its client leaves."""
    runner = server.api.loop.engine.runner
    run = runner.run
    monkeypatch.setattr(runner, "run", lambda batch: (time.sleep(delay), run(batch))[1])


def open_request(server, body):
    sock = socket.create_connection(server.server_address[:2])
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def test_client_disconnect_mid_stream_frees_blocks(server, monkeypatch):
    slow_engine(server, monkeypatch)
    engine = server.api.loop.engine
    aborted = engine.stats.aborted
    socks = [open_request(server, {"prompt": f"A long tale {i}", "max_tokens": 200, "stream": True}) for i in range(4)]
    for s in socks:
        got = b""
        while got.count(b"data: ") < 2:  # the stream has started
            got += s.recv(4096)
        s.close()
    assert wait_until(lambda: idle(server))
    assert engine.stats.aborted == aborted + 4


def test_client_disconnect_while_waiting_non_stream_frees_blocks(server, monkeypatch):
    slow_engine(server, monkeypatch)
    engine = server.api.loop.engine
    aborted = engine.stats.aborted
    s = open_request(server, {"prompt": "A long tale", "max_tokens": 200})
    assert wait_until(lambda: engine.num_running == 1)
    s.close()
    assert wait_until(lambda: idle(server))
    assert engine.stats.aborted == aborted + 1


def test_errors_are_openai_style_and_the_server_keeps_serving(server, monkeypatch):
    cases = [
        ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("POST", "/v1/completions", {"prompt": "x", "n": True}, 400, "n"),
        ("POST", "/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
        ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("POST", "/v1/completions", {"prompt": [99999999]}, 400, "prompt"),
        ("POST", "/v1/completions", [1, 2], 400, None),
        ("POST", "/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),  # unsupported: refused, not ignored
        ("POST", "/v1/completions", {"prompt": "x", "echo": 1}, 400, "echo"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, 400, "echo"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
         400, "top_logprobs"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                          "top_logprobs": 21}, 400, "top_logprobs"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "presence_penalty": 0.5}, 400, "presence_penalty"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ("GET", "/v1/nothing", None, 404, None),
        ("GET", "/v1/completions", None, 405, None),
        ("DELETE", "/v1/models", None, 405, None),
        ("POST", "/v1/completions", {"prompt": "x", "n": 65}, 400, "n"),
        ("POST", "/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
        ("POST", "/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
        ("POST", "/v1/completions", {"prompt": "x", "seed": 2**63 - 1, "n": 2}, 400, "seed"),  # the 2nd gets seed+1
    ]
    for method, path, body, code, param in cases:
        status, r = call(server, method, path, body)
        assert status == code, (path, body, r)
        assert set(r["error"]) == {"message", "type", "param", "code"} and r["error"]["message"]
        assert r["error"]["param"] == param
    # the prompt plus max_tokens beyond the context
    status, r = call(server, "POST", "/v1/completions", {"prompt": [1] * 200, "max_tokens": 100})
    assert status == 400 and "maximum context length is 256 tokens; you requested 300" in r["error"]["message"]
    assert r["error"]["code"] == "context_length_exceeded" and r["error"]["param"] == "max_tokens"
    # a prompt that fills the context alone: named as the problem, whatever max_tokens is (or isn't)
    long_chat = {"messages": [{"role": "user", "content": "word " * 300}]}
    for path, body, param in [("/v1/chat/completions", long_chat, "messages"),
                              ("/v1/chat/completions", {**long_chat, "max_tokens": 5}, "messages"),
                              ("/v1/completions", {"prompt": [1] * 256}, "prompt")]:
        status, r = call(server, "POST", path, body)
        assert status == 400 and r["error"]["param"] == param, r
        assert r["error"]["code"] == "context_length_exceeded"
        assert re.search(r"maximum context length is 256 tokens; you requested \d+", r["error"]["message"])
    # the largest seed that leaves room for the n-th choice's seed+n-1 is fine
    status, r = call(server, "POST", "/v1/completions", {"prompt": "x", "seed": 2**63 - 2, "n": 2, "max_tokens": 2})
    assert status == 200, r
    # invalid JSON, and a body over the limit (announced, never sent)
    status, r = call(server, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in r["error"]["message"]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]["message"]
    conn.close()
    # a body cut short (the client half-closes early), and two Content-Lengths that disagree
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for head in (b"Content-Length: 1000\r\n", b"Content-Length: %d\r\nContent-Length: 9\r\n" % len(body)):
        with socket.create_connection(server.server_address[:2]) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\n" + head + b"\r\n" + body)
            s.shutdown(socket.SHUT_WR)
            reply = s.makefile("rb").read()
        assert reply.startswith(b"HTTP/1.0 400") and (b"ended after" in reply or b"conflicting" in reply), reply
    # garbage instead of HTTP
    with socket.create_connection(server.server_address[:2]) as s:
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.0 400")
    # authentication
    monkeypatch.setattr(server, "api_key", "sesame")
    assert call(server, "GET", "/v1/models")[0] == 401
    status, r = call(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and r["error"]["type"] == "authentication_error"
    assert call(server, "GET", "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
    assert call(server, "GET", "/v1/models", headers={"Authorization": "bearer sesame"})[0] == 200  # any case
    assert call(server, "GET", "/v1/models", headers={"Authorization": "Basic sesame"})[0] == 401
    monkeypatch.setattr(server, "api_key", None)
    # a full queue: hold the engine so requests pile up, then one more is refused
    loop = server.api.loop
    slow_engine(server, monkeypatch, delay=0.05)
    monkeypatch.setattr(loop, "max_waiting", 2)
    monkeypatch.setattr(loop.engine.scheduler, "max_num_seqs", 1)
    busy = [{"prompt": f"busy {i}", "max_tokens": 100, "stream": True} for i in range(3)]
    socks = [open_request(server, busy[0])]
    # (the first must be running before the others arrive: until the engine's next step takes it from
    # the inbox it is waiting too, and the third would be refused as a fourth)
    assert wait_until(lambda: loop.engine.num_running == 1)
    socks += [open_request(server, body) for body in busy[1:]]
    assert wait_until(lambda: loop.engine.num_running == 1 and loop.engine.num_waiting == 2)
    status, r = call(server, "POST", "/v1/completions", {"prompt": "one more", "max_tokens": 2})
    assert status == 503 and r["error"]["code"] == "queue_full"
    for s in socks:
        s.close()
    assert wait_until(lambda: idle(server))
    # and after all that, the server still answers
    status, r = call(server, "POST", "/v1/completions", {"prompt": "still there?", "max_tokens": 3})
    assert status == 200 and r["usage"]["completion_tokens"] >= 1


def test_metrics_are_open_unless_asked_to_need_the_key(server, monkeypatch):
    monkeypatch.setattr(server, "api_key", "sesame")
    assert server.metrics_need_key is False  # the default: Prometheus scrapes without credentials
    assert call(server, "GET", "/metrics")[0] == 200 and call(server, "GET", "/v1/models")[0] == 401
    monkeypatch.setattr(server, "metrics_need_key", True)  # --metrics-need-key
    assert call(server, "GET", "/metrics")[0] == 401
    assert call(server, "GET", "/metrics", headers={"Authorization": "Bearer sesame"})[0] == 200
    assert call(server, "GET", "/health")[0] == 200  # (a health probe never needs it)


def test_verbose_logs_hide_a_key_sent_in_the_url(server, monkeypatch, capfd):
    monkeypatch.setattr(server, "verbose", True)
    call(server, "GET", "/?key=sesame&temperature=0")
    call(server, "GET", "/v1/models?API_KEY=sesame")
    err = capfd.readouterr().err  # (a request is logged as its status line is sent: before call() returns)
    assert err.lower().count("key=[redacted]") == 2 and "sesame" not in err and "temperature=0" in err, err


def test_models_health_and_metrics(server):
    status, r = call(server, "GET", "/v1/models")
    assert status == 200 and r["data"][0]["id"] == "tiny"
    assert call(server, "GET", "/health")[0] == 200
    call(server, "POST", "/v1/completions", {"prompt": "count me", "max_tokens": 3})
    status, text = call(server, "GET", "/metrics")
    assert status == 200
    values = dict(re.findall(r"^(serve_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    for name in ("serve_requests_running", "serve_requests_waiting", "serve_kv_blocks_used", "serve_kv_blocks_total",
                 "serve_preemptions_total", "serve_prefix_cache_hits_total", "serve_prompt_tokens_total",
                 "serve_generation_tokens_total", "serve_time_to_first_token_seconds_count"):
        assert name in values, name
    assert float(values["serve_generation_tokens_total"]) >= 3
    assert float(values["serve_time_to_first_token_seconds_count"]) >= 1
    assert float(values['serve_time_to_first_token_seconds_bucket{le="+Inf"}']) == \
        float(values["serve_time_to_first_token_seconds_count"])


def test_health_is_503_until_the_model_is_attached():
    srv = make_server(port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert call(srv, "GET", "/health")[0] == 503
        assert call(srv, "POST", "/v1/completions", {"prompt": "x"})[0] == 503
        assert call(srv, "GET", "/")[0] == 200  # the page can load meanwhile
    finally:
        srv.shutdown()


class Chromium:
    """Headless Chromium driven over its DevTools pipe (fd 3: commands in, fd 4: replies out, each a
    JSON message ended by a NUL byte): standard library only, no websockets."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe"]

    def __init__(self, browser, url, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', browser, *self.FLAGS,
             f"--user-data-dir={profile}", url],
            pass_fds=(cmd_r, out_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group, so close() ends its helper processes too
        os.close(cmd_r)
        os.close(out_w)
        self.buf, self.last_id = b"", 0

    def send(self, method, session=None, timeout=30, **params):
        self.last_id += 1
        msg = {"id": self.last_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" not in self.buf:
                ready, _, _ = select.select([self.out_r], [], [], max(0.0, deadline - time.time()))
                chunk = os.read(self.out_r, 1 << 16) if ready else b""
                assert chunk, f"no answer from Chromium to {method}"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last_id:  # (events in between are skipped)
                assert "error" not in reply, reply
                return reply["result"]

    def page_session(self):
        assert wait_until(lambda: any(t["type"] == "page" for t in self.send("Target.getTargets")["targetInfos"]))
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        return self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]

    def evaluate(self, session, expression, wait=False, gesture=False):
        """`expression`'s value in the page; wait: for the promise it gives; gesture: as if the user
        did it (what a click on a copy button is)."""
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=wait,
                         userGesture=gesture)["result"].get("value")

    def screenshot(self, session, path):
        """The whole page as it is drawn now (scrolled parts too), a PNG, also saved at `path` (to look at)."""
        shot = self.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
        png = base64.b64decode(shot["data"])
        Path(path).write_bytes(png)
        return png

    def close(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # Chromium's zygote and renderers, not only the browser
        self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.out_r)


def browser_or_fail():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert browser, "headless Chromium is needed for this test: apt-get update && apt-get install -y chromium"
    return browser


def test_chat_page_streams_with_its_settings_copies_stops_and_starts_a_new_chat_in_headless_chromium(server, monkeypatch):
    """One browser for the page's controls, each checked against what the API itself answers: the URL's
    settings, the model's name, the system prompt and sampling fields, copy, New chat and Stop."""
    def api_chat(messages, **fields):  # the API's own (greedy) answer to these messages
        status, r = call(server, "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, **fields})
        assert status == 200, r
        return r
    first = api_chat([{"role": "user", "content": "hello"}], max_tokens=12)
    expected = first["choices"][0]["message"]["content"]
    host, port = server.server_address[:2]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        chrome = Chromium(browser_or_fail(), f"http://{host}:{port}/?q=hello&temperature=0&max_tokens=12", profile)
        try:
            session = chrome.page_session()
            js = lambda expression, **kw: chrome.evaluate(session, expression, **kw)  # noqa: E731
            status = lambda: js("document.getElementById('status')?.textContent")  # noqa: E731
            assert wait_until(lambda: (status() or "").startswith("done"), timeout=60), status()
            bubbles = "[...document.querySelectorAll('.msg')].map(d => d.className + ':' + d.textContent)"
            assert js(bubbles) == ["msg user:hello", "msg assistant:" + expected]
            # ?temperature= and ?max_tokens= are the fields' first values; the tokens counted are the API's
            assert js('["temperature", "top_p", "max_tokens"].map(n => $(n).value)') == ["0", "", "12"]
            usage = first["usage"]
            assert f"prompt {usage['prompt_tokens']} tokens, answer {usage['completion_tokens']}" in status(), status()
            # the header names the served model
            assert wait_until(lambda: js("$('model').textContent") == server.api.model_name == "tiny")
            # copy: the answer onto the clipboard, by navigator.clipboard where it may be used ...
            chrome.send("Browser.grantPermissions", origin=f"http://{host}:{port}",
                        permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
            clipboard = lambda: js("navigator.clipboard.readText()", wait=True)  # noqa: E731
            js("document.querySelector('.copy').click()", gesture=True)
            assert wait_until(lambda: js("document.querySelector('.copy').textContent") == "copied")
            assert js("document.querySelector('.copy').dataset.via") == "clipboard" and clipboard() == expected
            # the system prompt and sampling fields as typed: the API's answer to the same messages, and
            # temperature 1 with a top-p this small is greedy (only the likeliest token is left to draw)
            system = "You are a pirate. Answer in one line."
            fields = {"system": system, "temperature": "1", "top_p": "0.000001", "max_tokens": "6"}
            js(f"""for (const [name, value] of Object.entries({json.dumps(fields)})) {{
                       $(name).value = value; $(name).dispatchEvent(new Event("change")); }}""")  # as if typed
            js('send("Who are you?")', wait=True)
            history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": expected},
                       {"role": "user", "content": "Who are you?"}]
            second = api_chat([{"role": "system", "content": system}, *history], max_tokens=6)
            answer = second["choices"][0]["message"]["content"]
            assert answer != expected  # (so the clipboard below tells the two copies apart)
            assert js("[...document.querySelectorAll('.msg')].pop().textContent") == answer
            usage = second["usage"]
            assert f"prompt {usage['prompt_tokens']} tokens, answer {usage['completion_tokens']}" in status(), status()
            assert usage["prompt_tokens"] > call(server, "POST", "/tokenize", {"messages": history})[1]["count"]
            assert js("messages") == history + [{"role": "assistant", "content": answer}]  # (the system prompt: the field's)
            assert js('JSON.parse(localStorage.getItem("chatSettings")).system') == system  # kept for next time
            # ... and by a selected textarea and execCommand("copy") where it may not (plain http)
            js('navigator.clipboard.writeText = () => Promise.reject(new DOMException("not here", "NotAllowedError"))')
            last_copy = "[...document.querySelectorAll('.copy')].pop()"
            js(f"{last_copy}.click()", gesture=True)
            assert wait_until(lambda: js(f"{last_copy}.textContent") == "copied")
            assert js(f"{last_copy}.dataset.via") == "execCommand" and clipboard() == answer
            png = chrome.screenshot(session, Path(tempfile.gettempdir()) / "chat_page.png")
            assert png.startswith(b"\x89PNG") and len(png) > 1000
            # New chat: an empty log and conversation, the settings as they were
            js("$('new').click()")
            assert js("[messages.length, document.querySelectorAll('#log > *').length, status.textContent]") == \
                [0, 0, "new chat"]
            assert js(f"{json.dumps(list(fields))}.map(n => $(n).value)") == list(fields.values())
            # Stop: a long answer ends early; what came stays (the beginning of the API's answer), the engine is idle
            story = [{"role": "system", "content": system}, {"role": "user", "content": "Tell me a long story."}]
            full = api_chat(story, max_tokens=200)
            assert full["choices"][0]["finish_reason"] == "length"
            full = full["choices"][0]["message"]["content"]
            engine = server.api.loop.engine
            aborted = engine.stats.aborted
            slow_engine(server, monkeypatch, delay=0.05)  # (200 tokens: 10 s, if Stop did nothing)
            js('$("max_tokens").value = "200"; send("Tell me a long story.")')
            shown = "[...document.querySelectorAll('.msg')].pop().textContent"
            assert wait_until(lambda: js(shown))  # (some text has come)
            assert js('[$("send").disabled, $("stop").disabled]') == [True, False]  # while answering
            js("$('stop').click()")
            assert wait_until(lambda: status() == "stopped"), status()
            assert js('[$("send").disabled, $("stop").disabled]') == [False, True]
            partial = js(shown)
            assert 0 < len(partial) < len(full) and full.startswith(partial), (partial, full)
            assert js("messages") == [story[1], {"role": "assistant", "content": partial}]  # the conversation keeps it
            assert wait_until(lambda: idle(server)) and engine.stats.aborted == aborted + 1
            # a browser that blocks site data (storage throws SecurityError): the page still asks and answers
            monkeypatch.undo()  # (the engine at full speed again)
            chrome.send("Page.enable", session)
            chrome.send("Page.addScriptToEvaluateOnNewDocument", session, source="""
                for (const name of ["localStorage", "sessionStorage"])
                  Object.defineProperty(window, name, {get() { throw new DOMException("blocked", "SecurityError"); }});""")
            # (another URL than the first: a reload of the same one would bring back the fields as typed)
            chrome.send("Page.navigate", session, url=f"http://{host}:{port}/?max_tokens=12&temperature=0&q=hello")
            assert wait_until(lambda: (status() or "").startswith("done"), timeout=60), status()
            assert js(bubbles) == ["msg user:hello", "msg assistant:" + expected]
            assert js('try { localStorage; "readable" } catch (e) { e.name }') == "SecurityError"  # (it was blocked)
        finally:
            chrome.close()


def serve_command(checkpoint, *flags):
    """`python serve.py --model CHECKPOINT --port 0 FLAGS` as a process, its output (stdout and stderr) on a pipe."""
    return subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(checkpoint), "--port", "0", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stops_cleanly(proc, *signals):
    """Send the signals 50 ms apart; the server must exit 0 having said so, with no traceback or abort.
    Returns its output."""
    for i, sig in enumerate(signals):
        if i:
            time.sleep(0.05)
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    out = proc.stdout.read()
    assert "shutting down" in out and "terminate called" not in out and "Traceback" not in out, out
    return out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a process manager's stop
def test_command_line_serves_a_checkpoint(tmp_path, stop):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).save_checkpoint(tmp_path, template="alpaca")
    proc = serve_command(tmp_path, "--api-key", "k")
    try:
        line = proc.stdout.readline()
        port = int(re.search(r":(\d+)/", line).group(1))
        conn = lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # noqa: E731

        def get(path, body=None):
            c = conn()
            c.request("POST" if body else "GET", path, body=json.dumps(body) if body else None,
                      headers={"Authorization": "Bearer k"})
            r = c.getresponse()
            return r.status, r.read()

        assert wait_until(lambda: get("/health")[0] == 200, timeout=60)
        messages = [{"role": "user", "content": "Hi"}]
        status, data = get("/v1/chat/completions", {"messages": messages, "max_tokens": 4})
        assert status == 200 and json.loads(data)["model"] == str(tmp_path)
        # the prompt is in the checkpoint's template (alpaca's preamble), not the default chat one
        assert json.loads(data)["usage"]["prompt_tokens"] == len(encode_prompt(messages, "alpaca", get_tokenizer()))
        # Ctrl-C or SIGTERM (twice) while a request streams: the server stops its engine first and exits
        # cleanly (it used to leave the engine thread mid-step and die with SIGABRT; SIGTERM killed it; a
        # second signal interrupted the shutdown)
        c = conn()
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "Go", "max_tokens": 100, "n": 16,
                                                                 "stream": True}),
                  headers={"Authorization": "Bearer k"})
        r = c.getresponse()
        assert r.status == 200 and r.fp.readline().startswith(b"data: ")  # the answer is under way
        stops_cleanly(proc, stop, stop)  # impatient: a second signal must not cut the shutdown short
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
                  if line.startswith("data: {")]  # the stream tells why it ends: not an engine failure
        assert events[-1]["error"] == {"message": "the server is shutting down", "type": "server_error",
                                       "param": None, "code": "shutting_down"}, events[-1]
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_command_line_with_a_kv_cache_too_small_says_so_in_one_line(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).save_checkpoint(tmp_path)
    bad = serve_command(tmp_path, "--kv-cache-memory", "64KB")
    out = bad.communicate(timeout=120)[0]
    assert bad.returncode == 2 and "one full-context sequence needs" in out and "Traceback" not in out, out


def test_command_line_stopped_while_loading_exits_cleanly(tmp_path):
    """SIGTERM before the server is ready (a 2 GB KV cache takes seconds to build here): no traceback."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).save_checkpoint(tmp_path)
    proc = serve_command(tmp_path, "--kv-cache-memory", "2GB")
    try:
        assert proc.stdout.readline().startswith("listening on")
        assert "ready:" not in stops_cleanly(proc, signal.SIGTERM)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_during_shutdown_requests_get_503_and_after_it_connections_are_refused(monkeypatch):
    """shut_down() (what Ctrl-C and SIGTERM run) answers every request that arrives while it waits for
    the last answers with a 503, then closes the listener: never a connection accepted and then reset."""
    import serve
    monkeypatch.setattr(serve.signal, "signal", lambda *args: None)  # (the test's process keeps its handlers)
    torch.manual_seed(0)
    srv = make_server(Engine(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    answers = []

    def a_request_being_answered():  # holds shut_down's wait, and asks while it lasts
        with srv.answering():
            assert wait_until(lambda: srv.stopping, timeout=10)
            answers.append(call(srv, "GET", "/health"))
            answers.append(call(srv, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}))
    holder = threading.Thread(target=a_request_being_answered)
    holder.start()
    assert wait_until(lambda: srv.num_answering == 1)
    serve.shut_down(srv, srv.api.loop)
    holder.join(timeout=10)
    assert [status for status, _ in answers] == [503, 503], answers
    assert all(r["error"]["code"] == "shutting_down" for _, r in answers), answers
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(srv.server_address[:2], timeout=5)


def test_engine_failure_answers_500_and_the_server_recovers(server, monkeypatch):
    runner = server.api.loop.engine.runner
    monkeypatch.setattr(runner, "run", lambda batch: 1 / 0)
    status, r = call(server, "POST", "/v1/completions", {"prompt": "boom", "max_tokens": 3})
    assert status == 500 and r["error"]["type"] == "server_error"
    status, text = call(server, "POST", "/v1/completions", {"prompt": "boom", "max_tokens": 3, "stream": True})
    assert status == 200 and "the engine failed" in text and text.endswith("data: [DONE]\n\n")
    monkeypatch.undo()
    assert wait_until(lambda: idle(server))
    status, r = call(server, "POST", "/v1/completions", {"prompt": "fine again", "max_tokens": 3})
    assert status == 200


def test_a_request_whose_sampling_fails_fails_alone(server, monkeypatch):
    """A sampler error in one row ends that request with a 500 (or an error event); the requests
    batched with it go on to their normal end."""
    import engine as engine_module
    real = engine_module.sample

    def flaky(logits, temperature, *args, **kwargs):  # (the engine samples its whole batch in one call)
        if 1.25 in (temperature if isinstance(temperature, list) else [temperature]):
            raise RuntimeError("sampler exploded")
        return real(logits, temperature, *args, **kwargs)

    monkeypatch.setattr(engine_module, "sample", flaky)
    slow_engine(server, monkeypatch)
    engine = server.api.loop.engine
    result = {}
    innocent = threading.Thread(target=lambda: result.update(r=call(
        server, "POST", "/v1/completions", {"prompt": "An innocent request", "max_tokens": 40, "temperature": 0.7,
                                            "seed": 3})))
    innocent.start()
    assert wait_until(lambda: engine.num_running == 1)
    status, r = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 1.25})
    assert status == 500 and "sampler exploded" in r["error"]["message"]
    status, text = call(server, "POST", "/v1/completions",
                        {"prompt": "x", "max_tokens": 30, "temperature": 1.25, "n": 2, "stream": True})
    assert status == 200 and "sampler exploded" in text and text.endswith("data: [DONE]\n\n")
    innocent.join()
    status, r = result["r"]
    assert status == 200 and r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 40
    assert wait_until(lambda: idle(server))  # the failed sequences' blocks (and the aborted sibling's) are free


def test_request_limits_json_depth_stop_strings_queue_and_max_completion_tokens(server, monkeypatch):
    import serve
    cases = [
        (b"[" * 100000, None),  # nested past the parser's recursion limit
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),  # past Python's int-parsing limit
        (json.dumps({"prompt": "x", "stop": ["x" * (openai_api.MAX_STOP_CHARS + 1)]}).encode(), "stop"),
        (json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    ]
    for raw, param in cases:
        status, r = call(server, "POST", "/v1/completions", raw=raw)
        assert status == 400 and r["error"]["param"] == param, (raw[:40], r)
    status, r = call(server, "POST", "/v1/completions",
                     {"prompt": "x", "max_tokens": 2, "stop": ["x" * openai_api.MAX_STOP_CHARS] * openai_api.MAX_STOP})
    assert status == 200, r
    # chat: a null max_tokens does not hide max_completion_tokens
    status, r = call(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": None, "max_completion_tokens": 0})
    assert status == 400 and r["error"]["param"] == "max_completion_tokens", r
    # a request with more sequences (prompts x n) than one request may have: 400 naming the limit
    assert server.api.loop.max_seqs_per_request == 64  # (make_server's default)
    status, r = call(server, "POST", "/v1/completions", {"prompt": ["x"] * 5, "n": 16, "max_tokens": 1})
    assert status == 400 and "asks for 80 sequences" in r["error"]["message"], r
    monkeypatch.setattr(server.api.loop, "max_seqs_per_request", 2)
    status, r = call(server, "POST", "/v1/completions", {"prompt": "x", "n": 3, "max_tokens": 2})
    assert status == 400 and "at most 2 per request (--max-seqs-per-request)" in r["error"]["message"], r
    assert call(server, "POST", "/v1/completions", {"prompt": "x", "n": 2, "max_tokens": 2})[0] == 200
    with pytest.raises(ValueError, match="max_waiting"):
        serve.EngineLoop(server.api.loop.engine, max_waiting=0)


@pytest.mark.parametrize("argv, message", [
    (["--max-waiting", "0"], "--max-waiting must be >= 1"),
    (["--max-seqs-per-request", "0"], "--max-seqs-per-request must be in 1..--max-waiting (256)"),
    (["--max-waiting", "8", "--max-seqs-per-request", "9"], "--max-seqs-per-request must be in 1..--max-waiting (8)"),
    (["--request-timeout", "0"], "--request-timeout must be a positive number"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--metrics-need-key"], "--metrics-need-key needs --api-key"),
    (["--api-key", ""], "--api-key is empty"),  # (it would turn authentication off)
    (["--model", "no/such/checkpoint"], "no such file"),  # a path: checked before anything listens
])
def test_bad_serving_flags_are_refused_in_one_line(argv, message, capsys):
    import serve
    with pytest.raises(SystemExit) as e:
        serve.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "listening" not in out


def test_a_client_that_half_closes_gets_the_whole_answer(server, monkeypatch):
    """shutdown(SHUT_WR) after the request only says "nothing more to send": the answer still comes."""
    engine = server.api.loop.engine
    aborted = engine.stats.aborted
    body = {"prompt": "Half closed", "max_tokens": 20, "temperature": 0}
    expected = call(server, "POST", "/v1/completions", body)[1]["choices"][0]["text"]
    slow_engine(server, monkeypatch)  # 20 steps of 20 ms: the handler surely looks at the socket meanwhile
    for stream in (False, True):
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json"})
        conn.sock.shutdown(socket.SHUT_WR)
        r = conn.getresponse()  # (skips the interim "100 Continue" the server may send as a probe)
        payload = r.read().decode()
        conn.close()
        assert r.status == 200, payload
        if stream:  # (SSE comments, ": ...", are probes too: clients skip them)
            events = sse_events("\n\n".join(e for e in payload.split("\n\n") if not e.startswith(":")))
            text = "".join(c["text"] for e in events for c in e["choices"])
        else:
            text = json.loads(payload)["choices"][0]["text"]
        assert text == expected
    assert engine.stats.aborted == aborted


def test_a_refused_request_with_a_body_reliably_gets_its_error(server):
    """413, 404, 405: the body is read (and dropped) before the error is sent, so a client that sends
    its whole body first reads the error instead of a connection reset."""
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    mid = json.dumps({"prompt": "x" * (600 << 10)}).encode()
    for path, data, code in [("/v1/completions", big, 413), ("/v1/nothing", mid, 404), ("/health", mid, 405)]:
        for _ in range(20):  # (without the draining, about half of these were a BrokenPipeError)
            status, r = call(server, "POST", path, raw=data)
            assert status == code and r["error"]["message"]


def test_a_client_that_resets_before_reading_its_error_leaves_no_traceback(server, capfd):
    """A client that sends a bad request and resets the connection: the server has no one to answer,
    and must neither log a traceback per such request (a log flood) nor stop serving."""
    before = threading.active_count()
    for raw in (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}", b"GET /nope HTTP/1.1\r\n\r\n",
                b"BREW / HTCPCP/1.0\r\n\r\n"):
        for _ in range(5):
            s = socket.create_connection(server.server_address[:2])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
            s.sendall(raw)
            s.close()
    assert wait_until(lambda: threading.active_count() <= before)  # every handler thread has finished
    assert call(server, "GET", "/health")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_head_has_no_body_and_options_is_refused(server):
    for path, code in [("/", 200), ("/health", 200), ("/v1/nothing", 404), ("/v1/completions", 405)]:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        conn.request("HEAD", path)
        r = conn.getresponse()
        assert r.status == code and r.read() == b""
        conn.close()
    with socket.create_connection(server.server_address[:2], timeout=10) as s:  # nothing after the headers
        s.sendall(b"HEAD /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 404") and reply.endswith(b"\r\n\r\n"), reply
    status, r = call(server, "OPTIONS", "/v1/completions")
    assert status == 405 and r["error"]["code"] == "method_not_allowed"


def test_logprobs_end_where_a_stop_string_cuts_the_text(server, monkeypatch):
    """Text " Hello world", stop " SECRET" made of the tokens " SEC" "RET": those two have no logprobs
    entries (the tokens spell the text), streamed or not; completion_tokens counts all 4 generated."""
    enc = server.api.enc
    script = [enc.encode(t)[0] for t in (" Hello", " world", " SEC", "RET", " more")]
    scripted_model(server, monkeypatch, script)
    body = {"prompt": "Say it", "max_tokens": 10, "temperature": 0, "logprobs": 1, "stop": " SECRET"}
    status, r = call(server, "POST", "/v1/completions", body)
    c = r["choices"][0]
    assert status == 200 and c["text"] == " Hello world" and c["finish_reason"] == "stop"
    assert c["logprobs"]["tokens"] == [" Hello", " world"] and c["logprobs"]["text_offset"] == [0, 6]
    assert len(c["logprobs"]["token_logprobs"]) == len(c["logprobs"]["top_logprobs"]) == 2
    assert r["usage"]["completion_tokens"] == 4
    status, text = call(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(text)]
    assert "".join(ch["text"] for ch in chunks) == " Hello world"
    assert [t for ch in chunks if ch["logprobs"] for t in ch["logprobs"]["tokens"]] == [" Hello", " world"]


def test_every_token_of_a_character_split_across_tokens_keeps_its_logprobs_entry(server, monkeypatch):
    """" hi 😀" then <|endoftext|>: the emoji is one character of text but several tokens (bytes), and
    each of those tokens gets its entry, also when the answer ends right after it."""
    enc = server.api.enc
    script = enc.encode(" hi 😀") + [EOT]
    assert len(script) >= 4  # the test means something: the emoji spans tokens
    scripted_model(server, monkeypatch, script)
    body = {"prompt": "Say it", "max_tokens": 10, "temperature": 0, "logprobs": 0}
    status, r = call(server, "POST", "/v1/completions", body)
    c = r["choices"][0]
    assert status == 200 and c["text"] == " hi 😀" and c["finish_reason"] == "stop"
    assert len(c["logprobs"]["tokens"]) == len(script) - 1  # every token but <|endoftext|>
    status, text = call(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = [e["choices"][0] for e in sse_events(text)]
    assert len([t for ch in chunks if ch["logprobs"] for t in ch["logprobs"]["tokens"]]) == len(script) - 1


def test_chat_page_drops_the_oldest_exchanges_when_the_context_is_full_and_shows_stream_errors(server, monkeypatch):
    """Against a server with an API key, too: the page says where the key goes, and names the model once it has it."""
    host, port = server.server_address[:2]
    monkeypatch.setattr(server, "api_key", "sesame")  # a server with an API key, from the page's first request
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        chrome = Chromium(browser_or_fail(), f"http://{host}:{port}/?temperature=0&max_tokens=8", profile)
        try:
            session = chrome.page_session()
            js = lambda expression, **kw: chrome.evaluate(session, expression, **kw)  # noqa: E731
            send = lambda text: js(f"send({json.dumps(text)})", wait=True)  # noqa: E731
            model = lambda: js("$('model').textContent")  # noqa: E731
            assert wait_until(lambda: model() == "API key needed"), model()  # (/v1/models: 401)
            # the page says where to enter the key, and sends what is entered there
            send("hello")
            last = js("[...document.querySelectorAll('.msg')].pop().textContent")
            assert "needs an API key: enter it in the API key field" in last and js("messages.length") == 0
            js('key.value = "sesame"; key.dispatchEvent(new Event("change"))')
            assert js('sessionStorage.getItem("apiKey")') == "sesame"  # (kept for the tab)
            assert wait_until(lambda: model() == "tiny"), model()  # asked again, with the key
            # a system prompt and a history of about 3 x 2 x 60 tokens: more than the tiny model's 256-token context
            js("""$("system").value = "Be kind.";
                for (let i = 0; i < 3; i++) messages.push({role: "user", content: `question ${i} ` + "word ".repeat(60)},
                                                          {role: "assistant", content: `answer ${i} ` + "word ".repeat(60)});""")
            send("hello")
            assert js("status.textContent").startswith("done")
            kept = js("messages")
            roles = [m["role"] + ":" + m["content"].split(" ")[0] for m in kept]
            history = ["user:question", "assistant:answer"] * 3
            # the answer came, and of the history only the newest exchanges remain ...
            assert roles[-2] == "user:hello" and roles[-1].startswith("assistant:")
            middle = roles[:-2]
            assert len(middle) < len(history) and len(middle) % 2 == 0 and middle == history[len(history) - len(middle):]
            # ... after the system prompt: what the model read is it and them (the prompt's tokens, counted)
            sent = [{"role": "system", "content": "Be kind."}, *kept[:-1]]
            count = call(server, "POST", "/tokenize", {"messages": sent}, headers={"Authorization": "Bearer sesame"})[1]["count"]
            assert f"prompt {count} tokens" in js("status.textContent"), (count, js("status.textContent"))
            # without max tokens a reply may take 256 tokens, but no more than a quarter of the context
            budget = js('replyTokens({Authorization: "Bearer sesame"})', wait=True)
            assert budget == min(256, server.api.n_ctx // 4) and js("$('max_tokens').placeholder") == f"auto: {budget}"
            # a message that cannot fit even alone: an error, and the conversation is left as it was
            before = js("messages.length")
            send("word " * 400)
            assert js("status.textContent") == "error"
            assert js("messages.length") == before
            # an engine failure mid-stream: its message shows, not a script error
            monkeypatch.setattr(server.api.loop.engine.runner, "run", lambda batch: 1 / 0)
            send("again")
            last = js("[...document.querySelectorAll('.msg')].pop().className + '|' + "
                      "[...document.querySelectorAll('.msg')].pop().textContent")
            assert last.startswith("msg error|error: the engine failed"), last
        finally:
            chrome.close()
    monkeypatch.undo()
    assert wait_until(lambda: idle(server))


def test_the_openai_client_talks_to_the_server(server):
    """The official client, as the README shows it: models, a chat completion, a streamed completion,
    each the same as the raw HTTP answer."""
    from openai import OpenAI
    host, port = server.server_address[:2]
    client = OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": "Hi"}]
    raw = call(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 6,
                                                        "temperature": 0})[1]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == raw["choices"][0]["message"]["content"]
    assert r.usage.completion_tokens == raw["usage"]["completion_tokens"]
    raw = call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 6, "temperature": 0})[1]
    stream = client.completions.create(model="tiny", prompt="Once", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == raw["choices"][0]["text"] != ""


def raw_reply(server, request, timeout=5):
    """What the server answers to the bytes `request`, read until it closes the connection."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as s:
        s.sendall(request)
        return s.makefile("rb").read()


@pytest.mark.parametrize("request_bytes, message", [
    # HTTP/0.9 (no version): no headers follow, so nothing may be waited for
    (b"GET /\r\n", b"HTTP/0.9"),
    (b"GET /health\r\n\r\n", b"HTTP/0.9"),
    # two framings at once (RFC 9112: refuse), and Content-Lengths int() would take
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 33\r\n\r\n" + b"x" * 33,
     b"Transfer-Encoding"),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: +33\r\n\r\n" + b"x" * 33, b"valid Content-Length"),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 3_3\r\n\r\n" + b"x" * 33, b"valid Content-Length"),
])
def test_ambiguous_or_ancient_framing_is_a_400_at_once(server, request_bytes, message):
    start = time.monotonic()
    reply = raw_reply(server, request_bytes)
    assert reply.startswith(b"HTTP/1.0 400") and message in reply, reply
    assert time.monotonic() - start < 3  # answered, not left to the read timeout
    assert call(server, "GET", "/health")[0] == 200  # and the server goes on


# ----------------------------------------------------------------------------- for evaluation harnesses

def own_log_probs(server, ids):
    """The model's own log-softmax over `ids` (position p: the distribution of token p + 1)."""
    model = server.api.loop.engine.model
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


def test_echo_with_max_tokens_0_gives_the_prompts_own_logprobs(server):
    enc = get_tokenizer()
    prompt = "The quick brown fox jumps over the lazy dog, and then it"
    ids = enc.encode(prompt)
    for sent in (prompt, ids):  # as text and as token ids
        status, r = call(server, "POST", "/v1/completions", {"prompt": sent, "echo": True, "max_tokens": 0,
                                                             "logprobs": 3})
        assert status == 200, r
        c = r["choices"][0]
        assert c["text"] == prompt and c["finish_reason"] == "length"
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        lp = c["logprobs"]
        assert lp["tokens"] == [enc.decode([t]) for t in ids] and lp["token_logprobs"][0] is None
        assert lp["text_offset"] == [len(enc.decode(ids[:i])) for i in range(len(ids))]
        own = own_log_probs(server, ids)
        assert lp["token_logprobs"][1:] == pytest.approx([float(own[p, ids[p + 1]]) for p in range(len(ids) - 1)], abs=1e-4)
        for p, top in enumerate(lp["top_logprobs"][1:]):
            best = torch.topk(own[p], 3)
            assert {enc.decode([t]) for t in best.indices.tolist()} <= set(top)  # the top 3, and the token itself
    assert wait_until(lambda: idle(server))


def test_a_log_likelihood_request_as_lm_evaluation_harness_sends_it(server):
    """local-completions' loglikelihood request: token ids of context + continuation, echo, logprobs 1,
    max_tokens 1, temperature 0; it sums token_logprobs[ctxlen:-1] and checks each is its top one."""
    enc = get_tokenizer()
    context, continuations = enc.encode("Question: what color is the sky? Answer:"), [" blue", " a banana"]
    prompts = [context + enc.encode(c) for c in continuations]
    status, r = call(server, "POST", "/v1/completions", {"model": "tiny", "prompt": prompts, "echo": True,
                                                         "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert status == 200, r
    for ids, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's, then the one token generated
        own = own_log_probs(server, ids)
        expected = sum(float(own[p - 1, ids[p]]) for p in range(len(context), len(ids)))
        assert sum(lp["token_logprobs"][len(context):-1]) == pytest.approx(expected, abs=1e-4)
        greedy = all(float(own[p - 1, ids[p]]) == float(own[p - 1].max()) for p in range(len(context), len(ids)))
        assert greedy == all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(context):-1],
                                                                       lp["top_logprobs"][len(context):-1]))
        assert choice["text"].startswith(enc.decode(ids)) and len(choice["text"]) > len(enc.decode(ids))
    assert wait_until(lambda: idle(server))


def test_chat_logprobs_and_top_logprobs_in_openais_chat_shape(server):
    messages = [{"role": "user", "content": "Name a color."}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    status, r = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    content = r["choices"][0]["logprobs"]["content"]
    ids = encode_prompt(messages, "chat", get_tokenizer())
    generated = []
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 2
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        own = own_log_probs(server, ids + generated)[-1]
        token = int(own.argmax())  # greedy: each token is the model's most likely one
        assert entry["logprob"] == pytest.approx(float(own[token]), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(torch.topk(own, 2).values.tolist(), abs=1e-4)
        generated.append(token)
    assert "".join(e["token"] for e in content).lstrip() == r["choices"][0]["message"]["content"]
    status, text = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    streamed = [e for chunk in sse_events(text) if chunk["choices"] and chunk["choices"][0].get("logprobs")
                for e in chunk["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    status, r = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert r["choices"][0]["logprobs"] is None  # not asked for


def test_usage_counts_the_closing_endoftext_as_vllm_does(server, monkeypatch):
    enc = get_tokenizer()
    script = enc.encode(" Hello world") + [EOT]
    scripted_model(server, monkeypatch, script)
    status, r = call(server, "POST", "/v1/completions", {"prompt": "Say it", "max_tokens": 10, "temperature": 0})
    assert r["choices"][0]["text"] == " Hello world" and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == len(script)  # the two words' tokens and <|endoftext|>


def test_model_by_id_tokenize_and_detokenize(server):
    status, r = call(server, "GET", "/v1/models/tiny")
    assert status == 200 and r["id"] == "tiny" and r["object"] == "model" and r["max_model_len"] == 256
    status, r = call(server, "GET", "/v1/models/gpt-4")
    assert status == 404 and r["error"]["code"] == "model_not_found"
    status, r = call(server, "POST", "/tokenize", {"prompt": "Hello world"})
    assert status == 200 and r == {"count": 2, "max_model_len": 256, "tokens": [15496, 995]}
    messages = [{"role": "user", "content": "Hi"}]
    status, r = call(server, "POST", "/tokenize", {"messages": messages})
    assert r["tokens"] == encode_prompt(messages, "chat", get_tokenizer())  # the served template, cued to answer
    status, r = call(server, "POST", "/detokenize", {"tokens": [15496, 995]})
    assert status == 200 and r == {"prompt": "Hello world"}
    for path, body in [("/tokenize", {"prompt": 5}), ("/tokenize", {}), ("/detokenize", {"tokens": [-1]}),
                       ("/detokenize", {"tokens": "Hello"})]:
        status, r = call(server, "POST", path, body)
        assert status == 400 and r["error"]["message"], (path, body)
    status, r = call(server, "GET", "/tokenize")
    assert status == 405
