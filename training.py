"""The training machinery train.py, sft.py and dpo.py share, in the order a step uses it: the
optimizer and the learning-rate schedule, the training step, evaluation, the resumable training
state and the fingerprints a resume checks, the guards that keep a run from losing work (an
unfinished run, the weights it starts from, a --out that cannot be written, a resume with other
flags), and measuring (FLOPs, MFU).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import shlex
import shutil
import tempfile
import types
from array import array
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError, read_checkpoint_json
from common import JSON_ERRORS, die, flag, replace_atomically, same_file, write_or_die
from gpt import load_state_from_file
from tokenizer import IGNORE


# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", verbose=True):
    """AdamW with two groups: matrices (linear weights, embeddings) decay, vectors (biases, LayerNorm
    gains) do not; shrinking a gain or a bias toward zero is no regularization, only damage. Only
    parameters with requires_grad are included, so frozen weights (LoRA) are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    if verbose:
        print(f"optimizer: {len(decay)} tensors with weight decay ({sum(p.numel() for p in decay):,} parameters), "
              f"{len(no_decay)} without ({sum(p.numel() for p in no_decay):,} parameters)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # the fused CUDA kernel updates all parameters in one launch instead of a loop of small ones
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device_type == "cuda")


def lr_at(step, max_lr, warmup_steps, max_steps, min_lr):
    """Learning rate at `step` (0-based): linear warmup from max_lr/warmup_steps to max_lr, then a
    cosine from max_lr down to min_lr at max_steps, then min_lr."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# ----------------------------------------------------------------------------- the step and evaluation

class TokenCrossEntropy:
    """train_step's usual objective: the cross-entropy of every learned token (y != -100), so the unit
    a step averages over is the token. Another objective (preference.DPOObjective) gives its own
    count(batch) of units and loss_sum(model, batch, n), the loss summed over the batch's n units."""

    def count(self, batch):
        return int((batch[1] != IGNORE).sum())

    def loss_sum(self, model, batch, n):
        x, y, *packing = batch  # (packed rows also carry positions and segments: conversations.collate_packed)
        pos, segments = packing or (None, None)
        logits, loss = model(x, y, pos=pos, segments=segments)  # mean over its learned tokens
        # back to a sum (a micro-batch with nothing to learn still runs backward: DDP needs every rank's)
        return loss * n if n else logits.sum() * 0.0


def train_step(model, optimizer, micro_batches, lr, grad_clip=1.0, autocast=contextlib.nullcontext, stats=None,
               objective=TokenCrossEntropy()):
    """One optimizer step over a list of (x, y) micro-batches (or (x, y, pos, segments) of packed
    rows); returns the loss (a float).

    The loss is the sum of the token cross-entropies over ALL micro-batches divided by the number
    of learned tokens (y != -100) in all of them, so accumulating 4 micro-batches of 2 equals one
    batch of 8 exactly, however unevenly the learned tokens fall. Under DDP (`model` a DDP
    wrapper) the count is summed over every process and gradients are all-reduced only once, on
    the last micro-batch, so N processes compute what one process would on the whole batch.
    `stats`, when a dict, receives the gradient norm before clipping. `objective`: what is summed
    and over which units (TokenCrossEntropy)."""
    ddp = isinstance(model, DDP)
    world = dist.get_world_size() if ddp else 1
    device = next(model.parameters()).device
    counts = [objective.count(batch) for batch in micro_batches]
    n_total = torch.tensor(sum(counts), device=device)
    if ddp:
        dist.all_reduce(n_total)
    n_total = int(n_total)
    if n_total == 0:
        raise ValueError("no learned tokens (labels other than -100) in this batch")
    loss_sum = torch.zeros((), device=device)
    for i, (batch, n) in enumerate(zip(micro_batches, counts)):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not ddp) else model.no_sync()
        with sync:
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with autocast():
                part = objective.loss_sum(model, batch, n)
            # DDP averages gradients over processes; scaling by world undoes that, leaving sum / n_total
            (part * (world / n_total)).backward()
        loss_sum += part.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ddp:
        dist.all_reduce(loss_sum)
    if stats is not None:
        stats["grad_norm"] = float(norm)
    return float(loss_sum) / n_total


