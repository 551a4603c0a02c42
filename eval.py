"""Tell how good a model is, in numbers you can compare with published ones.

    python eval.py ppl gpt2 story.txt                       # loss, perplexity, bits per byte
    python eval.py choice gpt2 --task hellaswag             # HellaSwag's validation set: acc, acc_norm
    python eval.py choice out/sft questions.jsonl           # {context, choices, label} per line
    python eval.py signals out/sft data.json                # do its answers end? do they talk on?
    python eval.py judge out/sft/test_responses.json --judge-url http://127.0.0.1:8000 --judge-model M

ppl scores a text file (or a token file, X.bin, from data.py) in windows of the model's context,
`--stride` tokens apart. choice scores each candidate ending by the log-probability of its tokens
after the question. signals answers held-out prompts through the serving engine in one batch.
judge asks any OpenAI-compatible chat endpoint (serve.py, llama-server, vLLM, ollama) to score
each answer against its reference from 0 to 100; it is resumable (scores already in --out are kept).
How the scores are computed: scoring.py.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

import scoring
from checkpoint import CheckpointError, DownloadError, cache_dir, download, read_json_file
from common import (AT_LEAST_1, DTYPES, HelpFormatter, check_flags, device_or_die, die, dtype_or_die, same_file,
                    write_json_atomic, write_or_die)
from conversations import DataError, load_conversations
from data import load_tokens
from gpt import load_or_die
from inference import load_model_or_die
from tokenizer import TEMPLATES, encode, get_tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# its SHA-256 (of 12,246,618 bytes), as TensorFlow Datasets records it for this URL
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog="Each command has its own --help.")
    commands = p.add_subparsers(dest="command", required=True, metavar="{ppl,choice,signals,judge}")

    def command(name, help):
        c = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        if name != "judge":
            c.add_argument("model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir | .safetensors file")
            c.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
            c.add_argument("--dtype", choices=DTYPES, default=None,
                           help="default: the device's usual one (bfloat16 on CUDA, float32 elsewhere); auto: bfloat16 "
                                "where the chip computes in it natively; int8: the matrices in int8, as generate.py and "
                                "serve.py run them (CPU only)")
        c.add_argument("--out", default=None, help="also write the results to this JSON file")
        return c

    c = command("ppl", "mean loss, perplexity and bits per byte of a text")
    c.add_argument("text", help="a UTF-8 text file, or a token file (X.bin) that data.py wrote")
    c.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the context: no overlap, as nanoGPT's val loss)")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")

    c = command("choice", "accuracy on multiple-choice questions (acc and length-normalised acc_norm)")
    c.add_argument("file", nargs="?", help="JSONL of {context, choices, label} or of HellaSwag's records "
                   "(with --task hellaswag and no file: its validation set, downloaded once)")
    c.add_argument("--task", choices=["hellaswag"], default=None, help="a known task, downloaded when no file is given")
    c.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    c.add_argument("--batch-size", type=int, default=16, help="choices per forward pass")

    c = command("signals", "how a chatbot's answers to held-out prompts end, without a judge")
    c.add_argument("data", help="conversations, in any format sft.py reads: each last answer is the reference")
    c.add_argument("--template", choices=TEMPLATES, default=None,
                   help="prompt template (default: the checkpoint's; alpaca for a model never fine-tuned)")
    c.add_argument("--limit", type=int, default=100, help="answer the first N conversations")
    c.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer")

    c = command("judge", "scores from 0 to 100 for answers, given by an OpenAI-compatible chat endpoint")
    c.add_argument("responses", help="a test_responses.json as sft.py writes it: [{prompt, reference, response}]")
    c.add_argument("--judge-url", required=True, help="the endpoint's base URL (http://HOST:PORT, with or without /v1)")
    c.add_argument("--judge-model", required=True, help="the model name the endpoint serves")
    c.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    c.add_argument("--retries", type=int, default=3, help="tries again after a failed request this many times")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    args = p.parse_args(argv)
    check_flags(args, **{k: AT_LEAST_1 for k in ("stride", "batch_size", "limit", "max_new_tokens") if hasattr(args, k)})
    if args.command == "judge":
        check_flags(args, retries=(lambda v: v >= 0, "0 or more"), timeout=(lambda v: 0 < v < float("inf"), "a positive number"))
    source = getattr(args, {"ppl": "text", "choice": "file", "signals": "data", "judge": "responses"}[args.command])
    if args.out and source and same_file(args.out, source):
        die(f"--out {args.out} is the input file: it would be replaced by the results")
    return args


# ----------------------------------------------------------------------------- perplexity

def read_text_ids(path, enc):
    """Token ids of a text file, or of a token file (X.bin) as data.py writes them."""
    path = Path(path)
    if not path.is_file():
        die(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix == ".bin":
        try:
            return np.asarray(load_tokens(path.parent, path.stem), dtype=np.int64)
        except ValueError as e:
            die(str(e))
    try:
        return encode(path.read_text(encoding="utf-8"), enc)
    except UnicodeDecodeError as e:
        die(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})")


def run_ppl(args, model, enc):
    stride = args.stride or model.config.block_size
    if stride > model.config.block_size:
        die(f"--stride {stride} is longer than the model's context ({model.config.block_size}): tokens would go unscored")
    ids = read_text_ids(args.text, enc)
    if len(ids) < 2:
        die(f"{args.text}: {len(ids)} token{'s' * (len(ids) != 1)}, too short to score (at least 2)")
    if max(ids) >= model.config.vocab_size:  # (a token file made for another tokenizer or model)
        die(f"{args.text}: token id {max(ids)} is outside the model's vocabulary of {model.config.vocab_size}")
    with tqdm(total=len(ids) - 1, desc="scoring", unit="tok", disable=None) as bar:
        result = scoring.perplexity(model, ids, stride, args.batch_size, enc, progress=bar.update)
    bpb = result["bits_per_byte"]
    print(f"{args.text}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
          f"bits per byte {'-' if bpb is None else f'{bpb:.4f}'} ({result['tokens']:,} tokens, "
          f"{result['bytes']:,} bytes; context {model.config.block_size}, stride {stride})")
    return {**result, "text": str(args.text), "context": model.config.block_size, "stride": stride}


# ----------------------------------------------------------------------------- multiple choice

def choice_file(args):
    """The questions' file: the one given, or a known task's, downloaded once."""
    if args.file:
        return args.file
    if args.task != "hellaswag":
        die("give a questions file, or --task hellaswag for HellaSwag's validation set")
    dest = cache_dir() / "data" / "hellaswag_val.jsonl"
    try:
        return download(HELLASWAG_URL, dest, sha256=HELLASWAG_SHA256, offline="give it as FILE")
    except DownloadError as e:
        die(str(e))
    except OSError as e:
        die(f"cannot write {dest} ({e.strerror or e})")


def run_choice(args, model, enc):
    path = choice_file(args)
    try:
        items = scoring.read_choice_items(path)[:args.limit]
        with tqdm(total=len(items), desc="questions", disable=None) as bar:
            scores = scoring.score_choices(model, items, enc, args.batch_size, progress=bar.update)
    except DataError as e:
        die(str(e))
    except ValueError as e:  # (a question that does not fit the context)
        die(f"{path}: {e}")
    result = scoring.choice_accuracy(items, scores)
    print(f"{path}: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} ({result['questions']:,} question{'s' * (result['questions'] != 1)})")
    return {**result, "file": str(path)}


# ----------------------------------------------------------------------------- answer signals

def run_signals(args, model, enc):
    template = args.template or model.checkpoint_info.get("template") or "alpaca"
    try:
        conversations = load_conversations(args.data, log=lambda *a: None)[:args.limit]
    except DataError as e:
        die(str(e))
    answers, skipped = scoring.answer_conversations(model, conversations, template, args.max_new_tokens, enc)
    if not answers:
        die(f"{args.data}: none of the first {len(conversations)} conversations has a question that fits the context")
    s = scoring.answer_signals(answers, template)
    print(f"{args.model} on {args.data} ({s['answers']} answers, template {template}): {s['ended']:.0%} end with "
          f"<|endoftext|>, {s['talks_on']:.0%} write the next turn's {scoring.NEXT_TURN[template]!r}, "
          f"{s['mean_tokens']:.1f} tokens on average" + (f"; {skipped} skipped (no question that fits)" if skipped else ""))
    return {**s, "data": str(args.data), "template": template, "skipped": skipped}


# ----------------------------------------------------------------------------- judge

JUDGE_PROMPT = """You are grading an assistant's answer against a reference answer.

