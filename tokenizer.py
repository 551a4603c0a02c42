"""Text to token ids and back: GPT-2's byte-level BPE, TextStream (generated ids to printable text,
stop strings), and the chat templates.

A conversation is a list of turns {"role": "system" | "user" | "assistant", "content": str}; a user
turn may also carry "input" (Alpaca's optional context). A template renders it as pieces of text,
each either learned (an assistant's answer) or not, and from them token ids with labels: IGNORE
(-100) on everything the model must not learn (prompts, user turns), the answer's ids where it
must. Every answer is closed by one <|endoftext|>, learned too: it is how the model learns to stop
talking. This is the one source of truth for sft.py, generate.py, the server and export.py; the
template's name is recorded in every fine-tuned checkpoint.
"""

import bisect
import codecs
import functools
import itertools
import json

from common import die

# ----------------------------------------------------------------------------- GPT-2's tokenizer

EOT = 50256  # <|endoftext|>: the document separator in pretraining and the end of an answer in chat
VOCAB_SIZE = 50257  # GPT-2's tokens; a model's vocabulary may be padded past them (nanoGPT pads to 50,304)


def get_tokenizer():
    """GPT-2's byte-level BPE from tiktoken (50257 tokens, <|endoftext|> = 50256)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its two files on first use: no network, no tokenizer
        die(f"cannot load GPT-2's tokenizer files ({type(e).__name__}); connect to the internet once, "
            f"or point TIKTOKEN_CACHE_DIR at a folder that holds them")


def encode(text, enc=None):
    """User text -> token ids. "<|endoftext|>" written in the text is ordinary text here, never the
    special token: only our own code places EOT (templates, document separators)."""
    return (enc or get_tokenizer()).encode(text, disallowed_special=())


class TextStream:
    """Token ids in, printable text out. Two things make this more than enc.decode:

    - GPT-2's BPE works on bytes, so one character (an emoji, a CJK ideograph) can span tokens; an
      incremental UTF-8 decoder holds back an unfinished character until its last byte arrives.
    - A stop string may arrive split across tokens ("\\nUs" + "er:"), so any tail of the text that
      could be the start of a stop string is held back until it either completes (stop: it and
      everything after it are dropped) or cannot anymore (it is released).
    """

    def __init__(self, enc, stop=()):
        self.enc = enc
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet emitted
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_id):
        """Add one token; return the new text that is safe to emit now (may be "")."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.enc.decode_single_token_bytes(token_id))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        longest = len(self.pending)  # (a longer start of a stop string cannot be what pending ends with)
        hold = max((n for s in self.stop for n in range(1, min(len(s), longest + 1))
                    if self.pending.endswith(s[:n])), default=0)
        return self._emit(len(self.pending) - hold)

    def finish(self):
        """Flush what is left (an unfinished character becomes U+FFFD) unless a stop string ended it."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._emit(len(self.pending))

    def _emit(self, n):
        out, self.pending = self.pending[:n], ("" if self.stopped else self.pending[n:])
        self.text += out
        return out


# ----------------------------------------------------------------------------- chat templates

IGNORE = -100  # the label of a token the loss skips (prompt, user turns, padding)


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")


ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")


TEMPLATES = ("alpaca", "chat")


def _pieces(messages, template):
    """(text or EOT, learned) pieces of a conversation, in order."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    return (_alpaca_pieces if template == "alpaca" else _chat_pieces)(system, turns)


def _alpaca_pieces(system, turns):
    has_input = any(m.get("input") for m in turns)
    preamble = ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE
    out = [(("\n\n".join(system) + "\n\n" if system else "") + preamble, False)]
    for m in turns:
        if m["role"] == "user":
            text = f"### Instruction:\n{m['content']}\n\n"
            if m.get("input"):
                text += f"### Input:\n{m['input']}\n\n"
            out.append((text + "### Response:\n", False))
        else:
            out += [(m["content"], True), (EOT, True), ("\n\n", False)]
    return out


