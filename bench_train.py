"""Training speed of our GPT-2 124M next to Hugging Face's GPT2LMHeadModel, trained the same way.

Both models are trained by the very code train.py and sft.py run: training.make_optimizer's AdamW
(fused on CUDA) and training.train_step (loss over the learned tokens, backward, gradient clipping at
1.0, the update), so this measures the product, not a copy of it. Both get the same shapes, the same
random batches, the same loss (cross-entropy on fp32 logits), autocast dtype, SDPA attention and,
when asked, torch.compile of the whole model as train.py does it. The two are timed step by step in
turn (so a change in the machine's load hits both alike). Prints tokens/s and MFU
(training.flops_per_token against the device's peak) for each, and our speed as a ratio of theirs.
transformers is a test-only dependency: install it to run this.

    python bench_train.py                                   # CUDA: B=16, T=1024, bf16, compiled
    python bench_train.py --device cpu --batch 2 --seq-len 128 --steps 3
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import AT_LEAST_1, NON_NEGATIVE, POSITIVE, HelpFormatter, autocast_for, check_flags, device_or_die, die
from gpt import GPT, GPTConfig
from training import device_peak_flops, flops_per_token, make_optimizer, mfu, train_step


def build_ours(device):
    return GPT(GPTConfig()).to(device)


class WithLoss(nn.Module):
    """Hugging Face's model behind our model's training interface, model(x, y) -> (logits, loss), so
    that training.train_step runs it as it runs ours. The loss is ours too: cross-entropy of fp32 logits
    over the targets that are not -100. (HF's own labels= would shift targets that are already shifted.)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(input_ids=x).logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


def build_theirs(device):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        die("transformers is not installed (pip install transformers); it is only needed for this benchmark")
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(device)
    assert model.config._attn_implementation == "sdpa"
    return WithLoss(model)


def make_stepper(model, args, device, autocast):
    """A function that runs one training step on (x, y) and returns its loss: train.py's own step,
    training.train_step with training.make_optimizer's AdamW, on the model compiled as train.py compiles it."""
    model.train()
    optimizer = make_optimizer(model, lr=6e-4, device_type=device.split(":")[0], verbose=False)
    compiled = torch.compile(model) if args.compile else model

    def step(x, y):
        return train_step(compiled, optimizer, [(x, y)], lr=6e-4, grad_clip=1.0, autocast=autocast)
    return step


def run(steppers, args, device):
    """Time the steppers on the same batches, interleaved step by step, so that a change in the
    machine's load during the run hits every model alike. Returns {name: seconds per step}."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    times = {name: [] for name in steppers}
    for i in range(args.warmup + args.steps):
        batch = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=gen)
        # contiguous, as data.get_batch makes them (GPT.forward views the targets flat)
        x, y = batch[:, :-1].contiguous().to(device), batch[:, 1:].contiguous().to(device)
        for name, step in steppers.items():
            sync()
            t0 = time.perf_counter()
            step(x, y)
            sync()
            if i >= args.warmup:  # the first steps pay for compilation and allocation
                times[name].append(time.perf_counter() - t0)
    return {name: sum(t) / len(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: the best available)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 16 on CUDA, 2 elsewhere)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 1024 on CUDA, 128 elsewhere)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 compiled, else 1)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (default: from training.py's table)")
    args = p.parse_args()
    check_flags(args, batch=AT_LEAST_1, seq_len=(lambda v: 1 <= v <= 1024, "1..1024"), steps=AT_LEAST_1,
                warmup=NON_NEGATIVE, peak_flops=POSITIVE)
    device = str(device_or_die(args.device))  # a bad or missing device: one line, as in train.py
    cuda = device.startswith("cuda")
    args.batch = args.batch if args.batch is not None else (16 if cuda else 2)
    args.seq_len = args.seq_len if args.seq_len is not None else (1024 if cuda else 128)
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    autocast = autocast_for(device, args.dtype)
    print(f"GPT-2 124M training step, B={args.batch} T={args.seq_len}, {args.dtype}, compile={args.compile}, "
          f"device {device}, {args.steps} timed steps after {args.warmup} warmup")
    torch.manual_seed(0)
    model = build_ours(device)
    # the same FLOPs per token for both models: the same architecture, counted by one formula
    fpt = flops_per_token(model.config, model.num_params(), args.seq_len)
    ours = make_stepper(model, args, device, autocast)
    torch.manual_seed(0)
    theirs = make_stepper(build_theirs(device), args, device, autocast)
    seconds = run({"ours (gpt.py)": ours, "HF transformers": theirs}, args, device)
    peak = args.peak_flops or device_peak_flops(device)
    speed = {}
    for name, sec in seconds.items():
        speed[name] = args.batch * args.seq_len / sec
        util = mfu(fpt, speed[name], peak)
        print(f"{name:>16}: {speed[name]:10,.0f} tokens/s | MFU {'n/a' if util is None else f'{100 * util:.1f}%'} | "
              f"{1000 * sec:.0f} ms/step")
    ours, theirs = speed.values()
    print(f"ours / HF: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
