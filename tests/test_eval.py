"""eval.py and scoring.py: every score against an independent computation with transformers'
GPT2LMHeadModel on random weights saved in the hub's layout, and the CLI's one-line errors."""
import hashlib
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scoring
from conftest import one_line_error, saying_always
from gpt import GPT, GPTConfig
from test_gpt import hub_layout_file, random_hf
from tokenizer import EOT, encode, get_tokenizer


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    """A random 2-layer GPT-2 with a 64-token context: transformers' model, and ours loaded from its hub file."""
    hf = random_hf(2, 4, 64, n_positions=64)
    path = hub_layout_file(tmp_path_factory.mktemp("hub"), hf)
    return hf, GPT.from_pretrained(path), path


@pytest.fixture(scope="module")
def story_ids(made_data):
    text = (made_data / "stories.txt").read_text()[:1500]
    return text, encode(text)


def hf_sliding_window_nll(hf, ids, context, stride):
    """Transformers' loss of every token t >= 1 of `ids` given the context a sliding window gives it:
    windows start at multiples of `stride` and hold at most `context` tokens of input, and t is
    scored in the first one that reaches it, from ids[b:t], b = stride * max(0, ceil((t - context) / stride)).
    Returns (summed nll in nats, tokens scored, the scored tokens in order)."""
    by_start = {}
    for t in range(1, len(ids)):
        by_start.setdefault(stride * max(0, math.ceil((t - context) / stride)), []).append(t)
    total, scored = 0.0, []
    for b, targets in by_start.items():  # one forward per window start, read at each target's position
        with torch.no_grad():
            logits = hf(torch.tensor([ids[b:targets[-1]]])).logits[0].double()
        rows = torch.tensor([t - 1 - b for t in targets])
        total += float(F.cross_entropy(logits[rows], torch.tensor([ids[t] for t in targets]), reduction="sum"))
        scored += [ids[t] for t in targets]
    return total, len(scored), scored


@pytest.mark.parametrize("stride", [64, 24])  # no overlap; each window two-thirds context
def test_perplexity_equals_transformers_loss_with_the_context_each_window_gives(hf_and_ours, story_ids, stride):
    hf, ours, _ = hf_and_ours
    _, ids = story_ids
    assert len(ids) > 4 * 64  # several windows, the last one short
    nll, count, scored = hf_sliding_window_nll(hf, ids, 64, stride)
    got = scoring.perplexity(ours, ids, stride=stride, batch_size=3, enc=get_tokenizer())
    assert got["tokens"] == count == len(ids) - 1  # every token but the first, once
    assert got["loss"] == pytest.approx(nll / count, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    n_bytes = sum(len(get_tokenizer().decode_single_token_bytes(t)) for t in scored)
    assert got["bytes"] == n_bytes and got["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_bits_per_byte_counts_the_texts_bytes_and_leaves_document_separators_out(hf_and_ours, story_ids):
    hf, ours, _ = hf_and_ours
    text, ids = story_ids
    # every token but the first is scored, once: the bytes are the text's, less the first token's
    for stride in (64, 32):
        got = scoring.perplexity(ours, ids, stride=stride, enc=get_tokenizer())
        assert got["bytes"] == len(text.encode("utf-8")) - len(get_tokenizer().decode_single_token_bytes(ids[0]))
    # with <|endoftext|> between documents: it counts in the loss, not in bits per byte (it spells no text)
    with_eot = ids[:100] + [EOT] + ids[100:200]
    nll, count, scored = hf_sliding_window_nll(hf, with_eot, 64, 32)
    got = scoring.perplexity(ours, with_eot, stride=32, enc=get_tokenizer())
    assert got["loss"] == pytest.approx(nll / count, abs=1e-5) and EOT in scored
    i = 100 - 1  # the EOT is the 100th target (targets start at token 1)
    with torch.no_grad():  # the EOT's own nll, from transformers, with the context its window gave it
        logits = hf(torch.tensor([with_eot[64:100]])).logits[0, -1]  # (b = 32 * ceil((100 - 64) / 32) = 64)
    eot_nll = float(F.cross_entropy(logits[None].double(), torch.tensor([EOT]), reduction="sum"))
    assert scored[i] == EOT
    text_bytes = sum(len(get_tokenizer().decode_single_token_bytes(t)) for t in scored if t != EOT)
    assert got["bytes"] == text_bytes
    assert got["bits_per_byte"] == pytest.approx((nll - eot_nll) / math.log(2) / text_bytes, rel=1e-5)


def test_sliding_windows_score_each_token_once_and_fit_the_context():
    for n, context, stride in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (9, 4, 4), (4, 8, 8), (2, 8, 3), (13, 4, 2)]:
        windows = scoring.sliding_windows(n, context, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, n)), (n, context, stride)  # every token but the first, once, in order
        assert all(end - 1 - begin <= context and begin < first < end for begin, end, first in windows)
        assert [begin for begin, _, _ in windows] == [stride * k for k in range(len(windows))]


