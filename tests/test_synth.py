"""synth.py: each rule that keeps, cleans or drops a generated conversation, and the resumable output."""
import json
from pathlib import Path

import pytest

from synth import DEFAULTS, build, clean_conversation, load_config
CFG = {**DEFAULTS, "model": "x", "prompt_lines": ["Talk about {word}.", "STUDENT:"],
       "words": ["black hole"], "exclude": ["as an AI"]}


def clean(text, word="black hole", **over):
    return clean_conversation("STUDENT:" + text, word, {**CFG, **over})


def test_a_well_formed_dialogue_is_kept_as_chat_messages():
    msgs, reason = clean(" What is a black hole?\nTEACHER: A region where gravity wins.\n")
    assert reason is None
    assert msgs == [{"role": "user", "content": "What is a black hole?"},
                    {"role": "assistant", "content": "A region where gravity wins."}]


def test_first_turn_must_mention_the_word_case_insensitively_multi_word_too():
    assert clean(" What is a BLACK   hole?\nTEACHER: Gravity.")[1] is None  # spacing and case do not matter
    assert clean(" What is a star?\nTEACHER: A black hole is not a star.")[1] == "first turn does not mention the word"


def test_every_line_must_be_a_known_role():
    assert clean(" Black hole?\nTEACHER: Yes.\nNARRATOR: Then...")[1] == "a line that is not 'ROLE: text'"
    assert clean(" Black hole?\njust some text")[1] == "a line that is not 'ROLE: text'"


def test_exclude_terms_are_literal_case_insensitive_substrings():
    assert clean(" Black hole?\nTEACHER: As an AI, I know.")[1] == "an excluded term"
    # regex characters in a term are matched literally, not as a pattern
    assert clean(" Black hole?\nTEACHER: Yes.", exclude=["h.le"])[1] is None
    assert clean(" Black hole?\nTEACHER: Ah (sigh).", exclude=["(sigh)"])[1] == "an excluded term"
    # an empty list, or an empty term, excludes nothing
    assert clean(" Black hole?\nTEACHER: Yes.", exclude=[])[1] is None
    assert clean(" Black hole?\nTEACHER: Yes.", exclude=[""])[1] is None


def test_leading_form_of_address_is_stripped():
    msgs, _ = clean(" Teacher, what is a black hole?\nTEACHER: Student: it is dense.")
    assert msgs[0]["content"] == "What is a black hole?"
    assert msgs[1]["content"] == "It is dense."


def test_fully_quoted_utterances_are_unwrapped_but_inner_quotes_kept():
    msgs, _ = clean(' "What is a black hole?"\nTEACHER: “Very dense.”')
    assert [m["content"] for m in msgs] == ["What is a black hole?", "Very dense."]
    msgs, _ = clean(' "Black hole" and "star" differ how?\nTEACHER: Mass.')
    assert msgs[0]["content"] == '"Black hole" and "star" differ how?'


def test_trailing_unanswered_user_turn_is_dropped():
    msgs, _ = clean(" Black hole?\nTEACHER: Dense.\nSTUDENT: And then?")
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert clean(" Black hole?")[1] == "no user turn answered by the assistant"


def test_a_truncated_generation_loses_its_cut_last_line():
    msgs, _ = clean_conversation("STUDENT: Black hole?\nTEACHER: Dense.\nSTUDENT: And\nTEACHER: It is ver",
                                 "black hole", CFG, truncated=True)
    assert msgs[-1] == {"role": "assistant", "content": "Dense."}


def test_same_speaker_twice_is_dropped():
    assert clean(" Black hole?\nSTUDENT: Hello?\nTEACHER: Yes.")[1] == "two turns in a row by one speaker"


def fake_generate(replies):
    calls = []

    def generate(prompts, cfg):
        calls.append(prompts)
        return [(replies[i % len(replies)], False) for i in range(len(prompts))]
    return generate, calls


def test_build_appends_resumes_and_deduplicates(tmp_path):
    out = tmp_path / "c.jsonl"
    cfg = {**CFG, "words": ["cat", "dog"], "conversations_per_word": 2, "output": str(out),
           "text_output": str(tmp_path / "c.txt"), "prompt_lines": ["About {word}:", "STUDENT:"]}
    gen, calls = fake_generate([" What is a cat?\nTEACHER: A pet.", " What is a dog?\nTEACHER: A pet too."])
    kept, dropped = build(cfg, gen)
    assert calls[0] == ["About cat:\nSTUDENT:"] * 2 + ["About dog:\nSTUDENT:"] * 2
    # cat prompts got replies 0 and 1 (the dog reply doesn't mention cat); dog got 0 (no dog) and 1
    assert kept == 2 and dropped == {"first turn does not mention the word": 2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["word"] for r in records] == ["cat", "dog"]
    assert (tmp_path / "c.txt").read_text().startswith("TERM: cat\nSTUDENT: What is a cat?\nTEACHER: A pet.\n\n")
    # a second run with one new word only generates for that word, and a repeat of a kept
    # conversation is not written again
    cfg["words"] = ["cat", "dog", "cat and dog"]
    gen, calls = fake_generate([" What is a cat and dog?\nTEACHER: Pets."] * 1)
    kept, dropped = build(cfg, gen)
    assert calls[0] == ["About cat and dog:\nSTUDENT:"] * 2
    assert kept == 1 and dropped == {"a duplicate": 1}
    assert len(out.read_text().splitlines()) == 3


