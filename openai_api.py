"""The OpenAI API's schema, apart from HTTP: request bodies checked into engine requests
(OpenAIApi), and a request's engine outputs into OpenAI's response and stream shapes (Completion).

Every refusal is an ApiError: the HTTP status and the {"error": {...}} body OpenAI's clients expect.
A field this server does not implement is refused, never silently ignored.
"""

import time
import uuid
from dataclasses import replace
from typing import NamedTuple

from sampling import BadSamplingParam, SamplingParams
from tokenizer import encode, encode_prompt, strip_answer_start


# ----------------------------------------------------------------------------- refusals

class ApiError(Exception):
    """A refusal, as the OpenAI API words it: an HTTP status and an {"error": ...} body."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class QueueFull(Exception):
    """More sequences waiting than --max-waiting allows: a 503, try again later."""


class ShuttingDown(Exception):
    """Sent to the requests still running when the server stops (Ctrl-C, SIGTERM): a 503, not a failure."""

    def api_error(self):
        return ApiError(503, str(self), type="server_error", code="shutting_down")


# ----------------------------------------------------------------------------- OpenAI requests

# Stop strings are searched in the held-back text after every token of every sequence, and a tail as
# long as the longest of them is held back: unbounded, one request could stall every stream. OpenAI
# allows 4; 256 characters each is far more than any real stop sequence ("\nUser:") needs.
MAX_STOP, MAX_STOP_CHARS = 4, 256


# OpenAI request fields this server does not implement, with the values that ask for nothing
UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
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


def check_sampling_params(params, samples):
    """`params` against the rules every caller shares (sampling.py's SamplingParams.check), refused as
    the API refuses a field. The API's own tighter limits (temperature <= 2) are _field's, in parse."""
    try:
        return params.check(samples=samples)
    except BadSamplingParam as e:
        raise ApiError(400, f"invalid value for '{e.field}': {e.value!r} (must be {e.must})", param=e.field) from None


class CompletionRequest(NamedTuple):
    """A request body, checked: what the engine is asked to do, and how the answer is to be sent."""
    prompts: list        # token-id lists
    params: list         # a SamplingParams per choice of each prompt (n of them)
    n: int
    logprobs: int | None  # report the top-`logprobs` alternatives of every token (None: no logprobs)
    stream: bool
    include_usage: bool  # (streaming) a last chunk with the token counts
    echo: bool = False  # (completions) the answer starts with the prompt, and its logprobs with the prompt's


class OpenAIApi:
    """Turns OpenAI-style request bodies into engine requests, and submits them."""

    def __init__(self, engine_loop, model_name, template):
        self.loop, self.model_name, self.template = engine_loop, model_name, template
        self.enc = engine_loop.engine.enc
        self.n_ctx = engine_loop.engine.n_ctx

    def submit(self, request, sink):
        """Queue the request's sequences (every prompt, n times) in the engine; its Sequences. The
        engine loop's refusals become ApiErrors."""
        prompt_logprobs = request.logprobs if request.echo else None  # (with echo, also the prompt's)
        sequences = [(ids, params, request.logprobs, prompt_logprobs)
                     for ids in request.prompts for params in request.params]
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
            if body.get("echo"):
                raise ApiError(400, "'echo' is supported on /v1/completions only", param="echo")
            echo = False
            wanted = _field(body, "logprobs", (bool,), False)
            top = _field(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer 0..20")
            if top is not None and not wanted:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            logprobs = (top or 0) if wanted else None
        else:
            prompts = self._prompts(body.get("prompt"))
            logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer 0..20")
            echo = _field(body, "echo", (bool,), False)
        longest = max(len(p) for p in prompts)
        if longest >= self.n_ctx:  # no room for even one token, whatever max_tokens says
            what = "messages" if chat else "prompt"
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest} tokens in the {what} alone, which leaves no room for an answer. "
                                f"Please shorten the {what}.", param=what, code="context_length_exceeded")
        default_max = (self.n_ctx - longest) if chat else 16  # OpenAI's defaults: the rest of the context, 16
        # (chat: max_completion_tokens is the newer name; a null max_tokens does not hide it)
        name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
        max_tokens = _field(body, name, (int,), default_max, lambda v: v >= (0 if echo else 1),
                            "at least 0 with echo (0: the prompt only)" if echo else "at least 1")
        if longest + max_tokens > self.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "0 to 2"))
        top_p = float(_field(body, "top_p", (int, float), 1.0))
        top_k = _field(body, "top_k", (int,), 0, lambda v: v >= -1, "-1 or 0 for all, else at least 1")
        n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "1 to 16")
        seed = _field(body, "seed", (int,), None)
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings of "
                                f"at most {MAX_STOP_CHARS} characters each", param="stop")
        stream = _field(body, "stream", (bool,), False)
        opts = _field(body, "stream_options", (dict,), {})
        include_usage = bool(opts.get("include_usage")) if stream else False
        params = check_sampling_params(SamplingParams(max(max_tokens, 1), temperature, max(top_k, 0), top_p, stop, seed), n)
        params = [replace(params, max_tokens=max_tokens, seed=None if seed is None else seed + j) for j in range(n)]
        return CompletionRequest(prompts, params, n, logprobs, stream, include_usage, echo)

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

    def tokenize(self, body):
        """POST /tokenize, as vLLM's: {"prompt": text} or {"messages": [...]} (in the model's template,
        cued for the answer) -> {"count", "max_model_len", "tokens"}."""
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise ApiError(400, "give 'prompt' (a string) or 'messages', one of them")
        if "messages" in body:
            ids = self._chat_prompt(body["messages"])
        elif isinstance(body["prompt"], str):
            ids = encode(body["prompt"], self.enc)
        else:
            raise ApiError(400, "'prompt' must be a string", param="prompt")
        return {"count": len(ids), "max_model_len": self.n_ctx, "tokens": ids}

    def detokenize(self, body):
        """POST /detokenize, as vLLM's: {"tokens": [ids]} -> {"prompt": text}."""
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < self.enc.n_vocab for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids (0..{self.enc.n_vocab - 1})", param="tokens")
        return {"prompt": self.enc.decode(tokens)}

    def token_text(self, tok):
        return self.enc.decode_single_token_bytes(tok).decode("utf-8", errors="replace")

    def logprob_entry(self, token, logprob, alternatives):
        """A Choice's logprob entry for `token` and its top `alternatives` [(id, logprob)]."""
        text = self.token_text(token)
        listed = [(self.token_text(t), lp, self.enc.decode_single_token_bytes(t)) for t, lp in alternatives]
        top = {t: lp for t, lp, _ in listed}
        top[text] = logprob  # (/v1/completions lists the token itself among its top ones)
        return text, logprob, top, self.enc.decode_single_token_bytes(token), listed


