"""Instruction fine-tuning (SFT): turn a pretrained GPT-2 into a model that answers instructions.

    python sft.py                                   # gpt2 on the 52k Stanford Alpaca set
    python sft.py --quick --model runs/tinystories-small/checkpoint --data ../shared/data/instruction-data.json
    python sft.py --model gpt2-medium --data dolly --data guanaco --lora-rank 8
    python sft.py --resume out/sft                  # continue an interrupted run exactly

Pretraining taught the model to continue text. Fine-tuning shows it conversations rendered with a
chat template (tokenizer.py) and trains it on the *answers* only: every prompt and user token has label
-100, so the loss asks "given this request, what is the answer?" and never "predict the request".
Each answer ends with one learned <|endoftext|>, which is how the model learns to stop. The loss is
normalized by the number of learned tokens in the whole accumulated batch (training.train_step), so a
long answer counts as many tokens, not as one example.

The data is split train/val/test with --seed; val loss is measured every --eval-interval steps and
the best model so far is the checkpoint in --out (with its template recorded, so generate.py and
serve.py format prompts the same way). After training, the best checkpoint answers the test
prompts greedily and the answers are written next to the references for reading; the base model
answers them too, and training_metadata.json holds both models' answer signals (scoring.py: how
many answers end with <|endoftext|>, how many talk on into the next turn, their mean length).

LoRA (--lora-rank > 0) freezes the model and learns a low-rank update W + (alpha/r) B A for chosen
linear layers: a few hundred thousand trainable numbers instead of 124M. Adapters are folded into
the weights when saving, so the output is a plain checkpoint.

Template default: alpaca when every conversation is single-turn, chat when any is multi-turn.

Output layout, all in --out:
    model.safetensors, config.json   the best checkpoint so far (LoRA merged): load it with generate.py
    log.jsonl                        a record per step (loss, lr) and per evaluation (val_loss); loss.png
                                     from it at the end when matplotlib is installed
    test_responses.json, training_metadata.json     written when training is done
    last/                            the resumable training state (training.save_training_state): weights
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
import json
import math
import pickle
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import CheckpointError, read_checkpoint_json
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, HelpFormatter, StopSignal, autocast_for,
                    check_flags, default_dtype, device_or_die, die, write_json_atomic, write_or_die)
from conversations import (DataError, collate, collate_packed, default_template, encode_examples, eval_batches,
                  iterate_batches, load_conversations, pack_examples, split_dataset)
from gpt import SIZES, load_or_die
from inference import load_model
from lora import add_lora, lora_merged
from scoring import answer_conversations, answer_signals
from tokenizer import TEMPLATES, get_tokenizer
from training import (STATE_FILE, check_resumed_flags, checkpoint_dir, data_fingerprint, evaluate, flags_given,
                      load_training_state, lr_at, make_optimizer, plot_losses, refuse_another_out,
                      refuse_resuming_nothing, refuse_to_overwrite_a_run, refuse_to_overwrite_weights,
                      save_training_state, start_log, train_step, warn_if_warmup_outlasts)

# ----------------------------------------------------------------------------- command line

STATE_DIR = "last"  # the resumable training state, inside --out
NOT_SAVED = {"resume", "stop_at_step", "out", "overwrite"}  # flags of one invocation, not saved with the run
# Flags a resumed run may change: they do not touch the numbers the training computes. (--device may
# name another device of the same type, cuda:1 for cuda:0; a different type is refused at load.)
RESUMABLE_CHANGES = NOT_SAVED | {"device", "save_every", "max_test", "max_new_tokens"}
EXACT_RESUME = "an exact resume needs the same run; start a new one with another --out"


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
    p.add_argument("--max-samples", type=int, default=None,
                   help="a seeded sample of this many conversations, before the split (the guides' 5k-subset runs)")
    p.add_argument("--pack", action="store_true",
                   help="pack short training examples into rows of --max-len tokens, each attending only within "
                        "itself (no padding; --batch-size then counts rows)")
    p.add_argument("--no-mask", action="store_true",
                   help="learn every token, the prompts' too, not only the answers' (an instructive comparison)")
    p.add_argument("--val-frac", type=float, default=0.05, help="share of the data held out for validation")
    p.add_argument("--test-frac", type=float, default=0.05, help="share held out for the test answers")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between val evaluations (default: ~10 per run)")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"steps between saves of the resumable state in OUT/{STATE_DIR} (default: at every evaluation)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="save the resumable state and stop after this many steps (as Ctrl-C would)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out instead of refusing")
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
    refuse_resuming_nothing(state.parent, state, f"sft.py saves its state in {STATE_DIR}/ there every "
                                                 "--save-every steps and on Ctrl-C")
    try:
        info = read_checkpoint_json(checkpoint_dir(state))
    except CheckpointError as e:
        die(f"--resume: {e}")
    if not isinstance(info.get("sft_args"), dict) or not isinstance(info.get("data_fingerprint"), str):
        die(f"--resume: {state} is not a training state saved by sft.py")
    return info


def absolute_paths(flags):
    """--model and --data in the dict `flags` as absolute paths where they name local files (names like
    gpt2 or alpaca stay): they are saved with the run, and --resume must find them from any directory."""
    local = lambda v: str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v  # noqa: E731
    if "model" in flags:
        flags["model"] = local(flags["model"])
    if isinstance(flags.get("data"), list):
        flags["data"] = [local(d) for d in flags["data"]]
    return flags


def resumed_args(args, given):
    """The saved run's flags, with the ones given now (which must agree with them, except
    RESUMABLE_CHANGES) on top, for the run that --resume [OUT] (OUT: --out) continues."""
    state = state_dir_of(args.resume or args.out)
    out = state.parent
    saved = read_saved_run(state)["sft_args"]
    check_resumed_flags(given, saved, [k for k in given if k not in RESUMABLE_CHANGES], EXACT_RESUME)
    if args.resume:
        refuse_another_out(args.resume, out, given)
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in NOT_SAVED},
                                 **given, "out": str(out), "resume": str(out)})


def check_values(args, given):
    """Before any data or model is loaded: a bad value is a one-line error, not a traceback (--epochs
    inf) or a silently different run (a negative --grad-clip would reverse the gradients)."""
    check_flags(args, **{flag: AT_LEAST_1 for flag in ("batch_size", "grad_accum", "max_new_tokens", "max_steps",
                                                      "eval_interval", "save_every", "stop_at_step", "max_samples")},
                epochs=POSITIVE, lr=POSITIVE, warmup_steps=NON_NEGATIVE,
                min_lr_ratio=(lambda v: 0 <= v <= 1, "between 0 and 1 (the schedule decays to it)"),
                weight_decay=NON_NEGATIVE, grad_clip=NON_NEGATIVE, dropout=PROBABILITY,
                max_len=(lambda v: v >= 2, "at least 2"), lora_rank=NON_NEGATIVE, lora_alpha=POSITIVE,
                max_test=NON_NEGATIVE, val_frac=(lambda v: 0 < v < 1, "in (0, 1)"),
                test_frac=(lambda v: 0 <= v < 1, "in [0, 1)"))
    for flag in ("val_frac", "test_frac", "max_samples"):  # --quick's own split would replace them without a word
        if args.quick and flag in given:
            die(f"--{flag.replace('_', '-')} cannot be combined with --quick, which splits its 120 conversations "
                "100 / 10 / 10")
    for flag in ("lora_alpha", "lora_targets"):  # (settings of an adapter that rank 0 does not make)
        if args.lora_rank == 0 and flag in given:
            die(f"--{flag.replace('_', '-')} needs --lora-rank above 0 (without it the whole model is fine-tuned)")
    # the best checkpoint goes into OUT itself and the state into OUT/last: neither may be the base model
    refuse_to_overwrite_weights("--model", args.model, args.out, [args.out, Path(args.out) / STATE_DIR])


def parse_args(argv=None):
    """Flags; with --resume, the saved run's flags, which flags given now may repeat but not change."""
    args = argparse.Namespace(**absolute_paths(vars(build_parser().parse_args(argv))))
    given = absolute_paths(flags_given(build_parser, argv))
    if args.resume is not None:
        args = resumed_args(args, given)
    args.data = args.data or ["alpaca"]
    args.lr = args.lr if args.lr is not None else (3e-4 if args.lora_rank > 0 else 3e-5)
    if args.batch_size is None:
        args.batch_size = 4 if args.quick else 8
    if args.grad_accum is None:
        args.grad_accum = 1 if args.quick else 4
    check_values(args, given)
    if args.quick:
        args.max_steps = args.max_steps or 20
        args.max_test = min(args.max_test, 10)
        args.max_new_tokens = min(args.max_new_tokens, 64)
    return args


