"""Data: from text and conversations on disk to the token ids a GPT-2 trains on.

Three parts, one per kind of training:
  1. chat templates: how a conversation (a list of {"role", "content"} turns) becomes tokens, with the
     labels that say which tokens the model learns. One source of truth for sft.py, generate.py and
     serve.py; the template's name is recorded in every fine-tuned checkpoint.
  2. pretraining data: plain text -> uint16 token files read back with np.memmap.
  3. conversation data: Alpaca, Dolly, Guanaco, OpenAssistant and chat JSONL files -> conversations,
     and the masked-label batches sft.py trains on.
"""

import itertools
import json
import random
import re
from pathlib import Path

import torch

from gpt import EOT, cache_dir, download, encode, get_tokenizer

IGNORE = -100  # the label of a token the loss skips (prompt, user turns, padding)

# ----------------------------------------------------------------------------- 1. chat templates
# A conversation is a list of turns {"role": "system" | "user" | "assistant", "content": str}; a user
# turn may also carry "input" (Alpaca's optional context). A template renders it as pieces of text,
# each either learned (an assistant's answer) or not; every assistant turn is closed by one
# <|endoftext|>, which is learned too: it is how the model learns to stop talking.

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")
TEMPLATES = ("alpaca", "chat")


def _pieces(messages, template):
    """(text or EOT, learned) pieces of a conversation, in order."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    out = []
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if template == "alpaca":
        has_input = any(m.get("input") for m in turns)
        preamble = ALPACA_PREAMBLE_INPUT if has_input else ALPACA_PREAMBLE
        out.append((("\n\n".join(system) + "\n\n" if system else "") + preamble, False))
        for m in turns:
            if m["role"] == "user":
                text = f"### Instruction:\n{m['content']}\n\n"
                if m.get("input"):
                    text += f"### Input:\n{m['input']}\n\n"
                out.append((text + "### Response:\n", False))
            else:
                out += [(m["content"], True), (EOT, True), ("\n\n", False)]
    else:  # chat
        if system:
            out.append(("\n\n".join(system) + "\n\n", False))
        for m in turns:
            if m["role"] == "user":
                content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
                out.append((f"User: {content}\nAssistant:", False))
            else:
                out += [(" " + m["content"], True), (EOT, True), ("\n", False)]
    return out


def encode_conversation(messages, template, enc=None):
    """Token ids and labels for training: labels are IGNORE everywhere except the assistant's answers
    and the one <|endoftext|> closing each answer. The trailing separator after the last answer is
    dropped: the conversation ends at its EOT."""
    enc = enc or get_tokenizer()
    pieces = _pieces(messages, template)
    while pieces and not pieces[-1][1]:
        pieces.pop()
    ids, labels = [], []
    for text, learned in pieces:
        toks = [EOT] if text == EOT else encode(text, enc)
        ids += toks
        labels += toks if learned else [IGNORE] * len(toks)
    return ids, labels


def encode_prompt(messages, template, enc=None):
    """Token ids that ask the model for the next assistant turn: the conversation so far (its last
    turn a user's) followed by the template's cue for the assistant to answer."""
    enc = enc or get_tokenizer()
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to prompt an answer")
    ids = []
    for text, _ in _pieces(messages, template):
        ids += [EOT] if text == EOT else encode(text, enc)
    return ids


def format_prompt(messages, template):
    """The prompt of `encode_prompt` as text (for display and for the conversation builder)."""
    return "".join("<|endoftext|>" if t == EOT else t for t, _ in _pieces(messages, template))


# ----------------------------------------------------------------------------- 2. pretraining data


# ----------------------------------------------------------------------------- 3. conversation data
# Every source becomes the same internal form, a conversation: a list of turns {"role", "content"}
# (a user turn may carry "input"). The format is detected record by record from its keys:
#
#   alpaca    {"instruction", "input", "output"}                       JSON list or JSONL
#   dolly     {"instruction", "context", "response"}                   JSONL
#   guanaco   {"text": "### Human: ...### Assistant: ..."}             JSONL, multi-turn
#   oasst     {"message_tree_id", "prompt": {"text", "role", "replies": [...]}}   JSONL trees, multi-turn
#   chat      {"messages": [{"role", "content"}, ...]}                  JSONL (OpenAI / UltraChat style)
#   sharegpt  {"conversations": [{"from", "value"}, ...]}               JSONL
#
# A record that fits none of them stops loading with an error naming the file and line: training on
# a silently half-read file is worse than not training at all.

DATASETS = {  # the names sft.py accepts besides a path; downloaded once into gpt.cache_dir()/data
    "alpaca": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
    "dolly": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
    "guanaco": "https://huggingface.co/datasets/timdettmers/openassistant-guanaco/resolve/main/"
               "openassistant_best_replies_train.jsonl",
}


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and, where it can, the line."""


def read_records(path):
    """Yield (line number, record) from a JSON list file or a JSONL file. For a JSON list the line
    is where each record starts, so an error can still point into the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if not text.lstrip().startswith("["):  # JSONL: one record per line, blank lines allowed
        for n, row in enumerate(text.splitlines(), start=1):
            if row.strip():
                try:
                    yield n, json.loads(row)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return
    # one JSON list: decode it element by element (raw_decode) to know where each record starts
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    i = space.match(text, space.match(text).end() + 1).end()  # the first record, after the '['
    line, counted = 1, 0
    try:
        if text[i] == "]":  # an empty list
            return
        while True:
            line += text.count("\n", counted, i)  # counted incrementally: linear in the file's size
            counted = i
            record, i = decoder.raw_decode(text, i)
            yield line, record
            i = space.match(text, i).end()
            if text[i] == "]":
                return
            if text[i] != ",":
                raise json.JSONDecodeError("Expecting ',' or ']'", text, i)
            i = space.match(text, i + 1).end()
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except IndexError:
        raise DataError(f"{path}: the JSON list is never closed (truncated file?)") from None


def _text(record, key):
    """record[key] as a stripped string ("" when absent or null); anything else is malformed."""
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is a {type(value).__name__}, not a string")
    return value.strip()


def _single_turn(instruction, context, answer):
    user = {"role": "user", "content": instruction}
    if context:
        user["input"] = context
    return [user, {"role": "assistant", "content": answer}]


def _from_turns(turns, role_key, text_key, roles):
    """[{role_key, text_key}, ...] -> a conversation, mapping each role name through `roles`."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("the list of turns is empty or not a list")
    out = []
    for t in turns:
        if not isinstance(t, dict) or t.get(role_key) not in roles:
            raise ValueError(f"a turn's {role_key!r} must be one of {', '.join(roles)}")
        out.append({"role": roles[t[role_key]], "content": _text(t, text_key)})
    return out


GUANACO_TURN = re.compile(r"###\s*(Human|Assistant):")


def _from_guanaco(text):
    parts = GUANACO_TURN.split(text)  # [before, role, text, role, text, ...]
    if parts[0].strip():
        raise ValueError("text before the first '### Human:' marker")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": t.strip()} for r, t in zip(parts[1::2], parts[2::2])]


def _from_oasst(tree):
    """The best-ranked path through an OpenAssistant message tree: from the prompt, follow at every
    turn the reply with the lowest rank (0 is the best; unranked replies come after ranked ones,
    deleted ones are never taken) until a message has no replies."""
    node, out = tree["prompt"], []
    roles = {"prompter": "user", "assistant": "assistant"}
    while True:
        if not isinstance(node, dict) or node.get("role") not in roles:
            raise ValueError("an OpenAssistant message needs a 'role' of prompter or assistant")
        out.append({"role": roles[node["role"]], "content": _text(node, "text")})
        replies = [r for r in node.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
        if not replies:
            return out
        node = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))


