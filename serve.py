"""Serve GPT-2 to many users at once: a paged KV cache, continuous batching, an OpenAI-compatible API.

    python serve.py --model out/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi!"}]}'
    open http://localhost:8000/  (a small chat page)

generate.py answers one prompt at a time; a server has many requests in flight, arriving and leaving
at any moment. engine.py's Engine batches them (the vLLM recipe: see its docstring); this file puts
it behind HTTP:

  EngineLoop  The engine in one background thread, with a queue per HTTP request.
  OpenAIApi   OpenAI request bodies, checked, into engine requests.
  Completion  One request's choices as they are generated, into OpenAI's chunks and responses.
  Handler     The HTTP endpoints (standard library http.server): /v1/completions,
              /v1/chat/completions, /v1/models, /health, /metrics, and the chat page at /.
"""

import argparse
import itertools
import json
import queue
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import torch

from checkpoint import CheckpointError, resolve_weights
from common import HelpFormatter, check_flags, default_dtype, device_or_die, die
from engine import TTFT_BUCKETS, Engine, check_engine_limits
from gpt import SIZES
from inference import load_model
from runner import BLOCK
from sampling import MAX_SEED, SamplingParams
from tokenizer import encode, encode_prompt, strip_answer_start


# ----------------------------------------------------------------------------- the engine thread

class QueueFull(Exception):
    """More sequences waiting than --max-waiting allows: a 503, try again later."""


class ShuttingDown(Exception):
    """Sent to the requests still running when the server stops (Ctrl-C, SIGTERM): a 503, not a failure."""

    def api_error(self):
        return ApiError(503, str(self), type="server_error", code="shutting_down")


class EngineLoop:
    """Runs Engine.step() in one background thread. An HTTP handler submits its sequences with a
    queue of its own and reads StepOutputs from it; abort() cancels them (client gone)."""

    def __init__(self, engine, max_waiting=256):
        if max_waiting < 1:  # 0 would refuse every request with 503
            raise ValueError(f"max_waiting must be at least 1, not {max_waiting}")
        self.engine, self.max_waiting = engine, max_waiting
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
        """requests: [(prompt ids, SamplingParams, logprobs)], all admitted or none (QueueFull when
        the queue is full, ValueError when a request is bad)."""
        if len(requests) > self.max_waiting:  # it would be refused forever, even by an idle server
            raise ValueError(f"this request has {len(requests)} sequences (prompts x n); the server queues at "
                             f"most {self.max_waiting} (--max-waiting)")
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


# ----------------------------------------------------------------------------- OpenAI requests

MAX_BODY = 1 << 20  # 1 MiB
# Stop strings are searched in the held-back text after every token of every sequence, and a tail as
# long as the longest of them is held back: unbounded, one request could stall every stream. OpenAI
# allows 4; 256 characters each is far more than any real stop sequence ("\nUser:") needs.
MAX_STOP, MAX_STOP_CHARS = 4, 256
# A refused request's body is still read (up to this much, for up to DRAIN_SECONDS, while it keeps
# coming: DRAIN_IDLE seconds without a byte end it) before the error is sent: a client still sending
# when the socket closes gets a reset instead of the error.
DRAIN_MAX, DRAIN_SECONDS, DRAIN_IDLE = 16 << 20, 5.0, 0.25
STATIC = Path(__file__).resolve().parent / "static" / "chat.html"


class ApiError(Exception):
    """A refusal, as the OpenAI API words it: an HTTP status and an {"error": ...} body."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


# OpenAI request fields this server does not implement, with the values that ask for nothing
UNSUPPORTED = {"echo": (False, None), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "tools": (None, []),
               "response_format": (None, {"type": "text"})}


def _field(body, name, kinds, default, ok=None, rule=""):
    """body[name] checked to be of `kinds` (bool is never a number) and to satisfy `ok`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (ok and not ok(value)):
        raise ApiError(400, f"invalid value for '{name}': {value!r}" + (f" ({rule})" if rule else ""), param=name)
    return value