# ----------------------------------------------------------------------------- setting up a run

def read_conversations(args):
    """The conversations of every --data, mixed in order, or a one-line error."""
    conversations = []
    try:
        for name in args.data:
            conversations += load_conversations(name)
    except DataError as e:
        die(str(e))
    return conversations


def sampled(conversations, args):
    """The conversations a run uses: with --quick a seeded 120 (100 to train on, 10 to validate, 10
    to test), with --max-samples N a seeded N, else all of them."""
    n = 120 if args.quick else args.max_samples
    if args.quick:
        args.val_frac = args.test_frac = 1 / 12
    if n and len(conversations) > n:
        return random.Random(args.seed).sample(conversations, n)
    return conversations


@dataclass
class Split:
    """The conversations split train / val / test, and the train and val ones encoded as examples."""
    conversations: list
    train: list
    val: list
    test: list
    train_examples: list
    val_examples: list
    train_stats: dict
    val_stats: dict


def split_and_encode(args, conversations, template, max_len, enc):
    try:
        train_conv, val_conv, test_conv = split_dataset(conversations, args.val_frac, args.test_frac, args.seed)
    except DataError as e:
        die(str(e))
    train_ex, train_stats = encode_examples(train_conv, template, max_len, enc, learn_prompt=args.no_mask)
    val_ex, val_stats = encode_examples(val_conv, template, max_len, enc, learn_prompt=args.no_mask)
    if not train_ex or not val_ex:
        die(f"no training or validation example fits in --max-len {max_len}")
    return Split(conversations, train_conv, val_conv, test_conv, train_ex, val_ex, train_stats, val_stats)


