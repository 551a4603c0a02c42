"""Pretraining: teach a GPT-2 to continue text, from scratch or from OpenAI's weights.

The loop is nanoGPT's: AdamW (weight decay on matrices only), linear warmup then cosine decay of
the learning rate, gradient accumulation up to a batch counted in tokens, gradient clipping, bf16
autocast and torch.compile on CUDA (fp32 on CPU). The same script runs on one device or under
torchrun (DDP): each process reads its own slice of every batch, and only rank 0 logs and saves.

    python train.py                                  # CPU: a small model on TinyStories, text in minutes
    python train.py --data ../shared/data/tinystories_sample.txt --max-steps 200
    python train.py --preset gpt2-124m --data CORPUS # the real GPU recipe (GPT-2 small, ~10B tokens)
    torchrun --nproc_per_node=8 train.py --preset gpt2-124m --data CORPUS
    python train.py --resume runs/tinystories-small  # continue a run exactly where it stopped

A run writes into --out (default runs/<data name>/): `checkpoint/` (a model checkpoint in the
project's format, loadable with GPT.from_pretrained, plus the optimizer state), `log.jsonl` (one
record per step and per evaluation) and `loss.png` when matplotlib is installed.

Exact resumption. The checkpoint holds the weights, the AdamW moments, the step and the position
in the token stream; the learning rate is a function of the step; the random state (dropout) is
reseeded every step from (seed, step, rank). So a run stopped at step k (Ctrl-C, or --stop-at-step
k) and resumed computes the very same steps as one that never stopped.

The optimizer, schedule, training step, checkpoint code and the checks that keep a run from losing
work (--out, an unfinished run, a failed write, a resume with other flags) live in training.py,
shared with sft.py. This file is the pretraining run: its flags, its setup, and the loop in main.
"""

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, read_checkpoint_json
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, PROBABILITY, HelpFormatter, StopSignal, autocast_for,
                    check_flags, device_or_die, die, flag, write_or_die)
from data import get_batch, load_tokens, prepare_pretrain_data
from gpt import GPT, GPTConfig, SIZES
from sampling import sample
from tokenizer import EOT, get_tokenizer
from training import (STATE_FILE, check_resumed_flags, checkpoint_dir, device_peak_flops, evaluate, flags_given,
                      flops_per_token, load_training_state, lr_at, make_optimizer, mfu, plot_losses,
                      refuse_another_out, refuse_resuming_nothing, refuse_to_overwrite_a_run,
                      refuse_to_overwrite_weights, save_training_state, start_log, train_step, warn_if_warmup_outlasts)

# ----------------------------------------------------------------------------- command line

SMALL_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256)  # the CPU default: ~7M parameters, most in wte