# ----------------------------------------------------------------------------- multiple choice

ITEMS = [  # (context, endings, label): hand-written, the second with a context longer than the model's 64 tokens
    ("The cat sat on the", ["mat.", "moon, which was made of cheese and very far away.", "dog"], 0),
    ("Once upon a time " * 30 + "there was a", ["princess.", "girl who liked to run.", "."], 1),
    ("Tom was sad. His mother gave him a hug and", ["he smiled.", "the car flew away.", "he was happy again."], 2),
    ("Lily wanted to play outside, but it was raining.\n", ["So she stayed in.", "Rain is wet."], 0),
]


def hf_choice_logprob(hf, context, ending, n_ctx):
    """The summed log-probability of the ending's tokens after the context, by transformers."""
    end_ids = encode(ending if context[-1].isspace() else " " + ending)
    ids = (encode(context) + end_ids)[-n_ctx:]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[len(ids) - len(end_ids) - 1 + k, t]) for k, t in enumerate(end_ids)), len(end_ids)


def test_choice_scores_and_accuracy_equal_an_independent_computation_with_transformers(hf_and_ours):
    hf, ours, _ = hf_and_ours
    got = scoring.score_choices(ours, ITEMS, get_tokenizer(), batch_size=4)
    expected = [[hf_choice_logprob(hf, c, e, 64) for e in endings] for c, endings, _ in ITEMS]
    for g, e in zip(got, expected):
        assert [n for _, n in g] == [n for _, n in e]
        assert [s for s, _ in g] == pytest.approx([s for s, _ in e], abs=1e-4)
    best = [max(range(len(e)), key=lambda j: e[j][0]) for e in expected]
    best_norm = [max(range(len(e)), key=lambda j: e[j][0] / e[j][1]) for e in expected]
    acc = scoring.choice_accuracy(ITEMS, got)
    assert acc == {"acc": sum(b == label for b, (_, _, label) in zip(best, ITEMS)) / 4,
                   "acc_norm": sum(b == label for b, (_, _, label) in zip(best_norm, ITEMS)) / 4, "questions": 4}


def test_an_empty_context_scores_the_ending_after_endoftext(hf_and_ours):
    hf, ours, _ = hf_and_ours
    item = ("", ["Once upon a time.", "Zebra."], 0)
    got = scoring.score_choices(ours, [item], get_tokenizer())[0]
    for (score, n), ending in zip(got, item[1]):
        ids = [EOT] + encode(ending)  # nothing before the ending: its first token is predicted from <|endoftext|>
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        assert n == len(ids) - 1 and score == pytest.approx(sum(float(logp[k, ids[k + 1]]) for k in range(n)), abs=1e-4)


def test_progress_counts_each_question_once_its_choices_are_all_scored(hf_and_ours):
    counted = []
    scoring.score_choices(hf_and_ours[1], ITEMS, get_tokenizer(), batch_size=2, progress=counted.append)
    assert sum(counted) == len(ITEMS)


