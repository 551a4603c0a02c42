"""Serve GPT-2 to many users at once: a paged KV cache, continuous batching, an OpenAI-compatible API.

    python serve.py --model out/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi!"}]}'
    open http://localhost:8000/  (a small chat page)

generate.py answers one prompt at a time; a server has many requests in flight, arriving and leaving
at any moment. engine.py's Engine batches them (the vLLM recipe: see its docstring), and
openai_api.py speaks OpenAI's request and response shapes; this file puts them behind HTTP:

  EngineLoop  The engine in one background thread, with a queue per HTTP request.
  Handler     The HTTP endpoints (standard library http.server): /v1/completions,
              /v1/chat/completions, /v1/models[/ID], /tokenize, /detokenize, /health, /metrics,
              and the chat page at /.
"""

import argparse
import contextlib
import hmac
import io
import itertools
import json
import queue
import re
import select
import signal
import socket
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from checkpoint import CheckpointError, resolve_weights
from common import (AT_LEAST_1, DTYPES, JSON_ERRORS, POSITIVE, HelpFormatter, check_flags, device_or_die, die,
                    dtype_or_die, json_problem)
from engine import TTFT_BUCKETS, Engine, check_engine_limits
from gpt import SIZES
from inference import load_model_or_die
from openai_api import ApiError, Completion, OpenAIApi, QueueFull, ShuttingDown
from runner import BLOCK


# ----------------------------------------------------------------------------- the engine thread