class CompletionRequest(NamedTuple):
    """A request body, checked: what the engine is asked to do, and how the answer is to be sent."""
    prompts: list        # token-id lists
    params: list         # a SamplingParams per choice of each prompt (n of them)
    n: int
    logprobs: int | None  # report the top-`logprobs` alternatives of every token (None: no logprobs)
    stream: bool
    include_usage: bool  # (streaming) a last chunk with the token counts


class OpenAIApi:
    """Turns OpenAI-style request bodies into engine requests, and submits them."""

    def __init__(self, engine_loop, model_name, template):
        self.loop, self.model_name, self.template = engine_loop, model_name, template
        self.enc = engine_loop.engine.enc
        self.n_ctx = engine_loop.engine.n_ctx

    def submit(self, request, sink):
        """Queue the request's sequences (every prompt, n times) in the engine; its Sequences. The
        engine loop's refusals become ApiErrors."""
        sequences = [(ids, params, request.logprobs) for ids in request.prompts for params in request.params]
        try:
            return self.loop.submit(sequences, sink)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="queue_full") from None
        except ShuttingDown as e:
            raise e.api_error() from None
        except ValueError as e:  # (parse() checks first; the engine's own checks are the last word)
            raise ApiError(400, str(e)) from None

    def parse(self, body, chat):
        """Validate a request body into a CompletionRequest (an ApiError at the first bad field)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name, neutral in UNSUPPORTED.items():  # refused, not silently ignored
            if name in body and body[name] not in neutral:
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server has '{self.model_name}'",
                           param="model", code="model_not_found")
        if chat:
            prompts = [self._chat_prompt(body.get("messages"))]
            if body.get("logprobs"):
                raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
            logprobs = None
        else:
            prompts = self._prompts(body.get("prompt"))
            logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer 0..20")
        longest = max(len(p) for p in prompts)
        if longest >= self.n_ctx:  # no room for even one token, whatever max_tokens says
            what = "messages" if chat else "prompt"
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest} tokens in the {what} alone, which leaves no room for an answer. "
                                f"Please shorten the {what}.", param=what, code="context_length_exceeded")
        default_max = (self.n_ctx - longest) if chat else 16  # OpenAI's defaults: the rest of the context, 16
        # (chat: max_completion_tokens is the newer name; a null max_tokens does not hide it)
        name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
        max_tokens = _field(body, name, (int,), default_max, lambda v: v >= 1, "at least 1")
        if longest + max_tokens > self.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "0 to 2"))
        top_p = float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "greater than 0, at most 1"))
        top_k = _field(body, "top_k", (int,), 0, lambda v: v >= -1, "-1 or 0 for all, else at least 1")
        n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "1 to 16")
        seed = _field(body, "seed", (int,), None, lambda v: 0 <= v <= MAX_SEED - (n - 1),
                      f"an integer 0..{MAX_SEED - (n - 1)}: choice i samples with seed + i")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings of "
                                f"at most {MAX_STOP_CHARS} characters each", param="stop")
        stream = _field(body, "stream", (bool,), False)
        opts = _field(body, "stream_options", (dict,), {})
        include_usage = bool(opts.get("include_usage")) if stream else False
        params = [SamplingParams(max_tokens, temperature, max(top_k, 0), top_p, stop,
                                 None if seed is None else seed + j) for j in range(n)]
        return CompletionRequest(prompts, params, n, logprobs, stream, include_usage)

    def _prompts(self, prompt):
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > 64:
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of up to 64 of those",
                           param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = encode(p, self.enc)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.enc.n_vocab for t in p):
                ids = list(p)
            else:
                raise ApiError(400, "each prompt must be a string or a list of token ids", param="prompt")
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            out.append(ids)
        return out

    def _chat_prompt(self, messages):
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                    raise ApiError(400, "message content parts must be text", param="messages")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise ApiError(400, "each message needs a string 'content'", param="messages")
            turns.append({"role": m["role"], "content": content})
        try:
            return encode_prompt(turns, self.template, self.enc)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None

    def token_text(self, tok):
        return self.enc.decode_single_token_bytes(tok).decode("utf-8", errors="replace")


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


# ----------------------------------------------------------------------------- OpenAI answers

class Choice:
    """One choice of a completion while it is generated: its text, and (if asked for) the logprob
    entries of its tokens, each given out once its token's text has been (see release_logprobs)."""

    def __init__(self, chat):
        self.chat, self.texts, self.finish_reason = chat, [], None
        self.started = not chat  # a chat answer has not started until its first non-space
        self.text_bytes = 0  # of the text given out so far
        self.logprob_bytes = 0  # of the text whose tokens' logprob entries are given out
        self.pending = []  # (token text, logprob, top logprobs, bytes) of the tokens whose text is held back
        self.offset = 0  # text_offset of the next entry: characters of the tokens given out
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add_text(self, text):
        """Take the next piece of text; returns it as it is to be shown."""
        if self.chat:  # the template cues the answer after "Assistant:"; the model answers " ..."
            text, self.started = strip_answer_start(text, self.started)
        self.texts.append(text)
        self.text_bytes += len(text.encode("utf-8", "surrogatepass"))  # (bytes: see release_logprobs)
        return text

    def release_logprobs(self, finish_reason):
        """The logprob entries whose token's text has been given out, as a logprobs object (the new
        ones only). The text of a token may be held back (it could be the start of a stop string),
        so its entry waits with it; a token the stop string consumed never gets one, nor does
        <|endoftext|>: the tokens spell the text (a token the stop string begins inside of keeps its
        entry: part of its text is in the answer). At "length" the text is all out: all entries go.
        Counted in bytes, not characters: a character split across tokens (an emoji) is one character
        of text but two or more tokens, each of which has its entry."""
        new = {key: [] for key in self.logprobs}
        while self.pending and (self.logprob_bytes < self.text_bytes or finish_reason == "length"):
            token, logprob, top, nbytes = self.pending.pop(0)
            self.logprob_bytes += nbytes
            for key, value in zip(new, (token, logprob, top, self.offset)):
                new[key].append(value)
            self.offset += len(token)
        if finish_reason:
            self.pending.clear()
        for key, values in new.items():  # (the whole answer's, for a response that is not streamed)
            self.logprobs[key] += values
        return new


