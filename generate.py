"""Generate text with GPT-2: sampling, a KV cache, streaming output, a chat REPL.

    python generate.py --prompt "The meaning of life is" --temperature 0.8 --top-p 0.95
    python generate.py --model out/sft --chat
    python generate.py --compare gpt2 out/sft --prompt "Name three colors."

A checkpoint with a chat template answers a --prompt as a user's message; a base model continues
it. A prompt that leaves no room in the context is an error (the start of what you wrote is never
dropped silently); in --chat the oldest turns are dropped to make room, and only a single message
too long to fit is refused. Generation stops at <|endoftext|>, at a --stop string, at
--max-new-tokens, or when the context is full. How it is done: inference.py and sampling.py.
"""

import argparse
import os
import re
import shutil
import sys
import textwrap
from dataclasses import replace

from common import AT_LEAST_1, DTYPES, HelpFormatter, check_flags, device_or_die, die, dtype_or_die, flag
from inference import generate, load_model_or_die
from sampling import MAX_SEED, BadSamplingParam, NothingToSample, SamplingParams
from tokenizer import (PromptTooLong, check_prompt, encode, encode_prompt, fit_conversation, get_tokenizer,
                       strip_answer_start)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=(
        "A prompt longer than the model's context is an error (never truncated); in --chat, the oldest "
        "turns are dropped to keep the conversation within the context."))
    p.add_argument("--model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir (default: gpt2)")
    p.add_argument("--prompt", action="append", help="text (repeatable): a checkpoint with a chat template "
                   "answers it as a user's message in that template; a base model continues it")
    p.add_argument("--chat", action="store_true", help="interactive conversation in the checkpoint's template")
    p.add_argument("--system", help="system prompt for --chat")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "OTHER"),
                   help="answer each --prompt with two models, side by side (each as --prompt would)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=None, help=f"makes sampling repeatable (0 to {MAX_SEED}); "
                   "sample i, or the i-th answer in --chat, uses seed + i")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable), never printed")
    p.add_argument("--num-samples", type=int, default=1, help="answers per prompt (seeds --seed, --seed + 1, ...)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: the device's usual one (bfloat16 on CUDA, float32 elsewhere); auto: bfloat16 "
                        "where the chip computes in it natively (said on stderr); int8: the matrices in int8 (CPU only)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- checking the flags

def check_args(args):
    """The sampling parameters the flags ask for, or a one-line error for each flag value, or
    combination, that generate.py cannot honour."""
    params = checked_sampling_params(args)
    check_modes(args)
    check_texts(args)
    return params


SAMPLING_FLAGS = {"max_tokens": "--max-new-tokens"}  # SamplingParams fields whose flag has another name


def checked_sampling_params(args):
    check_flags(args, num_samples=AT_LEAST_1)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop, args.seed)
    try:
        params.check(name=lambda field: SAMPLING_FLAGS.get(field, flag(field)),
                     samples=args.num_samples)
    except BadSamplingParam as e:
        die(str(e))
    return params


def check_modes(args):
    """--prompt, --chat and --compare each take their own flags."""
    if args.compare and args.chat:
        die("--compare answers --prompt; it does not go with --chat")
    if args.compare and not args.prompt:
        die("--compare needs --prompt")
    for name, given, why in (
            ("--model", args.compare and args.model, "--compare names its two models"),
            ("--num-samples", args.compare and args.num_samples > 1, "--compare shows one answer per model"),
            ("--prompt", args.chat and args.prompt, "--chat reads its messages from the terminal"),
            ("--num-samples", args.chat and args.num_samples > 1, "--chat gives one answer per message"),
            ("--system", args.system is not None and not args.chat, "--system is the system prompt of --chat")):
        if given:
            die(f"{name} does not apply here: {why}")
    if not args.chat and not args.prompt:
        die("give --prompt TEXT (or --chat)")