class EngineLoop:
    """Runs Engine.step() in one background thread. An HTTP handler submits its sequences with a
    queue of its own and reads StepOutputs from it; abort() cancels them (client gone)."""

    def __init__(self, engine, max_waiting=256, max_seqs_per_request=64):
        if max_waiting < 1:  # 0 would refuse every request with 503
            raise ValueError(f"max_waiting must be at least 1, not {max_waiting}")
        self.engine, self.max_waiting = engine, max_waiting
        self.max_seqs_per_request = min(max_seqs_per_request, max_waiting)  # (more would be refused forever)
        self.wake = threading.Event()
        self.submit_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stopped = False

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, requests, sink):
        """requests: [(prompt ids, SamplingParams, logprobs, prompt logprobs)], all admitted or none (QueueFull when
        the queue is full, ValueError when a request is bad)."""
        if len(requests) > self.max_seqs_per_request:
            raise ValueError(f"this request asks for {len(requests)} sequences (prompts x n); the server takes at "
                             f"most {self.max_seqs_per_request} per request (--max-seqs-per-request)")
        with self.submit_lock:
            if self.stopped:  # (the server is shutting down: the engine takes nothing more)
                raise ShuttingDown("the server is shutting down")
            if self.engine.num_waiting + len(requests) > self.max_waiting:
                raise QueueFull(f"the server is busy ({self.engine.num_waiting} requests waiting); try again later")
            seqs = self.engine.add_requests(requests, sink=sink)
        self.wake.set()
        return seqs

    def abort(self, seqs):
        for s in seqs:
            self.engine.abort(s.seq_id)
        self.wake.set()

    def _run(self):
        while not self.stopped:
            self.wake.clear()
            if not self.engine.has_work():
                self.wake.wait(1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out-of-memory must not leave handlers waiting forever
                traceback.print_exc()
                for seq in self.engine.fail_all():
                    if seq.sink:
                        seq.sink.put(e)
                continue
            for out in outputs:
                if out.seq.sink is not None:  # (a sequence that failed alone: its handler gets the error)
                    out.seq.sink.put(out if out.error is None else out.error)


# ----------------------------------------------------------------------------- HTTP limits and /metrics

MAX_BODY = 1 << 20  # 1 MiB
# A refused request's body is still read (up to this much, for up to DRAIN_SECONDS, while it keeps
# coming: DRAIN_IDLE seconds without a byte end it) before the error is sent: a client still sending
# when the socket closes gets a reset instead of the error.
DRAIN_MAX, DRAIN_SECONDS, DRAIN_IDLE = 16 << 20, 5.0, 0.25
STATIC = Path(__file__).resolve().parent / "static" / "chat.html"


class RequestTimeout(Exception):
    """The request (line, headers and body) did not arrive whole within the server's --request-timeout."""


class DeadlineReader(socket.SocketIO):
    """A connection's reading side with one deadline for the whole request: a per-read timeout alone
    lets a client that drips a byte every few seconds hold its thread forever. Each read waits at
    most until the deadline (and never longer than the per-read timeout); once the request is read,
    lift() ends the deadline, as generating and streaming the answer may take any time."""

    def __init__(self, sock, seconds, per_read):
        super().__init__(sock, "rb")
        self.deadline, self.per_read = time.monotonic() + seconds, per_read

    def readinto(self, buffer):
        if self.deadline is None:
            return super().readinto(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout()
        self._sock.settimeout(min(left, self.per_read))
        try:
            return super().readinto(buffer)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise RequestTimeout() from None
            raise

    def lift(self):
        if self.deadline is not None:
            self.deadline = None
            self._sock.settimeout(self.per_read)


def metrics_text(loop):
    """/metrics in Prometheus' text format: the engine's state now, and its EngineStats."""
    engine, stats = loop.engine, loop.engine.stats
    blocks = engine.blocks
    lines = []

    def metric(name, kind, help_, value):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"])

    metric("serve_requests_running", "gauge", "Sequences in the running batch.", engine.num_running)
    metric("serve_requests_waiting", "gauge", "Sequences waiting to be scheduled.", engine.num_waiting)
    metric("serve_kv_blocks_used", "gauge", "KV-cache blocks held by sequences.", len(blocks.blocks) - blocks.num_free)
    metric("serve_kv_blocks_total", "gauge", f"KV-cache blocks in the pool ({BLOCK} tokens each).", len(blocks.blocks))
    metric("serve_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
           engine.scheduler.num_preemptions)
    metric("serve_prefix_cache_queries_total", "counter", "Full prompt blocks looked up in the prefix cache.",
           blocks.queries)
    metric("serve_prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.", blocks.hits)
    metric("serve_prompt_tokens_total", "counter", "Prompt tokens received.", stats.prompt_tokens)
    metric("serve_generation_tokens_total", "counter", "Tokens generated.", stats.generation_tokens)
    metric("serve_requests_aborted_total", "counter", "Sequences aborted (client gone).", stats.aborted)
    name = "serve_time_to_first_token_seconds"
    lines += [f"# HELP {name} Time from arrival to the first generated token.", f"# TYPE {name} histogram"]
    cumulative = list(itertools.accumulate(stats.ttft_counts))  # Prometheus buckets are cumulative
    for bound, count in zip(TTFT_BUCKETS + ("+Inf",), cumulative):
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines += [f"{name}_sum {stats.ttft_sum:.6f}", f"{name}_count {cumulative[-1]}"]
    return "\n".join(lines) + "\n"


def refuse_connection(sock, limit):
    """Answer a connection over the cap with a 503 and close it. What the client sends meanwhile is
    read and dropped for a moment: closing a socket with unread bytes sends a reset, which can reach
    the client before it reads the 503."""
    body = json.dumps({"error": {"message": f"the server has {limit} connections open (--max-connections); "
                                            "try again later", "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    try:
        sock.settimeout(DRAIN_IDLE)
        sock.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and sock.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        sock.close()


# ----------------------------------------------------------------------------- HTTP

def redact(line):
    """A log line with the value of any key= or api_key= in a query string hidden: a key sent in the URL
    must not end up in the logs in the clear."""
    return re.sub(r"([?&](?:api_)?key=)[^&\s]*", r"\1[redacted]", line, flags=re.IGNORECASE)


class ClientGone(Exception):
    """The client of a request still being answered has closed its connection."""


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (each in its own thread). Responses close the connection (HTTP/1.0 style),
    which keeps streaming simple: the stream ends when the socket does."""

    server_version = "gpt2-serve/1.0"
    default_request_version = "HTTP/1.0"  # answer even garbage with a status line (never HTTP/0.9)
    # Seconds a read or write on the socket may wait: a client that announces a body and never
    # sends it (or stops reading a stream) must not hold a thread forever. Generating does not
    # touch the socket, so a long answer is not cut short by this.
    timeout = 60

    head_only = False  # a HEAD request: headers as for GET, no body
    body_read = False  # has the request body (if any) been read?
    probed = 0.0  # when the last probe went to a client that half-closed (see client_gone)
    # (what an error needs when the request line itself never came whole)
    command, request_version, requestline = None, "HTTP/1.0", ""

    def setup(self):
        super().setup()  # (self.rfile is replaced: the same buffered reader, over a reader with a deadline)
        self.rfile.close()  # (the one super() made, unread: the socket stays open)
        self.reader = DeadlineReader(self.connection, self.server.request_timeout, self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle(self):
        try:
            super().handle()
        except RequestTimeout:
            self.close_connection = True
            self.send_error_json(ApiError(408, f"the request did not arrive whole within "
                                               f"{self.server.request_timeout:g} s (--request-timeout)",
                                          code="request_timeout"))

    def log_message(self, format, *args):  # quiet unless asked
        if self.server.verbose:
            super().log_message("%s", redact(format % args))

    # ------------------------------------------------------------ plumbing
    def send_bytes(self, status, content_type, data):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)

    def send_json(self, status, obj):
        self.send_bytes(status, "application/json", json.dumps(obj).encode())

    def parse_request(self):
        """http.server takes a request line without a version ("GET /") for HTTP/0.9, which has no
        headers and no status line, and answers it late or not at all: refused here, at once."""
        if len(self.raw_requestline.split()) == 2:
            self.command, self.request_version = None, "HTTP/1.0"  # (the error's status line is 1.0's)
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
            self.send_error(400, "an HTTP/0.9 request line (no version) is not supported; send HTTP/1.1")
            return False
        return super().parse_request()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unsupported method): JSON too."""
        self.close_connection = True
        self.send_error_json(ApiError(code, message or self.responses.get(code, ("error",))[0]))

    def send_error_json(self, e):
        try:
            self.send_json(e.status, {"error": {"message": e.message, "type": e.type, "param": e.param,
                                                "code": e.code}})
        except OSError:  # the client left without reading it (a reset): nothing to answer, nothing to log
            self.close_connection = True

    def client_gone(self, streaming):
        """Has the client gone away? An end of file on the read side alone does not say: a client may
        shut down its sending half once its request is out (shutdown(SHUT_WR)) and still wait for the
        answer. So at the first EOF, write something the client ignores: while streaming, an SSE
        comment; before the answer, to an HTTP/1.1 client, an interim "100 Continue" (which clients
        must skip, however many come). A peer that has closed entirely answers it with a reset, which
        the next check (a write, or the pending socket error) sees; repeated every second, as a
        half-closed client may close entirely later. An HTTP/1.0 client may not be sent a 1xx, so
        there, EOF before the answer still counts as gone."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            if self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False  # (bytes after the request: not ours to read; the client is there)
            if not streaming and self.request_version < "HTTP/1.1":
                return True
            if time.monotonic() - self.probed >= 1.0:
                self.probed = time.monotonic()
                probe = b": ping\n\n" if streaming else f"{self.protocol_version} 100 Continue\r\n\r\n".encode()
                self.wfile.write(probe)
                self.wfile.flush()
            return bool(self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        except (OSError, ValueError):
            return True

    ROUTES = {"/": "GET", "/health": "GET", "/metrics": "GET", "/v1/models": "GET", "/v1/models/": "GET",
              "/v1/completions": "POST", "/v1/chat/completions": "POST", "/tokenize": "POST", "/detokenize": "POST"}

    def _dispatch(self):
        """Every method comes here (self.command names it), so that a known path asked with the
        wrong one gets a 405, in JSON."""
        method = "GET" if self.head_only else self.command
        path = self.path.split("?", 1)[0]
        if "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers:
            self.reader.lift()  # (no body to wait for: the request is all here)
        with self.server.answering():
            self._answer(method, path)

    def _answer(self, method, path):
        try:
            if self.server.stopping:
                raise ShuttingDown("the server is shutting down").api_error()
            route = "/v1/models/" if path.startswith("/v1/models/") else path  # (/v1/models/{id})
            if route not in self.ROUTES:
                raise ApiError(404, f"no such endpoint: {path}", code="not_found")
            if method != self.ROUTES[route]:
                raise ApiError(405, f"{path} accepts {self.ROUTES[route]} only, not {method}", code="method_not_allowed")
            api = self.server.api
            if path == "/":
                return self.send_bytes(200, "text/html; charset=utf-8", STATIC.read_bytes())
            if path == "/health":
                return self.send_json(200 if api else 503, {"status": "ok" if api else "loading"})
            if api is None:
                raise ApiError(503, "the model is still loading", type="server_error", code="not_ready")
            if self.server.api_key and (path != "/metrics" or self.server.metrics_need_key) and not self.authorized():
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               type="authentication_error", code="invalid_api_key")
            if path == "/metrics":
                return self.send_bytes(200, "text/plain; version=0.0.4", metrics_text(api.loop).encode())
            model = {"id": api.model_name, "object": "model", "created": self.server.started, "owned_by": "local",
                     "max_model_len": api.n_ctx}
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [model]})
            if route == "/v1/models/":
                if urllib.parse.unquote(path.removeprefix("/v1/models/")) != api.model_name:
                    raise ApiError(404, f"the model '{path.removeprefix('/v1/models/')}' does not exist; this server has "
                                        f"'{api.model_name}'", param="model", code="model_not_found")
                return self.send_json(200, model)
            if path == "/tokenize":
                return self.send_json(200, api.tokenize(self._body()))
            if path == "/detokenize":
                return self.send_json(200, api.detokenize(self._body()))
            self._generate(api, chat=path == "/v1/chat/completions")
        except ApiError as e:
            self._drain_body()
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left (or stopped reading); nothing to answer
        except Exception as e:  # a bug must not take the server down, nor leave the client hanging
            traceback.print_exc()
            self.send_error_json(ApiError(500, f"internal error: {e}", type="server_error"))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def do_HEAD(self):  # as GET, without the body (a HEAD response must have none)
        self.head_only = True
        self._dispatch()

    def _drain_body(self):
        """Read and drop a body not read yet (a refused request's): a client still sending it when the
        connection closes gets a reset, often before it reads the error. Bounded in bytes and time."""
        if self.body_read:
            return
        self.body_read = True
        self.reader.lift()  # (bounded below on its own terms)
        try:
            left = min(int(self.headers.get("Content-Length", "0")), DRAIN_MAX)
        except (ValueError, AttributeError):  # (no headers: a malformed request line)
            return
        self.close_connection = True
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, min(DRAIN_IDLE, deadline - time.monotonic())))
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            self.connection.settimeout(self.timeout)

    def authorized(self):
        """Whether the request carries the API key as `Authorization: Bearer KEY` (the scheme's case is
        free, RFC 9110), compared in constant time: how long a wrong key takes says nothing of the key."""
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.server.api_key.encode())

    def _body(self):
        if len(set(self.headers.get_all("Content-Length", []))) > 1:  # which one frames the body? (RFC 9110)
            self.close_connection = True
            raise ApiError(400, "the request has conflicting Content-Length headers")
        if "Transfer-Encoding" in self.headers:  # (with a Content-Length too, the framing is ambiguous: RFC 9112
            self.close_connection = True         # says refuse; alone, a chunked body this server does not read)
            raise ApiError(400 if "Content-Length" in self.headers else 411,
                           "Transfer-Encoding is not supported: send the body with a Content-Length")
        text = self.headers.get("Content-Length", "").strip()
        if not re.fullmatch(r"[0-9]+", text):  # (int() would take "+33", "3_3" and "٣٣": digits only)
            raise ApiError(411 if "Content-Length" not in self.headers else 400,
                           "a request body with a valid Content-Length is required")
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY}")
        self.body_read = True  # (from here on the body is read, or not worth waiting for)
        try:
            raw = self.rfile.read(length)
        except (RequestTimeout, TimeoutError):
            self.close_connection = True
            raise ApiError(408, f"the request body did not arrive within {self.server.request_timeout:g} s "
                                "(--request-timeout)", code="request_timeout") from None
        self.reader.lift()
        if len(raw) < length:  # the client closed its side early: the body is cut, whatever it parses as
            raise ApiError(400, f"the request body ended after {len(raw)} of the {length} bytes its "
                                "Content-Length announced")
        try:
            return json.loads(raw)
        except JSON_ERRORS as e:  # (nested too deeply, not UTF-8, an integer of over 4300 digits, ...)
            raise ApiError(400, f"the request body is not valid JSON ({json_problem(e)})") from None

    # ------------------------------------------------------------ completions
    def _generate(self, api, chat):
        request = api.parse(self._body(), chat)
        sink = queue.Queue()
        seqs = api.submit(request, sink)
        completion = Completion(api, chat, request, seqs)
        try:
            if request.stream:
                self._start_stream(completion.opening_chunks())
            for out in self._outputs(sink, len(seqs), request.stream):
                chunk = completion.add(out)
                if request.stream and chunk is not None:
                    self._event(chunk)
            if not completion.finished:  # (one choice failed: the others are not awaited)
                api.loop.abort(seqs)
            if request.stream:
                self._end_stream(completion.usage_chunk() if request.include_usage else None)
            else:
                self.send_json(200, completion.response())
        except (ClientGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            api.loop.abort(seqs)  # free the blocks now; nobody is listening
            self.close_connection = True
        except BaseException:
            api.loop.abort(seqs)
            raise

    def _start_stream(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for event in events:
            self._event(event)

    def _end_stream(self, last_event=None):
        if last_event is not None:
            self._event(last_event)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _outputs(self, sink, count, stream):
        """StepOutputs from the engine until all `count` sequences have finished; checks between
        outputs that the client is still there."""
        done, checked = 0, time.monotonic()
        while done < count:
            if time.monotonic() - checked > 0.05:  # a few times a second, busy or not
                if self.client_gone(stream):
                    raise ClientGone()
                checked = time.monotonic()
            try:
                out = sink.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(out, Exception):
                error = (out.api_error() if isinstance(out, ShuttingDown)
                         else ApiError(500, f"the engine failed: {out}", type="server_error"))
                if not stream:
                    raise error
                # the 200 and the headers are sent already: report it in the stream, then end it
                self._event({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
                return
            if out.finish_reason:
                done += 1
            yield out

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 128  # listen backlog: bursts of connections wait instead of being refused

    def __init__(self, address, api_key=None, verbose=False, request_timeout=30.0, max_connections=512,
                 metrics_need_key=False):
        super().__init__(address, Handler)
        self.api = None  # set by attach() once the model is loaded; until then /health says 503
        self.api_key, self.verbose, self.started = api_key, verbose, int(time.time())
        self.metrics_need_key = metrics_need_key  # /metrics, open by default (Prometheus), behind the key too
        self.stopping = False  # set by shut_down: every request is answered 503 from then on
        self.request_timeout, self.max_connections = request_timeout, max_connections
        self.num_answering, self.count_lock = 0, threading.Lock()  # requests read and not yet answered
        self.num_connections = 0  # open connections, each with its handler thread

    def process_request(self, request, client_address):
        """A thread per connection, up to max_connections: beyond, a quick 503 (in a short-lived
        thread), so that thousands of idle sockets cannot take every thread and all the memory."""
        with self.count_lock:
            full = self.num_connections >= self.max_connections
            self.num_connections += not full
        if full:
            return threading.Thread(target=refuse_connection, args=(request, self.max_connections), daemon=True).start()
        try:
            super().process_request(request, client_address)
        except BaseException:  # (no thread started: it will not count itself out)
            self._connection_closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed()

    def _connection_closed(self):
        with self.count_lock:
            self.num_connections -= 1

    @contextlib.contextmanager
    def answering(self):
        """Counts a request from when it is read until its answer is written, so that a shutdown can
        wait for the last words of the requests it ends (the handlers are daemon threads)."""
        with self.count_lock:
            self.num_answering += 1
        try:
            yield
        finally:
            with self.count_lock:
                self.num_answering -= 1

    def attach(self, engine_loop, model_name, template="chat"):
        self.api = OpenAIApi(engine_loop, model_name, template)


def make_server(engine=None, host="127.0.0.1", port=0, api_key=None, model_name="gpt2", template="chat",
                max_waiting=256, max_seqs_per_request=64, verbose=False, request_timeout=30.0, max_connections=512,
                metrics_need_key=False):
    """A Server bound to host:port (0 = any free port: see server.server_address), its engine loop
    started. Call server.serve_forever() (in a thread, for tests); server.shutdown() stops it."""
    server = Server((host, port), api_key, verbose, request_timeout, max_connections, metrics_need_key)
    if engine is not None:
        server.attach(EngineLoop(engine, max_waiting, max_seqs_per_request).start(), model_name, template)
    return server


# ----------------------------------------------------------------------------- the CLI

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--metrics-need-key", action="store_true",
                   help="require the API key on /metrics too (Prometheus: authorization: {credentials: KEY})")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV cache (default: bfloat16 on CUDA, float32 elsewhere); auto: bfloat16 where "
                        "the chip computes in it natively; int8: the matrices in int8, the KV cache float32 (CPU only)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one forward pass (a step's token budget, at least --max-num-seqs): running "
                        "decodes come first, longer prompts are prefilled in chunks over several steps; smaller = "
                        "steadier streams, larger = faster first tokens and throughput")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences beyond which requests get 503")
    p.add_argument("--max-seqs-per-request", type=int, default=64,
                   help="most sequences (prompts x n) one request may ask for; more is a 400 (at most --max-waiting)")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV-cache size, e.g. 256MB or 2GiB or 1.5 (GiB) (default on CUDA: --gpu-memory-utilization "
                        "of the free memory; elsewhere 1 GiB, at most half the free memory and what --max-num-seqs full "
                        "contexts need)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--served-model-name", default=None, help="the model id in the API (default: --model)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a request (line, headers and body) may take to arrive; then 408")
    p.add_argument("--max-connections", type=int, default=512, help="open connections beyond which a new one gets 503")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p.parse_args(argv)


def check_args(args):
    """Refuse bad flags, and a checkpoint path that is not one, before anything listens or loads."""
    try:
        check_engine_limits(args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory, flags=True)
    except ValueError as e:
        die(str(e))
    check_flags(args, gpu_memory_utilization=(lambda v: 0 < v <= 1, "in (0, 1]"),
                max_waiting=(lambda v: v >= 1, ">= 1"),  # 0 would answer every request 503
                max_seqs_per_request=(lambda v: 1 <= v <= args.max_waiting, f"in 1..--max-waiting ({args.max_waiting})"),
                port=(lambda v: 0 <= v < 65536, "in 0..65535"),
                request_timeout=POSITIVE, max_connections=AT_LEAST_1)
    if args.api_key == "":  # (an empty key would silently turn authentication off)
        die("--api-key is empty: give a key, or leave the flag out to serve without one")
    if args.metrics_need_key and args.api_key is None:
        die("--metrics-need-key needs --api-key (there is no key to ask for)")
    if args.model not in SIZES or Path(args.model).exists():  # a path: check it before listening
        try:                                                   # (a hub name downloads while loading)
            resolve_weights(args.model, SIZES)
        except CheckpointError as e:
            die(str(e))


def listen(args):
    """The server, answering in a thread of its own (with no engine yet, /health says "loading")."""
    try:
        server = make_server(host=args.host, port=args.port, api_key=args.api_key, verbose=args.verbose,
                             request_timeout=args.request_timeout, max_connections=args.max_connections,
                             metrics_need_key=args.metrics_need_key)
    except OSError as e:
        die(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/ (loading {args.model})", flush=True)
    return server


def load_engine(args, device, dtype, int8=False):
    """The model's Engine, and the chat template it was trained with (a bad checkpoint or a KV cache
    that does not fit: a one-line error, exit 2)."""
    model = load_model_or_die(args.model, device, dtype, int8)
    template = model.checkpoint_info.get("template", "chat")  # (load_model refused an unknown one)
    try:
        engine = Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
                        cuda_graph=not args.no_cuda_graph)
    except ValueError as e:
        die(str(e))
    return engine, template


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    # systemd, `docker stop`, `kill`: stop as on Ctrl-C, at once (not common.StopSignal's request to stop
    # at a safe point: the server has no loop of its own to check one, and may be loading a model)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = loop = None
    try:
        server = listen(args)  # first, so that /health can say "loading" (503) while the weights come in
        engine, template = load_engine(args, device, dtype, int8)
        loop = EngineLoop(engine, args.max_waiting, args.max_seqs_per_request).start()
        server.attach(loop, args.served_model_name or args.model, template)
        print(f"ready: {args.model} on {device} ({'int8' if int8 else dtype}), KV cache {len(engine.blocks.blocks)} blocks of {BLOCK} "
              f"tokens = {len(engine.blocks.blocks) * BLOCK} tokens", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shut_down(server, loop)


def shut_down(server, loop):
    """Stop without losing a word. A second Ctrl-C or SIGTERM must not cut this short. From the
    signal on, a new request is answered 503 (the listener stays open until the end: closing it
    would reset the connections queued in it). The engine thread stops first, between two steps (a
    process that exits while that thread is inside a torch kernel is aborted by the C++ runtime,
    SIGABRT), so that nothing is generated after the signal; then the requests still running are
    told why they end; then the listener closes, and a connection after that is refused, not
    reset. (Stopped while loading, there is no engine yet.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("shutting down", flush=True)
    if server is not None:
        server.stopping = True
    sinks = []
    if loop is not None:
        loop.stop()
        sinks = list({id(seq.sink): seq.sink for seq in loop.engine.fail_all() if seq.sink is not None}.values())
        for sink in sinks:
            sink.put(ShuttingDown("the server is shutting down"))
    if server is not None:
        # the handlers are daemon threads, gone when main returns: let them take it to their clients
        # (until each has written its answer: taking it from the queue is not enough)
        deadline = time.monotonic() + 5
        while (any(not sink.empty() for sink in sinks) or server.num_answering) and time.monotonic() < deadline:
            time.sleep(0.01)
        server.shutdown()  # no new connections taken
        server.server_close()


if __name__ == "__main__":
    main()
