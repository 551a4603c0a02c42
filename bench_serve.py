"""Benchmark engine.py's Engine against Hugging Face transformers on the same requests, in one run.

    python bench_serve.py --device cuda --num-requests 512 --dtype bfloat16
    python bench_serve.py --device cpu --random-init --model gpt2 --num-requests 16 --max-len 64 --max-out 32

Many requests of mixed prompt and output lengths (uniform in --min-len..--max-len and
--min-out..--max-out, seeded) go through Engine.generate and through transformers with the same
weights: its continuous-batching manager (`init_continuous_batching`, as `generate_batch` uses) when
the installed version has one and the device is CUDA, else padded static batches of --hf-batch-size
(--hf-mode picks).
Every request generates exactly its output length (<|endoftext|> is ignored on both sides), so both
produce the same number of tokens: greedily, or sampled with --temperature and --top-p on both sides
(which then times the samplers too). Reported: output tokens/s over the whole run, mean and p50/p90
time to first token (from submission, so queueing counts), and the ratio of throughputs.
transformers is a test-only dependency of this project: this script is a developer's tool.
"""

import argparse
import random
import statistics
import time

import torch

from checkpoint import CheckpointError
from common import DTYPES, HelpFormatter, check_flags, device_or_die, die, dtype_or_die, flag
from engine import Engine, check_engine_limits
from gpt import GPT, GPTConfig, SIZES
from inference import pack_for_cpu, quantize_int8
from runner import kv_cache_blocks
from sampling import BadSamplingParam, SamplingParams


def make_requests(n, min_len, max_len, min_out, max_out, vocab, seed):
    """n random (prompt ids, output length) pairs, the same for every run of one seed."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))], rng.randint(min_out, max_out))
            for _ in range(n)]


def summary(name, tokens, seconds, ttfts):
    """Print one side's line of the report; returns its throughput, output tokens/s."""
    ttfts = sorted(ttfts)

    def quantile(f):
        return ttfts[min(len(ttfts) - 1, int(f * len(ttfts)))]
    print(f"{name:<28} {tokens / seconds:10.1f} tok/s   {seconds:8.2f} s   TTFT mean {statistics.mean(ttfts) * 1e3:8.1f} ms"
          f"   p50 {quantile(0.5) * 1e3:8.1f} ms   p90 {quantile(0.9) * 1e3:8.1f} ms")
    return tokens / seconds


def bench_engine(engine, requests, args):
    """Every request through the engine at once: (output tokens, seconds, time to first token of each)."""
    model = engine.model  # (for sync)

    def params(max_tokens):
        return SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p)
    engine.generate([[1, 2, 3]] * 2, params(4), use_tqdm=False)  # warm-up
    sync(model)
    start = time.perf_counter()
    seqs = [engine.add_request(ids, params(n), ignore_eos=True) for ids, n in requests]
    pending = len(seqs)
    while pending:
        pending -= sum(1 for out in engine.step() if out.finish_reason)
    sync(model)
    seconds = time.perf_counter() - start
    assert all(len(s.output_ids) == n for s, (_, n) in zip(seqs, requests))
    ttfts = [s.first_token_time - start for s in seqs]
    return sum(n for _, n in requests), seconds, ttfts


def hf_model(model):
    """The same weights in transformers' GPT2LMHeadModel (its Conv1D layers want [in, out])."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        die("transformers is not installed (pip install -r requirements-dev.txt), or pass --hf-mode none")
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                    vocab_size=c.vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        state["transformer." + k] = v
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    dev, dtype = model.wte.weight.device, model.wte.weight.dtype
    return hf.to(device=dev, dtype=dtype).eval()


def bench_hf_continuous(hf, requests, args):
    """The requests through transformers' continuous-batching manager, as bench_engine measures ours."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gc = GenerationConfig(max_new_tokens=max(n for _, n in requests), eos_token_id=None, pad_token_id=0,
                          **hf_sampling(args))
    # transformers sizes its own batch and cache from the free memory; these two flags override it
    opts = {"max_batch_tokens": args.hf_max_batch_tokens, "num_blocks": args.hf_num_blocks,
            "max_requests_per_batch": args.max_num_seqs}
    cb = ContinuousBatchingConfig(**{k: v for k, v in opts.items() if v})
    manager = hf.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    try:
        sync(hf)
        start = time.perf_counter()
        for ids, n in requests:
            manager.add_request(ids, max_new_tokens=n, record_timestamps=True)
        ttfts, tokens = [], 0
        for _ in requests:
            r = manager.get_result(timeout=3600)
            if r is None or r.error:
                raise RuntimeError(f"transformers request failed: {getattr(r, 'error', 'timeout')}")
            tokens += len(r.generated_tokens)
            ttfts.append(r.timestamps[0] - r.created_time)  # its clock, from submission
        sync(hf)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return tokens, seconds, ttfts


