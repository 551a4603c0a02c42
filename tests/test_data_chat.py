"""Conversation data (conversations.py): every format -> conversations -> masked-label batches.

The label-mask tests spell out the expected text of each template literally and check the ids and
labels token by token: prompt and user tokens -100, answer tokens learned, exactly one learned
<|endoftext|> closing each answer, padding -100, and y = labels shifted left by one. The ids are
always those of the whole rendered text tokenized in one go, as transformers and llama.cpp do.

At the end, data.py's pretraining preparation as a command: redone when the split
changes, and Ctrl-C in the middle of it.
"""
import itertools
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conversations import (DataError, collate, default_template, encode_examples, eval_batches, iterate_batches,
                  load_conversations, read_records, split_dataset, to_conversation)
import data
from tokenizer import (ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, EOT, IGNORE, encode, encode_conversation, encode_prompt,
                       get_tokenizer, jinja_template)
FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def tokenize_rendered(text):
    """Rendered template text -> ids the way other runtimes get them: in one go, <|endoftext|> special."""
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


def expected(pieces):
    """(literal text or EOT, learned) pieces -> the ids and labels a template must produce. Each run
    of prompt text, and each answer with its EOT, is tokenized whole; the examples below switch
    between prompt and answer where a token boundary falls, which the assert checks."""
    ids, labels = [], []
    for learned, run in itertools.groupby(pieces, key=lambda p: p[1]):
        toks = tokenize_rendered("".join("<|endoftext|>" if text == EOT else text for text, _ in run))
        ids += toks
        labels += toks if learned else [IGNORE] * len(toks)
    assert ids == tokenize_rendered("".join("<|endoftext|>" if text == EOT else text for text, _ in pieces))
    return ids, labels


def check_example(conversation, template, pieces):
    ids, labels = encode_conversation(conversation, template)
    want_ids, want_labels = expected(pieces)
    assert ids == want_ids
    assert labels == want_labels
    # exactly one learned EOT per assistant turn, and it is the token right after each answer
    n_answers = sum(t["role"] == "assistant" for t in conversation)
    assert sum(1 for i, l in zip(ids, labels) if i == EOT and l == EOT) == n_answers
    assert labels[-1] == EOT
    # batched beside a longer example: x = ids[:-1], y = labels[1:], then right padding that is never learned
    n = len(ids) - 1
    x, y = collate([(ids, labels), (ids + [11] * 5, labels + [IGNORE] * 5)])
    assert x[0, :n].tolist() == ids[:-1] and y[0, :n].tolist() == labels[1:]
    assert x[0, n:].tolist() == [EOT] * 5 and y[0, n:].tolist() == [IGNORE] * 5
    return ids, labels


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2))
    return path


# ----------------------------------------------------------------------------- formats and masks

def test_alpaca_json_list_with_input_mask(tmp_path):
    path = write_json(tmp_path / "a.json", [
        {"instruction": "Fix the spelling.", "input": "freind", "output": "friend"},
        {"instruction": "Name a fruit.", "input": "", "output": "Apple."}])
    conv = load_conversations(path)
    assert conv[0] == [{"role": "user", "content": "Fix the spelling.", "input": "freind"},
                       {"role": "assistant", "content": "friend"}]
    check_example(conv[0], "alpaca", [
        (ALPACA_PREAMBLE_INPUT, False),
        ("### Instruction:\nFix the spelling.\n\n### Input:\nfreind\n\n### Response:\n", False),
        ("friend", True), (EOT, True)])
    # no input: the shorter preamble and no Input section
    check_example(conv[1], "alpaca", [
        (ALPACA_PREAMBLE, False), ("### Instruction:\nName a fruit.\n\n### Response:\n", False),
        ("Apple.", True), (EOT, True)])


def test_dolly_jsonl_context_becomes_input_mask():
    conv = load_conversations(FIXTURES / "dolly_sample.jsonl")  # a blank line in the file is allowed
    assert len(conv) == 3
    assert conv[0][0]["input"].startswith("Virgin Australia commenced")
    assert "input" not in conv[1][0]  # empty context: no Input section
    check_example(conv[1], "alpaca", [
        (ALPACA_PREAMBLE, False),
        ("### Instruction:\nWhich is a species of fish? Tope or Rope\n\n### Response:\n", False),
        ("Tope", True), (EOT, True)])
    check_example(conv[1], "chat", [
        ("User: Which is a species of fish? Tope or Rope\nAssistant:", False), (" Tope", True), (EOT, True)])