def to_conversation(record):
    """One record of any supported format -> a conversation. Raises ValueError when it fits none."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not a {type(record).__name__}")
    if "messages" in record:
        return _from_turns(record["messages"], "role", "content",
                           {"system": "system", "user": "user", "assistant": "assistant"})
    if "conversations" in record:
        return _from_turns(record["conversations"], "from", "value",
                           {"system": "system", "human": "user", "gpt": "assistant"})
    if isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return _from_oasst(record)
    if "instruction" in record and "output" in record:
        return _single_turn(_text(record, "instruction"), _text(record, "input"), _text(record, "output"))
    if "instruction" in record and "response" in record:
        return _single_turn(_text(record, "instruction"), _text(record, "context"), _text(record, "response"))
    if isinstance(record.get("text"), str) and GUANACO_TURN.search(record["text"]):
        return _from_guanaco(record["text"])
    raise ValueError(f"fits no known format (keys: {', '.join(sorted(record)) or 'none'}); expected "
                     f"alpaca, dolly, guanaco, oasst, chat 'messages' or sharegpt 'conversations'")


def _trainable(conversation):
    """Drop trailing user turns (nothing answers them) and say whether any answer is left to learn."""
    while conversation and conversation[-1]["role"] != "assistant":
        conversation.pop()
    return any(t["role"] == "assistant" and t["content"] for t in conversation)


def resolve_dataset(name_or_path):
    """alpaca | dolly | guanaco (downloaded once) or a local file -> its path."""
    name = str(name_or_path)
    if name in DATASETS and not Path(name).exists():
        url = DATASETS[name]
        try:
            return download(url, cache_dir() / "data" / url.rsplit("/", 1)[1])
        except Exception as e:  # requests' errors, disk errors: all mean "could not get the data"
            raise DataError(f"could not download the {name} dataset from {url} ({e})") from None
    if not Path(name).is_file():
        raise DataError(f"{name}: no such file, and not one of {', '.join(DATASETS)}")
    return Path(name)


def load_conversations(name_or_path, log=print):
    """Read a dataset into a list of conversations. Records with no answer to learn (an empty
    response, an OpenAssistant prompt nobody replied to) are skipped and counted, loudly."""
    path = resolve_dataset(name_or_path)
    conversations, skipped = [], 0
    for line, record in read_records(path):
        try:
            conversation = to_conversation(record)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{line}: {e}") from None
        if _trainable(conversation):
            conversations.append(conversation)
        else:
            skipped += 1
    if not conversations:
        raise DataError(f"{path}: no usable conversations")
    if skipped:
        log(f"{path}: skipped {skipped} records with no answer to learn")
    return conversations


def is_multi_turn(conversation):
    return sum(t["role"] == "assistant" for t in conversation) > 1


def default_template(conversations):
    """alpaca for single-turn data (what its instructions were written for), chat when any
    conversation has more than one answer (the alpaca layout reads badly as a dialogue)."""
    return "chat" if any(is_multi_turn(c) for c in conversations) else "alpaca"


def split_dataset(items, val_frac, test_frac, seed):
    """Shuffle with `seed` and cut into (train, val, test): the same seed gives the same split."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val, n_test = (max(1, round(f * len(items))) if f > 0 else 0 for f in (val_frac, test_frac))
    if n_val + n_test >= len(items):
        raise DataError(f"{len(items)} conversations are too few to split off {n_val} for validation "
                        f"and {n_test} for test")
    return items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]