@torch.inference_mode()
def bench_hf_static(hf, requests, args):
    """Padded static batches (left padding), in arrival order: the classic way to batch generate()."""
    dev = hf.device
    start = time.perf_counter()
    ttfts, tokens = [], 0
    for i in range(0, len(requests), args.hf_batch_size):
        chunk = requests[i:i + args.hf_batch_size]
        width = max(len(ids) for ids, _ in chunk)
        idx = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in chunk], device=dev)
        first = []

        class FirstToken:  # a streamer that notes when the batch's first token arrives
            def put(self, value):  # called with the prompt (2-D), then each new token (1-D)
                if value.dim() == 1 and not first:
                    first.append(time.perf_counter())

            def end(self):
                pass

        out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=max(n for _, n in chunk),
                          min_new_tokens=max(n for _, n in chunk), pad_token_id=0, streamer=FirstToken(),
                          **hf_sampling(args))
        sync(hf)
        t_first = first[0] if first else time.perf_counter()
        ttfts += [t_first - start] * len(chunk)
        tokens += sum(n for _, n in chunk)  # only what each request asked for counts
        assert out.shape[1] - width >= max(n for _, n in chunk)
    return tokens, time.perf_counter() - start, ttfts


def hf_sampling(args):
    """transformers' generate() flags for the same sampling as ours."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0}


def sync(model):
    """Wait for the GPU: a timer read before its queued kernels finish measures nothing."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | ... | checkpoint dir")
    p.add_argument("--random-init", action="store_true", help="random weights of --model's size (no download)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere; int8 (CPU): our engine's matrices in int8, "
                        "transformers in float32")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=16, help="shortest prompt, tokens")
    p.add_argument("--max-len", type=int, default=512, help="longest prompt, tokens")
    p.add_argument("--min-out", type=int, default=16, help="shortest output, tokens")
    p.add_argument("--max-out", type=int, default=256, help="longest output, tokens")
    p.add_argument("--max-num-seqs", type=int, default=128, help="the engine's batch cap (and transformers')")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (both sides)")
    p.add_argument("--kv-cache-memory", default=None, help="the engine's KV cache (see serve.py)")
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--hf-mode", choices=["auto", "continuous", "static", "none"], default="auto",
                   help="transformers' side: continuous batching, padded static batches, or skip it")
    p.add_argument("--hf-batch-size", type=int, default=32, help="static batches' size")
    p.add_argument("--hf-num-blocks", type=int, default=None, help="transformers' KV blocks (default: its own sizing)")
    p.add_argument("--hf-max-batch-tokens", type=int, default=None, help="transformers' tokens per step (default: its own)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0, both sides sample")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling on both sides (with --temperature)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_args(args):
    """Bad flags are one-line errors, found before any model is built: a typo should not cost a model load first."""
    try:  # the sampling rules every caller shares
        SamplingParams(temperature=args.temperature, top_p=args.top_p).check(name=flag)
    except BadSamplingParam as e:
        die(str(e))
    if not (1 <= args.min_len <= args.max_len and 1 <= args.min_out <= args.max_out and args.num_requests >= 1):
        die("need 1 <= --min-len <= --max-len, 1 <= --min-out <= --max-out and --num-requests >= 1")
    try:
        check_engine_limits(args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory, flags=True)
    except ValueError as e:
        die(str(e))
    at_least_1 = (lambda v: v >= 1, ">= 1")
    check_flags(args, hf_batch_size=at_least_1, hf_num_blocks=at_least_1, hf_max_batch_tokens=at_least_1)