def test_guanaco_multi_turn_mask():
    conv = load_conversations(FIXTURES / "guanaco_sample.jsonl")
    assert conv[1] == [{"role": "user", "content": "Can you name a prime number?"},
                       {"role": "assistant", "content": "7 is a prime number."},
                       {"role": "user", "content": "And an even one?"},
                       {"role": "assistant", "content": "2 is the only even prime."}]
    check_example(conv[1], "chat", [
        ("User: Can you name a prime number?\nAssistant:", False), (" 7 is a prime number.", True), (EOT, True),
        ("\n", False), ("User: And an even one?\nAssistant:", False), (" 2 is the only even prime.", True),
        (EOT, True)])
    # the same conversation in the alpaca layout: each user turn is an Instruction, each answer learned
    check_example(conv[1], "alpaca", [
        (ALPACA_PREAMBLE, False), ("### Instruction:\nCan you name a prime number?\n\n### Response:\n", False),
        ("7 is a prime number.", True), (EOT, True), ("\n\n", False),
        ("### Instruction:\nAnd an even one?\n\n### Response:\n", False),
        ("2 is the only even prime.", True), (EOT, True)])


def test_oasst_tree_takes_best_ranked_path_mask():
    conv = load_conversations(FIXTURES / "oasst_tree.jsonl")
    # rank 0 beats rank 1; a deleted reply is never taken even at rank 0; ranked beats unranked
    assert conv == [[{"role": "user", "content": "Tell me a fact."},
                     {"role": "assistant", "content": "Honey never spoils."},
                     {"role": "user", "content": "Why?"},
                     {"role": "assistant", "content": "It is too acidic for microbes."}]]
    check_example(conv[0], "chat", [
        ("User: Tell me a fact.\nAssistant:", False), (" Honey never spoils.", True), (EOT, True), ("\n", False),
        ("User: Why?\nAssistant:", False), (" It is too acidic for microbes.", True), (EOT, True)])


def test_chat_messages_sharegpt_and_ultrachat_mask():
    conv = load_conversations(FIXTURES / "chat_messages.jsonl")
    check_example(conv[0], "chat", [
        ("You are terse.\n\n", False), ("User: Hi\nAssistant:", False), (" Hello.", True), (EOT, True),
        ("\n", False), ("User: Bye\nAssistant:", False), (" Goodbye.", True), (EOT, True)])
    assert conv[2] == [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    check_example(conv[2], "chat", [("User: Name a color.\nAssistant:", False), (" Blue.", True), (EOT, True)])
    # raw UltraChat: "data" alternates user and assistant
    check_example(conv[3], "chat", [
        ("User: Is water wet?\nAssistant:", False), (" It makes things wet.", True), (EOT, True), ("\n", False),
        ("User: Is ice?\nAssistant:", False), (" Only when it melts.", True), (EOT, True)])


def test_openorca_dialogues_prompt_completion_and_text_mask(tmp_path):
    """The layouts the fine-tuning guides use beyond the classic ones, gzipped JSONL among them."""
    records = [
        {"id": "niv.1", "system_prompt": "You are terse.", "question": "Name a color.", "response": "Blue."},
        {"id": "cot.2", "system_prompt": "", "question": "2 + 2?", "response": "4."},
        {"dialog": ["Hi there.", "Hello!", "How are you?", "Fine.", "Bye."], "act": [1, 1, 2, 1, 1]},
        {"personas": ["i like tea."], "previous_utterance": ["I like tea.", "Me too."],
         "free_messages": ["Green or black?", "Why?"], "guided_messages": ["Green.", "It is light."]},
        {"prompt": "Say yes.", "completion": "Yes."},
        {"prompt": [{"role": "user", "content": "Say no."}], "completion": [{"role": "assistant", "content": "No."}]},
        {"text": "Once upon a time there was a cat."},
    ]
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    conv = load_conversations(path)
    assert len(conv) == 7
    check_example(conv[0], "chat", [("You are terse.\n\n", False), ("User: Name a color.\nAssistant:", False),
                                    (" Blue.", True), (EOT, True)])
    assert conv[1] == [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}]  # no system
    # daily_dialog: turns alternate from the user; the unanswered last one is dropped
    assert [t["role"] for t in conv[2]] == ["user", "assistant", "user", "assistant"]
    check_example(conv[2], "chat", [("User: Hi there.\nAssistant:", False), (" Hello!", True), (EOT, True),
                                    ("\n", False), ("User: How are you?\nAssistant:", False), (" Fine.", True),
                                    (EOT, True)])
    # blended_skill_talk: the seed utterances, then free (user) and guided (assistant) speakers in turn
    assert [t["content"] for t in conv[3]] == ["I like tea.", "Me too.", "Green or black?", "Green.", "Why?",
                                               "It is light."]
    assert [t["role"] for t in conv[3]] == ["user", "assistant"] * 3
    check_example(conv[4], "alpaca", [(ALPACA_PREAMBLE, False), ("### Instruction:\nSay yes.\n\n### Response:\n", False),
                                      ("Yes.", True), (EOT, True)])
    assert conv[5] == [{"role": "user", "content": "Say no."}, {"role": "assistant", "content": "No."}]
    # plain text: a document, every token learned (the chat layout, which such data gets by default)
    check_example(conv[6], "chat", [(" Once upon a time there was a cat.", True), (EOT, True)])
    assert default_template([conv[6]]) == "chat" and default_template([conv[4]]) == "alpaca"


