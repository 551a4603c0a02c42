"""Instruction fine-tuning (SFT): turn a pretrained GPT-2 into a model that answers instructions.

    python sft.py                                   # gpt2 on the 52k Stanford Alpaca set
    python sft.py --quick --model runs/tinystories-small/checkpoint --data ../shared/data/instruction-data.json
    python sft.py --model gpt2-medium --data dolly --data guanaco --lora-rank 8
    python sft.py --resume out/sft                  # continue an interrupted run exactly

Pretraining taught the model to continue text. Fine-tuning shows it conversations rendered with a
chat template (data.py) and trains it on the *answers* only: every prompt and user token has label
-100, so the loss asks "given this request, what is the answer?" and never "predict the request".
Each answer ends with one learned <|endoftext|>, which is how the model learns to stop. The loss is
normalized by the number of learned tokens in the whole accumulated batch (train.train_step), so a
long answer counts as many tokens, not as one example.

The data is split train/val/test with --seed; val loss is measured every --eval-interval steps and
the best model so far is the checkpoint in --out (with its template recorded, so generate.py and
serve.py format prompts the same way). After training, the best checkpoint answers the test
prompts greedily and the answers are written next to the references for reading.

LoRA (--lora-rank > 0) freezes the model and learns a low-rank update W + (alpha/r) B A for chosen
linear layers: a few hundred thousand trainable numbers instead of 124M. Adapters are folded into
the weights when saving, so the output is a plain checkpoint.

Template default: alpaca when every conversation is single-turn, chat when any is multi-turn.

Output layout, all in --out:
    model.safetensors, config.json   the best checkpoint so far (LoRA merged): load it with generate.py
    test_responses.json, training_metadata.json     written when training is done
    last/                            the resumable training state (train.save_training_state): weights
                                     (with LoRA: the frozen base plus the unmerged adapters), AdamW
                                     moments, step, best val loss and the loss history

Resuming. last/ is rewritten atomically every --save-every steps, at the end, and on Ctrl-C (the
current step finishes first). `python sft.py --resume OUT` (or the original command plus --resume)
continues exactly: the run's flags come from last/, the LR schedule is a function of the step, the
batch iterator is advanced past the batches already drawn, and dropout is reseeded every step from
(seed, step), so a stopped-and-resumed run computes the same weights as one that never stopped
(bit for bit on a CPU; some CUDA kernels are not deterministic even without a stop). A resume that
cannot be exact (another model, data, template, LoRA rank, device type, a changed flag) is refused.
"""

import argparse
import hashlib
import math
import pickle
import random
import shlex
import signal
import sys
import time
from array import array
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint_json
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, HelpFormatter, autocast_for, check_flags,
                    device_or_die, die, write_json_atomic, write_or_die)
from data import (DataError, default_template, encode_examples, eval_batches, iterate_batches, load_conversations,
                  split_dataset)
from gpt import GPT, SIZES, load_or_die
from inference import generate_tokens
from lora import add_lora, lora_merged
from sampling import SamplingParams
from tokenizer import TEMPLATES, PromptTooLong, fit_conversation, format_prompt, get_tokenizer
from training import (STATE_FILE, checkpoint_dir, evaluate, load_training_state, lr_at, make_optimizer, make_run_dir,
                      refuse_to_overwrite_unfinished, refuse_to_overwrite_weights, save_training_state, train_step,
                      warn_if_warmup_outlasts)
# ----------------------------------------------------------------------------- LoRA


# ----------------------------------------------------------------------------- the run