def build_model(args, device, dtype):
    """--model's weights, or random ones of its size (--random-init)."""
    if args.random_init:
        if args.model not in SIZES:
            die(f"--random-init needs a size name: {', '.join(SIZES)}")
        torch.manual_seed(args.seed)
        return GPT(GPTConfig(**SIZES[args.model])).to(device=device, dtype=dtype).eval()
    try:
        return GPT.from_pretrained(args.model, device=device, dtype=dtype)
    except (CheckpointError, OSError) as e:
        die(f"cannot load {args.model!r}: {e} (offline? try --random-init)")


def run_engine(model, requests, args):
    """Our side of the benchmark; returns its throughput."""
    try:
        engine = Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory=args.kv_cache_memory, cuda_graph=not args.no_cuda_graph)
    except ValueError as e:  # (the memory may have changed since the check)
        die(str(e))
    tokens, seconds, ttfts = bench_engine(engine, requests, args)
    throughput = summary("engine.Engine", tokens, seconds, ttfts)
    print(f"  (preemptions {engine.scheduler.num_preemptions}, KV blocks {len(engine.blocks.blocks)})")
    return throughput  # (the engine and its KV cache go here, before transformers runs)


def run_transformers(hf, requests, args, device):
    """transformers' side of the benchmark; returns its throughput."""
    mode = args.hf_mode
    if mode == "auto":
        # transformers' continuous batching sizes its cache from free memory, which on a CPU it
        # often gets wrong (a MemoryError at start-up): there, padded static batches
        mode = "continuous" if hasattr(hf, "init_continuous_batching") and device.type == "cuda" else "static"
    if mode == "continuous":
        try:
            tokens, seconds, ttfts = bench_hf_continuous(hf, requests, args)
        except (RuntimeError, MemoryError) as e:
            die(f"transformers' continuous batching failed ({e}); try --hf-num-blocks or --hf-mode static")
    else:
        tokens, seconds, ttfts = bench_hf_static(hf, requests, args)
    return summary(f"transformers ({mode})", tokens, seconds, ttfts)


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    device = device_or_die(args.device)
    dtype, int8 = dtype_or_die(device, args.dtype)
    model = build_model(args, device, dtype)
    n_ctx = model.config.block_size
    if args.max_len + args.max_out > n_ctx:
        die(f"--max-len + --max-out = {args.max_len + args.max_out} exceeds the context ({n_ctx})")
    requests = make_requests(args.num_requests, args.min_len, args.max_len, args.min_out, args.max_out,
                             model.config.vocab_size - 1, args.seed)
    sampling = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature}, top_p {args.top_p}"
    print(f"{args.num_requests} requests, prompts {args.min_len}..{args.max_len}, outputs {args.min_out}..{args.max_out} "
          f"tokens, {sampling}; {args.model} on {device} ({dtype})", flush=True)
    try:  # a KV cache too small for the model or too large for the memory: found before transformers'
        # copy of the model is built (the engine itself comes after it: on CUDA it takes most free memory)
        kv_cache_blocks(model, args.max_num_seqs, kv_cache_memory=args.kv_cache_memory)
    except ValueError as e:
        die(str(e))
    hf = None if args.hf_mode == "none" else hf_model(model)  # (before packing: transformers gets the plain weights)
    if int8:  # as inference.load_model does for serve.py --dtype int8 (in place)
        quantize_int8(model)
        print("  (our matrices in int8; transformers' in float32)")
    elif device.type == "cpu":  # as inference.load_model does for serve.py (in place: the engine runs the packed model)
        pack_for_cpu(model)
        print(f"  (CPU weight layout: {model.cpu_layout}, measured fastest)")
    ours = run_engine(model, requests, args)
    if hf is None:
        return
    theirs = run_transformers(hf, requests, args, device)
    print(f"ratio (engine / transformers): {ours / theirs:.2f}x output tokens/s")


if __name__ == "__main__":
    main()