def render(conversation, template):
    """The conversation as the exported Jinja template renders it, in the sandbox transformers uses."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(jinja_template(template)).render(messages=conversation)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_training_tokens_are_the_rendered_text_in_one_go_and_labels_cover_exactly_the_answers(template):
    """What sft.py trains on is what other runtimes (and our own encode_prompt) feed the model: the
    rendered text tokenized whole. Text meets across template pieces here ("request.\n\n" + "###",
    "Be brief.\n\n" + "User:", answers ending in a newline) where piece-by-piece tokens would differ."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Fix the spelling:\n", "input": "teh cat"},
        {"role": "assistant", "content": "The cat.\n"},
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Spelling:\n\n- the"}]
    answers = [("" if template == "alpaca" else " ") + t["content"] for t in conversation if t["role"] == "assistant"]
    ids, labels = encode_conversation(conversation, template)
    text = render(conversation, template)
    text = text[:text.rindex("<|endoftext|>") + len("<|endoftext|>")]  # training ends at the last answer's EOT
    assert ids == tokenize_rendered(text)
    # the learned tokens are exactly each answer and its EOT, every one labelled with itself
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    learned = [[i for i, _ in run] for is_learned, run in itertools.groupby(zip(ids, labels), lambda t: t[1] != IGNORE)
               if is_learned]
    enc = get_tokenizer()
    assert [enc.decode(run) for run in learned] == [a + "<|endoftext|>" for a in answers]
    # the prompt inference builds for each answer is the start of the training ids, the answer's first token next
    for k in (2, 4):
        prompt = encode_prompt(conversation[:k], template)
        assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE


def test_a_token_straddling_prompt_and_answer_counts_as_prompt():
    """The documented rule: a token is learned iff it starts inside an answer. "### Response:\n" + an
    answer starting "\n" tokenize whole as one "\n\n" token, which belongs to the prompt."""
    ids, labels = encode_conversation([{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "\n Hello"}], "alpaca")
    newlines = encode("\n\n")
    assert len(newlines) == 1 and ids[-3:] == newlines + encode(" Hello") + [EOT]
    assert labels[-3:] == [IGNORE] + encode(" Hello") + [EOT]