# Masked-label batches. An example is (ids, labels) from encode_conversation. The model reads
# x = ids[:-1] and is scored on y = labels[1:]: position t predicts token t+1, so a label belongs
# to the position *before* its token. Padding goes on the right with label IGNORE; masking is done
# by label, never by "token == pad", because the pad token (EOT) is also the learned end of answer.

def encode_examples(conversations, template, max_len, enc=None, log=print):
    """Encode conversations into examples of at most max_len + 1 tokens (so x and y hold max_len).
    A longer example is cut at the end; one with nothing left to learn is dropped. Both are counted
    and printed, never silent. Returns (examples, stats)."""
    enc = enc or get_tokenizer()
    examples, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "tokens_cut": 0, "learned_tokens": 0}
    for conversation in conversations:
        ids, labels = encode_conversation(conversation, template, enc)
        if len(ids) > max_len + 1:
            stats["truncated"] += 1
            stats["tokens_cut"] += len(ids) - (max_len + 1)
            ids, labels = ids[:max_len + 1], labels[:max_len + 1]
        learned = sum(label != IGNORE for label in labels[1:])
        if learned == 0:  # the prompt alone fills the context: nothing to learn from this one
            stats["dropped"] += 1
            continue
        examples.append((ids, labels))
        stats["learned_tokens"] += learned
    stats["examples"] = len(examples)
    if stats["truncated"] or stats["dropped"]:
        log(f"max_len {max_len}: truncated {stats['truncated']} examples ({stats['tokens_cut']} tokens cut), "
            f"dropped {stats['dropped']} whose prompt alone fills the context")
    return examples, stats


def collate(examples, pad_id=EOT):
    """A list of (ids, labels) -> x, y LongTensors (B, T): x = ids[:-1], y = labels[1:], right-padded
    to the longest with pad_id in x and IGNORE in y (a padded position is never scored)."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor(labels[1:])
    return x, y


def iterate_batches(examples, batch_size, seed=0):
    """Endless (x, y) batches: each epoch a fresh seeded shuffle, cut into batches of batch_size
    (the last of an epoch may be smaller). The same seed gives the same batches."""
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate([examples[j] for j in order[i:i + batch_size]])


def eval_batches(examples, batch_size):
    """The examples in order, as a list of (x, y) batches for evaluation. Sorted by length so that
    each batch pads little; the loss per learned token does not depend on the grouping."""
    ordered = sorted(examples, key=lambda e: len(e[0]))
    return [collate(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]