PRESETS = {
    # GPT-2 124M as in nanoGPT / build-nanogpt. A step is 2**19 = 524,288 tokens (~0.5M, GPT-3 small's
    # batch): 64 sequences x 1024 tokens x 8 accumulation steps on one GPU, or x 1 on 8 GPUs.
    # 10B tokens / 524,288 = 19,073 steps; warmup 375M tokens / 524,288 = 715 steps (GPT-3's schedule).
    # max lr 6e-4 (GPT-3 small), decayed to 10% of it. Tuned for 10B tokens of FineWeb-Edu: point --data
    # at a large corpus (a file or URL); TinyStories (~0.5B tokens) would be seen ~20 times.
    "gpt2-124m": dict(model="gpt2", data="tinystories", batch_size=64, seq_len=1024, batch_tokens=524288,
                      lr=6e-4, min_lr=6e-5, warmup=715, max_steps=19073, weight_decay=0.1,
                      eval_every=250, eval_iters=20, save_every=1000, log_every=10),
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a recipe: sets the defaults of the flags below")
    p.add_argument("--data", default="tinystories-small",
                   help="a prepared data directory (train.bin, val.bin), a text file, a URL, or one of the "
                        "names of data.py (tinystories, tinystories-small, shakespeare)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<data name>)")
    p.add_argument("--resume", default=None, help="continue the run in this directory (flags given now override its saved ones)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(SIZES), help="a GPT-2 size, from scratch (default: a small model)")
    g.add_argument("--init", default=None, help="start from weights: gpt2, gpt2-medium, ... or a checkpoint directory")
    g.add_argument("--n-layer", type=int, help=f"override (small model: {SMALL_MODEL['n_layer']})")
    g.add_argument("--n-head", type=int, help=f"override (small model: {SMALL_MODEL['n_head']})")
    g.add_argument("--n-embd", type=int, help=f"override (small model: {SMALL_MODEL['n_embd']})")
    g.add_argument("--block-size", type=int, help=f"context length (small model: {SMALL_MODEL['block_size']})")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout probability (0 for pretraining, as GPT-2 on large data)")
    g = p.add_argument_group("optimization")
    # The defaults are the CPU run: 8 x 256 = 2,048 tokens a step, 1,000 steps = 2M tokens;
    # TinyStories-like sentences appear after ~250k tokens.
    g.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the context length)")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per optimizer step, reached by gradient accumulation (default: one micro-batch per process)")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in the whole run")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    g.add_argument("--warmup", type=int, default=50, help="warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on the matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=1337, help="seeds the initial weights, dropout and sampling")
    g = p.add_argument_group("running")
    g.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="autocast dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--eval-every", type=int, default=100, help="validate and print a sample every N steps")
    g.add_argument("--eval-iters", type=int, default=20, help="validation micro-batches")
    g.add_argument("--log-every", type=int, default=10, help="print a log line every N steps")
    g.add_argument("--save-every", type=int, default=500, help="save a checkpoint every N steps")
    g.add_argument("--sample-tokens", type=int, default=64, help="length of the sample printed at each evaluation")
    g.add_argument("--stop-at-step", type=int, default=None, help="save and stop before this step (as Ctrl-C would)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out instead of refusing")
    g.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: from a table)")
    return p


NOT_RESUMED = {"resume", "stop_at_step", "preset", "overwrite"}  # flags of one invocation: saved, never taken back from a run
SHAPE = ("model", "n_layer", "n_head", "n_embd", "block_size")  # flags that make a model from scratch
KEEPS_ITS_MODEL = "a resumed run keeps its model; start a new run with another --out to change it"


def check_saved_flags(parser, saved, where):
    """Die if a saved flag's value is not one its flag could have produced (a hand-edited or corrupt
    config.json): argparse would otherwise report it as a bad command-line flag the user never gave."""
    for action in parser._actions:
        value = saved.get(action.dest)
        if value is None or action.dest in NOT_RESUMED or action.dest == "help":
            continue
        if action.type in (int, float):
            ok = type(value) is int or (action.type is float and type(value) is float)
        else:  # --compile/--no-compile: a bool; the rest: text
            ok = isinstance(value, bool if isinstance(action, argparse.BooleanOptionalAction) else str)
        if not ok or (action.choices and value not in action.choices):
            die(f"--resume: the saved run in {where} is corrupt: train_args {action.dest} is {value!r}, "
                f"not a value of {action.option_strings[0]}")


def read_resumed_run(parser, resume, given):
    """(run directory, its saved flags) for --resume `resume`, after refusing what a resume cannot
    honour: another --out, a corrupt saved run, a flag that would change the model."""
    run = Path(resume)
    if (run / STATE_FILE).exists() and not (run / "checkpoint").exists():
        run = run.parent  # given the checkpoint directory itself
    refuse_another_out(resume, run, given)
    refuse_resuming_nothing(run, run / "checkpoint", "train.py keeps a run's state in checkpoint/ inside its --out")
    try:
        where = checkpoint_dir(run / "checkpoint")
        saved = read_checkpoint_json(where).get("train_args")
    except CheckpointError as e:
        die(f"--resume {resume}: {e}")
    if not isinstance(saved, dict):
        die(f"--resume {resume}: no training run saved there")
    check_saved_flags(parser, saved, where / "config.json")
    check_resumed_flags(given, saved, ["init"], KEEPS_ITS_MODEL, unset="none")
    check_resumed_flags(given, saved, SHAPE, KEEPS_ITS_MODEL)
    return run, saved


