"""Benchmark: greedy tokens/s of generate.py against Hugging Face transformers' `generate`.

Both run the same GPT-2 124M with the same random weights (built by transformers, saved as a
hub-layout safetensors file and loaded by GPT.from_pretrained), on the same prompt, for the same
number of new tokens, in the same process. Each is timed end to end (prefill + decode) after a
warm-up, alternating runs, best of --repeats.

    python bench_generate.py --prompt-len 32 --new-tokens 64
    python bench_generate.py --dtype int8                # our int8 path against transformers in float32
    python bench_generate.py --device cuda --dtype bfloat16
    python bench_generate.py --threads 2 --dtype int8 --llama-cpp ~/llama.cpp/build/bin/llama-completion

With --llama-cpp, the same weights also go through export.py into a GGUF file at the same precision
(float32 -> f32, bfloat16 -> bf16, float16 -> f16, int8 -> q8_0) and llama.cpp's binary runs them on the
same prompt, greedy, for the same number of tokens, with the same threads; its time is the total its
own timings report (prompt + decode + sampling: what ours and transformers' times cover), best of
--repeats runs. llama.cpp is never needed otherwise (docs/benchmarks.md says how to build it).

transformers is a test-only dependency of this project: this script needs it, generate.py does not.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint import write_safetensors
from common import AT_LEAST_1, DTYPES, HelpFormatter, check_flags, device_or_die, die, dtype_or_die
from gpt import GPT
from inference import CpuLinear, generate_tokens, pack_for_cpu, quantize_int8
from sampling import SamplingParams
from tokenizer import get_tokenizer

GGUF_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "q8_0"}  # export.py's names
PROMPT_TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps aloud "
               "as his father had, and when the lamp was lit he sat by the window to write the day's weather "
               "in a book that nobody had read for forty years. ") * 40


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
    p.add_argument("--llama-cpp", metavar="PATH", type=Path, default=None,
                   help="also time llama.cpp: its llama-completion (or llama-cli) binary, on a GGUF export of the "
                        "same weights at the same precision")
    args = p.parse_args()
    check_flags(args, prompt_len=AT_LEAST_1, new_tokens=AT_LEAST_1, repeats=AT_LEAST_1, threads=AT_LEAST_1)
    if args.prompt_len + args.new_tokens > 1024:
        die("--prompt-len and --new-tokens must fit in GPT-2's 1024-token context together")
    if args.llama_cpp and not (args.llama_cpp.is_file() and os.access(args.llama_cpp, os.X_OK)):
        die(f"--llama-cpp {args.llama_cpp}: not an executable file (llama.cpp's build/bin/llama-completion)")
    return args


def same_random_models(device, dtype, directory):
    """transformers' GPT-2 124M with random weights, and ours with the same ones: HF's state dict ->
    a hub-layout file in `directory` -> our loader. Returns (hf, ours, the file)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        die("this benchmark needs transformers (pip install transformers)")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    path = os.path.join(directory, "model.safetensors")
    write_safetensors(path, {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    ours = GPT.from_pretrained(path, device=device, dtype=dtype)
    return hf.to(device=device, dtype=dtype), ours, path


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    precision = "int8" if int8 else str(dtype).removeprefix("torch.")  # (what --dtype auto resolved to)
    if int8 and args.layout != "auto":
        die("--layout picks a float weight layout; --dtype int8 has its own")
    tmp = tempfile.TemporaryDirectory()
    hf, ours, weights = same_random_models(device, dtype, tmp.name)
    layout = ""
    if int8:
        quantize_int8(ours)
        layout = " (our matrices in int8; transformers in float32)"
    elif device.type == "cpu":  # as inference.load_model does for generate.py
        pack_for_cpu(ours, layout=None if args.layout == "auto" else args.layout)
        layout = f" (weight layout: {ours.cpu_layout}{', measured fastest' if args.layout == 'auto' else ''})"

    enc = get_tokenizer()
    prompt = enc.encode(PROMPT_TEXT)[:args.prompt_len]  # text, so that llama.cpp can be given the same tokens
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    hf_input = torch.tensor([prompt], device=device)

    def run_ours():
        return list(generate_tokens(ours, prompt, params))

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(hf_input, attention_mask=torch.ones_like(hf_input), do_sample=False,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=50256)
        return out[0, len(prompt):].tolist()

    print(f"device {device}{layout}, {precision}, {torch.get_num_threads()} threads, GPT-2 124M (random weights), "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    best, tokens = best_of(args.repeats, device, {"ours": run_ours, "hf": run_hf})
    report(best, tokens)
    if args.llama_cpp:
        gguf = export_gguf(weights, GGUF_DTYPE[precision], tmp.name)
        seconds, text = time_llama_cpp(args, gguf, enc.decode(prompt))
        report_llama_cpp(args.new_tokens / seconds, best, tokens, text, enc.decode(tokens["ours"]))
    tmp.cleanup()


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


# ----------------------------------------------------------------------------- llama.cpp, when given

def export_gguf(weights, gguf_dtype, directory):
    """The benchmark's weights as a GGUF file, written by export.py run as a user runs it."""
    out = os.path.join(directory, f"model-{gguf_dtype}.gguf")
    cmd = [sys.executable, str(Path(__file__).with_name("export.py")), weights, "--to", "gguf", out, "--dtype", gguf_dtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        die(f"export.py failed: {(done.stderr.strip().splitlines() or ['(no message)'])[-1]}")
    return out


def time_llama_cpp(args, gguf, prompt):
    """(the best of --repeats total times in seconds, the text of the last run) of llama.cpp generating
    --new-tokens greedy tokens after `prompt`, with --threads threads."""
    cmd = [str(args.llama_cpp), "-m", gguf, "-p", prompt, "-n", str(args.new_tokens), "-t", str(args.threads),
           "-tb", str(args.threads), "--temp", "0", "--ignore-eos", "--no-display-prompt", "-no-cnv"]
    best = float("inf")
    for _ in range(args.repeats):
        done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode:
            die(f"{args.llama_cpp} failed (exit {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        timings = llama_cpp_timings(done.stderr)
        if timings is None:
            die(f"{args.llama_cpp}: no timings in its output; it should be llama-completion or llama-cli")
        if timings["prompt_tokens"] != args.prompt_len:
            die(f"llama.cpp read the prompt as {timings['prompt_tokens']} tokens, not {args.prompt_len}")
        best = min(best, timings["total_ms"] / 1000)
    return best, done.stdout.rstrip("\n")


def llama_cpp_timings(log):
    """{total_ms, prompt_tokens} from llama.cpp's performance lines (common_perf_print, or
    llama_perf_context_print in older builds), or None:
        ... prompt eval time =      24.26 ms /     6 tokens (    4.04 ms per token, ...)
        ...       total time =     289.67 ms /    37 tokens"""
    total = re.search(r"\btotal time =\s*([\d.]+) ms", log)
    prompt = re.search(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", log)
    if not (total and prompt):
        return None
    return {"total_ms": float(total.group(1)), "prompt_tokens": int(prompt.group(1))}


def report_llama_cpp(rate, best, tokens, text, ours_text):
    ours = len(tokens["ours"]) / best["ours"]
    same = next((i for i, (a, b) in enumerate(zip(text, ours_text)) if a != b), min(len(text), len(ours_text)))
    print(f"llama.cpp:                {rate:7.1f} tok/s  ({1000 / rate:.1f} ms/token)")
    print(f"ratio (ours / llama.cpp): {ours / rate:7.2f}x")
    print(f"llama.cpp's text:         {'identical to ours' if text == ours_text else f'the same for its first {same} of {len(ours_text)} characters'}")


if __name__ == "__main__":
    main()