def test_endoftext_written_in_a_message_is_text_not_the_special_token():
    conversation = [{"role": "user", "content": "Say <|endoftext|> now"},
                    {"role": "assistant", "content": "Fine: <|endoftext|>"}]
    for template in ("alpaca", "chat"):
        ids, labels = encode_conversation(conversation, template)
        assert ids.count(EOT) == 1 and ids[-1] == labels[-1] == EOT  # only the template's closing EOT
        assert EOT not in encode_prompt(conversation[:1], template)
        assert get_tokenizer().decode(ids).count("<|endoftext|>") == 3


def test_alpaca_and_oasst_files_load_and_pick_templates(made_data):
    alpaca = load_conversations(made_data / "instructions.json")
    assert len(alpaca) == 1100 and default_template(alpaca) == "alpaca"
    oasst = load_conversations(made_data / "oasst_trees.jsonl")
    assert len(oasst) == 100 and default_template(oasst) == "chat"
    assert any(len(c) >= 4 for c in oasst)  # multi-turn paths are kept whole
    trees = [json.loads(line) for line in (made_data / "oasst_trees.jsonl").read_text().splitlines()]
    assert any(to_conversation(t)[-1]["role"] == "user" for t in trees)  # some paths end in a question...
    assert all(c[-1]["role"] == "assistant" for c in oasst)  # ... which is dropped: nothing answers it
    assert default_template(load_conversations(FIXTURES / "dolly_sample.jsonl")) == "alpaca"


# ----------------------------------------------------------------------------- batches

def test_collate_shifts_and_pads_token_by_token():
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you today?"}]
    (ids_s, lab_s), (ids_l, lab_l) = (encode_conversation(c, "chat") for c in (short, long))
    x, y = collate([(ids_s, lab_s), (ids_l, lab_l)])
    T = len(ids_l) - 1
    assert x.shape == y.shape == (2, T) and x.dtype == y.dtype == torch.long
    prompt = encode("User: Hi\nAssistant:")
    answer = encode(" Yo")
    for t in range(T):
        if t < len(prompt) - 1:  # positions inside the prompt predict prompt tokens: not learned
            assert y[0, t] == IGNORE and x[0, t] == prompt[t]
        elif t < len(prompt) - 1 + len(answer):  # the prompt's last token predicts the answer's first
            assert x[0, t] == (prompt + answer)[t] and y[0, t] == answer[t - len(prompt) + 1]
        elif t == len(prompt) - 1 + len(answer):  # the answer's last token predicts the one EOT
            assert x[0, t] == answer[-1] and y[0, t] == EOT
        else:  # right padding: pad id EOT in x, but never learned (masking is by label, not by token)
            assert x[0, t] == EOT and y[0, t] == IGNORE
    # the longer row has no padding: x = ids[:-1], y = labels[1:], its last target the learned EOT
    assert x[1].tolist() == ids_l[:-1] and y[1].tolist() == lab_l[1:] and y[1, -1] == EOT
    assert (y[0] == EOT).sum() == 1 and (y[1] == EOT).sum() == 1


def test_truncation_is_counted_and_prompt_only_examples_dropped():
    logs = []
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 50}],
             [{"role": "user", "content": "long question " * 40}, {"role": "assistant", "content": "ok"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]]
    full = [len(encode_conversation(c, "chat")[0]) for c in convs]
    examples, stats = encode_examples(convs, "chat", max_len=20, log=logs.append)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and stats["examples"] == 2
    assert stats["tokens_cut"] == (full[0] - 21) + (full[1] - 21)
    assert len(examples[0][0]) == 21 and examples[0][1][-1] != EOT  # cut inside the answer
    assert examples[1][0] == encode_conversation(convs[2], "chat")[0]  # short one untouched
    assert len(logs) == 1 and "truncated 2" in logs[0] and "dropped 1" in logs[0]


def test_iterate_batches_reproducible_and_covers_every_example():
    examples = [([1, 2, i + 3], [IGNORE, 2, i + 3]) for i in range(7)]
    a = [b for _, b in zip(range(4), iterate_batches(examples, 3, seed=1))]
    b = [b for _, b in zip(range(4), iterate_batches(examples, 3, seed=1))]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert [x.shape[0] for x, _ in a] == [3, 3, 1, 3]  # the epoch's last batch is the remainder
    # one epoch = the first three batches: every example exactly once (its last token is its label)
    assert sorted(int(y[i, 1]) for _, y in a[:3] for i in range(y.shape[0])) == list(range(3, 10))
    ev = eval_batches(examples, 3)
    assert sum(x.shape[0] for x, _ in ev) == 7