STATE_DIR = "last"  # the resumable training state, inside --out
NOT_SAVED = {"resume", "stop_at_step", "out"}  # flags of one invocation, not of the run
# Flags a resumed run may change: they do not touch the numbers the training computes. (--device may
# name another device of the same type, cuda:1 for cuda:0; a different type is refused at load.)
RESUMABLE_CHANGES = NOT_SAVED | {"device", "save_every", "max_test", "max_new_tokens"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", help=f"{' | '.join(SIZES)} or a checkpoint directory")
    p.add_argument("--data", action="append", default=None,
                   help="alpaca | dolly | guanaco (downloaded) or a JSON/JSONL file; repeat to mix (default: alpaca)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="chat template (default: alpaca for single-turn data, chat if any conversation is multi-turn)")
    p.add_argument("--out", default="out/sft",
                   help=f"output directory: the best checkpoint, and in {STATE_DIR}/ the resumable training state")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="OUT",
                   help=f"continue the run saved in OUT/{STATE_DIR} (OUT: --out) exactly, with its saved flags; flags "
                        "given now must agree with them, except --device, --save-every, --stop-at-step, --max-test "
                        "and --max-new-tokens")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: 8; --quick: 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default: 4; --quick: 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-5, or 3e-4 with LoRA)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability while fine-tuning")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per example (default: the model's context; --quick: at most 256)")
    p.add_argument("--val-frac", type=float, default=0.05, help="share of the data held out for validation")
    p.add_argument("--test-frac", type=float, default=0.05, help="share held out for the test answers")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between val evaluations (default: ~10 per run)")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"steps between saves of the resumable state in OUT/{STATE_DIR} (default: at every evaluation)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="save the resumable state and stop after this many steps (as Ctrl-C would)")
    p.add_argument("--max-test", type=int, default=100, help="test prompts to answer into test_responses.json")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest test answer")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale: the update is (alpha / rank) B A")
    p.add_argument("--lora-targets", default="c_attn,c_proj",
                   help="comma-separated linear layers to adapt: c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj")
    p.add_argument("--seed", type=int, default=1337, help="seeds the split, the batch order, dropout and LoRA's init")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--quick", action="store_true",
                   help="prove the pipeline in a minute: 120 conversations (100 train), 20 steps of 4 examples")
    return p


def state_dir_of(path):
    """OUT/last for an output directory OUT; the state directory itself when given one."""
    path = Path(path)
    return path if (checkpoint_dir(path) / STATE_FILE).exists() and path.name == STATE_DIR else path / STATE_DIR


def read_saved_run(state):
    """The config.json of a saved sft.py state (its flags in "sft_args"), or a one-line error."""
    if not (checkpoint_dir(state) / STATE_FILE).exists():
        die(f"--resume: no training state in {state} (sft.py saves one every --save-every steps and on Ctrl-C)")
    try:
        info = read_checkpoint_json(checkpoint_dir(state))
    except CheckpointError as e:
        die(f"--resume: {e}")
    if not isinstance(info.get("sft_args"), dict) or not isinstance(info.get("data_fingerprint"), str):
        die(f"--resume: {state} is not a training state saved by sft.py")
    return info


def absolute_paths(args):
    """--model and --data as absolute paths where they name local files (names like gpt2 or alpaca stay):
    they are saved with the run, and --resume must find them from any working directory."""
    local = lambda v: str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v  # noqa: E731
    args.model = local(args.model)
    if isinstance(args.data, list):
        args.data = [local(d) for d in args.data]
    return args


def parse_args(argv=None):
    """Flags; with --resume, the saved run's flags, which flags given now may repeat but not change."""
    parser = build_parser()
    args = absolute_paths(parser.parse_args(argv))
    unset = object()  # a default no flag can produce: what is left at it was not on the command line
    parser.set_defaults(**{k: unset for k in vars(args) if k != "data"})  # --data appends: None stays
    given = {k: v for k, v in vars(absolute_paths(parser.parse_args(argv))).items() if v is not unset and v is not None}
    if args.resume is not None:
        out = Path(args.resume or args.out)
        state = state_dir_of(out)
        out = state.parent
        saved = read_saved_run(state)["sft_args"]
        for k, v in given.items():
            if k not in RESUMABLE_CHANGES and k in saved and v != saved[k]:
                die(f"--resume: --{k.replace('_', '-')} {v} differs from the saved run's "
                    f"{'default' if saved[k] is None else saved[k]} "
                    f"(an exact resume needs the same run; start a new one with another --out)")
        if args.resume and "out" in given and Path(given["out"]) != out:
            die(f"--resume {args.resume} and --out {given['out']} name different runs")
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in NOT_SAVED},
                                     **given, "out": str(out), "resume": str(out)})
    args.data = args.data or ["alpaca"]
    args.lr = args.lr if args.lr is not None else (3e-4 if args.lora_rank > 0 else 3e-5)
    if args.batch_size is None:
        args.batch_size = 4 if args.quick else 8
    if args.grad_accum is None:
        args.grad_accum = 1 if args.quick else 4
    # before any data or model is loaded: a bad value is a one-line error, not a traceback (--epochs
    # inf) or a silently different run (a negative --grad-clip would reverse the gradients)
    check_flags(args, **{flag: AT_LEAST_1 for flag in ("batch_size", "grad_accum", "max_new_tokens", "max_steps",
                                                      "eval_interval", "save_every", "stop_at_step")},
                epochs=POSITIVE, lr=POSITIVE, warmup_steps=NON_NEGATIVE,
                min_lr_ratio=(lambda v: 0 <= v <= 1, "between 0 and 1 (the schedule decays to it)"),
                weight_decay=NON_NEGATIVE, grad_clip=NON_NEGATIVE, dropout=PROBABILITY,
                max_len=(lambda v: v >= 2, "at least 2"), lora_rank=NON_NEGATIVE, lora_alpha=POSITIVE,
                max_test=NON_NEGATIVE)
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1) or args.val_frac == 0:
        die("--val-frac must be in (0, 1) and --test-frac in [0, 1)")
    for flag in ("val_frac", "test_frac"):  # --quick's own split would replace them without a word
        if args.quick and flag in given:
            die(f"--{flag.replace('_', '-')} cannot be combined with --quick, which splits its 120 conversations "
                "100 / 10 / 10")
    for flag in ("lora_alpha", "lora_targets"):  # (settings of an adapter that rank 0 does not make)
        if args.lora_rank == 0 and flag in given:
            die(f"--{flag.replace('_', '-')} needs --lora-rank above 0 (without it the whole model is fine-tuned)")
    # the best checkpoint goes into OUT itself and the state into OUT/last: neither may be the base model
    refuse_to_overwrite_weights("--model", args.model, args.out, [args.out, Path(args.out) / STATE_DIR])
    if args.quick:
        args.max_steps = args.max_steps or 20
        args.max_test = min(args.max_test, 10)
        args.max_new_tokens = min(args.max_new_tokens, 64)
    return args