@torch.no_grad()
def evaluate(model, batches, autocast=contextlib.nullcontext):
    """Mean loss per learned token over (x, y) batches, in eval mode (no dropout). Given a DDP
    wrapper, each process passes its own batches and all get the mean over everyone's."""
    ddp = isinstance(model, DDP)
    net = model.module if ddp else model  # the forward without DDP's gradient bookkeeping
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, learned tokens)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        n = (y != IGNORE).sum()
        if n:
            with autocast():
                _, loss = net(x, y)
            total += torch.stack([loss.double() * n, n.double()])
    if ddp:
        dist.all_reduce(total)
    net.train(was_training)
    if total[1] == 0:
        raise ValueError("no learned tokens in the evaluation batches")
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------- the resumable training state

STATE_FILE = "training_state.pt"  # optimizer state, step and extras, beside the model checkpoint


def unwrap(model):
    """The GPT inside a DDP wrapper and/or a torch.compile wrapper."""
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def save_torch_file(obj, path):
    """torch.save, except that a failed write (a full disk, a file too large) raises the OSError that
    caused it, as every other write does: torch's C++ writer reports it as a RuntimeError ("unexpected
    pos ...") naming neither the file nor the cause. So the bytes go through a Python file whose
    write() keeps the error it raised."""
    errors = []
    with open(path, "wb") as f:
        def write(data):
            try:
                return f.write(data)
            except OSError as e:
                errors.append(e)
                raise
        try:
            torch.save(obj, types.SimpleNamespace(write=write, flush=f.flush))
        except RuntimeError:
            if errors:
                raise errors[0] from None
            raise


def beside(directory, suffix):
    """DIR.tmp (a save being written) or DIR.old (the previous save, set aside while DIR is replaced)."""
    directory = Path(directory)
    return directory.with_name(directory.name + suffix)