def _chat_pieces(system, turns):
    out = [("\n\n".join(system) + "\n\n", False)] if system else []
    for m in turns:
        if m["role"] == "user":
            content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
            out.append((f"User: {content}\nAssistant:", False))
        else:
            out += [(" " + m["content"], True), (EOT, True), ("\n", False)]
    return out


@functools.lru_cache(maxsize=None)
def token_sizes(enc):
    """The length in bytes of every token id, as a list: built once, then a lookup per token
    (decoding each token's bytes again for every conversation would cost more than encoding)."""
    return [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]


def _utf8_size(text):
    """The number of bytes `text` has for the tokenizer. tiktoken turns lone surrogates (which
    UTF-8 cannot hold) into U+FFFD before encoding; so do we, so offsets stay in step."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return len(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8"))


def _encode_pieces(pieces, enc):
    """Token ids and labels of template pieces, tokenized the way other runtimes tokenize the text.

    transformers' apply_chat_template (with the exported Jinja template) and llama.cpp render the
    whole conversation as one string and tokenize it once. Tokenizing each piece on its own would
    give other tokens wherever text meets across a piece boundary ("request.\n\n" + "### Instruction"
    is [198, 198, ...] in one go but [628, ...] piece by piece), so a model would be trained on tokens
    it never sees at inference. So: the text between two of our <|endoftext|> tokens is encoded in
    one go (tiktoken itself splits text at special tokens, so this is what encoding the rendered
    string with <|endoftext|> allowed gives), and each token's label is taken from the piece its
    first byte lies in (GPT-2's BPE is byte-level: a token is a run of the text's UTF-8 bytes).

    Where a token straddles a boundary, the rule is: a token is learned iff it STARTS inside a learned
    piece. In our templates that happens only when an answer begins with whitespace the prompt's
    own can merge with (alpaca's "### Response:\n" + "\n x" gives the token "\n\n"): the token
    counts as prompt, so the answer's first newline is not learned. The answers the loaders make
    are stripped, so it never happens with them. An answer never ends inside a token: its
    <|endoftext|> follows it.

    EOT is placed only by the template: "<|endoftext|>" written in a message stays ordinary text
    (encode), so a user cannot end an answer or a document for the model."""
    ids, labels = [], []
    segment = []  # (text, learned) pieces since the last EOT
    size = token_sizes(enc)

    def flush():
        toks = encode("".join(t for t, _ in segment), enc)
        ends = list(itertools.accumulate(_utf8_size(t) for t, _ in segment))  # byte where each piece ends
        start = 0  # byte where the token starts
        for tok in toks:
            learned = segment[bisect.bisect_right(ends, start)][1]  # the piece holding that byte
            ids.append(tok)
            labels.append(tok if learned else IGNORE)
            start += size[tok]
        segment.clear()

    for text, learned in pieces:
        if text == EOT:
            flush()
            ids.append(EOT)
            labels.append(EOT if learned else IGNORE)
        else:
            segment.append((text, learned))
    flush()
    return ids, labels


def encode_conversation(messages, template, enc=None):
    """Token ids and labels for training: labels are IGNORE everywhere except the assistant's answers
    and the one <|endoftext|> closing each answer. The trailing separator after the last answer is
    dropped: the conversation ends at its EOT. The ids are exactly those of the conversation's text
    tokenized in one go (see _encode_pieces), so what training sees is what inference sees."""
    enc = enc or get_tokenizer()
    pieces = _pieces(messages, template)
    while pieces and not pieces[-1][1]:
        pieces.pop()
    return _encode_pieces(pieces, enc)


def encode_prompt(messages, template, enc=None):
    """Token ids that ask the model for the next assistant turn: the conversation so far (its last
    turn a user's) followed by the template's cue for the assistant to answer. The same tokens as
    the exported template's apply_chat_template(..., tokenize=True) (tests/test_export.py)."""
    enc = enc or get_tokenizer()
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to prompt an answer")
    return _encode_pieces(_pieces(messages, template), enc)[0]


def format_prompt(messages, template):
    """The prompt of `encode_prompt` as text (for display and for the conversation builder)."""
    return "".join("<|endoftext|>" if t == EOT else t for t, _ in _pieces(messages, template))


def jinja_template(template):
    """The template as a Jinja chat template, for the exports (Hugging Face's tokenizer_config.json,
    GGUF's tokenizer.chat_template): other runtimes format a conversation with it the way
    format_prompt does. It shares the preambles with _pieces but spells out the other strings
    again, so tests/test_export.py checks that the two render its sample conversations alike."""
    q = json.dumps  # a Python string as a Jinja string literal (JSON string syntax is valid Jinja)

    def cue(text):  # the answer's cue after a user turn: after the last one only if a generation is asked for
        return "{%- if not loop.last or add_generation_prompt %}{{ " + text + " }}{% endif %}"
    system = "{%- for m in messages if m.role == 'system' %}{{ m.content + " + q("\n\n") + " }}{% endfor %}"
    if template == "alpaca":
        return ("{%- set ns = namespace(has_input=false) %}"
                "{%- for m in messages if m.role != 'system' and m.input is defined and m.input %}"
                "{% set ns.has_input = true %}{% endfor %}"
                + system +
                "{{ " + q(ALPACA_PREAMBLE_INPUT) + " if ns.has_input else " + q(ALPACA_PREAMBLE) + " }}"
                "{%- for m in messages if m.role != 'system' %}"
                "{%- if m.role == 'user' %}{{ " + q("### Instruction:\n") + " + m.content + " + q("\n\n") + " }}"
                "{%- if m.input is defined and m.input %}{{ " + q("### Input:\n") + " + m.input + " + q("\n\n") + " }}{% endif %}"
                + cue(q("### Response:\n")) +
                "{%- else %}{{ m.content + " + q("<|endoftext|>\n\n") + " }}{% endif %}"
                "{%- endfor %}")
    if template == "chat":
        return (system +
                "{%- for m in messages if m.role != 'system' %}"
                "{%- if m.role == 'user' %}{{ " + q("User: ") + " + m.content }}"
                "{%- if m.input is defined and m.input %}{{ " + q("\n\n") + " + m.input }}{% endif %}"
                + cue(q("\nAssistant:")) +
                "{%- else %}{{ " + q(" ") + " + m.content + " + q("<|endoftext|>\n") + " }}{% endif %}"
                "{%- endfor %}")
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


# ----------------------------------------------------------------------------- fitting into the context

class PromptTooLong(ValueError):
    """A prompt that leaves the model no room for a new token."""


def check_prompt(prompt_ids, n_ctx):
    """Raise ValueError (PromptTooLong if so) unless the prompt leaves room for at least one new token.
    Call it before printing anything: generate_tokens checks too, but only once it is iterated."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= n_ctx:
        raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens; the model's context holds {n_ctx} "
                            f"(prompt plus new tokens)")


def fit_conversation(messages, template, n_ctx, reserve, enc):
    """Prompt ids for the next answer, dropping the oldest turns (system prompts stay) until the
    prompt leaves `reserve` tokens for the answer, or only the new message is left (PromptTooLong if
    it alone fills the context). Returns (ids, messages kept)."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        ids = encode_prompt(system + turns, template, enc)
        if len(ids) + reserve <= n_ctx or len(turns) == 1:
            break
        turns = turns[1:]
        while turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    if len(ids) >= n_ctx:
        raise PromptTooLong(f"that message makes a prompt of {len(ids)} tokens; the context holds {n_ctx}")
    return ids, system + turns


def strip_answer_start(piece, started):
    """Chat templates cue the answer with "Assistant:" and the model learned " " + content, so an
    answer begins with whitespace nobody wants to see. Feed the pieces of an answer in order, with
    started=False at first: returns (the piece, its leading whitespace dropped until the answer has
    started, started). The one place for this: generate.py (chat and --prompt) and the API's answers
    use it."""
    if not started:
        piece = piece.lstrip()
        started = bool(piece)
    return piece, started