class Completion:
    """One /v1/completions or /v1/chat/completions request while it is generated: its choices
    (choice index = prompt * n + sample), in OpenAI's shapes: the chunks of a stream, or the whole
    response at the end."""

    def __init__(self, api, chat, request, seqs):
        self.api, self.chat, self.logprobs, self.seqs = api, chat, request.logprobs, seqs
        self.choices = [Choice(chat) for _ in seqs]
        self.index = {s.seq_id: i for i, s in enumerate(seqs)}
        self.prompt_tokens = sum(len(p) for p in request.prompts)  # once per prompt, however many choices (as OpenAI counts)
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": api.model_name}
        if request.include_usage:
            self.head["usage"] = None  # OpenAI's schema: null on every chunk, the numbers on the last one

    def chunk(self, choice):
        return {**self.head, "choices": [choice]}

    def opening_chunks(self):
        """A chat stream first gives each choice its role."""
        return [self.chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) for i in range(len(self.choices)) if self.chat]

    def add(self, out):
        """Take a StepOutput into its choice. Returns the chunk that streams it, or None when it
        brings nothing to show."""
        i = self.index[out.seq.seq_id]
        choice = self.choices[i]
        choice.finish_reason = out.finish_reason
        if out.token is not None and self.logprobs is not None and out.logprob is not None:
            choice.pending.append(self._logprob_entry(out))
        text = choice.add_text(out.text)
        new_logprobs = None if self.logprobs is None else choice.release_logprobs(out.finish_reason)
        if not (text or out.finish_reason or new_logprobs and new_logprobs["tokens"]):
            return None
        if self.chat:
            return self.chunk({"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                               "finish_reason": out.finish_reason})
        return self.chunk({"index": i, "text": text, "logprobs": new_logprobs, "finish_reason": out.finish_reason})

    def _logprob_entry(self, out):
        token = self.api.token_text(out.token)
        top = {self.api.token_text(t): logprob for t, logprob in out.top_logprobs}
        top[token] = out.logprob
        return token, out.logprob, top, len(self.api.enc.decode_single_token_bytes(out.token))

    @property
    def finished(self):
        return all(choice.finish_reason is not None for choice in self.choices)

    def usage(self):
        # Every generated token counts, also those a stop string consumed (they were computed; OpenAI
        # counts them the same way), though the text and the logprobs end where the stop string began.
        completion_tokens = sum(len(s.output_ids) for s in self.seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def usage_chunk(self):
        return {**self.head, "choices": [], "usage": self.usage()}

    def response(self):
        """The whole answer, for a request that is not streamed."""
        body = {**self.head, "object": "chat.completion" if self.chat else "text_completion", "usage": self.usage(),
                "choices": []}
        for i, choice in enumerate(self.choices):
            text = "".join(choice.texts)
            if self.chat:
                body["choices"].append({"index": i, "message": {"role": "assistant", "content": text},
                                        "logprobs": None, "finish_reason": choice.finish_reason})
            else:
                logprobs = None if self.logprobs is None else choice.logprobs
                body["choices"].append({"index": i, "text": text, "logprobs": logprobs,
                                        "finish_reason": choice.finish_reason})
        return body


# ----------------------------------------------------------------------------- HTTP

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

    def log_message(self, format, *args):  # quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

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

    ROUTES = {"/": "GET", "/health": "GET", "/metrics": "GET", "/v1/models": "GET",
              "/v1/completions": "POST", "/v1/chat/completions": "POST"}

    def _dispatch(self):
        """Every method comes here (self.command names it), so that a known path asked with the
        wrong one gets a 405, in JSON."""
        method = "GET" if self.head_only else self.command
        path = self.path.split("?", 1)[0]
        try:
            if path not in self.ROUTES:
                raise ApiError(404, f"no such endpoint: {path}", code="not_found")
            if method != self.ROUTES[path]:
                raise ApiError(405, f"{path} accepts {self.ROUTES[path]} only, not {method}", code="method_not_allowed")
            api = self.server.api
            if path == "/":
                return self.send_bytes(200, "text/html; charset=utf-8", STATIC.read_bytes())
            if path == "/health":
                return self.send_json(200 if api else 503, {"status": "ok" if api else "loading"})
            if api is None:
                raise ApiError(503, "the model is still loading", type="server_error", code="not_ready")
            if path == "/metrics":
                return self.send_bytes(200, "text/plain; version=0.0.4", metrics_text(api.loop).encode())
            key = self.server.api_key
            if key and self.headers.get("Authorization", "") != f"Bearer {key}":
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               type="authentication_error", code="invalid_api_key")
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": api.model_name, "object": "model", "created": self.server.started, "owned_by": "local",
                     "max_model_len": api.n_ctx}]})
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

    def _body(self):
        if len(set(self.headers.get_all("Content-Length", []))) > 1:  # which one frames the body? (RFC 9110)
            self.close_connection = True
            raise ApiError(400, "the request has conflicting Content-Length headers")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411 if "Content-Length" not in self.headers else 400,
                           "a request body with a valid Content-Length is required") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY}")
        if length < 0:
            raise ApiError(400, "negative Content-Length")
        self.body_read = True  # (from here on the body is read, or not worth waiting for)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"the request body did not arrive within {self.timeout} s") from None
        if len(raw) < length:  # the client closed its side early: the body is cut, whatever it parses as
            raise ApiError(400, f"the request body ended after {len(raw)} of the {length} bytes its "
                                "Content-Length announced")
        try:
            return json.loads(raw)
        except RecursionError:  # "[[[[...": nested deeper than the parser's recursion limit
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits)
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

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

    def __init__(self, address, api_key=None, verbose=False):
        super().__init__(address, Handler)
        self.api = None  # set by attach() once the model is loaded; until then /health says 503
        self.api_key, self.verbose, self.started = api_key, verbose, int(time.time())

    def attach(self, engine_loop, model_name, template="chat"):
        self.api = OpenAIApi(engine_loop, model_name, template)


