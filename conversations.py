"""Conversation data: the instruction and chat datasets people publish, read into one form, and the
masked-label batches sft.py (and dpo.py, through preference.py) trains on.

Every source becomes the same internal form, a conversation: a list of turns {"role", "content"}
(a user turn may carry "input"); tokenizer.py turns a conversation into tokens, and the batches
below put those tokens in rows. data.py holds the other kind of training data: plain text for
pretraining.
"""

import gzip
import itertools
import json
import random
import re
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import DownloadError, cache_dir, download
from common import JSON_ERRORS, json_problem
from tokenizer import EOT, IGNORE, encode_conversation, get_tokenizer

# ----------------------------------------------------------------------------- reading conversations
# The format is detected record by record from its keys:
#
#   alpaca    {"instruction", "input", "output"}                       JSON list or JSONL
#   dolly     {"instruction", "context", "response"}                   JSONL
#   guanaco   {"text": "### Human: ...### Assistant: ..."}             JSONL, multi-turn
#   oasst     {"message_tree_id", "prompt": {"text", "role", "replies": [...]}}   JSONL trees, multi-turn
#   chat      {"messages": [{"role", "content"}, ...]}                  JSONL (OpenAI / UltraChat style)
#   sharegpt  {"conversations": [{"from", "value"}, ...]}               JSONL
#   ultrachat {"id", "data": ["user text", "assistant text", ...]}       JSONL (the raw UltraChat files)
#   openorca  {"system_prompt", "question", "response"}                 JSONL / parquet rows
#   dialogue  {"dialog": ["turn", "turn", ...]} (daily_dialog), or blended_skill_talk's
#             {"previous_utterance": [...], "free_messages": [...], "guided_messages": [...]}: turns
#             alternate, the first speaker as the user
#   prompt/completion {"prompt", "completion"}: strings, or message lists (TRL's conversational form)
#   text      {"text": "..."} with no Guanaco markers: a document, every token of it learned (in the
#             chat layout, " text<|endoftext|>"; sft.py picks that layout for such data)
#
# Any of them may be gzipped (name.jsonl.gz, as OpenAssistant's tree exports ship).
#
# A record that fits none of them stops loading with an error naming the file and line: training on
# a silently half-read file is worse than not training at all.