def test_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, val, test = split_dataset(items, 0.1, 0.05, seed=3)
    assert (len(train), len(val), len(test)) == (85, 10, 5)
    assert sorted(train + val + test) == items
    assert split_dataset(items, 0.1, 0.05, seed=3) == (train, val, test)
    assert split_dataset(items, 0.1, 0.05, seed=4) != (train, val, test)
    with pytest.raises(DataError, match="too few"):
        split_dataset([1, 2], 0.1, 0.1, seed=0)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name, text, where, what", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"foo": 1}\n', ":3:", "fits no known format"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', ":2:", "invalid JSON"),
    ("bad.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', ":1:", "'role' must be one of"),
    ("bad.jsonl", '{"instruction": "a", "output": 7}\n', ":1:", "'output' is a int"),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"question": "c"}\n]\n', ":3:", "fits no known"),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", \n]\n', ":4:", "invalid JSON"),
    ("bad.json", '[\n  {"instruction": "a", "output": "b"}\n', "", "never closed"),
    ("bad.jsonl", '{"text": ["not", "a", "string"]}\n', ":1:", "fits no known format"),
    # one message of OpenAssistant's flat export is not a document to learn whole
    ("bad.jsonl", '{"message_id": "m1", "parent_id": null, "role": "prompter", "text": "Hi"}\n', ":1:",
     "fits no known format"),
    ("bad.jsonl", '{"dialog": ["Hi", 3]}\n', ":1:", "a dialogue's turns must be a list of strings"),
    ("bad.jsonl", '{"previous_utterance": "hi there", "free_messages": ["a"], "guided_messages": ["b"]}\n', ":1:",
     "must be lists"),
    ("bad.jsonl", '{"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}]}\n', ":1:",
     "both be strings or both be lists"),
    ("cut.jsonl.gz", None, "", "cannot read"),  # a gzip file cut short
    # two JSON files concatenated: the second list must not be dropped without a word
    ("two.json", '[\n  {"instruction": "a", "output": "b"}\n]\n\n[{"instruction": "c", "output": "d"}]\n', ":5:",
     "extra data after the JSON list"),
    ("two.json", '[]\n{"instruction": "c", "output": "d"}\n', ":2:", "extra data after the JSON list"),
])
def test_malformed_record_names_file_and_line(tmp_path, name, text, where, what):
    path = tmp_path / name
    if text is None:
        path.write_bytes(gzip.compress(b'{"instruction": "a", "output": "b"}\n' * 100)[:40])
    else:
        path.write_text(text)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(path) + where in str(e.value) and what in str(e.value)


@pytest.mark.parametrize("name, text, where", [
    ("deep.json", "[" * 100000 + "]" * 100000, ":1:"),
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n' + "[" * 100000 + "]" * 100000, ":2:"),
])
def test_json_nested_too_deeply_names_the_file_not_a_recursion_error(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="nested too deeply") as e:
        load_conversations(path)
    assert str(e.value).startswith(str(path) + where)