def make_server(engine=None, host="127.0.0.1", port=0, api_key=None, model_name="gpt2", template="chat",
                max_waiting=256, verbose=False):
    """A Server bound to host:port (0 = any free port: see server.server_address), its engine loop
    started. Call server.serve_forever() (in a thread, for tests); server.shutdown() stops it."""
    server = Server((host, port), api_key, verbose)
    if engine is not None:
        server.attach(EngineLoop(engine, max_waiting).start(), model_name, template)
    return server


# ----------------------------------------------------------------------------- the CLI

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and KV cache (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one forward pass (a step's token budget, at least --max-num-seqs): running "
                        "decodes come first, longer prompts are prefilled in chunks over several steps; smaller = "
                        "steadier streams, larger = faster first tokens and throughput")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences beyond which requests get 503")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV-cache size, e.g. 256MB or 2GiB or 1.5 (GiB) (default on CUDA: --gpu-memory-utilization "
                        "of the free memory; elsewhere 1 GiB, at most half the free memory and what --max-num-seqs full "
                        "contexts need)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--served-model-name", default=None, help="the model id in the API (default: --model)")
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
                port=(lambda v: 0 <= v < 65536, "in 0..65535"))
    if args.api_key == "":  # (an empty key would silently turn authentication off)
        die("--api-key is empty: give a key, or leave the flag out to serve without one")
    if args.model not in SIZES or Path(args.model).exists():  # a path: check it before listening
        try:                                                   # (a hub name downloads while loading)
            resolve_weights(args.model, SIZES)
        except CheckpointError as e:
            die(str(e))