DATASETS = {  # the names sft.py accepts besides a path; downloaded once into checkpoint.cache_dir()/data
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
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic number, whatever the file's name
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is skipped, not an error
    except UnicodeDecodeError as e:  # the line, not the byte offset Python's message gives
        line = e.object.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except (OSError, EOFError, zlib.error) as e:  # (a truncated or corrupt gzip file too)
        raise DataError(f"{path}: cannot read ({e})") from None
    if text.lstrip().startswith("["):
        yield from _json_list_records(path, text)
    else:
        yield from _jsonl_records(path, text)


def _jsonl_records(path, text):
    """JSONL: one record per line, blank lines allowed."""
    # split on "\n" only: str.splitlines() also splits on U+2028, U+0085, \x0c ..., which JSON
    # allows unescaped inside strings (json.dumps(ensure_ascii=False) writes them as they are).
    # A "\r" left by "\r\n" is whitespace to json.loads.
    for n, row in enumerate(text.split("\n"), start=1):
        if row.strip():
            try:
                yield n, json.loads(row)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except JSON_ERRORS as e:  # nested too deeply, an integer past Python's digit limit
                raise DataError(f"{path}:{n}: invalid JSON ({json_problem(e)})") from None


def _json_list_records(path, text):
    """One JSON list, decoded element by element (raw_decode) to know the line each record starts on."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    i = space.match(text, space.match(text).end() + 1).end()  # the first record, after the '['
    line, counted = 1, 0
    try:
        if text[i] != "]":  # not an empty list
            while True:
                line += text.count("\n", counted, i)  # counted incrementally: linear in the file's size
                counted = i
                record, i = decoder.raw_decode(text, i)
                yield line, record
                i = space.match(text, i).end()
                if text[i] == "]":
                    break
                if text[i] != ",":
                    raise json.JSONDecodeError("Expecting ',' or ']'", text, i)
                i = space.match(text, i + 1).end()
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except IndexError:
        raise DataError(f"{path}: the JSON list is never closed (truncated file?)") from None
    except JSON_ERRORS as e:
        raise DataError(f"{path}:{line}: invalid JSON ({json_problem(e)})") from None
    # the list closes at text[i]; anything but whitespace after it (a second list pasted on, a stray
    # record) would otherwise be dropped without a word
    rest = space.match(text, i + 1).end()
    if rest < len(text):
        line += text.count("\n", counted, rest)
        raise DataError(f"{path}:{line}: extra data after the JSON list")


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
        turn = {"role": roles[t[role_key]], "content": _text(t, text_key)}
        if turn["role"] == "user" and isinstance(t.get("input"), str) and t["input"].strip():
            turn["input"] = t["input"].strip()  # (Alpaca's input, kept as our own conversations write it)
        out.append(turn)
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
    if isinstance(record.get("data"), list) and all(isinstance(t, str) for t in record["data"]):
        return [{"role": ("user", "assistant")[i % 2], "content": t.strip()} for i, t in enumerate(record["data"])]
    if isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return _from_oasst(record)
    if "instruction" in record and "output" in record:
        return _single_turn(_text(record, "instruction"), _text(record, "input"), _text(record, "output"))
    if "instruction" in record and "response" in record:
        return _single_turn(_text(record, "instruction"), _text(record, "context"), _text(record, "response"))
    if "question" in record and "response" in record:  # OpenOrca
        system = _text(record, "system_prompt")
        return ([{"role": "system", "content": system}] if system else []) + \
            _single_turn(_text(record, "question"), "", _text(record, "response"))
    if "dialog" in record or "free_messages" in record:
        turns = record["dialog"] if "dialog" in record else _blended_skill_talk(record)
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError("a dialogue's turns must be a list of strings")
        return [{"role": ("user", "assistant")[i % 2], "content": t.strip()} for i, t in enumerate(turns)]
    if "prompt" in record and "completion" in record:
        return _from_prompt_completion(record["prompt"], record["completion"])
    if isinstance(record.get("text"), str) and GUANACO_TURN.search(record["text"]):
        return _from_guanaco(record["text"])
    if isinstance(record.get("text"), str) and "role" not in record:  # (one message of a thread is no document)
        return [{"role": "assistant", "content": record["text"].strip()}]
    raise ValueError(f"fits no known format (keys: {', '.join(sorted(record)) or 'none'}); expected "
                     f"alpaca, dolly, guanaco, oasst, chat 'messages', sharegpt, ultrachat, openorca, dialog, "
                     f"prompt/completion or text")


def _blended_skill_talk(record):
    """blended_skill_talk's turns in order: the two seed utterances, then free and guided speaker
    alternating (the free speaker opens)."""
    seed, free, guided = (record.get(k) or [] for k in ("previous_utterance", "free_messages", "guided_messages"))
    if not all(isinstance(part, list) for part in (seed, free, guided)):
        raise ValueError("previous_utterance, free_messages and guided_messages must be lists")
    turns = list(seed)
    for a, b in itertools.zip_longest(free, guided):
        turns += [t for t in (a, b) if t is not None]
    return turns


def _from_prompt_completion(prompt, completion):
    if isinstance(prompt, str) and isinstance(completion, str):
        return _single_turn(prompt.strip(), "", completion.strip())
    if isinstance(prompt, list) and isinstance(completion, list):
        roles = {"system": "system", "user": "user", "assistant": "assistant"}
        return _from_turns(prompt, "role", "content", roles) + _from_turns(completion, "role", "content", roles)
    raise ValueError("prompt and completion must both be strings or both be lists of messages")


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
        dest = cache_dir() / "data" / url.rsplit("/", 1)[1]
        try:
            return download(url, dest, offline="give a JSON or JSONL file on this machine (--data FILE)")
        except DownloadError as e:
            raise DataError(f"the {name} dataset: {e}") from None
        except OSError as e:  # a full disk, a cache folder that cannot be written
            raise DataError(f"the {name} dataset: cannot write {dest} ({e.strerror or e})") from None
    if Path(name).is_dir():
        raise DataError(f"{name}: a directory, not a data file (a JSON or JSONL file)")
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
    return "chat" if any(is_multi_turn(c) or not any(t["role"] == "user" for t in c) for c in conversations) \
        else "alpaca"


def split_dataset(items, val_frac, test_frac, seed, what="conversations"):
    """Shuffle with `seed` and cut into (train, val, test): the same seed gives the same split."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_val, n_test = (max(1, round(f * len(items))) if f > 0 else 0 for f in (val_frac, test_frac))
    if n_val + n_test >= len(items):
        raise DataError(f"{len(items)} {what} are too few to split off {n_val} for validation"
                        + (f" and {n_test} for test" if n_test else ""))
    return items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]


