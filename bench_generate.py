"""Benchmark: greedy tokens/s of generate.py against Hugging Face transformers' `generate`.

Both run the same GPT-2 124M with the same random weights (built by transformers, saved as a
hub-layout safetensors file and loaded by GPT.from_pretrained), on the same prompt, for the same
number of new tokens, in the same process. Each is timed end to end (prefill + decode) after a
warm-up, alternating runs, best of --repeats.

    python bench_generate.py --prompt-len 32 --new-tokens 64
    python bench_generate.py --dtype int8                # our int8 path against transformers in float32
    python bench_generate.py --device cuda --dtype bfloat16

transformers is a test-only dependency of this project: this script needs it, generate.py does not.
"""

import argparse
import os
import tempfile
import time

import torch

from checkpoint import write_safetensors
from common import AT_LEAST_1, DTYPES, HelpFormatter, check_flags, device_or_die, die, dtype_or_die
from gpt import GPT
from inference import CpuLinear, generate_tokens, pack_for_cpu, quantize_int8
from sampling import SamplingParams


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="int8 (CPU): ours quantized (inference.quantize_int8), transformers in float32, having no "
                        "int8 path for GPT-2's Conv1D layers")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best counts")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--layout", choices=["auto", "linear", *CpuLinear.LAYOUTS], default="auto",
                   help="on a CPU, the weight layout (inference.pack_for_cpu): auto measures and takes the fastest, "
                        "as generate.py does; the others force one, to see what each gives")
    args = p.parse_args()
    check_flags(args, prompt_len=AT_LEAST_1, new_tokens=AT_LEAST_1, repeats=AT_LEAST_1, threads=AT_LEAST_1)
    if args.prompt_len + args.new_tokens > 1024:
        die("--prompt-len and --new-tokens must fit in GPT-2's 1024-token context together")
    return args


def same_random_models(device, dtype):
    """transformers' GPT-2 124M with random weights, and ours with the same ones: HF's state dict ->
    a hub-layout file -> our loader."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        die("this benchmark needs transformers (pip install transformers)")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        write_safetensors(path, {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
        ours = GPT.from_pretrained(path, device=device, dtype=dtype)
    return hf.to(device=device, dtype=dtype), ours


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    if int8 and args.layout != "auto":
        die("--layout picks a float weight layout; --dtype int8 has its own")
    hf, ours = same_random_models(device, dtype)
    layout = ""
    if int8:
        quantize_int8(ours)
        layout = " (our matrices in int8; transformers in float32)"
    elif device.type == "cpu":  # as inference.load_model does for generate.py
        pack_for_cpu(ours, layout=None if args.layout == "auto" else args.layout)
        layout = f" (weight layout: {ours.cpu_layout}{', measured fastest' if args.layout == 'auto' else ''})"

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

    print(f"device {device}{layout}, {args.dtype}, {torch.get_num_threads()} threads, GPT-2 124M (random weights), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    report(*best_of(args.repeats, device, {"ours": run_ours, "hf": run_hf}))


def best_of(repeats, device, runs):
    """Each run once to warm up, then `repeats` times in turn: (the best time of each, its tokens)."""
    for fn in runs.values():
        fn()
    best, tokens = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            start = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best, tokens


def report(best, tokens):
    rate = {k: len(tokens[k]) / best[k] for k in best}
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["hf"]))
    print(f"generate.py:              {rate['ours']:7.1f} tok/s  ({1000 * best['ours'] / len(tokens['ours']):.1f} ms/token)")
    print(f"transformers generate:    {rate['hf']:7.1f} tok/s  ({1000 * best['hf'] / len(tokens['hf']):.1f} ms/token)")
    print(f"ratio (ours / HF):        {rate['ours'] / rate['hf']:7.2f}x")
    print(f"greedy tokens identical:  {same}/{len(tokens['hf'])}")


if __name__ == "__main__":
    main()