def check_texts(args):
    if not all(args.stop):
        die("--stop is empty (it would end every answer before it starts)")
    for i, prompt in enumerate(args.prompt or []):
        if not prompt:
            die(f"{prompt_label(i, len(args.prompt))}--prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 reach argv as lone surrogates
            die(f"{prompt_label(i, len(args.prompt))}--prompt is not valid UTF-8")


def prompt_label(i, n):
    """'prompt 3 of 4: ' for the third of four --prompt's (nothing when there is one): errors name the
    one at fault."""
    return f"prompt {i + 1} of {n}: " if n > 1 else ""


# ----------------------------------------------------------------------------- the three modes

def main(argv=None):
    args = parse_args(argv)
    params = check_args(args)
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    enc = get_tokenizer()
    try:
        if args.compare:
            compare([load_model_or_die(name, device, dtype, int8) for name in args.compare], args, params, enc)
        elif args.chat:
            chat(load_model_or_die(args.model or "gpt2", device, dtype, int8), enc, params, args.system)
        else:
            answer_prompts(load_model_or_die(args.model or "gpt2", device, dtype, int8), args, params, enc)
    except (PromptTooLong, NothingToSample) as e:
        die(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)  # (what a shell reports for Ctrl-C: the output is cut short, not complete)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, and point stdout at
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # /dev/null so the exit flush
        sys.exit(1)                                                       # does not fail a second time


def answer_prompts(model, args, params, enc):
    """Each --prompt, --num-samples times, streamed as it is generated."""
    templated = bool(getattr(model, "checkpoint_info", {}).get("template"))  # (a fine-tuned model)
    n = len(args.prompt)  # all checked before any is answered:
    ids = [checked_answer_ids(model, prompt, enc, prompt_label(i, n)) for i, prompt in enumerate(args.prompt)]
    for i, prompt_ids in enumerate(ids):
        note_room(params.max_tokens, model.config.block_size - len(prompt_ids), model.config.block_size,
                  "after this prompt", prompt_label(i, n))
    for prompt, prompt_ids in zip(args.prompt, ids):
        for i in range(args.num_samples):
            if args.num_samples > 1:
                print(f"\n---------- sample {i + 1}", flush=True)
            seed = None if params.seed is None else params.seed + i
            # a continuation goes on from the prompt; an answer starts on a line of its own
            print(prompt, end="\n" if templated else "", flush=True)
            started = not templated
            for piece in generate(model, prompt_ids, replace(params, seed=seed), enc):
                piece, started = strip_answer_start(piece, started)
                print(piece, end="", flush=True)
            print(flush=True)


def compare(models, args, params, enc):
    """Each --prompt answered by both models, printed in two columns."""
    n = len(args.prompt)  # all checked before any is answered
    ids = [[checked_answer_ids(m, prompt, enc, prompt_label(i, n)) for m in models]
           for i, prompt in enumerate(args.prompt)]
    for prompt, pair in zip(args.prompt, ids):
        answers = ["".join(generate(m, i, params, enc)) for m, i in zip(models, pair)]
        print(f"\n=== {prompt}\n" + side_by_side(*answers, args.compare), flush=True)


def note_room(max_tokens, room, n_ctx, after, label=""):
    """Say so (on stderr) when --max-new-tokens asks for more than the context has room for: the
    answer will stop when the context is full, not at --max-new-tokens."""
    if max_tokens > room:
        print(f"note: {label}--max-new-tokens {max_tokens}, but the {n_ctx}-token context has room for {room} "
              f"{after}: the answer stops when it is full", file=sys.stderr)


def answer_ids(model, prompt, enc):
    """A fine-tuned checkpoint is asked in its chat template; a base model continues the text."""
    template = getattr(model, "checkpoint_info", {}).get("template")
    if template:
        return encode_prompt([{"role": "user", "content": prompt}], template, enc)
    return encode(prompt, enc)


def checked_answer_ids(model, prompt, enc, label=""):
    """answer_ids, or a one-line error (starting with the prompt's `label`) if they leave no room to
    answer: checked before printing."""
    ids = answer_ids(model, prompt, enc)
    try:
        check_prompt(ids, model.config.block_size)
    except ValueError as e:
        die(f"{label}{e}")
    return ids


def side_by_side(left, right, titles):
    """Two texts in two columns, wrapped to the terminal's width."""
    width = max(20, (shutil.get_terminal_size().columns - 3) // 2)
    cols = [[t[:width], "-" * width] for t in titles]
    for col, text in zip(cols, (left, right)):
        for para in text.strip().split("\n"):
            col += textwrap.wrap(para, width) or [""]
    n = max(map(len, cols))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(*(c + [""] * (n - len(c)) for c in cols)))


# ----------------------------------------------------------------------------- chat

def chat(model, enc, params, system=None):
    """A multi-turn conversation on stdin/stdout in the checkpoint's template; works piped too.
    Returns the conversation (the turns still within the context)."""
    template = getattr(model, "checkpoint_info", {}).get("template")
    if template is None:  # (a base model continues text; it never learned to take turns)
        print("note: this model's checkpoint names no chat template of ours (never fine-tuned here?): it chats in "
              "the 'chat' template, which it may never have learned", file=sys.stderr)
        template = "chat"
    n_ctx = model.config.block_size
    reserve = min(params.max_tokens, n_ctx // 4)  # room kept for the answer when dropping old turns
    messages = [{"role": "system", "content": system}] if system else []
    least = check_system_prompt_fits(messages, template, n_ctx, enc)
    note_room(params.max_tokens, n_ctx - least, n_ctx, "after a one-word message (less as the chat grows)")
    tty = sys.stdin.isatty()
    stdin = getattr(sys.stdin, "buffer", sys.stdin)  # (a text stream without one, e.g. io.StringIO: as is)
    if tty:
        print(f"chat ({template} template, {n_ctx}-token context); /help lists the commands, "
              f"Ctrl-C stops an answer, Ctrl-D quits")
    answers = 0
    while (line := read_message(stdin, tty)) is not None:
        command = line.split()[0] if line.startswith("/") else None
        if command in ("/quit", "/exit"):
            break
        if command in CHAT_COMMANDS or re.fullmatch(r"/\w+", line):  # (a message may start with "/usr ...")
            messages = chat_command(command, messages, system)
            continue
        if not line:
            continue
        try:
            ids, messages = fit_conversation(messages + [{"role": "user", "content": line}],
                                             template, n_ctx, reserve, enc)
        except PromptTooLong as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        # with --seed, each answer its own seed: one seed for all would repeat the same draws every turn
        seeded = params if params.seed is None else replace(params, seed=params.seed + answers)
        answers += 1
        messages.append({"role": "assistant", "content": print_answer(model, ids, seeded, enc)})
    return messages


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "start a new conversation (a --system prompt stays)",
                 "/quit": "end the chat (so do /exit and Ctrl-D)"}


def chat_command(command, messages, system):
    """Carry out a chat command, saying on stderr what it did; returns the conversation after it."""
    if command == "/reset":
        print("(a new conversation" + (": the system prompt stays)" if system else ")"), file=sys.stderr)
        return messages[:1] if system else []
    if command == "/help":
        print("\n".join(f"  {name:7} {what}" for name, what in CHAT_COMMANDS.items()), file=sys.stderr)
    else:
        print(f"(unknown command {command}: /help lists them; nothing was sent)", file=sys.stderr)
    return messages


def check_system_prompt_fits(messages, template, n_ctx, enc):
    """A system prompt that leaves no room for any message is refused up front (else every message
    would be refused, for the system prompt's fault). Returns the tokens of the shortest prompt."""
    least = len(encode_prompt(messages + [{"role": "user", "content": "hi"}], template, enc))
    if least >= n_ctx:
        die(f"--system makes every prompt at least {least} tokens: the {n_ctx}-token context has no room "
            f"left to answer")
    return least


def read_message(stdin, tty):
    """The next line typed or piped, stripped; None at the end of input (Ctrl-D, or Ctrl-C at the
    prompt); "" for a line that is not UTF-8, refused with a message rather than garbled."""
    if tty:
        print("> ", end="", flush=True)
    try:  # bytes, decoded here: a line that is not UTF-8 is refused, not garbled (or fatal)
        raw = stdin.readline()
    except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, as Ctrl-D does
        print(file=sys.stderr)
        return None
    if not raw:  # Ctrl-D (end of input)
        if tty:
            print()  # end the prompt's line, so the shell's prompt starts on its own
        return None
    try:
        return (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
    except UnicodeDecodeError as e:
        print(f"error: that line is not valid UTF-8 (byte {e.start}); it was skipped", file=sys.stderr)
        return ""


def print_answer(model, ids, params, enc):
    """Print the answer as it is generated; return it. Ctrl-C stops this answer, not the conversation."""
    answer, started = "", False
    try:
        for piece in generate(model, ids, params, enc):
            piece, started = strip_answer_start(piece, started)
            answer += piece
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pass
    print(flush=True)
    return answer.rstrip()


if __name__ == "__main__":
    main()