def test_hellaswag_records_are_read_as_released_and_generic_ones_too(tmp_path):
    hellaswag = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                 "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
                 "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                 "source_id": "activitynet~v_-JhWjGDPHMY"}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(hellaswag) + "\n" + json.dumps({"context": "2 + 2 =", "choices": ["4", "5"], "label": "0"}))
    assert scoring.read_choice_items(path) == [(hellaswag["ctx"], hellaswag["endings"], 3), ("2 + 2 =", ["4", "5"], 0)]


@pytest.mark.parametrize("record, message", [
    ({"context": "a", "choices": ["b", "c"]}, "no label"),
    ({"context": "a", "choices": ["b"], "label": 0}, "a list of at least 2 non-empty strings"),
    ({"context": "a", "choices": ["b", "c"], "label": 2}, "'label' must be the index of the right choice, 0..1, not 2"),
    ({"ctx": "a", "endings": ["b", ""], "label": 0}, "'ctx' must be a string and 'endings' a list"),
    ([1, 2], "not a JSON object"),
])
def test_a_malformed_question_names_its_file_and_line(tmp_path, record, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"context": "ok", "choices": ["a", "b"], "label": 1}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(scoring.DataError) as e:
        scoring.read_choice_items(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


# ----------------------------------------------------------------------------- answer signals

def test_answer_signals_count_endings_next_turns_and_lengths():
    answers = [{"response": "Paris.", "finish_reason": "stop", "tokens": 2},
               {"response": "Paris.\n\n### Instruction:\nAnd", "finish_reason": "length", "tokens": 10},
               {"response": "It is Paris", "finish_reason": "length", "tokens": 3},
               {"response": "Lyon. ### Instruction", "finish_reason": "stop", "tokens": 5}]
    assert scoring.answer_signals(answers, "alpaca") == {"ended": 0.5, "talks_on": 0.5, "mean_tokens": 5.0, "answers": 4}
    assert scoring.answer_signals(answers, "chat")["talks_on"] == 0.0  # chat's next turn is "User:"
    assert scoring.answer_signals([], "chat") == {"ended": None, "talks_on": None, "mean_tokens": None, "answers": 0}


CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in [("Name a color.", "Red."), ("What is 2 + 2?", "4."), ("Say hi.", "Hi!")]]


def test_answers_end_when_the_model_says_endoftext_and_run_to_the_limit_when_it_never_does():
    enc = get_tokenizer()
    answers, skipped = scoring.answer_conversations(saying_always(EOT), CONVERSATIONS, "alpaca", 12, enc)
    assert skipped == 0 and [a["reference"] for a in answers] == ["Red.", "4.", "Hi!"]
    assert scoring.answer_signals(answers, "alpaca") == {"ended": 1.0, "talks_on": 0.0, "mean_tokens": 0.0, "answers": 3}
    dot = encode(".")[0]
    answers, _ = scoring.answer_conversations(saying_always(dot), CONVERSATIONS, "chat", 12, enc)
    assert [a["response"] for a in answers] == ["." * 12] * 3
    assert scoring.answer_signals(answers, "chat") == {"ended": 0.0, "talks_on": 0.0, "mean_tokens": 12.0, "answers": 3}


def test_test_answers_are_generated_in_one_engine_batch_and_equal_greedy_one_by_one(tiny_model, monkeypatch):
    from engine import Engine
    from inference import generate_tokens
    from sampling import SamplingParams
    from tokenizer import encode_prompt
    enc, batches = get_tokenizer(), []
    real = Engine.generate

    def spy(self, prompts, *args, **kwargs):
        batches.append(len(prompts))
        return real(self, prompts, *args, **kwargs)
    monkeypatch.setattr(Engine, "generate", spy)
    conversations = CONVERSATIONS + [[{"role": "assistant", "content": "no question before me"}]]
    answers, skipped = scoring.answer_conversations(tiny_model, conversations, "alpaca", 10, enc)
    assert batches == [3] and skipped == 1
    for conv, answer in zip(CONVERSATIONS, answers):
        ids = encode_prompt(conv[:1], "alpaca", enc)
        alone = list(generate_tokens(tiny_model, ids, SamplingParams(max_tokens=10, temperature=0.0)))
        assert answer["response"] == enc.decode(alone) and answer["tokens"] == len(alone)
        assert answer["prompt"] == f"{scoring.format_prompt(conv[:1], 'alpaca')}"


