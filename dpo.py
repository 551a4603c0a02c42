"""Preference tuning with DPO: after SFT, teach the model which of two answers people prefer.

    python dpo.py --model out/sft --data pairs.jsonl                 # the whole model, a frozen copy as reference
    python dpo.py --model out/sft --data pairs.jsonl --lora-rank 8   # adapters; the reference is the model without them
    python dpo.py --model out/sft --data pairs.jsonl --loss ipo --beta 0.5
    python dpo.py --model out/sft --pairs-from alpaca                # pairs made from the model's own answers

--data holds preference pairs: {prompt or messages, chosen, rejected}, the answers as strings or
message lists (TRL's and UltraFeedback-binarized's layouts), or HH-RLHF's two transcripts
(preference.py reads them all). Without pairs, --pairs-from takes an SFT dataset instead: its
answers become the chosen ones and the model's own answers to the same prompts (greedy, or sampled
with --temperature; all in one engine batch) the rejected ones (an answer the token limit cut short scored without the closing
<|endoftext|> it never wrote), written to OUT/pairs.jsonl first and trained on as read back from
it. Each pair is rendered in the model's chat template (the one its checkpoint records; --template
otherwise) and only the final answers' tokens are scored. The loss and the reference model are
explained in preference.py; the optimizer step is training.train_step, with the pair as the unit
gradient accumulation averages over.

Every --eval-interval steps the held-out pairs (--val-frac) are scored: the loss and TRL's metrics
under TRL's names (eval_rewards/accuracies is the held-out preference accuracy). Everything goes to
OUT/log.jsonl; the trained model (LoRA merged) is written to OUT as a plain checkpoint with its
template, and OUT/training_metadata.json holds the first and last held-out metrics.

Resuming: OUT/last is rewritten atomically every --save-every steps, at the end and on Ctrl-C;
`python dpo.py --resume OUT` continues exactly as sft.py's does (the saved flags, the seeded batch
order skipped forward, AdamW's moments; with --pairs-from, the pairs saved in OUT/pairs.jsonl), and
refuses to when the encoded pairs or the reference weights differ from the saved run's. A new run
over an earlier one is refused unless given --overwrite.
"""

import argparse
import copy
import json
import math
import pickle
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint_json
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, StopSignal, autocast_for, check_flags,
                    device_or_die, die, replace_atomically, write_json_atomic, write_or_die)
from conversations import DataError, load_conversations, split_dataset
from gpt import load_or_die
from lora import add_lora, lora_merged
from preference import (LOSS_TYPES, DPOObjective, encode_pairs, evaluate_pairs, pair_batches, pairs_from_answers,
                        read_pairs)
from tokenizer import TEMPLATES, get_tokenizer
from training import (check_resumed_flags, checkpoint_dir, data_fingerprint, flags_given, load_training_state, lr_at,
                      make_optimizer, make_run_dir, refuse_resuming_nothing, refuse_to_overwrite_a_run,
                      refuse_to_overwrite_weights, save_training_state, start_log, train_step, weights_fingerprint)


STATE_DIR = "last"  # the resumable training state, inside --out
NOT_SAVED = {"resume", "stop_at_step", "out", "overwrite"}  # flags of one invocation
RESUMABLE_CHANGES = NOT_SAVED | {"device", "save_every"}  # flags a resumed run may change: no number depends on them


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="out/sft", help="the fine-tuned model to start from (a checkpoint directory)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="a JSON or JSONL file of preference pairs")
    source.add_argument("--pairs-from", metavar="DATA",
                        help="an SFT dataset (alpaca | dolly | guanaco or a file, as sft.py's --data): its answers "
                             "chosen, the model's own rejected")
    p.add_argument("--max-pairs", type=int, default=1000, help="with --pairs-from: conversations to answer (a seeded sample)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="with --pairs-from: the longest answer the model writes")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="with --pairs-from: 0 = the model's greedy answers; above, sampled ones (seeded by --seed)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="chat template (default: the one the model's checkpoint records)")
    p.add_argument("--out", default="out/dpo", help="output directory: the model, log.jsonl, training_metadata.json")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out instead of refusing")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="OUT",
                   help=f"continue the run saved in OUT/{STATE_DIR} (OUT: --out) exactly, with its saved flags")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"steps between saves of the resumable state in OUT/{STATE_DIR} (default: at every evaluation)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="save the resumable state and stop after this many steps (as Ctrl-C would)")
    p.add_argument("--beta", type=float, default=0.1, help="how far from the reference the model may move (small: far)")
    p.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid", help="DPO's sigmoid loss, or IPO's squared one")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="the share of pairs assumed mislabelled (sigmoid loss only; conservative DPO)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 5e-6, or 5e-5 with LoRA)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--max-len", type=int, default=None, help="longest prompt plus answer, tokens (default: the context)")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of the pairs held out")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between held-out evaluations (default: ~5 per run)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = the whole model")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale: the update is (alpha / rank) B A")
    p.add_argument("--lora-targets", default="c_attn,c_proj", help="comma-separated linear layers to adapt")
    p.add_argument("--seed", type=int, default=1337, help="seeds the split and the batch order")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    return p


