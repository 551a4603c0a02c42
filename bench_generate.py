"""Benchmark: greedy tokens/s of generate.py against Hugging Face transformers' `generate`.

Both run the same GPT-2 124M with the same random weights (built by transformers, saved as a
hub-layout safetensors file and loaded by GPT.from_pretrained), on the same prompt, for the same
number of new tokens, in the same process. Each is timed end to end (prefill + decode) after a
warm-up, alternating runs, best of --repeats.

    python bench_generate.py --prompt-len 32 --new-tokens 64
    python bench_generate.py --device cuda --dtype bfloat16

transformers is a test-only dependency of this project: this script needs it, generate.py does not.
"""

import argparse
import os
import tempfile
import time

import torch

from checkpoint import write_safetensors
from common import HelpFormatter, device_or_die, die
from gpt import GPT
from inference import CpuLinear, generate_tokens, pack_for_cpu
from sampling import SamplingParams

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: the best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--layout", choices=["auto", "linear", *CpuLinear.LAYOUTS], default="auto",
                   help="on a CPU, the weight layout (generate.pack_for_cpu): auto measures and takes the fastest, "
                        "as generate.py does; the others force one, to see what each gives")
    args = p.parse_args()
    if args.prompt_len < 1 or args.new_tokens < 1 or args.prompt_len + args.new_tokens > 1024:
        die("--prompt-len and --new-tokens must be >= 1 and fit in GPT-2's 1024-token context together")
    if args.repeats < 1 or args.threads < 1:
        die("--repeats and --threads must be >= 1")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        die("this benchmark needs transformers (pip install transformers)")
    torch.set_num_threads(args.threads)
    device = device_or_die(args.device)
    dtype = getattr(torch, args.dtype)

    # the same random weights in both models: HF's state dict -> hub-layout file -> our loader
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        write_safetensors(path, {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
        ours = GPT.from_pretrained(path, device=device, dtype=dtype)
    layout = ""
    if device.type == "cpu":  # as generate.py's CLI does
        pack_for_cpu(ours, layout=None if args.layout == "auto" else args.layout)
        layout = f" (weight layout: {ours.cpu_layout}{', measured fastest' if args.layout == 'auto' else ''})"
    hf = hf.to(device=device, dtype=dtype)

    prompt = torch.randint(0, 50000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    hf_input = torch.tensor([prompt], device=device)

    def run_ours():
        return list(generate_tokens(ours, prompt, params))

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(hf_input, attention_mask=torch.ones_like(hf_input), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=50256)
        return out[0, len(prompt):].tolist()

    def timed(fn):
        sync(device)
        t0 = time.perf_counter()
        tokens = fn()
        sync(device)
        return time.perf_counter() - t0, tokens

    print(f"device {device}{layout}, {args.dtype}, {torch.get_num_threads()} threads, GPT-2 124M (random weights), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    best = {"ours": float("inf"), "hf": float("inf")}
    tokens = {}
    for fn in (run_ours, run_hf):  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            dt, tokens[name] = timed(fn)
            best[name] = min(best[name], dt)
    rate = {k: len(tokens[k]) / best[k] for k in best}
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"]))
    print(f"generate.py:              {rate['ours']:7.1f} tok/s  ({1000 * best['ours'] / len(tokens['ours']):.1f} ms/token)")
    print(f"transformers generate:    {rate['hf']:7.1f} tok/s  ({1000 * best['hf'] / len(tokens['hf']):.1f} ms/token)")
    print(f"ratio (ours / HF):        {rate['ours'] / rate['hf']:7.2f}x")
    print(f"greedy tokens identical:  {same}/{len(tokens['hf'])}")


if __name__ == "__main__":
    main()