# ----------------------------------------------------------------------------- OpenAI answers

class Choice:
    """One choice of a completion while it is generated: its text, and (if asked for) the logprob
    entries of its tokens, each given out once its token's text has been (see release_logprobs).
    An entry is (token text, logprob, {text: logprob} of the top alternatives and the token, the
    token's bytes, [(text, logprob, bytes)] of the alternatives); the two APIs shape them differently."""

    def __init__(self, chat):
        self.chat, self.texts, self.finish_reason = chat, [], None
        self.started = not chat  # a chat answer has not started until its first non-space
        self.text_bytes = 0  # of the text given out (or, a chat answer's leading space, dropped) so far
        self.logprob_bytes = 0  # of the text whose tokens' logprob entries are given out
        self.pending = []  # the entries of the tokens whose text is held back
        self.entries = []  # the entries given out, for a response that is not streamed
        self.offset = 0  # /v1/completions' text_offset of the next entry: characters of the tokens given out
        self.echoed = False

    def add_text(self, text):
        """Take the next piece of text; returns it as it is to be shown."""
        self.text_bytes += len(text.encode("utf-8", "surrogatepass"))  # (bytes: see release_logprobs)
        if self.chat:  # the template cues the answer after "Assistant:"; the model answers " ..."
            text, self.started = strip_answer_start(text, self.started)
        self.texts.append(text)
        return text

    def release_logprobs(self, finish_reason):
        """The logprob entries whose token's text has been given out (the new ones only). The text
        of a token may be held back (it could be the start of a stop string), so its entry waits
        with it; a token the stop string consumed never gets one, nor does <|endoftext|>: the tokens
        spell the text (a token the stop string begins inside of keeps its entry: part of its text
        is in the answer). At "length" the text is all out: all entries go. Counted in bytes, not
        characters: a character split across tokens (an emoji) is one character of text but two or
        more tokens, each of which has its entry."""
        new = []
        while self.pending and (self.logprob_bytes < self.text_bytes or finish_reason == "length"):
            entry = self.pending.pop(0)
            self.logprob_bytes += len(entry[3])
            new.append(entry)
        if finish_reason:
            self.pending.clear()
        self.entries += new
        return new