def listen(args):
    """The server, answering in a thread of its own (with no engine yet, /health says "loading")."""
    try:
        server = make_server(host=args.host, port=args.port, api_key=args.api_key, verbose=args.verbose)
    except OSError as e:
        die(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/ (loading {args.model})", flush=True)
    return server


def load_engine(args, device, dtype):
    """The model's Engine, and the chat template it was trained with (a bad checkpoint or a KV cache
    that does not fit: a one-line error, exit 2)."""
    model = load_model(args.model, device, dtype)
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
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # systemd, `docker stop`, `kill`: stop as on Ctrl-C
    server = loop = None
    try:
        server = listen(args)  # first, so that /health can say "loading" (503) while the weights come in
        engine, template = load_engine(args, device, dtype)
        loop = EngineLoop(engine, args.max_waiting).start()
        server.attach(loop, args.served_model_name or args.model, template)
        print(f"ready: {args.model} on {device} ({dtype}), KV cache {len(engine.blocks.blocks)} blocks of {BLOCK} "
              f"tokens = {len(engine.blocks.blocks) * BLOCK} tokens", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shut_down(server, loop)


def shut_down(server, loop):
    """Stop without losing a word. A second Ctrl-C or SIGTERM must not cut this short. The listener
    closes first; then the engine thread stops, between two steps (a process that exits while that
    thread is inside a torch kernel is aborted by the C++ runtime, SIGABRT, instead of ending); then
    the requests still running are told why they end. (Stopped while loading, there is no engine yet.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("shutting down", flush=True)
    if server is not None:
        server.shutdown()  # no new connections (a request already in a handler gets a 503)
    if loop is not None:
        loop.stop()
        sinks = {id(seq.sink): seq.sink for seq in loop.engine.fail_all() if seq.sink is not None}.values()
        for sink in sinks:
            sink.put(ShuttingDown("the server is shutting down"))
        # the handlers are daemon threads, gone when main returns: let them take it to their clients
        deadline = time.monotonic() + 2
        while any(not sink.empty() for sink in sinks) and time.monotonic() < deadline:
            time.sleep(0.01)


if __name__ == "__main__":
    main()