def save_training_state(directory, model, optimizer, step, extra=None, **metadata):
    """Write a resumable checkpoint: the model in the project's format (model.save_checkpoint, with
    `step` and **metadata in config.json) plus STATE_FILE (optimizer state, step, `extra`).

    Atomic: everything goes into DIR.tmp, then DIR.tmp is renamed to DIR (the previous DIR is set
    aside as DIR.old for that moment). A crash at any point leaves a complete checkpoint in DIR or,
    in the instant between the two renames, in DIR.old, where load_training_state looks too. A write
    that fails (a full disk) deletes DIR.tmp and raises its OSError, DIR untouched."""
    directory = Path(directory)
    tmp, old = beside(directory, ".tmp"), beside(directory, ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unwrap(model).save_checkpoint(tmp, step=step, **metadata)
        save_torch_file({"step": step, "optimizer": optimizer.state_dict(), "extra": extra or {}}, tmp / STATE_FILE)
    except BaseException:  # (a second Ctrl-C too) no half-written copy left to fill the disk or confuse anyone
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(directory):
    """The directory holding a training state: DIR, or DIR.old if a save was cut between renames."""
    directory, old = Path(directory), beside(directory, ".old")
    if not (directory / STATE_FILE).exists() and (old / STATE_FILE).exists():
        return old
    return directory


def load_training_state(directory, model, optimizer):
    """Restore the weights and the optimizer state saved by save_training_state; returns (step, extra).
    Nothing is unpickled: weights come from safetensors, the rest via torch.load(weights_only=True).
    A state that does not fit this model and optimizer raises CheckpointError (one line)."""
    directory = checkpoint_dir(directory)
    if not (directory / STATE_FILE).exists():
        raise CheckpointError(f"{directory}: no {STATE_FILE} here, not a training checkpoint")
    raw = unwrap(model)
    saved = read_checkpoint_json(directory)["config"]
    mine = {k: v for k, v in vars(raw.config).items() if k in saved}
    if saved != mine:
        raise CheckpointError(f"{directory}: the checkpoint's model {saved} differs from this one {mine}")
    load_state_from_file(raw, directory / "model.safetensors", transposed=False)
    path = directory / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        step, extra = state["step"], state["extra"]
    except (RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        # a cut file, another optimizer's groups; torch's messages can run over several lines
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a training state for this model ({type(e).__name__}: {first_line})") from None
    # load_state_dict checks the number of parameters per group, not their shapes: moments saved
    # from another model would pass here and fail at the first step with a size mismatch
    names = {p: name for name, p in raw.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise CheckpointError(f"{path}: the optimizer's {key} for {names.get(p, 'a parameter')} has shape "
                                          f"{list(value.shape)}, the parameter {list(p.shape)} (a state saved from "
                                          "another model)")
    return step, extra


def data_fingerprint(*example_lists):
    """A hash of the encoded examples (ids and labels): it changes with the data, the template,
    --max-len, --seed or the split, any of which would make a resumed run a different run."""
    h = hashlib.sha256()
    for examples in example_lists:
        h.update(len(examples).to_bytes(8, "little"))
        for ids, labels in examples:
            h.update(array("q", [len(ids), *ids, *labels]).tobytes())
    return h.hexdigest()


def weights_fingerprint(model):
    """A hash of a model's weights, for what a resume rebuilds from a file rather than the saved
    state (DPO's frozen reference): a file changed between stop and resume is another run."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------- guarding a run

def refuse_to_overwrite_a_run(out, state, args_key, overwrite=False, train_on=""):
    """Die if the checkpoint directory `state` of run directory `out` holds a run of this script (its
    flags under `args_key` in config.json), finished or not: a new run in `out` would overwrite its
    checkpoint and log, which must be a choice (--overwrite, or another --out), never an accident.
    `train_on`: how the script's --resume goes on past a finished run, for the hint."""
    try:
        info = read_checkpoint_json(checkpoint_dir(state))
    except CheckpointError:
        return  # nothing there (or nothing readable): nothing to lose
    saved = info.get(args_key)
    if not isinstance(saved, dict):
        return  # not a run of this script
    if overwrite:
        return
    step, max_steps = info.get("step", 0), info.get("max_steps", saved.get("max_steps"))
    if isinstance(step, int) and isinstance(max_steps, int) and step < max_steps:
        die(f"{out} holds an unfinished run (step {step} of {max_steps}): continue it with "
            f"--resume {shlex.quote(str(out))}, or choose another --out (or --overwrite to replace it)")
    done = f" (step {step})" if isinstance(step, int) else ""
    die(f"{out} holds a finished run{done}: choose another --out{train_on}, or pass --overwrite to replace it")


def refuse_to_overwrite_weights(flag, name, out, written):
    """Die if the weights `name` (the value of `flag`: a local checkpoint directory or .safetensors
    file) lie in a directory in `written`, one this run saves its checkpoint into (or its .tmp/.old
    while saving): the run's first save would replace the model it starts from. A model name (gpt2)
    is a download in the cache, which no run writes."""
    path = Path(name)
    if not path.exists():
        return
    home = path if path.is_dir() else path.parent
    for directory in map(Path, written):
        if any(same_file(home, d) for d in (directory, beside(directory, ".tmp"), beside(directory, ".old"))):
            die(f"{flag} {name} is the checkpoint this run would write in --out {out}, so saving would replace "
                "the weights it starts from: choose another --out")


def warn_if_warmup_outlasts(flag, warmup, max_steps, lr):
    """A warmup as long as the run never decays the learning rate, and a longer one never reaches
    --lr at all: legal, but rarely meant (--lr 6e-5 --max-steps 2 with the default warmup of 50)."""
    if warmup >= max_steps:
        peak = lr * max_steps / warmup  # lr_at's value at the last step
        print(f"warning: {flag} {warmup} is not shorter than --max-steps {max_steps}: the learning rate only rises, "
              f"to {peak:.2e} of --lr {lr:.2e}, and never decays")


def make_run_dir(out):
    """Create the output directory and check that a file can be written in it, or die in one line:
    better before training than at the first save, minutes or hours later."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        die(f"--out {out} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        die(f"--out {out}: cannot write there ({e.strerror or e})")


# ----------------------------------------------------------------------------- the run's log

def log_lines_before(log_path, step, evaluates_at_step=True):
    """The lines of log.jsonl a run resumed after `step` steps keeps: the training records of steps
    1 to `step`, the evaluations before `step`, and the one at `step` unless the resumed run
    evaluates there again (it does not when a finished run goes on past a step that is not a
    multiple of --eval-every: its final evaluation stays). A last line that is
    not a record is skipped rather than refused: it is one cut short by a kill in the middle of a
    write, and as the log is written before the checkpoint, it is from a step the resumed run redoes
    anyway. A bad line anywhere else is an error."""
    if not log_path.exists():
        return []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as e:
        die(f"--resume: cannot read {log_path}: {e.strerror or e}")
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            keep = record["step"] < step or (record["step"] == step and ("val_loss" not in record
                                                                            or not evaluates_at_step))
        except (*JSON_ERRORS, KeyError, TypeError):
            if number == len(lines):
                break
            die(f"{log_path}:{number}: not a log record ({line[:40]!r}); delete that line to resume")
        if keep:
            kept.append(line)
    return kept


def start_log(out, step, evaluates_at_step, resume):
    """Create the run directory and (re)write its log.jsonl: empty for a new run; on resume, without
    the records of steps the checkpoint had not reached (log_lines_before)."""
    make_run_dir(out)  # every input is checked; now --out must be writable, before any training
    log_path = Path(out) / "log.jsonl"
    kept = log_lines_before(log_path, step, evaluates_at_step) if resume else []
    with write_or_die(log_path):  # replaced whole or not at all
        replace_atomically(log_path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def plot_losses(log_path, png_path):
    """Train and validation loss curves from log.jsonl, if matplotlib is installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss plot (pip install matplotlib)")
        return
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=str(Path(log_path).parent.name))
    ax.legend()
    ax.grid(alpha=0.3)
    try:  # (all or nothing: a run stopped mid-write keeps the previous plot)
        replace_atomically(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- resuming with the saved flags

def flags_given(build_parser, argv):
    """The flags on the command line `argv`, as {dest: value} in the parser's order: told apart from
    defaults (and from the values a resumed run takes from its saved flags) by parsing with a fresh
    parser whose every default is SUPPRESS, which argparse leaves out of the result."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {action.dest: given[action.dest] for action in parser._actions if action.dest in given}


def check_resumed_flags(given, saved, names, why, unset="default"):
    """Die at the first flag of `names` given now (`given`, from flags_given) with a value other than
    the saved run's (`saved`: its flags, by dest), `why` saying why the run needs it unchanged. A
    flag the saved run left unset shows as `unset`."""
    for name in names:
        if name in given and given[name] != saved.get(name):
            was = saved.get(name)
            die(f"--resume: {flag(name)} {given[name]} differs from the saved run's "
                f"{unset if was is None else was} ({why})")


def refuse_another_out(resume, run, given):
    """Die if --out was given and names another directory than `run`, the one --resume continues:
    the run would go on in one of them, and the other flag would be silently ignored."""
    if "out" in given and not same_file(given["out"], run):
        die(f"--resume {resume} continues the run in {run}; --out {given['out']} names another "
            "(leave --out out to resume, or drop --resume to start a new run there)")


def refuse_resuming_nothing(run, state, saves):
    """Die unless `state` (the directory inside the run directory `run` where the script keeps its
    training state) holds one: "--resume DIR: no run in DIR", and why (`saves`: where the script
    saves its run, and when)."""
    if (checkpoint_dir(state) / STATE_FILE).exists():
        return
    run = Path(run)
    why = "no such directory" if not run.exists() else "not a directory" if not run.is_dir() else saves
    die(f"--resume {run}: no run in {run} ({why})")


# ----------------------------------------------------------------------------- measuring

def flops_per_token(config, n_params, seq_len):
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 per parameter (2 forward,
    4 backward; n_params without the position embedding, a lookup) plus attention's QK^T and AV
    matmuls, 12 * layers * heads * head_dim * sequence length."""
    return 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * seq_len


# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity). MFU is measured against these, so
# an fp32 run reports a lower MFU than the same speed in bf16 would. --peak-flops overrides.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12),
              ("L4", 121e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)]


def device_peak_flops(device):
    """Peak FLOP/s of a CUDA device from PEAK_FLOPS by name, or None (CPU, unknown GPU)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def mfu(flops_per_tok, tokens_per_sec, peak_flops):
    """Model FLOPs utilization: the fraction of the hardware's peak the model's arithmetic uses."""
    return flops_per_tok * tokens_per_sec / peak_flops if peak_flops else None