def data_fingerprint(*example_lists):
    """A hash of the encoded examples (ids and labels): it changes with the data, the template,
    --max-len, --seed or the split, any of which would make a resumed run a different run."""
    h = hashlib.sha256()
    for examples in example_lists:
        h.update(len(examples).to_bytes(8, "little"))
        for ids, labels in examples:
            h.update(array("q", [len(ids), *ids, *labels]).tobytes())
    return h.hexdigest()


def answer_test_prompts(model, conversations, template, max_new_tokens, enc):
    """Greedy answers to each test conversation's last question. The prompt is the conversation up
    to its last answer (oldest turns dropped if it does not fit); the reference is that answer."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    results, too_long = [], 0
    # a prompt must end with a question: keep the conversations whose last answer follows a user turn
    usable = [c for c in conversations if len(c) >= 2 and c[-2]["role"] == "user"]
    if len(usable) < len(conversations):
        print(f"{len(conversations) - len(usable)} test conversations have no user turn before their last answer")
    for conv in tqdm(usable, desc="test answers", disable=None):
        messages, reference = conv[:-1], conv[-1]["content"]
        try:
            ids, kept = fit_conversation(messages, template, model.config.block_size, max_new_tokens, enc)
        except PromptTooLong:
            too_long += 1
            continue
        response = enc.decode(list(generate_tokens(model, ids, params)))
        results.append({"prompt": format_prompt(kept, template), "reference": reference, "response": response})
    if too_long:
        print(f"{too_long} test prompts are longer than the context and were not answered")
    return results


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run_args = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}  # saved with the state
    if not args.resume:  # a new run would overwrite an interrupted one's state: make that a choice
        refuse_to_overwrite_unfinished(Path(args.out), Path(args.out) / STATE_DIR, "sft_args")
    torch.manual_seed(args.seed)
    device = str(device_or_die(args.device))
    enc = get_tokenizer()

    # Everything that can fail on bad input (model, data, flags) happens before anything is written.
    # The data first: a typo in a data file should not cost a model download.
    conversations = []
    try:
        for name in args.data:
            conversations += load_conversations(name)
    except DataError as e:
        die(str(e))
    model = load_or_die(args.model, device=device, dropout=args.dropout)
    if args.quick:  # a seeded handful: 100 to train on, 10 to validate, 10 to test
        if len(conversations) > 120:
            conversations = random.Random(args.seed).sample(conversations, 120)
        args.val_frac = args.test_frac = 1 / 12
    template = args.template or default_template(conversations)
    block_size = model.config.block_size
    max_len = args.max_len or (min(256, block_size) if args.quick else block_size)
    if not 2 <= max_len <= block_size:
        die(f"--max-len {max_len} must be between 2 and the model's context, {block_size}")
    try:
        train_conv, val_conv, test_conv = split_dataset(conversations, args.val_frac, args.test_frac, args.seed)
    except DataError as e:
        die(str(e))
    train_ex, train_stats = encode_examples(train_conv, template, max_len, enc)
    val_ex, val_stats = encode_examples(val_conv, template, max_len, enc)
    if not train_ex or not val_ex:
        die(f"no training or validation example fits in --max-len {max_len}")
    lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.lora_rank > 0:
        try:
            add_lora(model, args.lora_rank, args.lora_alpha, lora_targets)
        except ValueError as e:
            die(str(e))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)"
          + (f", LoRA rank {args.lora_rank} on {','.join(lora_targets)}" if args.lora_rank else ""))

    micro_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * micro_per_epoch / args.grad_accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
    if args.warmup_steps is not None:  # (the default is shorter than any run of 2 steps or more)
        warn_if_warmup_outlasts("--warmup-steps", warmup, max_steps, args.lr)
    eval_interval = args.eval_interval or max(1, max_steps // 10)
    if args.quick:
        eval_interval = args.eval_interval or 5
    print(f"data {', '.join(args.data)}: {len(train_ex)} train / {len(val_ex)} val / {len(test_conv)} test "
          f"examples, template {template!r}, max_len {max_len}; {max_steps} steps of "
          f"{args.batch_size} x {args.grad_accum} examples on {device}")

    device_type = torch.device(device).type
    optimizer = make_optimizer(model, args.lr, weight_decay=args.weight_decay, device_type=device_type)
    autocast = autocast_for(device)
    batches = iterate_batches(train_ex, args.batch_size, seed=args.seed)
    val_batches = [(x.to(device), y.to(device)) for x, y in eval_batches(val_ex, args.batch_size)]
    out = Path(args.out)
    state_dir = out / STATE_DIR
    save_every = args.save_every or eval_interval
    fingerprint = data_fingerprint(train_ex, val_ex)

    # The run's progress besides weights and optimizer: what a resumed run needs to carry on exactly.
    progress = {"history": [], "best": float("inf"), "best_step": None, "train_loss": float("nan"),
                "train_time": 0.0, "resumed_at": []}
    step = 0
    if args.resume:  # the last checks, then the weights (LoRA: base + unmerged adapters) and AdamW moments
        saved = read_saved_run(state_dir)
        if saved["data_fingerprint"] != fingerprint:
            die(f"--resume: the training data differs from the run saved in {state_dir} "
                "(a changed data file or tokenization); nothing was written")
        if saved.get("device_type", device_type) != device_type:  # other kernels, and bf16 autocast on CUDA only
            die(f"--resume: the run was trained on {saved['device_type']} and would continue on {device_type}, "
                f"which computes different numbers; pass --device {saved['device_type']}")
        try:
            step, progress = load_training_state(state_dir, model, optimizer)
            progress["resumed_at"].append(step)
        except (CheckpointError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            die(f"--resume: cannot load the training state in {state_dir}: {e}")
        if progress["best_step"] is not None and not (out / "model.safetensors").exists():
            die(f"--resume: the best checkpoint so far (step {progress['best_step']}) is missing from {out}; "
                "the run cannot finish without it")
        if args.stop_at_step is not None and args.stop_at_step <= step:
            die(f"--stop-at-step {args.stop_at_step}: the saved run is already at step {step}")
        for _ in range(step * args.grad_accum):  # the batch order is seeded: skip the batches already trained on
            next(batches)
        print(f"resumed at step {step} of {max_steps} from {state_dir}")
    history = progress["history"]
    make_run_dir(out)  # every input is checked; now --out must be writable, before any training

    def save(step, val_loss):
        meta = dict(template=template, base_model=str(args.model), data=args.data, step=step, val_loss=val_loss)
        with write_or_die(out):  # (save_checkpoint deletes its own half-written files)
            with lora_merged(model):
                model.save_checkpoint(out, **meta)

    def save_state(step):
        progress["train_time"] += time.time() - t_train
        with write_or_die(state_dir):  # (save_training_state deletes its own half-written copy)
            save_training_state(state_dir, model, optimizer, step, progress, sft_args=run_args,
                                data_fingerprint=fingerprint, max_steps=max_steps, template=template,
                                lora_rank=args.lora_rank, device_type=device_type)
        return step

    # Ctrl-C: finish the current step, save the state, stop. A second Ctrl-C quits at once.
    stop = {"requested": False}

    def on_interrupt(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write("interrupted: saving the training state after this step (Ctrl-C again to quit without saving)")

    t_train = time.time()
    if not history:
        first_val = evaluate(model, val_batches, autocast=autocast)
        history.append({"step": 0, "val_loss": first_val})
        print(f"step 0: val loss {first_val:.4f}")
    first_val = history[0]["val_loss"]
    model.train()
    saved_at = step if args.resume else None
    previous_handler = signal.signal(signal.SIGINT, on_interrupt)
    try:
        bar = tqdm(total=max_steps, initial=step, desc="sft", disable=None)
        while step < max_steps:
            if stop["requested"] or step == args.stop_at_step:
                if saved_at != step:
                    save_state(step)
                bar.close()
                print(f"stopped at step {step} of {max_steps}, state saved in {state_dir}; continue with: "
                      f"python sft.py --resume {shlex.quote(str(out))}")
                return
            step += 1  # step counts the steps done; lr_at takes this step's 0-based index
            lr = lr_at(step - 1, args.lr, warmup, max_steps, args.lr * args.min_lr_ratio)
            micro = [(x.to(device), y.to(device)) for x, y in (next(batches) for _ in range(args.grad_accum))]
            torch.manual_seed(args.seed + step)  # dropout masks depend on (seed, step) only: resumable
            progress["train_loss"] = train_step(model, optimizer, micro, lr, grad_clip=args.grad_clip,
                                                autocast=autocast)
            bar.update()
            bar.set_postfix(loss=f"{progress['train_loss']:.4f}", lr=f"{lr:.2e}")
            if step % eval_interval == 0 or step == max_steps:
                val_loss = evaluate(model, val_batches, autocast=autocast)
                if not math.isfinite(val_loss):
                    die(f"validation loss is {val_loss} at step {step}: training diverged (try a lower --lr)"
                        + (f"; the best checkpoint so far (step {progress['best_step']}) is in {out}"
                           if progress["best_step"] else ""))
                model.train()
                history.append({"step": step, "train_loss": progress["train_loss"], "val_loss": val_loss})
                improved = val_loss < progress["best"]
                if improved:  # keep the best model so far as the output checkpoint
                    progress["best"], progress["best_step"] = val_loss, step
                    save(step, val_loss)
                tqdm.write(f"step {step}: train loss {progress['train_loss']:.4f}, val loss {val_loss:.4f}"
                           + (" (best, saved)" if improved else ""))
            if step % save_every == 0 or step == max_steps:
                saved_at = save_state(step)
                t_train = time.time()
        bar.close()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    train_time = progress["train_time"]
    best, best_step, train_loss = progress["best"], progress["best_step"], progress["train_loss"]
    del model, optimizer  # free the device for the best model (and its KV cache) below
    if device_type == "cuda":
        torch.cuda.empty_cache()

    # The best checkpoint, loaded back as generate.py and serve.py will load it, answers the test set.
    try:
        best_model = GPT.from_pretrained(out, device=device)
    except CheckpointError as e:  # (e.g. deleted while training ran)
        die(f"cannot load the best checkpoint to answer the test prompts: {e}")
    results = answer_test_prompts(best_model, test_conv[:args.max_test], template, args.max_new_tokens, enc)
    with write_or_die(out / "test_responses.json"):
        write_json_atomic(out / "test_responses.json", results)
    metadata = {
        "base_model": str(args.model), "data": args.data, "template": template, "device": device,
        "sizes": {"conversations": len(conversations), "train": len(train_conv), "val": len(val_conv),
                  "test": len(test_conv), "train_examples": train_stats, "val_examples": val_stats},
        "hyperparameters": {**{k: v for k, v in vars(args).items()
                               if k not in ("data", "model", "out", "template", "device", "resume", "stop_at_step")},
                            "max_len": max_len, "max_steps": max_steps, "warmup_steps": warmup,
                            "eval_interval": eval_interval, "save_every": save_every,
                            "lora_targets": lora_targets if args.lora_rank else None},
        "losses": {"initial_val": first_val, "final_train": train_loss, "final_val": history[-1]["val_loss"],
                   "best_val": best, "best_step": best_step, "history": history},
        "parameters": {"total": total, "trainable": trainable},
        "time_s": {"train": round(train_time, 1), "total": round(time.time() - t_start, 1)},
        "resumed_at_steps": progress["resumed_at"],
        "outputs": {"checkpoint": str(out), "test_responses": str(out / "test_responses.json")},
    }
    with write_or_die(out / "training_metadata.json"):
        write_json_atomic(out / "training_metadata.json", metadata)
    print(f"best val loss {best:.4f} at step {best_step} (from {first_val:.4f}); checkpoint, "
          f"test_responses.json ({len(results)} answers) and training_metadata.json in {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: quit now, no traceback
        sys.exit(130)