def parse_args(argv=None):
    """Flags; with --resume, the saved run's, which flags given now may repeat but not change."""
    args = build_parser().parse_args(argv)
    given = flags_given(build_parser, argv)
    for name in ("model", "data", "pairs_from"):  # saved with the run: --resume finds them from anywhere
        value = getattr(args, name)
        if isinstance(value, str) and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
            if name in given:
                given[name] = getattr(args, name)
    if args.resume is not None:
        out = Path(args.resume or args.out)
        refuse_resuming_nothing(out, out / STATE_DIR, f"dpo.py saves its state in {STATE_DIR}/ there every "
                                                      "--save-every steps and on Ctrl-C")
        try:
            saved = read_checkpoint_json(checkpoint_dir(out / STATE_DIR)).get("dpo_args")
        except CheckpointError as e:
            die(f"--resume: {e}")
        if not isinstance(saved, dict):
            die(f"--resume: {out / STATE_DIR} is not a training state saved by dpo.py")
        check_resumed_flags(given, saved, [k for k in given if k not in RESUMABLE_CHANGES],
                            "an exact resume needs the same run; start a new one with another --out")
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in NOT_SAVED},
                                     **given, "out": str(out), "resume": str(out)})
    if not (args.data or args.pairs_from):
        die("give the preference pairs (--data FILE), or an SFT dataset to make them from (--pairs-from DATA)")
    check_flags(args, beta=POSITIVE, label_smoothing=(lambda v: 0 <= v < 0.5, "in [0, 0.5)"), epochs=POSITIVE,
                max_steps=AT_LEAST_1, batch_size=AT_LEAST_1, grad_accum=AT_LEAST_1, lr=POSITIVE,
                warmup_steps=NON_NEGATIVE, grad_clip=NON_NEGATIVE, max_len=(lambda v: v >= 2, "at least 2"),
                val_frac=(lambda v: 0 < v < 1, "in (0, 1)"), eval_interval=AT_LEAST_1, lora_rank=NON_NEGATIVE,
                lora_alpha=POSITIVE, max_pairs=AT_LEAST_1, max_new_tokens=AT_LEAST_1, temperature=NON_NEGATIVE,
                save_every=AT_LEAST_1, stop_at_step=AT_LEAST_1)
    if args.label_smoothing and args.loss == "ipo":
        die("--label-smoothing is for the sigmoid loss; IPO has none")
    args.lr = args.lr or (5e-5 if args.lora_rank else 5e-6)
    refuse_to_overwrite_weights("--model", args.model, args.out, [args.out, Path(args.out) / STATE_DIR])
    return args


def load_data(args, model, template, max_len, enc):
    """(train pairs, held-out pairs), encoded, or a one-line error."""
    try:
        saved_pairs = Path(args.out) / "pairs.jsonl"
        if args.data:
            pairs = read_pairs(args.data)
        elif args.resume and saved_pairs.exists():  # (the pairs the run was started on)
            pairs = read_pairs(saved_pairs)
        else:
            pairs = make_pairs(args, model, template, enc)
        train, val, _ = split_dataset(pairs, args.val_frac, 0.0, args.seed, what="preference pairs")
    except DataError as e:
        die(str(e))
    (train, dropped), (val, dropped_val) = (encode_pairs(part, template, max_len, enc) for part in (train, val))
    if dropped or dropped_val:
        print(f"{dropped + dropped_val} pairs longer than --max-len {max_len} left out")
    if not train or not val:
        die(f"no training or held-out pair fits in --max-len {max_len}")
    return train, val