def test_resume_reads_back_unicode_line_separators_written_unescaped(tmp_path):
    """ensure_ascii=False writes U+2028 and U+0085 as they are; they are not line breaks when the
    output is read back to resume (nor when sft.py loads it)."""
    from conversations import load_conversations
    out = tmp_path / "c.jsonl"
    cfg = {**CFG, "words": ["cat"], "output": str(out), "prompt_lines": ["About {word}:", "STUDENT:"]}
    answer = "A pet.\u2028Also\x85a friend."
    gen, _ = fake_generate([" What is a cat?\nTEACHER: " + answer])
    assert build(cfg, gen)[0] == 1
    assert answer in out.read_text(encoding="utf-8")
    cfg["words"] = ["cat", "dog"]
    gen, calls = fake_generate([" What is a dog?\nTEACHER: A pet too."])
    assert build(cfg, gen)[0] == 1 and calls[0] == ["About dog:\nSTUDENT:"]  # cat was read back as done
    assert [c[1]["content"] for c in load_conversations(out)] == [answer, "A pet too."]


def test_config_errors_are_clear(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"model": "gpt2", "words": []}))
    with pytest.raises(ValueError, match="missing prompt_lines"):
        load_config(p)
    p.write_text(json.dumps({"model": "gpt2", "words": [], "prompt_lines": ["Hi {word}"]}))
    with pytest.raises(ValueError, match="last prompt line must open a turn"):
        load_config(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config"):
        load_config(p)
    p.write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError inside json, not a ValueError
    with pytest.raises(ValueError, match=r"cfg.json: cannot read config \(nested too deeply to read\)$"):
        load_config(p)


def test_end_to_end_through_the_real_engine_into_sft_data(tmp_path):
    """A tiny model that has memorized one dialogue, run through serve.py's batched engine with greedy
    sampling: the plumbing (prompts in, counts, resumable output) works and the file is sft.py data."""
    import torch

    from conversations import load_conversations
    from gpt import GPT, GPTConfig
    from tokenizer import get_tokenizer
    from synth import engine_generate
    from training import make_optimizer, train_step

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64))
    ids = get_tokenizer().encode("About cat:\nSTUDENT: What is a cat?\nTEACHER: A small pet.<|endoftext|>",
                                 allowed_special="all")
    batch = [(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))]
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0, verbose=False)
    for _ in range(60):
        loss = train_step(model, opt, batch, lr=1e-2)
    assert loss < 0.05, "the tiny model should have memorized its one dialogue"
    model.save_checkpoint(tmp_path / "m")

    out = tmp_path / "conv.jsonl"
    cfg = {**DEFAULTS, "model": str(tmp_path / "m"), "prompt_lines": ["About {word}:", "STUDENT:"],
           "words": ["cat", "dog"], "conversations_per_word": 3, "temperature": 0.0, "max_tokens": 30,
           "output": str(out)}
    generate = engine_generate(cfg["model"], device="cpu")
    kept, dropped = build(cfg, generate)
    # greedy: the three cat prompts give the same dialogue (kept once, then duplicates); the dog
    # prompts cannot mention "dog" (the model only knows the cat dialogue)
    assert kept == 1
    assert dropped["a duplicate"] == 2 and sum(dropped.values()) == 5
    assert [json.loads(line)["messages"] for line in out.read_text().splitlines()] == [
        [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small pet."}]]
    # resuming: cat is done, only dog is generated again, and nothing new is kept
    kept, dropped = build(cfg, generate)
    assert kept == 0 and sum(dropped.values()) == 3
    # sft.py's loader reads the file as it is
    assert load_conversations(out, log=lambda *_: None) == [
        [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small pet."}]]
    # --dtype int8 (synth.py's flag, as generate.py's): the memorized dialogue survives int8 weights
    out.unlink()
    kept, _ = build(cfg, engine_generate(cfg["model"], device="cpu", dtype="int8"))
    assert kept == 1 and [json.loads(line)["messages"] for line in out.read_text().splitlines()] == [
        [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small pet."}]]


@pytest.mark.parametrize("key,value,message", [
    ("max_tokens", "lots", "max_tokens must be an integer >= 1"),
    ("temperature", -1, "temperature must be a number >= 0"),
    ("top_p", 0, r"top_p must be a number in \(0, 1\]"),
    ("words", ["cat", 3], "words must be a list of non-empty strings"),
    ("conversations_per_word", True, "conversations_per_word must be an integer >= 1"),
])
def test_config_values_are_type_and_range_checked(tmp_path, key, value, message):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"model": "gpt2", "words": ["cat"], "prompt_lines": ["STUDENT:"], key: value}))
    with pytest.raises(ValueError, match=message):
        load_config(p)


def test_cli_bad_config_is_one_line_error(tmp_path):
    import subprocess
    import sys
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"model": str(tmp_path / "missing"), "words": ["cat"],
                             "prompt_lines": ["STUDENT:"], "output": str(tmp_path / "o.jsonl")}))
    r = subprocess.run([sys.executable, "synth.py", str(p)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr


def write_config(tmp_path, **over):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"model": "gpt2", "words": ["cat"], "prompt_lines": ["STUDENT:"], **over}))
    return p