def attach_lora(model, args):
    """With --lora-rank > 0, freeze the model and wrap --lora-targets in adapters; print what trains.
    Returns (the targets, parameters in all, trainable parameters)."""
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.lora_rank > 0:
        try:
            add_lora(model, args.lora_rank, args.lora_alpha, targets)
        except ValueError as e:
            die(str(e))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f}%)"
          + (f", LoRA rank {args.lora_rank} on {','.join(targets)}" if args.lora_rank else ""))
    return targets, total, trainable


def schedule(args, n_train_examples):
    """(optimizer steps, warmup steps, steps between evaluations), from the flags or their defaults."""
    micro_per_epoch = math.ceil(n_train_examples / args.batch_size)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * micro_per_epoch / args.grad_accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
    if args.warmup_steps is not None:  # (the default is shorter than any run of 2 steps or more)
        warn_if_warmup_outlasts("--warmup-steps", warmup, max_steps, args.lr)
    eval_interval = args.eval_interval or max(1, max_steps // 10)
    if args.quick:
        eval_interval = args.eval_interval or 5
    return max_steps, warmup, eval_interval


@dataclass
class Run:
    """What main's loop works with, made by setup(): the model and optimizer, the data and its
    batches, the schedule, and the progress a resumed run carries on from."""
    args: argparse.Namespace
    run_args: dict  # the flags saved with the state
    device: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object  # a function returning the forward's context (autocast_for)
    enc: object
    template: str
    max_len: int
    data: Split
    lora_targets: list
    parameters: dict  # {"total": ..., "trainable": ...}
    max_steps: int
    warmup: int
    eval_interval: int
    save_every: int
    batches: object  # the seeded iterator of training micro-batches
    val_batches: list
    fingerprint: str
    step: int = 0  # optimizer steps done
    # The run's progress besides weights and optimizer: what a resumed run needs to carry on exactly.
    progress: dict = field(default_factory=lambda: {"history": [], "best": float("inf"), "best_step": None,
                                                    "train_loss": float("nan"), "train_time": 0.0, "resumed_at": [],
                                                    "tokens": 0})
    clock: float = 0.0  # when the training time not yet in progress["train_time"] started

    @property
    def out(self):
        return Path(self.args.out)

    @property
    def state_dir(self):
        return self.out / STATE_DIR

    @property
    def device_type(self):
        return torch.device(self.device).type

    def next_micro_batches(self):
        return [tuple(t.to(self.device) for t in next(self.batches)) for _ in range(self.args.grad_accum)]

    def log(self, record):
        """One record (a step's loss, an evaluation) appended to OUT/log.jsonl, as train.py keeps it."""
        with write_or_die(self.out / "log.jsonl"), open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_best(self, val_loss):
        """The output checkpoint: this model (LoRA merged), a plain GPT with its template."""
        meta = dict(template=self.template, base_model=str(self.args.model), data=self.args.data, step=self.step,
                    val_loss=val_loss)
        with write_or_die(self.out):  # (save_checkpoint deletes its own half-written files)
            with lora_merged(self.model):
                self.model.save_checkpoint(self.out, **meta)

    def save_state(self):
        """The resumable state in OUT/last (LoRA: the frozen base plus the unmerged adapters); the
        time spent saving is not training time."""
        self.progress["train_time"] += time.time() - self.clock
        with write_or_die(self.state_dir):  # (save_training_state deletes its own half-written copy)
            save_training_state(self.state_dir, self.model, self.optimizer, self.step, self.progress,
                                sft_args=self.run_args, data_fingerprint=self.fingerprint, max_steps=self.max_steps,
                                template=self.template, lora_rank=self.args.lora_rank, device_type=self.device_type)
        self.clock = time.time()


def setup(args):
    """Everything before the first step. Whatever can fail on bad input (model, data, flags) fails
    before anything is written; the data first, as a typo in a data file should not cost a model
    download."""
    run_args = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    if not args.resume:  # a new run would overwrite another's checkpoint and state: make that a choice
        refuse_to_overwrite_a_run(Path(args.out), Path(args.out) / STATE_DIR, "sft_args", args.overwrite)
    torch.manual_seed(args.seed)
    device = str(device_or_die(args.device))
    enc = get_tokenizer()
    conversations = read_conversations(args)
    model = load_or_die(args.model, device=device, dropout=args.dropout)
    conversations = sampled(conversations, args)
    template = args.template or default_template(conversations)
    block_size = model.config.block_size
    max_len = args.max_len or (min(256, block_size) if args.quick else block_size)
    if not 2 <= max_len <= block_size:
        die(f"--max-len {max_len} must be between 2 and the model's context, {block_size}")
    data = split_and_encode(args, conversations, template, max_len, enc)
    lora_targets, total, trainable = attach_lora(model, args)
    train_items, collate_fn = data.train_examples, collate
    if args.pack:  # rows of several short examples, one attention block each (GPT.hidden's segments)
        train_items, collate_fn = pack_examples(data.train_examples, max_len), collate_packed
        print(f"packed {len(data.train_examples)} training examples into {len(train_items)} rows of at most {max_len} tokens")
    max_steps, warmup, eval_interval = schedule(args, len(train_items))
    print(f"data {', '.join(args.data)}: {len(data.train_examples)} train / {len(data.val_examples)} val / "
          f"{len(data.test)} test examples, template {template!r}, max_len {max_len}; {max_steps} steps of "
          f"{args.batch_size} x {args.grad_accum} {'packed rows' if args.pack else 'examples'} on {device}")
    optimizer = make_optimizer(model, args.lr, weight_decay=args.weight_decay, device_type=torch.device(device).type)
    run = Run(args=args, run_args=run_args, device=device, model=model, optimizer=optimizer,
              autocast=autocast_for(device), enc=enc, template=template, max_len=max_len, data=data,
              lora_targets=lora_targets, parameters={"total": total, "trainable": trainable}, max_steps=max_steps,
              warmup=warmup, eval_interval=eval_interval, save_every=args.save_every or eval_interval,
              batches=iterate_batches(train_items, args.batch_size, seed=args.seed, collate_fn=collate_fn),
              val_batches=[(x.to(device), y.to(device)) for x, y in eval_batches(data.val_examples, args.batch_size)],
              fingerprint=data_fingerprint(data.train_examples, data.val_examples))
    if args.resume:
        resume(run)
    # every input is checked; now --out must be writable, before any training. A resumed run keeps the
    # log's records up to its step (its evaluation there, if any, was made before the state was saved)
    start_log(run.out, run.step, False, args.resume)
    return run


def resume(run):
    """The last checks a resume needs, then the weights (LoRA: base + unmerged adapters), AdamW's
    moments and the progress from OUT/last; the batch iterator skips the batches already trained on."""
    args, state_dir = run.args, run.state_dir
    saved = read_saved_run(state_dir)
    if saved["data_fingerprint"] != run.fingerprint:
        die(f"--resume: the training data differs from the run saved in {state_dir} "
            "(a changed data file or tokenization); nothing was written")
    if saved.get("device_type", run.device_type) != run.device_type:  # other kernels, and bf16 autocast on CUDA only
        die(f"--resume: the run was trained on {saved['device_type']} and would continue on {run.device_type}, "
            f"which computes different numbers; pass --device {saved['device_type']}")
    try:
        run.step, run.progress = load_training_state(state_dir, run.model, run.optimizer)
        run.progress["resumed_at"].append(run.step)
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        die(f"--resume: cannot load the training state in {state_dir}: {e}")
    best_step = run.progress["best_step"]
    if best_step is not None and not (run.out / "model.safetensors").exists():
        die(f"--resume: the best checkpoint so far (step {best_step}) is missing from {run.out}; "
            "the run cannot finish without it")
    if args.stop_at_step is not None and args.stop_at_step <= run.step:
        die(f"--stop-at-step {args.stop_at_step}: the saved run is already at step {run.step}")
    for _ in range(run.step * args.grad_accum):  # the batch order is seeded: skip the batches already trained on
        next(run.batches)
    print(f"resumed at step {run.step} of {run.max_steps} from {state_dir}")


# ----------------------------------------------------------------------------- after training: the test answers

def answer_test_set(run):
    """The best checkpoint, loaded back as generate.py and serve.py load it, answers the test
    prompts into test_responses.json, and the base model answers them too: their answer signals
    (scoring.answer_signals: do the answers end, do they talk on) show what fine-tuning changed.
    Returns (the number of answers, the signals {fine_tuned, base}; base None where it could not
    answer: the run's own outputs do not depend on it)."""
    run.model = run.optimizer = None  # free the device for the best model (and its KV cache)
    test = run.data.test[:run.args.max_test]
    try:
        answers, skipped = answers_of(run.out, run, test)
    except (CheckpointError, OSError, ValueError) as e:  # (deleted while training ran; a KV cache that does not fit)
        die(f"cannot answer the test prompts with the best checkpoint (saved in {run.out}): {e}")
    if skipped:
        print(f"{skipped} test conversations were not asked: no question before their last answer, or too long")
    results = [{k: a[k] for k in ("prompt", "reference", "response")} for a in answers]
    with write_or_die(run.out / "test_responses.json"):
        write_json_atomic(run.out / "test_responses.json", results)
    signals = {"fine_tuned": answer_signals(answers, run.template), "base": None}
    try:
        signals["base"] = answer_signals(answers_of(run.args.model, run, test)[0], run.template)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"warning: the base model {run.args.model} could not answer the test prompts ({e}); "
              "its answer signals are left out")
    return len(results), signals