def make_pairs(args, model, template, enc):
    """--pairs-from: the dataset's answers chosen, the model's own rejected; saved in OUT/pairs.jsonl."""
    conversations = load_conversations(args.pairs_from)
    if len(conversations) > args.max_pairs:
        conversations = random.Random(args.seed).sample(conversations, args.max_pairs)
    pairs, left_out = pairs_from_answers(model, conversations, template, args.max_new_tokens, enc, args.temperature,
                                         args.seed)
    if not pairs:
        raise DataError(f"{args.pairs_from}: the model answered none of {len(conversations)} prompts differently "
                        "from the dataset, or none fits the context")
    make_run_dir(args.out)
    path = Path(args.out) / "pairs.jsonl"
    with write_or_die(path):
        replace_atomically(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(p) + "\n" for p in pairs)))
    print(f"{len(pairs)} pairs from {args.pairs_from} (the dataset's answers chosen, {args.model}'s rejected) in {path}"
          + (f"; {left_out} left out (no question that fits, or the same answer)" if left_out else ""))
    return read_pairs(path)  # (trained on as read back, exactly as a resumed run will read them)


def batches_forever(pairs, batch_size, seed):
    """Micro-batches of training pairs, a fresh seeded shuffle each epoch."""
    rng = random.Random(seed)
    while True:
        order = pairs[:]
        rng.shuffle(order)
        yield from pair_batches(order, batch_size)