def check_values(args):
    """Before any data or model is loaded: a bad value is a one-line error, not a traceback or a
    silently different run (a negative --grad-clip would reverse the gradients)."""
    check_flags(args, **{name: AT_LEAST_1 for name in ("batch_size", "seq_len", "batch_tokens", "max_steps", "eval_every",
                                                      "eval_iters", "log_every", "save_every", "n_layer", "n_head",
                                                      "n_embd", "block_size")},
                lr=POSITIVE, min_lr=NON_NEGATIVE, warmup=NON_NEGATIVE, weight_decay=NON_NEGATIVE,
                grad_clip=NON_NEGATIVE, dropout=PROBABILITY, peak_flops=POSITIVE, sample_tokens=NON_NEGATIVE,
                stop_at_step=NON_NEGATIVE)
    if args.min_lr is not None and args.min_lr > args.lr:  # (the "decay" would then be a rise)
        die(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr down to --min-lr")
    if args.init and args.model:
        die("give --model (from scratch) or --init (from weights), not both")
    if args.init and args.out and not args.resume:  # before the data is tokenized; setup checks a default --out
        refuse_to_overwrite_weights("--init", args.init, args.out, [Path(args.out) / "checkpoint"])


def parse_args(argv):
    """Flags, over the preset's defaults, over (with --resume) the run's saved flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(build_parser, argv)
    if args.preset:  # the recipe's model is from scratch; with --init the weights say what it is
        parser.set_defaults(**{k: v for k, v in PRESETS[args.preset].items() if not (k == "model" and args.init)})
    if args.resume:
        run, saved = read_resumed_run(parser, args.resume, given)
        parser.set_defaults(**{**{k: v for k, v in saved.items() if k not in NOT_RESUMED}, "out": str(run)})
    elif args.init:
        for name in SHAPE[1:]:  # (--model with --init is refused in check_values)
            if name in given:
                die(f"{flag(name)} cannot be combined with --init: the model's shape comes from "
                    f"the weights of {args.init}")
    args = parser.parse_args(argv)
    check_values(args)
    return args


def already_finished(args):
    """Whether --resume names a run already at --max-steps: nothing to train, evaluate or save again."""
    step = read_checkpoint_json(checkpoint_dir(Path(args.out) / "checkpoint")).get("step", 0)
    if step < args.max_steps:
        return False
    if os.environ.get("RANK", "0") == "0":  # (under torchrun, one note, not one per process)
        print(f"note: the run in {args.out} already finished at step {step}"
              + (f" of {step}" if step == args.max_steps else f", past --max-steps {args.max_steps}")
              + "; raise --max-steps to train on")
    return True


# ----------------------------------------------------------------------------- setting up a run

def setup_distributed(device=None):
    """-> (ddp, rank, local_rank, world_size, device). Under torchrun (RANK etc. in the environment)
    join the process group: NCCL with one GPU per process on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return False, 0, 0, 1, str(device_or_die(device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = "cpu"
        dist.init_process_group("gloo")
    return True, rank, local_rank, world, device


def resolve_data(source):
    """A prepared directory as is; anything else through data.py (downloaded and tokenized once)."""
    if (Path(source) / "train.bin").exists():
        return Path(source)
    return prepare_pretrain_data(source)


def load_data(source, master, ddp):
    """(data directory, train tokens, val tokens). Rank 0 prepares the data (download, tokenize)
    while the others wait, then every process maps the same files."""
    try:
        if master:
            data_dir = resolve_data(source)
        if ddp:
            dist.barrier()
        if not master:
            data_dir = resolve_data(source)
        return data_dir, load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    except (ValueError, OSError) as e:
        die(f"--data {source}: {e}")


def build_model(args, ckpt, device):
    """The GPT to train: the checkpoint's architecture on --resume (its weights are loaded with the
    optimizer's state), OpenAI's or a checkpoint's weights with --init, else a new model."""
    try:
        if args.resume:
            model = GPT.from_pretrained(checkpoint_dir(ckpt), device=device, dropout=args.dropout)
        elif args.init:
            model = GPT.from_pretrained(args.init, device=device, dropout=args.dropout)
        else:
            shape = dict(SIZES[args.model]) if args.model else dict(SMALL_MODEL)
            overrides = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
            shape.update({k: v for k, v in overrides.items() if v is not None})
            torch.manual_seed(args.seed)  # the same initial weights on every rank
            model = GPT(GPTConfig(**shape, dropout=args.dropout)).to(device)
    except (CheckpointError, OSError, AssertionError, TypeError) as e:
        die(f"cannot build the model: {e}")
    return model.train()


def batch_shape(args, block_size, world, n_train, n_val):
    """(sequences B, tokens T, tokens per step, accumulation steps, validation batches), or a one-line
    error when the flags and the data do not make a step or a validation batch."""
    B, T = args.batch_size, args.seq_len if args.seq_len is not None else block_size
    if T > block_size:
        die(f"--seq-len {T} is longer than the model's context of {block_size}")
    tokens_per_micro = B * T * world  # one micro-batch on every process
    batch_tokens = args.batch_tokens if args.batch_tokens is not None else tokens_per_micro
    if batch_tokens % tokens_per_micro:
        die(f"--batch-tokens {batch_tokens} is not a multiple of batch-size x seq-len x processes = {tokens_per_micro}")
    if n_train < batch_tokens + 1:
        die(f"the training data has {n_train:,} tokens, fewer than one step's {batch_tokens:,}")
    n_val_batches = min(args.eval_iters, (n_val - 1) // (B * T))
    if n_val_batches < 1:
        die(f"the validation data ({n_val:,} tokens) is smaller than one batch of {B} x {T}")
    return B, T, batch_tokens, batch_tokens // tokens_per_micro, n_val_batches


def restore(ckpt, model, optimizer):
    """(steps done, position in the token stream) of the checkpoint --resume continues; the weights
    and AdamW's moments are loaded into `model` and `optimizer`."""
    try:
        step, extra = load_training_state(ckpt, model, optimizer)
    except CheckpointError as e:
        die(str(e))
    except OSError as e:
        die(f"--resume: cannot read the checkpoint in {ckpt}: {e}")
    return step, extra["data_position"]


@dataclass
class Run:
    """What main's loop works with, made by setup(): the processes, the model and optimizer, the
    data and its batching, and where the run is (steps done, position in the token stream)."""
    args: argparse.Namespace
    ddp: bool
    rank: int
    world: int
    device: str
    autocast: object  # a function returning the forward's context (autocast_for)
    out: Path
    model: torch.nn.Module  # what trains: compiled and/or DDP-wrapped
    raw: GPT  # the plain GPT, for sampling and counting FLOPs (saving unwraps the model itself)
    optimizer: torch.optim.Optimizer
    train_tokens: object
    val_batches: list
    batch_size: int
    seq_len: int
    batch_tokens: int
    grad_accum: int
    min_lr: float
    flops_per_token: int
    peak_flops: float  # None for an unknown device: no MFU
    step: int = 0  # optimizer steps done
    position: int = 0  # where in train_tokens the next step starts

    @property
    def master(self):
        return self.rank == 0  # only rank 0 prints and writes

    @property
    def ckpt(self):
        return self.out / "checkpoint"

    @property
    def log_path(self):
        return self.out / "log.jsonl"

    def next_micro_batches(self):
        """This process's micro-batches of the next step: micro-batch m of process r is the
        (m * world + r)-th slice of the step's tokens. An epoch done, the stream starts over."""
        B, T = self.batch_size, self.seq_len
        if self.position + self.batch_tokens + 1 > len(self.train_tokens):
            self.position = 0
        start = self.position
        self.position += self.batch_tokens
        return [get_batch(self.train_tokens, start + (m * self.world + self.rank) * B * T, B, T)
                for m in range(self.grad_accum)]

    def log(self, record):
        if self.master:
            with write_or_die(self.log_path), open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self):
        if self.master:
            with write_or_die(self.ckpt):  # (save_training_state deletes its own half-written copy)
                save_training_state(self.ckpt, self.model, self.optimizer, self.step,
                                    {"data_position": self.position}, train_args=vars(self.args))
        if self.ddp:
            dist.barrier()  # nobody runs ahead while rank 0 writes

    def all_agree_to_stop(self, stop):
        """Under DDP every process must stop at the same step, or the others wait forever."""
        if not self.ddp:
            return stop
        flag = torch.tensor(int(stop), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def setup(args):
    """Everything before the first step, in the order that makes a bad input fail before any work:
    processes and precision, data, the run directory's guards, model, batching, optimizer, resume,
    compile and DDP, the log."""
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else "cpu"  # (mps too: no fused AdamW, no compile by default)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    dtype = args.dtype or ("bfloat16" if device_type == "cuda" else "float32")

    data_dir, train_tokens, val_tokens = load_data(args.data, master, ddp)
    out = Path(args.out or Path("runs") / Path(data_dir).name).resolve()
    args.data, args.out = str(Path(data_dir).resolve()), str(out)  # saved with the run: --resume works from anywhere
    if args.init and not args.resume:  # (check_values checked a --out given; this is the default one)
        refuse_to_overwrite_weights("--init", args.init, out, [out / "checkpoint"])
    if not args.resume:  # a new run would overwrite another's log and checkpoint: make that a choice
        refuse_to_overwrite_a_run(out, out / "checkpoint", "train_args", args.overwrite,
                                  train_on=f", train it on with --resume {shlex.quote(str(out))} --max-steps N")

    model = build_model(args, out / "checkpoint", device)
    config = model.config
    B, T, batch_tokens, grad_accum, n_val_batches = batch_shape(args, config.block_size, world, len(train_tokens),
                                                                len(val_tokens))
    if master:
        warn_if_warmup_outlasts("--warmup", args.warmup, args.max_steps, args.lr)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, device_type=device_type, verbose=master)
    step, position = restore(out / "checkpoint", model, optimizer) if args.resume else (0, 0)
    if args.resume and args.stop_at_step is not None and args.stop_at_step <= step:
        die(f"--stop-at-step {args.stop_at_step}: the saved run is already at step {step}")
    if master:
        print(f"model: {config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context {config.block_size}: "
              f"{model.num_params():,} parameters (without the position embedding, as nanoGPT counts) | "
              f"device {device} x {world}, {dtype}")
        print(f"data: {data_dir} ({len(train_tokens):,} train / {len(val_tokens):,} val tokens) | "
              f"{batch_tokens:,} tokens per step = {B} x {T} x {grad_accum} accumulation x {world} processes")

    raw = model
    if args.compile if args.compile is not None else device_type == "cuda":
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    if master:  # (a resumed run evaluates again at `step` when main's loop would: see log_lines_before)
        start_log(out, step, step % args.eval_every == 0 or step >= args.max_steps, args.resume)
    return Run(args=args, ddp=ddp, rank=rank, world=world, device=device, autocast=autocast_for(device_type, dtype),
               out=out, model=model, raw=raw, optimizer=optimizer, train_tokens=train_tokens,
               val_batches=[get_batch(val_tokens, i * B * T, B, T) for i in range(rank, n_val_batches, world)],
               batch_size=B, seq_len=T, batch_tokens=batch_tokens, grad_accum=grad_accum,
               min_lr=args.min_lr if args.min_lr is not None else args.lr / 10,
               flops_per_token=flops_per_token(config, raw.num_params(), T),
               peak_flops=args.peak_flops or device_peak_flops(device), step=step, position=position)


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def sample_text(model, prompt_ids, max_new_tokens=64, top_k=50, seed=1337, autocast=contextlib.nullcontext):
    """A short continuation by top-k sampling: a glimpse of what the model learned, nothing more
    (inference.py is the real generator; sampling.py's sampler is the one used here). No KV cache: the
    whole window is re-read every token. A private generator keeps the training's random state
    untouched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids], device=device)
    for _ in range(max_new_tokens):
        with autocast():
            logits = model(idx[:, -model.config.block_size:])[:, -1, :].float()
        nxt = sample(logits, 1.0, top_k=top_k, generator=gen).view(1, 1)
        if nxt.item() == EOT:
            break
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return get_tokenizer().decode(idx[0, len(prompt_ids):].tolist())


# ----------------------------------------------------------------------------- the loop

def evaluate_and_sample(run):
    val_loss = evaluate(run.model, run.val_batches, run.autocast)
    run.log({"step": run.step, "val_loss": val_loss})
    if run.master:
        text = sample_text(run.raw, [EOT], run.args.sample_tokens, seed=run.args.seed, autocast=run.autocast)
        print(f"step {run.step:6d} | val loss {val_loss:.4f} | sample: {text!r}", flush=True)


def log_step(run, loss, lr, grad_norm, seconds):
    """The step's record in log.jsonl, and every --log-every steps (and after the first) a line."""
    tok_per_sec = run.batch_tokens / seconds
    util = mfu(run.flops_per_token, tok_per_sec / run.world, run.peak_flops)
    run.log({"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tok_per_sec,
             "mfu": util, "ms": seconds * 1000})
    if run.master and (run.step % run.args.log_every == 0 or run.step == 1):
        mfu_text = f"{100 * util:.1f}%" if util is not None else "n/a"
        print(f"step {run.step:6d}/{run.args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.2f} | "
              f"{tok_per_sec:,.0f} tok/s | mfu {mfu_text} | {seconds * 1000:.0f} ms", flush=True)


def finish(run):
    if run.master:
        print(f"saved {run.ckpt} at step {run.step}" + (" (stopped early; continue with --resume "
                                                        f"{run.out})" if run.step < run.args.max_steps else ""))
        png = run.out / "loss.png"
        with write_or_die(png, leftovers=[png]):
            plot_losses(run.log_path, png)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.resume and already_finished(args):
        return
    run = setup(args)
    stats, saved_at = {}, None
    # Ctrl-C: finish the current step, save, stop. (A second Ctrl-C stops at once, without saving.)
    message = "saving a checkpoint after this step (Ctrl-C again to quit without saving)" if run.master else None
    try:
        with StopSignal(message) as stop:
            while True:
                last = run.step >= args.max_steps
                if run.step % args.eval_every == 0 or last:
                    evaluate_and_sample(run)
                if last or run.all_agree_to_stop(stop.requested or run.step == args.stop_at_step):
                    break

                t0 = time.time()
                torch.manual_seed(args.seed + run.step * run.world + run.rank)  # dropout masks depend on (seed, step, rank) only
                micro_batches = run.next_micro_batches()
                lr = lr_at(run.step, args.lr, args.warmup, args.max_steps, run.min_lr)
                loss = train_step(run.model, run.optimizer, micro_batches, lr, args.grad_clip, run.autocast, stats)
                run.step += 1  # steps done: the log and the printed line of the 40th step say step 40, as its evaluation does
                log_step(run, loss, lr, stats["grad_norm"], time.time() - t0)
                if run.step % args.save_every == 0:
                    run.save()
                    saved_at = run.step
            if saved_at != run.step:
                run.save()
        finish(run)
    finally:
        if run.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the second Ctrl-C: quit now, no traceback
        sys.exit(130)