Request:
{prompt}

Reference answer:
{reference}

Assistant's answer:
{response}

How good is the assistant's answer, from 0 (useless or wrong) to 100 (as good as the reference)? Reply with the number alone."""


def read_responses(path):
    """[{prompt, reference, response}] from a test_responses.json, or a one-line error naming the item."""
    try:
        items = read_json_file(path, "not valid JSON")
    except CheckpointError as e:  # (its message names the file and what is wrong)
        die(str(e))
    if not isinstance(items, list):
        die(f"{path}: not a list of answers (as sft.py's test_responses.json)")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("prompt", "reference", "response")):
            die(f"{path}: item {i} has no string prompt, reference and response")
    return items


def judge_score(reply):
    """The score in a judge's reply: its first number, rounded, if it is 0 to 100; else None."""
    m = re.search(r"-?\d+(?:\.\d+)?", reply)
    if not m:
        return None
    value = float(m.group())
    return int(round(value)) if 0 <= value <= 100 else None


class Refused(Exception):
    """The judge refused one answer's request (a 400: too long for its context, say): that answer
    goes unscored, the others are still asked."""


class Judge:
    """One OpenAI-compatible chat endpoint, asked one question at a time, with retries."""

    RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # worth trying again
    ITEM_STATUS = {400, 413, 422}  # this request refused; any other refusal (401, 404) would refuse every one

    def __init__(self, url, model, api_key=None, retries=3, timeout=120.0):
        base = url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.retries, self.timeout = model, retries, timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def ask(self, prompt):
        """The judge's reply text. Raises Refused when the endpoint refuses this request, RuntimeError
        (its message one line) when every try failed, or at once when it refuses any request (a wrong
        model name, a missing key)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": 16}
        problem = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** (attempt - 1), 10))  # backing off: a busy server gets room to recover
            try:
                r = requests.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
            except requests.exceptions.Timeout:
                problem = f"no reply within {self.timeout:g} s"
                continue
            except requests.exceptions.RequestException:
                problem = "cannot connect"
                continue
            if r.status_code in self.RETRY_STATUS:
                problem = f"HTTP {r.status_code}"
                continue
            if r.status_code in self.ITEM_STATUS:
                raise Refused(f"HTTP {r.status_code} {error_message(r)}")
            if r.status_code != 200:
                raise RuntimeError(f"{self.url} refused the request: HTTP {r.status_code} {error_message(r)}")
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                problem = "a reply that is not an OpenAI chat completion"
                continue
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else ""
        raise RuntimeError(f"{self.url}: {problem} ({self.retries + 1} tries)")


def error_message(response):
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def judged_path(args):
    return Path(args.out) if args.out else Path(args.responses).with_suffix(".judged.json")


def previous_scores(path, judge):
    """{(prompt, reference, response): item} already judged in `path` (by the same judge model: a
    file of another's, or not of this command's, is refused rather than overwritten)."""
    if not path.exists():
        return {}
    try:
        saved = read_json_file(path, "not valid JSON")
    except CheckpointError as e:  # (a file we would overwrite: better said than silently replaced)
        die(f"{e}; it is not scores this command wrote: move it, or give another --out")
    if not isinstance(saved, dict) or not isinstance(saved.get("items"), list):
        die(f"{path}: not scores this command wrote; move it, or give another --out")
    if saved.get("judge_model") != judge.model:  # (its scores would be lost, or mixed with another judge's)
        die(f"{path} holds scores by the judge {saved.get('judge_model')!r}, not {judge.model!r}: give another --out")
    return {(i["prompt"], i["reference"], i["response"]): i for i in saved["items"]
            if isinstance(i, dict) and "judge_reply" in i}


def judge_summary(items, judge, responses):
    scores = [i["score"] for i in items if i.get("score") is not None]
    return {"responses": str(responses), "judge_url": judge.url, "judge_model": judge.model,
            "mean": sum(scores) / len(scores) if scores else None, "scored": len(scores),
            "unscored": sum(1 for i in items if "judge_reply" in i and i.get("score") is None),
            "items": items}


def run_judge(args):
    judge = Judge(args.judge_url, args.judge_model, args.api_key, args.retries, args.timeout)
    responses, out = read_responses(args.responses), judged_path(args)
    done = previous_scores(out, judge)
    items = [dict(done.get((r["prompt"], r["reference"], r["response"]), r)) for r in responses]
    todo = [i for i in items if "judge_reply" not in i]
    if done:
        print(f"{out}: {len(items) - len(todo)} of {len(items)} answers already judged, kept")
    for item in tqdm(todo, desc="judging", disable=None):
        try:
            reply = judge.ask(JUDGE_PROMPT.format(**item))
        except Refused as e:
            reply, item["judge_error"] = None, str(e)
        except RuntimeError as e:
            save_judged(out, judge_summary(items, judge, args.responses))
            done_now = sum("judge_reply" in i for i in items)
            die(f"judge {e}; the {done_now} answers judged so far are saved in {out}: run again to go on")
        item["judge_reply"], item["score"] = reply, None if reply is None else judge_score(reply)
        save_judged(out, judge_summary(items, judge, args.responses))  # after each: a kill loses one answer at most
    result = judge_summary(items, judge, args.responses)
    mean = "-" if result["mean"] is None else f"{result['mean']:.1f}"
    refused = [i["judge_error"] for i in items if i.get("judge_error")]
    held_none = result["unscored"] - len(refused)
    print(f"judged by {args.judge_model}: mean score {mean} over {result['scored']} answers"
          + (f"; {held_none} replies held no score from 0 to 100" if held_none else "")
          + (f"; {len(refused)} requests refused by the judge (the first: {refused[0]})" if refused else "")
          + f"; per-answer scores in {out}")
    return result


def save_judged(path, summary):
    with write_or_die(path):
        write_json_atomic(path, summary)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.command == "judge":
        run_judge(args)  # (writes its own file as it goes)
        return
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    enc = get_tokenizer()
    if args.command == "signals" or int8:  # the model as generate.py and serve.py load it
        model = load_model_or_die(args.model, device, dtype, int8)
    else:  # (scoring: no CPU layout packing, which is tuned for one token at a time)
        model = load_or_die(args.model, device=device, dtype=dtype)
    result = {"ppl": run_ppl, "choice": run_choice, "signals": run_signals}[args.command](args, model, enc)
    result["dtype"] = "int8" if int8 else str(dtype).removeprefix("torch.")
    if args.out:
        with write_or_die(args.out):
            write_json_atomic(args.out, {"model": str(args.model), **result})


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