def main(argv=None):
    args = parse_args(argv)
    out, state = Path(args.out), Path(args.out) / STATE_DIR
    if not args.resume:  # a new run would overwrite another's model and state: make that a choice
        refuse_to_overwrite_a_run(out, state, "dpo_args", args.overwrite)
    torch.manual_seed(args.seed)
    device = str(device_or_die(args.device))
    enc = get_tokenizer()
    model = load_or_die(args.model, device=device)
    template = args.template or model.checkpoint_info.get("template")
    if template is None:
        die(f"{args.model} records no chat template (it was never fine-tuned by sft.py): run sft.py first, or "
            "give --template")
    max_len = args.max_len or model.config.block_size
    train, val = load_data(args, model, template, min(max_len, model.config.block_size), enc)
    if args.lora_rank:
        reference = None  # the model with its adapters off
        try:
            add_lora(model, args.lora_rank, args.lora_alpha, [t.strip() for t in args.lora_targets.split(",")])
        except ValueError as e:
            die(str(e))
    else:  # the starting model, frozen (made before a resumed run loads its trained weights)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    steps = args.max_steps or max(1, math.ceil(args.epochs * len(train) / (args.batch_size * args.grad_accum)))
    warmup = args.warmup_steps if args.warmup_steps is not None else steps // 10
    eval_interval = args.eval_interval or max(1, steps // 5)
    save_every = args.save_every or eval_interval
    optimizer = make_optimizer(model, args.lr, weight_decay=0.0, device_type=torch.device(device).type, verbose=False)
    autocast = autocast_for(device)
    objective = DPOObjective(reference, args.beta, args.loss, args.label_smoothing)
    val_batches = list(pair_batches(val, args.batch_size))
    batches = batches_forever(train, args.batch_size, args.seed)
    run_args = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    sides = ([side for pair in part for side in pair] for part in (train, val))
    fingerprints = {"data_fingerprint": data_fingerprint(*sides),  # (what a resume must find unchanged)
                    "reference_fingerprint": weights_fingerprint(reference) if reference is not None else None}
    step, progress = 0, {"first": None, "last": None, "train_time": 0.0}
    if args.resume:
        step, progress = resume(state, model, optimizer, args, batches, fingerprints)
    print(f"DPO on {len(train)} pairs ({len(val)} held out), template {template!r}, beta {args.beta}, {args.loss} loss, "
          f"{steps} steps of {args.batch_size} x {args.grad_accum} pairs on {device}"
          + (f", LoRA rank {args.lora_rank}" if args.lora_rank else "") + (f"; resumed at step {step}" if step else ""))
    start_log(out, step, False, args.resume)  # (a resumed run keeps the records up to its step)

    def log(record):
        with write_or_die(out / "log.jsonl"), open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def held_out(step):
        metrics = evaluate_pairs(model, val_batches, objective, autocast)
        model.train()
        log({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})  # (TRL's names)
        tqdm.write(f"step {step}: held-out loss {metrics['loss']:.4f}, preference accuracy "
                   f"{metrics['rewards/accuracies']:.0%}, reward margin {metrics['rewards/margins']:+.4f}")
        return metrics

    def save_state():
        nonlocal clock
        progress["train_time"] += time.time() - clock
        with write_or_die(state):  # (save_training_state deletes its own half-written copy)
            save_training_state(state, model, optimizer, step, progress, dpo_args=run_args, max_steps=steps,
                                template=template, **fingerprints)
        clock = time.time()  # (saving is not training time)

    clock = time.time()
    if progress["first"] is None:
        progress["first"] = held_out(0)
    model.train()
    # Ctrl-C: finish the current step, save the state, stop. A second Ctrl-C quits at once.
    with StopSignal("saving the training state after this step (Ctrl-C again to quit without saving)",
                    write=tqdm.write) as stop:
        bar = tqdm(total=steps, initial=step, desc="dpo", disable=None)
        while step < steps:
            if stop.requested or step == args.stop_at_step:
                save_state()
                bar.close()
                print(f"stopped at step {step} of {steps}, state saved in {state}; continue with: "
                      f"python dpo.py --resume {shlex.quote(str(out))}")
                return
            step += 1
            lr = lr_at(step - 1, args.lr, warmup, steps, args.lr * 0.1)
            micro = [tuple(t.to(device) for t in next(batches)) for _ in range(args.grad_accum)]
            n_pairs = sum(x.shape[0] // 2 for x, _ in micro)
            objective.metrics = {}
            loss = train_step(model, optimizer, micro, lr, grad_clip=args.grad_clip, autocast=autocast,
                              objective=objective)
            log({"step": step, "loss": loss, "lr": lr, **{k: v / n_pairs for k, v in objective.metrics.items()}})
            bar.update()
            if step % eval_interval == 0 or step == steps:
                progress["last"] = held_out(step)
            if step % save_every == 0 or step == steps:
                save_state()
        bar.close()
    write_outputs(args, out, model, template, steps, warmup, progress, len(train), len(val))


def resume(state, model, optimizer, args, batches, fingerprints):
    """The weights (LoRA: the frozen base and the adapters), AdamW's moments and the progress from
    OUT/last, once the pairs and the reference are those the run was started on; the batch iterator
    skips the batches already trained on."""
    saved = read_checkpoint_json(checkpoint_dir(state))
    if saved.get("data_fingerprint") != fingerprints["data_fingerprint"]:
        die(f"--resume: the preference pairs differ from those of the run saved in {state} (a changed data file "
            "or tokenization); nothing was written")
    if saved.get("reference_fingerprint") != fingerprints["reference_fingerprint"]:
        die(f"--resume: the reference, {args.model}, differs from the one the run saved in {state} started from; "
            "nothing was written")
    try:
        step, progress = load_training_state(state, model, optimizer)
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        die(f"--resume: cannot load the training state in {state}: {e}")
    if args.stop_at_step is not None and args.stop_at_step <= step:
        die(f"--stop-at-step {args.stop_at_step}: the saved run is already at step {step}")
    for _ in range(step * args.grad_accum):  # the batch order is seeded: skip what was trained on
        next(batches)
    return step, progress


def write_outputs(args, out, model, template, steps, warmup, progress, n_train, n_val):
    """The trained model (LoRA merged) as a plain checkpoint with its template, and training_metadata.json."""
    model.eval()
    first, last = progress["first"], progress["last"]
    with write_or_die(out):
        with lora_merged(model):
            model.save_checkpoint(out, template=template, base_model=str(args.model),
                                  data=str(args.data or args.pairs_from), step=steps)
        write_json_atomic(out / "training_metadata.json", {
            "base_model": str(args.model), "data": str(args.data or args.pairs_from), "template": template,
            "pairs": {"train": n_train, "held_out": n_val},
            "hyperparameters": {**{k: v for k, v in vars(args).items() if k not in ("model", "data", "out")},
                                "max_steps": steps, "warmup_steps": warmup},
            "held_out": {"first": first, "last": last}, "time_s": {"train": round(progress["train_time"], 1)}})
    print(f"held-out preference accuracy {first['rewards/accuracies']:.0%} -> {last['rewards/accuracies']:.0%}, "
          f"reward margin {first['rewards/margins']:+.4f} -> {last['rewards/margins']:+.4f}; model and log in {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # nothing finished is lost: the model is written only at the end
        sys.exit(130)