@pytest.mark.parametrize("name, text, where", [
    ("big.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n", ":2:"),
    ("big.json", '[\n  {"instruction": "a", "output": "b"},\n  {"n": ' + "9" * 5000 + "}\n]\n", ":3:"),
])
def test_an_integer_past_pythons_digit_limit_names_the_line_not_a_value_error(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == f"{path}{where} invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)"


def test_non_utf8_data_names_the_line_and_a_directory_is_not_missing(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9", "output": "c"}\n')
    with pytest.raises(DataError) as e:  # was "... can't decode byte 0xe9 in position 46"
        load_conversations(path)
    assert str(e.value) == f"{path}:3: not UTF-8 text (byte 0xe9)"
    with pytest.raises(DataError) as e:  # was "no such file"
        load_conversations(tmp_path)
    assert str(e.value) == f"{tmp_path}: a directory, not a data file (a JSON or JSONL file)"


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    """U+2028, U+2029, U+0085 and form feeds may stand unescaped inside JSON strings (ensure_ascii=False
    writes them so); they are no line breaks. Windows line ends are read too, and line numbers stay right."""
    odd = "one\u2028two\u2029three\x85four\x0cfive"
    rows = [json.dumps({"instruction": "Split " + odd, "output": odd}, ensure_ascii=False),
            json.dumps({"instruction": "b", "output": "c"}), '{"instruction": ']
    path = tmp_path / "odd.jsonl"
    path.write_bytes("\r\n".join(rows).encode("utf-8"))
    records = list(itertools.islice(read_records(path), 2))
    assert records == [(1, {"instruction": "Split " + odd, "output": odd}), (2, {"instruction": "b", "output": "c"})]
    with pytest.raises(DataError, match=r"odd\.jsonl:3: invalid JSON"):
        list(read_records(path))


def test_unknown_name_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="not one of alpaca, dolly, guanaco"):
        load_conversations(tmp_path / "nope.json")
    (tmp_path / "empty.json").write_text("[]")
    assert list(read_records(tmp_path / "empty.json")) == []
    with pytest.raises(DataError, match="no usable conversations"):
        load_conversations(tmp_path / "empty.json")


def test_records_without_an_answer_are_skipped_loudly(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "a", "output": ""}\n{"instruction": "b", "output": "c"}\n')
    logs = []
    assert len(load_conversations(path, log=logs.append)) == 1
    assert logs and "skipped 1" in logs[0]


# ----------------------------------------------------------------------------- pretraining preparation

def test_prepare_is_redone_when_val_fraction_changes(tmp_path, made_data):
    src, out = tmp_path / "play.txt", tmp_path / "prep"
    src.write_text((made_data / "stories.txt").read_text()[:20000])
    data.prepare_pretrain_data(src, out, val_fraction=0.1)
    total = len(data.load_tokens(out, "train")) + len(data.load_tokens(out, "val"))
    data.prepare_pretrain_data(src, out, val_fraction=0.25)  # the same file, another split: not "done already"
    assert len(data.load_tokens(out, "val")) == int(total * 0.25)
    assert json.loads((out / "meta.json").read_text())["val_tokens"] == int(total * 0.25)
    mtime = (out / "train.bin").stat().st_mtime_ns
    data.prepare_pretrain_data(src, out, val_fraction=0.25)  # the same split again: skipped
    data.prepare_pretrain_data(src, out)  # no split asked for (train.py): whatever is there is kept
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert json.loads((out / "meta.json").read_text())["val_fraction"] == 0.25


def test_prepare_into_a_file_is_a_one_line_error(tmp_path, capsys):
    src, out = tmp_path / "a.txt", tmp_path / "taken"
    src.write_text("Some text.\n")
    out.write_text("someone's file")
    with pytest.raises(SystemExit) as e:
        data.main([str(src), "--out", str(out)])  # was "[Errno 17] File exists"
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {out} is a file, not a directory for the token files\n"
    assert out.read_text() == "someone's file"


def test_ctrl_c_while_tokenizing_exits_quietly_and_leaves_no_partial_files(tmp_path):
    """Ctrl-C reaches every process of the terminal's foreground group: the tokenizing workers ignore
    it, the main process stops them, removes its partial file and exits 130, without a traceback."""
    src, out = tmp_path / "big.txt", tmp_path / "prep"
    # ~24 MB of made-up words (slow to tokenize: many merges a word), blank-line separated documents: 2
    # workers with several seconds of work, stopped after the first second or so
    letters = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, size=24_000_000, dtype=np.uint8)
    letters[::7], letters[::701] = ord(" "), ord("\n")  # words of 6 letters, lines of 100 words
    src.write_bytes(letters.tobytes().replace(b"\n", b"\n\n"))
    proc = subprocess.Popen([sys.executable, "data.py", "pretrain", str(src), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)  # its own process group, as a terminal's job is
    partial, deadline = out / "train.bin.tmp", time.time() + 60
    while not (partial.exists() and partial.stat().st_size > 0):  # the workers have sent back tokens
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no partial token file, no meta.json