# ----------------------------------------------------------------------------- masked-label batches
# An example is (ids, labels) from encode_conversation. The model reads
# x = ids[:-1] and is scored on y = labels[1:]: position t predicts token t+1, so a label belongs
# to the position *before* its token. Padding goes on the right with label IGNORE; masking is done
# by label, never by "token == pad", because the pad token (EOT) is also the learned end of answer.

def encode_examples(conversations, template, max_len, enc=None, log=print, learn_prompt=False):
    """Encode conversations into examples of at most max_len + 1 tokens (so x and y hold max_len).
    A longer example is cut at the end; one with nothing left to learn is dropped. Both are counted
    and printed, never silent. `learn_prompt`: every token is learned, the prompts' too (sft.py
    --no-mask), not only the answers'. Returns (examples, stats)."""
    enc = enc or get_tokenizer()
    examples, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "tokens_cut": 0, "learned_tokens": 0}
    for conversation in tqdm(conversations, desc="tokenizing", unit="conv", disable=None, leave=False):
        ids, labels = encode_conversation(conversation, template, enc)
        if learn_prompt:
            labels = list(ids)
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


def pack_examples(examples, max_len):
    """Short examples packed into rows of at most max_len tokens (of x), in order, each row a list of
    examples: one row computes what padding to the longest example would spend on pad tokens. An
    example never straddles two rows. Batch them with collate_packed."""
    rows, row, used = [], [], 0
    for ids, labels in examples:
        n = len(ids) - 1
        if row and used + n > max_len:
            rows.append(row)
            row, used = [], 0
        row.append((ids, labels))
        used += n
    return rows + ([row] if row else [])


def collate_packed(rows, pad_id=EOT):
    """Rows of packed examples -> (x, y, pos, segments), each (B, T): x and y as collate makes them,
    pos restarting at 0 with each example, and segments numbering the examples of a row (padding
    -1). GPT.hidden keeps each token's attention within its own example, so a packed example's
    loss is what it would be alone."""
    parts = [collate(row, pad_id) for row in rows]  # (per row: its examples, each padded to the row's longest)
    T = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (row, (rx, ry)) in enumerate(zip(rows, parts)):
        at = 0
        for k, (ids, _) in enumerate(row):
            n = len(ids) - 1
            x[r, at:at + n], y[r, at:at + n] = rx[k, :n], ry[k, :n]
            pos[r, at:at + n], segments[r, at:at + n] = torch.arange(n), k
            at += n
    return x, y, pos, segments


def iterate_batches(examples, batch_size, seed=0, collate_fn=collate):
    """Endless batches of `examples` (or of packed rows, with collate_fn=collate_packed): each epoch
    a fresh seeded shuffle, cut into batches of batch_size (the last of an epoch may be smaller).
    The same seed gives the same batches."""
    for epoch in itertools.count():
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate_fn([examples[j] for j in order[i:i + batch_size]])


def eval_batches(examples, batch_size):
    """The examples as a list of (x, y) batches for evaluation, sorted by length (a fixed order) so
    that each batch pads little; the loss per learned token does not depend on the grouping."""
    ordered = sorted(examples, key=lambda e: len(e[0]))
    return [collate(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]