def answers_of(source, run, test):
    """answer_conversations of the model at `source`, loaded as generate.py loads it."""
    if run.device_type == "cuda":
        torch.cuda.empty_cache()  # (the previous model and its KV cache are gone)
    device = torch.device(run.device)
    model = load_model(source, device, default_dtype(device))
    return answer_conversations(model, test, run.template, run.args.max_new_tokens, run.enc)


def write_metadata(run, n_answers, signals, t_start):
    """training_metadata.json: what was trained on, how, and how the losses went; then one line saying so."""
    args, data, progress, out = run.args, run.data, run.progress, run.out
    history, first_val = progress["history"], progress["history"][0]["val_loss"]
    one_invocation = ("data", "model", "out", "template", "device", "resume", "stop_at_step")
    metadata = {
        "base_model": str(args.model), "data": args.data, "template": run.template, "device": run.device,
        "sizes": {"conversations": len(data.conversations), "train": len(data.train), "val": len(data.val),
                  "test": len(data.test), "train_examples": data.train_stats, "val_examples": data.val_stats},
        "hyperparameters": {**{k: v for k, v in vars(args).items() if k not in one_invocation},
                            "max_len": run.max_len, "max_steps": run.max_steps, "warmup_steps": run.warmup,
                            "eval_interval": run.eval_interval, "save_every": run.save_every,
                            "lora_targets": run.lora_targets if args.lora_rank else None},
        "losses": {"initial_val": first_val, "final_train": progress["train_loss"], "final_val": history[-1]["val_loss"],
                   "best_val": progress["best"], "best_step": progress["best_step"], "history": history},
        "answer_signals": signals,
        "parameters": run.parameters,
        "time_s": {"train": round(progress["train_time"], 1), "total": round(time.time() - t_start, 1)},
        # the tokens of every batch (padding included: what the device computes on), per second of training
        "tokens_per_s": round(progress.get("tokens", 0) / max(progress["train_time"], 1e-9), 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if run.device_type == "cuda" else None,
        "resumed_at_steps": progress["resumed_at"],
        "outputs": {"checkpoint": str(out), "test_responses": str(out / "test_responses.json")},
    }
    with write_or_die(out / "training_metadata.json"):
        write_json_atomic(out / "training_metadata.json", metadata)
    print(f"best val loss {progress['best']:.4f} at step {progress['best_step']} (from {first_val:.4f}); checkpoint, "
          f"test_responses.json ({n_answers} answers) and training_metadata.json in {out}")
    if n_answers and signals["base"]:
        base, tuned = signals["base"], signals["fine_tuned"]
        print(f"test answers, base -> fine-tuned: ending with <|endoftext|> {base['ended']:.0%} -> {tuned['ended']:.0%}, "
              f"writing the next turn {base['talks_on']:.0%} -> {tuned['talks_on']:.0%}, "
              f"mean length {base['mean_tokens']:.0f} -> {tuned['mean_tokens']:.0f} tokens")


# ----------------------------------------------------------------------------- the loop

def evaluate_and_keep_best(run):
    """Validate; a new best val loss saves the output checkpoint. A loss that is not finite stops the run."""
    progress = run.progress
    val_loss = evaluate(run.model, run.val_batches, autocast=run.autocast)
    if not math.isfinite(val_loss):
        die(f"validation loss is {val_loss} at step {run.step}: training diverged (try a lower --lr)"
            + (f"; the best checkpoint so far (step {progress['best_step']}) is in {run.out}"
               if progress["best_step"] else ""))
    run.model.train()
    progress["history"].append({"step": run.step, "train_loss": progress["train_loss"], "val_loss": val_loss})
    run.log({"step": run.step, "val_loss": val_loss})
    improved = val_loss < progress["best"]
    if improved:  # keep the best model so far as the output checkpoint
        progress["best"], progress["best_step"] = val_loss, run.step
        run.save_best(val_loss)
    tqdm.write(f"step {run.step}: train loss {progress['train_loss']:.4f}, val loss {val_loss:.4f}"
               + (" (best, saved)" if improved else ""))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    run = setup(args)
    progress = run.progress
    run.clock = time.time()
    if not progress["history"]:
        first_val = evaluate(run.model, run.val_batches, autocast=run.autocast)
        progress["history"].append({"step": 0, "val_loss": first_val})
        run.log({"step": 0, "val_loss": first_val})
        print(f"step 0: val loss {first_val:.4f}")
    run.model.train()
    saved_at = run.step if args.resume else None
    # Ctrl-C: finish the current step, save the state, stop. A second Ctrl-C quits at once.
    with StopSignal("saving the training state after this step (Ctrl-C again to quit without saving)",
                    write=tqdm.write) as stop:
        bar = tqdm(total=run.max_steps, initial=run.step, desc="sft", disable=None)
        while run.step < run.max_steps:
            if stop.requested or run.step == args.stop_at_step:
                if saved_at != run.step:
                    run.save_state()
                bar.close()
                print(f"stopped at step {run.step} of {run.max_steps}, state saved in {run.state_dir}; continue with: "
                      f"python sft.py --resume {shlex.quote(str(run.out))}")
                return
            run.step += 1  # step counts the steps done; lr_at takes this step's 0-based index
            lr = lr_at(run.step - 1, args.lr, run.warmup, run.max_steps, args.lr * args.min_lr_ratio)
            micro_batches = run.next_micro_batches()
            progress["tokens"] = progress.get("tokens", 0) + sum(batch[0].numel() for batch in micro_batches)
            torch.manual_seed(args.seed + run.step)  # dropout masks depend on (seed, step) only: resumable
            progress["train_loss"] = train_step(run.model, run.optimizer, micro_batches, lr, grad_clip=args.grad_clip,
                                                autocast=run.autocast)
            run.log({"step": run.step, "loss": progress["train_loss"], "lr": lr})
            bar.update()
            bar.set_postfix(loss=f"{progress['train_loss']:.4f}", lr=f"{lr:.2e}")
            if run.step % run.eval_interval == 0 or run.step == run.max_steps:
                evaluate_and_keep_best(run)
            if run.step % run.save_every == 0 or run.step == run.max_steps:
                run.save_state()
                saved_at = run.step
        bar.close()
    png = run.out / "loss.png"
    with write_or_die(png, leftovers=[png]):
        plot_losses(run.out / "log.jsonl", png)
    n_answers, signals = answer_test_set(run)
    write_metadata(run, n_answers, signals, t_start)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: quit now, no traceback
        sys.exit(130)