# ----------------------------------------------------------------------------- judge

class StubJudge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 whose reply to each request is chosen by
    `reply(prompt, n)` (n: the request's number): a string (the answer), an int (an HTTP error
    status), or ("slow", seconds, text)."""

    def __init__(self, reply):
        import http.server
        import threading
        self.reply, self.requests = reply, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                answer = outer.reply(body["messages"][0]["content"], len(outer.requests))
                if isinstance(answer, tuple):
                    time.sleep(answer[1])
                    answer = answer[2]
                if isinstance(answer, int):
                    data, status = {"error": {"message": f"no ({answer})", "type": "x"}}, answer
                else:
                    data, status = {"choices": [{"message": {"role": "assistant", "content": answer}}]}, 200
                blob = json.dumps(data).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(blob)))
                    self.end_headers()
                    self.wfile.write(blob)
                except OSError:  # the client gave up waiting (the slow reply)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def responses(tmp_path):
    items = [{"prompt": f"### Instruction:\nQuestion {i}\n\n### Response:\n", "reference": f"Answer {i}",
              "response": kind} for i, kind in enumerate(["good", "bad", "odd", "huge"])]
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps(items))
    return path


REPLIES = {"good": "85", "bad": "Score: 10/100", "odd": "I cannot grade this.", "huge": "250"}


def by_answer(prompt, n):
    return next(reply for kind, reply in REPLIES.items() if f"Assistant's answer:\n{kind}\n" in prompt)


def judge(*argv):
    from eval import main
    main(["judge", *argv])


def eval_judge_score(reply):
    from eval import judge_score
    return judge_score(reply)


def test_judge_scores_each_answer_and_counts_replies_without_a_score(responses, tmp_path, capsys):
    stub = StubJudge(by_answer)
    try:
        judge(str(responses), "--judge-url", stub.url, "--judge-model", "grader", "--api-key", "k3y")
    finally:
        stub.close()
    out = json.loads((tmp_path / "test_responses.judged.json").read_text())
    assert [i["score"] for i in out["items"]] == [85, 10, None, None]
    assert [i["judge_reply"] for i in out["items"]] == list(REPLIES.values())
    assert (out["mean"], out["scored"], out["unscored"], out["judge_model"]) == (47.5, 2, 2, "grader")
    path, auth, body = stub.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k3y" and body["model"] == "grader"
    assert "Question 0" in body["messages"][0]["content"] and "Answer 0" in body["messages"][0]["content"]
    assert "mean score 47.5 over 2 answers; 2 replies held no score" in capsys.readouterr().out


def test_judge_tries_again_after_a_failing_or_slow_reply(responses, tmp_path):
    stub = StubJudge(lambda prompt, n: {1: 503, 2: ("slow", 1.0, "99")}.get(n, by_answer(prompt, n)))
    try:
        judge(str(responses), "--judge-url", stub.url + "/v1/", "--judge-model", "g", "--timeout", "0.3")
    finally:
        stub.close()
    out = json.loads((tmp_path / "test_responses.judged.json").read_text())
    assert [i["score"] for i in out["items"]] == [85, 10, None, None]  # the first answer's third try counted
    assert len(stub.requests) == 4 + 2


def test_judge_run_cut_short_resumes_keeping_the_scores_it_has(responses, tmp_path, capsys):
    stub = StubJudge(lambda prompt, n: by_answer(prompt, n) if n <= 2 else 502)
    try:
        with pytest.raises(SystemExit):
            judge(str(responses), "--judge-url", stub.url, "--judge-model", "g", "--retries", "1")
    finally:
        stub.close()
    out = tmp_path / "test_responses.judged.json"
    assert one_line_error(capsys) == (f"error: judge {stub.url}/v1/chat/completions: HTTP 502 (2 tries); the 2 answers "
                                      f"judged so far are saved in {out}: run again to go on")
    assert [i.get("score") for i in json.loads(out.read_text())["items"]] == [85, 10, None, None]
    stub = StubJudge(by_answer)
    try:
        judge(str(responses), "--judge-url", stub.url, "--judge-model", "g")
    finally:
        stub.close()
    assert len(stub.requests) == 2  # only the two not judged yet
    assert json.loads(out.read_text())["scored"] == 2 and "2 of 4 answers already judged, kept" in capsys.readouterr().out
    before = out.read_text()
    with pytest.raises(SystemExit):  # another judge's scores are not overwritten
        judge(str(responses), "--judge-url", stub.url, "--judge-model", "other")
    assert one_line_error(capsys) == f"error: {out} holds scores by the judge 'g', not 'other': give another --out"
    assert out.read_text() == before


def test_judge_scores_read_from_replies():
    assert [eval_judge_score(r) for r in ["85", "Score: 7.6/10", "-5", "101", "none", "I give it 100."]] == \
        [85, 8, None, None, None, 100]


def test_an_answer_the_judge_refuses_goes_unscored_and_the_others_are_judged(responses, tmp_path, capsys):
    stub = StubJudge(lambda prompt, n: 400 if "Assistant's answer:\nbad\n" in prompt else by_answer(prompt, n))
    try:
        judge(str(responses), "--judge-url", stub.url, "--judge-model", "g")
    finally:
        stub.close()
    out = json.loads((tmp_path / "test_responses.judged.json").read_text())
    assert [i["score"] for i in out["items"]] == [85, None, None, None] and len(stub.requests) == 4  # no retry
    assert out["items"][1]["judge_error"] == "HTTP 400 no (400)" and (out["scored"], out["unscored"]) == (1, 3)
    assert "2 replies held no score from 0 to 100; 1 requests refused by the judge (the first: HTTP 400 no (400))" \
        in capsys.readouterr().out


def test_a_judge_that_refuses_or_cannot_be_reached_is_a_one_line_error(responses, tmp_path, capsys):
    stub = StubJudge(lambda prompt, n: 404)
    try:
        with pytest.raises(SystemExit):
            judge(str(responses), "--judge-url", stub.url, "--judge-model", "nope")
    finally:
        stub.close()
    assert len(stub.requests) == 1  # a refusal would refuse every answer: no retries
    assert "refused the request: HTTP 404 no (404)" in one_line_error(capsys)
    with pytest.raises(SystemExit):  # the stub is closed: nothing listens there now
        judge(str(responses), "--judge-url", stub.url, "--judge-model", "nope", "--retries", "0")
    assert f"judge {stub.url}/v1/chat/completions: cannot connect (1 tries)" in one_line_error(capsys)


def test_judge_end_to_end_against_our_own_server(responses, tmp_path):
    import threading
    from engine import Engine
    from serve import make_server
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=512)).eval()
    srv = make_server(Engine(model, max_num_seqs=8), port=0, model_name="tiny", max_waiting=8)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge(str(responses), "--judge-url", f"http://127.0.0.1:{srv.server_address[1]}", "--judge-model", "tiny",
              "--out", str(tmp_path / "scores.json"))
    finally:
        srv.shutdown()
        srv.api.loop.stop()
    out = json.loads((tmp_path / "scores.json").read_text())
    replies = [i["judge_reply"] for i in out["items"]]
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)  # a random model's words, each one
    from eval import judge_score
    assert [i["score"] for i in out["items"]] == [judge_score(r) for r in replies]
    assert out["scored"] + out["unscored"] == 4


# ----------------------------------------------------------------------------- the command line

def run_eval(*argv):
    from eval import main
    main(list(argv))


def test_cli_ppl_of_a_text_and_of_its_token_file_agree_and_write_json(hf_and_ours, story_ids, tmp_path, capsys):
    _, ours, hub = hf_and_ours
    text, ids = story_ids
    (tmp_path / "story.txt").write_text(text)
    np.array(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")
    run_eval("ppl", str(hub), str(tmp_path / "story.txt"), "--stride", "32", "--out", str(tmp_path / "a.json"))
    run_eval("ppl", str(hub), str(tmp_path / "val.bin"), "--stride", "32", "--out", str(tmp_path / "b.json"))
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    expected = scoring.perplexity(ours, ids, stride=32, enc=get_tokenizer())
    assert a["loss"] == pytest.approx(expected["loss"], abs=1e-6) and a["tokens"] == expected["tokens"]
    assert {k: a[k] for k in expected} == pytest.approx({k: b[k] for k in expected}, rel=1e-9)
    assert a["model"] == str(hub) and (a["context"], a["stride"]) == (64, 32)
    assert f"loss {a['loss']:.4f}, perplexity {a['perplexity']:.2f}" in capsys.readouterr().out


def test_cli_choice_prints_acc_and_acc_norm(hf_and_ours, tmp_path, capsys):
    _, ours, hub = hf_and_ours
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"context": c, "choices": e, "label": label}) + "\n" for c, e, label in ITEMS))
    run_eval("choice", str(hub), str(path), "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    expected = scoring.choice_accuracy(ITEMS, scoring.score_choices(ours, ITEMS, get_tokenizer()))
    assert {k: result[k] for k in expected} == expected
    assert f"acc {expected['acc']:.4f}, acc_norm {expected['acc_norm']:.4f} (4 questions)" in capsys.readouterr().out


def test_cli_signals_answers_a_data_file(tmp_path, capsys):
    model = saying_always(EOT)
    model.save_checkpoint(tmp_path / "m", template="chat")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": q[0]["content"], "output": q[1]["content"]} for q in CONVERSATIONS]))
    run_eval("signals", str(tmp_path / "m"), str(data), "--out", str(tmp_path / "s.json"), "--max-new-tokens", "8")
    assert json.loads((tmp_path / "s.json").read_text())["ended"] == 1.0
    assert "(3 answers, template chat): 100% end with <|endoftext|>" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["ppl", "{hub}", "{tmp}/missing.txt"], "{tmp}/missing.txt: no such file"),
    (["ppl", "{hub}", "{tmp}/odd.bin"], "an odd number, so not uint16 tokens"),
    (["ppl", "{hub}", "{tmp}/one.txt"], "{tmp}/one.txt: 1 token, too short to score (at least 2)"),
    (["ppl", "{hub}", "{tmp}/latin1.txt"], "{tmp}/latin1.txt: not UTF-8 text (byte 0xe9 at offset 3)"),
    (["ppl", "{hub}", "{tmp}/one.txt", "--stride", "65"], "--stride 65 is longer than the model's context (64)"),
    (["ppl", "{hub}", "{tmp}/one.txt", "--stride", "0"], "--stride must be at least 1 (got 0)"),
    (["ppl", "{tmp}/nomodel", "{tmp}/one.txt"], "no such file or directory"),
    (["choice", "{hub}", "{tmp}/bad.jsonl"], "{tmp}/bad.jsonl:2: invalid JSON"),
    (["choice", "{hub}"], "give a questions file, or --task hellaswag"),
    (["choice", "{hub}", "{tmp}/long.jsonl"], "{tmp}/long.jsonl: question 1: an ending of 71 tokens does not fit the model's context of 64"),
    (["signals", "{hub}", "{tmp}/badconv.jsonl"], "{tmp}/badconv.jsonl:2: invalid JSON"),
    (["judge", "{tmp}/one.txt", "--judge-url", "http://x", "--judge-model", "m"], "{tmp}/one.txt: not valid JSON"),
    (["judge", "{tmp}/list.json", "--judge-url", "http://x", "--judge-model", "m"],
     "{tmp}/list.json: item 1 has no string prompt, reference and response"),
    (["ppl", "{hub}", "{tmp}/one.txt", "--out", "{tmp}/one.txt"], "--out {tmp}/one.txt is the input file"),
    (["ppl", "{small}", "{tmp}/big.bin"], "{tmp}/big.bin: token id 50000 is outside the model's vocabulary of 1000"),
])
def test_cli_bad_input_is_a_one_line_error(hf_and_ours, tmp_path, capsys, argv, message):
    hub = hf_and_ours[2]
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03\x04\x05")
    (tmp_path / "one.txt").write_text("Hello")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": \n')
    (tmp_path / "badconv.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    (tmp_path / "long.jsonl").write_text(json.dumps({"context": "a", "choices": ["b " * 70, "c"], "label": 0}))
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "p", "reference": "r", "response": "x"}, {"prompt": 1}]))
    np.array([1, 50000, 2], dtype=np.uint16).tofile(tmp_path / "big.bin")
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=1000)).save_checkpoint(tmp_path / "small")
    fill = lambda s: s.format(hub=hub, tmp=tmp_path, small=tmp_path / "small")  # noqa: E731
    with pytest.raises(SystemExit):
        run_eval(*map(fill, argv))
    assert fill(message) in one_line_error(capsys)


def test_cli_help_for_each_command(capsys):
    with pytest.raises(SystemExit):
        run_eval("--help")
    assert "{ppl,choice,signals,judge}" in capsys.readouterr().out
    for command, flag in (("ppl", "--stride"), ("choice", "--task"), ("signals", "--template"), ("judge", "--judge-url")):
        with pytest.raises(SystemExit):
            run_eval(command, "--help")
        out = capsys.readouterr().out
        assert "--out" in out and flag in out, command


# ----------------------------------------------------------------------------- the whole life, end to end

def test_end_to_end_pretrain_sft_then_every_evaluation(tmp_path, made_data, one_thread, capsys):
    """A tiny pretrain, sft --quick on it, preference pairs from the SFT model's answers and DPO on
    them, then eval.py's four commands, the judge being our own server serving the fine-tuned model:
    the plumbing of the whole life, on the made data."""
    import threading
    import data
    import dpo
    import sft
    import train
    from engine import Engine
    from serve import make_server
    stories = tmp_path / "stories.txt"
    stories.write_text((made_data / "stories.txt").read_text()[:60_000])
    tokens = data.prepare_pretrain_data(stories, tmp_path / "stories", workers=1)
    train.main(["--data", str(tokens), "--out", str(tmp_path / "run"), "--max-steps", "20", "--eval-every", "20",
                "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "512", "--batch-size", "4",
                "--seq-len", "32", "--warmup", "2", "--lr", "3e-3", "--eval-iters", "1", "--sample-tokens", "4"])
    sft.main(["--quick", "--model", str(tmp_path / "run" / "checkpoint"), "--data",
              str(made_data / "instructions.json"), "--out", str(tmp_path / "sft"), "--max-len", "64",
              "--batch-size", "2", "--max-new-tokens", "8", "--lr", "1e-3", "--max-steps", "8"])
    signals = json.loads((tmp_path / "sft" / "training_metadata.json").read_text())["answer_signals"]
    assert signals["base"]["answers"] == signals["fine_tuned"]["answers"] == 10
    # preference pairs from the SFT model's own answers (rejected) and the dataset's (chosen), then DPO
    dpo.main(["--model", str(tmp_path / "sft"), "--pairs-from", str(made_data / "instructions.json"), "--max-pairs", "24",
              "--max-new-tokens", "8", "--out", str(tmp_path / "dpo"), "--max-steps", "4", "--batch-size", "2",
              "--lr", "1e-3", "--eval-interval", "2", "--device", "cpu"])
    pairs = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert 16 <= len(pairs) <= 24 and all(p["chosen"] != p["rejected"] for p in pairs)
    held_out = json.loads((tmp_path / "dpo" / "training_metadata.json").read_text())["held_out"]
    assert held_out["first"]["rewards/margins"] == 0 < held_out["last"]["rewards/margins"]
    assert held_out["last"]["rewards/accuracies"] > held_out["first"]["rewards/accuracies"] == 0
    capsys.readouterr()
    text = tmp_path / "story.txt"
    text.write_text((made_data / "stories.txt").read_text()[-3000:])  # (not trained on)
    run_eval("ppl", str(tmp_path / "run" / "checkpoint"), str(text), "--out", str(tmp_path / "ppl.json"))
    loss = json.loads((tmp_path / "ppl.json").read_text())["loss"]
    assert loss < math.log(50257) - 1.5  # it learned something
    run_eval("ppl", str(tmp_path / "run" / "checkpoint"), str(text), "--dtype", "int8", "--out", str(tmp_path / "q.json"))
    int8 = json.loads((tmp_path / "q.json").read_text())
    assert int8["dtype"] == "int8" and abs(math.exp(int8["loss"] - loss) - 1) < 0.01  # perplexity within 1%
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"context": c, "choices": e, "label": label}) + "\n" for c, e, label in ITEMS))
    run_eval("choice", str(tmp_path / "sft"), str(questions), "--out", str(tmp_path / "choice.json"))
    assert json.loads((tmp_path / "choice.json").read_text())["questions"] == 4
    run_eval("signals", str(tmp_path / "dpo"), str(made_data / "instructions.json"), "--limit", "5",
             "--max-new-tokens", "8", "--out", str(tmp_path / "signals.json"))
    assert json.loads((tmp_path / "signals.json").read_text())["answers"] == 5
    srv = make_server(Engine(GPT.from_pretrained(tmp_path / "sft"), max_num_seqs=4), port=0, model_name="sft",
                      max_waiting=8, template="alpaca")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        run_eval("judge", str(tmp_path / "sft" / "test_responses.json"), "--judge-url",
                 f"http://127.0.0.1:{srv.server_address[1]}", "--judge-model", "sft")
    finally:
        srv.shutdown()
        srv.api.loop.stop()
    judged = json.loads((tmp_path / "sft" / "test_responses.judged.json").read_text())
    assert len(judged["items"]) == 10 and judged["scored"] + judged["unscored"] == 10
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "acc_norm" in printed and "end with <|endoftext|>" in printed and "judged by sft" in printed


def test_cli_choice_task_hellaswag_downloads_the_validation_set_once(hf_and_ours, tmp_path, monkeypatch, capsys):
    import http.server
    import threading
    import eval as eval_script
    record = {"ctx": "A man is sitting on a roof. he", "label": 1, "endings": ["is flying.", "starts pulling up roofing."]}
    body = (json.dumps(record) + "\n").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(eval_script, "HELLASWAG_URL", f"http://127.0.0.1:{httpd.server_address[1]}/hellaswag_val.jsonl")
    monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path))
    try:
        with pytest.raises(SystemExit):  # this server's file is not the released one: its checksum says so
            run_eval("choice", str(hf_and_ours[2]), "--task", "hellaswag")
        assert "checksum mismatch" in one_line_error(capsys) and not (tmp_path / "data" / "hellaswag_val.jsonl").exists()
        monkeypatch.setattr(eval_script, "HELLASWAG_SHA256", hashlib.sha256(body).hexdigest())
        run_eval("choice", str(hf_and_ours[2]), "--task", "hellaswag")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (tmp_path / "data" / "hellaswag_val.jsonl").read_bytes() == body
    assert "(1 question)" in capsys.readouterr().out
    run_eval("choice", str(hf_and_ours[2]), "--task", "hellaswag")  # the server is gone: the cached file serves
    with pytest.raises(SystemExit):  # offline, with no copy: what to do instead
        monkeypatch.setenv("GPT2_CACHE_DIR", str(tmp_path / "empty"))
        run_eval("choice", str(hf_and_ours[2]), "--task", "hellaswag")
    assert "offline, copy that file to" in one_line_error(capsys)