@pytest.mark.parametrize("key,value,message", [
    ("output", 5, "output must be a file path, not 5"),
    ("output", {"a": 1}, "output must be a file path, not {'a': 1}"),
    ("output", "", "output must be a file path, not ''"),
    ("text_output", {"a": 1}, "text_output must be a file path or null, not {'a': 1}"),
    ("text_output", True, "text_output must be a file path or null, not True"),  # not file descriptor 1
    ("model", 5, "model must be a model name or checkpoint path, not 5"),
    ("ouput", "x.jsonl", "unknown key 'ouput'; the keys are model, prompt_lines, words, roles"),
    ("output", "{tmp}/afile/x.jsonl", "output '{tmp}/afile/x.jsonl' cannot be created: {tmp}/afile is a file"),
    ("text_output", "{tmp}", "text_output '{tmp}' is a directory"),
    ("text_output", "{tmp}/conversations.jsonl", "text_output '{tmp}/conversations.jsonl' is the same file as output"),
    ("output", "{tmp}/cfg.json", "output '{tmp}/cfg.json' is the config file itself"),
])
def test_config_keys_and_output_paths_are_checked(tmp_path, monkeypatch, key, value, message):
    """Every key's type, and that both outputs can be appended to, are checked when the config is
    read, before any generation; the error names the config file and the key."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file")
    if isinstance(value, str):
        value = value.replace("{tmp}", str(tmp_path))
    p = write_config(tmp_path, **{key: value})
    with pytest.raises(ValueError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: ") and message.replace("{tmp}", str(tmp_path)) in str(e.value)


def test_command_line_output_is_checked_and_named_as_the_flag(tmp_path):
    (tmp_path / "afile").write_text("a file")
    p = write_config(tmp_path)
    assert load_config(p, output=str(tmp_path / "o.jsonl"), model=None)["output"] == str(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=f"^--output '{tmp_path}/afile/o.jsonl' cannot be created"):
        load_config(p, output=str(tmp_path / "afile" / "o.jsonl"))


def test_cli_bad_output_is_refused_before_the_model_is_loaded(tmp_path, capsys):
    """A bad output path, or an existing output that is not UTF-8, is reported before any model is
    loaded or text generated (the model here does not even exist), and the file is named."""
    import synth
    from conftest import one_line_error
    (tmp_path / "afile").write_text("a file")
    missing = str(tmp_path / "no-model")
    for over, named in (({"output": str(tmp_path / "afile" / "x.jsonl")}, "output"),
                        ({"output": str(tmp_path / "o.jsonl"), "text_output": str(tmp_path)}, "text_output")):
        with pytest.raises(SystemExit) as e:
            synth.main([str(write_config(tmp_path, model=missing, **over)), "--device", "cpu"])
        assert e.value.code == 2
        err = one_line_error(capsys)
        assert f"cfg.json: {named} " in err and "no-model" not in err
        assert not (tmp_path / "o.jsonl").exists()
    (tmp_path / "latin1.jsonl").write_bytes('{"word": "café"}\n'.encode("latin-1"))
    with pytest.raises(SystemExit):
        synth.main([str(write_config(tmp_path, model=missing, output=str(tmp_path / "latin1.jsonl"))), "--device", "cpu"])
    assert one_line_error(capsys) == f"error: {tmp_path / 'latin1.jsonl'}: not UTF-8 (byte 13), " \
                                     "so not conversations written by synth.py"


def test_a_failed_append_leaves_both_outputs_as_they_were(tmp_path):
    """A write that fails at the end of a run (a full disk) cuts both files back to their old length:
    no half record that would stop the next run from resuming, no conversation in the text file but
    not the JSONL. The error names the file."""
    from conftest import file_size_limit
    out, txt = tmp_path / "c.jsonl", tmp_path / "c.txt"
    cfg = {**CFG, "words": ["cat"], "output": str(out), "text_output": str(txt),
           "prompt_lines": ["About {word}:", "STUDENT:"]}
    gen, _ = fake_generate([" What is a cat?\nTEACHER: A pet."])
    txt.write_text("x" * 1000)
    with file_size_limit(1010), pytest.raises(OSError) as e:  # the JSONL fits, the text does not
        build(cfg, gen)
    assert e.value.filename == str(txt) and not out.exists() and txt.read_text() == "x" * 1000
    done = '{"messages": [], "word": "dog"}\n'
    out.write_text(done)
    with file_size_limit(len(done) + 10), pytest.raises(OSError) as e:  # the JSONL's new line is cut
        build(cfg, gen)
    assert e.value.filename == str(out) and out.read_text() == done and txt.read_text() == "x" * 1000
    assert build(cfg, gen)[0] == 1
    assert out.read_text().startswith(done) and txt.read_text().startswith("x" * 1000 + "TERM: cat\n")