class Completion:
    """One /v1/completions or /v1/chat/completions request while it is generated: its choices
    (choice index = prompt * n + sample), in OpenAI's shapes: the chunks of a stream, or the whole
    response at the end."""

    def __init__(self, api, chat, request, seqs):
        self.api, self.chat, self.logprobs, self.seqs = api, chat, request.logprobs, seqs
        self.echo = request.echo
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
        echoed, echo_entries = self._echo(choice, out.seq)
        if out.token is not None and self.logprobs is not None and out.logprob is not None:
            choice.pending.append(self.api.logprob_entry(out.token, out.logprob, out.top_logprobs))
        text = echoed + choice.add_text(out.text)
        new = None if self.logprobs is None else echo_entries + choice.release_logprobs(out.finish_reason)
        if not (text or out.finish_reason or new):
            return None
        if self.chat:
            return self.chunk({"index": i, "delta": {"content": text} if text else {},
                               "logprobs": None if new is None else chat_logprobs(new), "finish_reason": out.finish_reason})
        logprobs = None
        if new is not None:
            logprobs = completion_logprobs(new, choice.offset)
            choice.offset += sum(len(entry[0]) for entry in new)
        return self.chunk({"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason})

    def _echo(self, choice, seq):
        """With echo, the first output of a choice starts with its prompt: (the prompt's text, its
        logprob entries: the first token has none, as nothing comes before it). Else ("", [])."""
        if not self.echo or choice.echoed:
            return "", []
        choice.echoed = True
        prompt = seq.tokens[:seq.prompt_len]
        text = self.api.enc.decode(prompt)
        choice.texts.append(text)
        if self.logprobs is None:
            return text, []
        first = self.api.token_text(prompt[0])
        entries = [(first, None, None, self.api.enc.decode_single_token_bytes(prompt[0]), [])]
        entries += [self.api.logprob_entry(t, lp, top) for t, (lp, top) in zip(prompt[1:], seq.prompt_entries)]
        choice.entries += entries  # (given out with the prompt's text, which is never held back)
        return text, entries

    @property
    def finished(self):
        return all(choice.finish_reason is not None for choice in self.choices)

    def usage(self):
        # Every generated token counts, also those a stop string consumed (they were computed; OpenAI
        # counts them the same way) and the closing <|endoftext|> (as vLLM and llama-server do),
        # though the text and the logprobs end where the answer does.
        completion_tokens = sum(len(s.output_ids) + s.ended_by_eot for s in self.seqs)
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
            logprobs = None
            if self.logprobs is not None:
                logprobs = chat_logprobs(choice.entries) if self.chat else completion_logprobs(choice.entries, 0)
            if self.chat:
                body["choices"].append({"index": i, "message": {"role": "assistant", "content": text},
                                        "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                body["choices"].append({"index": i, "text": text, "logprobs": logprobs,
                                        "finish_reason": choice.finish_reason})
        return body


def completion_logprobs(entries, offset):
    """/v1/completions' logprobs: parallel lists, text_offset counting characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, logprob, top, _, _ in entries:
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries):
    """/v1/chat/completions' logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{"token": text, "logprob": logprob, "bytes": list(raw),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in alternatives]}
                        for text, logprob, _, raw, alternatives in entries]}
