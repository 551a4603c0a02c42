"""Benchmark the paged decode attention kernel against PyTorch's SDPA on contiguous K/V.

Decoding reads every cached key and value once per new token and does little arithmetic with
them, so the figure of merit is memory bandwidth: bytes of K and V read / time. SDPA on contiguous
(B, n_head, T, head_dim) tensors is the bar to reach: it needs no block table, so a paged kernel
close to it pays little for paging. (Not exactly the same work: SDPA gets one length for the whole
batch, the paged kernel a length per sequence.)

On CUDA: triton.testing.do_bench on both, for each batch size, context length and dtype.
On CPU there is no Triton kernel to time: the script times the PyTorch reference at tiny sizes, so
that it runs everywhere and the reference's cost is visible; those numbers say nothing about GPUs.

    python bench_kernels.py                         # batch 64 and 128, context 512 and 1024, fp16 and bf16
    python bench_kernels.py --batch 1 8 --context 4096
"""

import argparse
import time

import torch
import torch.nn.functional as F

import paged_attention
from common import AT_LEAST_1, HelpFormatter, check_flags, device_or_die, die

BLOCK_SIZE = 16


def make_case(batch, context, n_head, head_dim, dtype, device):
    """A paged cache holding `batch` sequences of `context` tokens in scattered blocks, and the same
    keys and values laid out contiguously for SDPA."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, n_head, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    # a random permutation: sequences' blocks are scattered over the pool, as in a server that has run for a while
    tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, n_head, head_dim, device=device, dtype=dtype)
    # contiguous copies: (B, blocks, block_size, H, D) -> (B, H, T, D)
    k = k_cache[tables.long()].view(batch, context, n_head, head_dim).transpose(1, 2).contiguous()
    v = v_cache[tables.long()].view(batch, context, n_head, head_dim).transpose(1, 2).contiguous()
    return q, k_cache, v_cache, tables, context_lens, k, v


def bench_cuda(args):
    name = torch.cuda.get_device_name()
    print(f"device: {name}; n_head {args.n_head}, head_dim {args.head_dim}, block_size {BLOCK_SIZE}")
    print(f"{'dtype':>8} {'batch':>6} {'context':>8} {'splits':>6} {'paged us':>9} {'GB/s':>7} "
          f"{'sdpa us':>8} {'GB/s':>7} {'paged/sdpa':>10} {'max err':>8}")
    for dtype in args.dtype:
        for batch in args.batch:
            for context in args.context:
                print(bench_cuda_case(args, dtype, batch, context))
                torch.cuda.empty_cache()  # (the case's tensors are gone with its function)
    print("paged/sdpa > 1 means the paged kernel is faster than SDPA on contiguous K/V")


def bench_cuda_case(args, dtype, batch, context):
    """Time the paged kernel and SDPA on one case; returns its row of the table."""
    import triton.testing
    q, k_cache, v_cache, tables, lens, k, v = make_case(batch, context, args.n_head, args.head_dim,
                                                        getattr(torch, dtype), "cuda")
    scale = args.head_dim ** -0.5
    splits = args.num_splits or paged_attention.default_num_splits(batch, args.n_head, context, q.device)

    def paged():
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, num_splits=splits)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)

    err = (paged().float() - sdpa()[:, :, 0].float()).abs().max().item()
    t_paged = triton.testing.do_bench(paged, warmup=25, rep=200) * 1e-3  # ms -> s
    t_sdpa = triton.testing.do_bench(sdpa, warmup=25, rep=200) * 1e-3
    nbytes = 2 * k.numel() * k.element_size()  # K and V, each read once
    return (f"{dtype:>8} {batch:>6} {context:>8} {splits:>6} {t_paged * 1e6:>9.1f} {nbytes / t_paged / 1e9:>7.0f} "
            f"{t_sdpa * 1e6:>8.1f} {nbytes / t_sdpa / 1e9:>7.0f} {t_sdpa / t_paged:>10.2f} {err:>8.1e}")


def bench_cpu(args):
    print("no CUDA device: timing the PyTorch REFERENCE path on the CPU at tiny sizes "
          "(not the Triton kernel; says nothing about GPU speed)")
    print(f"{'dtype':>8} {'batch':>6} {'context':>8} {'reference ms':>13} {'sdpa ms':>8} {'max err':>8}")
    for batch in args.batch:
        for context in args.context:
            q, k_cache, v_cache, tables, lens, k, v = make_case(batch, context, args.n_head, args.head_dim,
                                                                torch.float32, "cpu")
            scale = args.head_dim ** -0.5
            seconds, outputs = {}, {}
            for name, fn in (("ref", lambda: paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)),
                             ("sdpa", lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)[:, :, 0])):
                fn()
                t0 = time.perf_counter()
                for _ in range(args.cpu_reps):
                    outputs[name] = fn()
                seconds[name] = (time.perf_counter() - t0) / args.cpu_reps
            err = (outputs["ref"] - outputs["sdpa"]).abs().max().item()
            print(f"{'float32':>8} {batch:>6} {context:>8} {seconds['ref'] * 1e3:>13.2f} {seconds['sdpa'] * 1e3:>8.2f} "
                  f"{err:>8.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 64 128 on CUDA, 4 on CPU)")
    p.add_argument("--context", type=int, nargs="+", help="context lengths (default: 512 1024 on CUDA, 128 512 on CPU)")
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16", "float32"],
                   help="CUDA only; the CPU reference runs in float32")
    p.add_argument("--num-splits", type=int, default=None, help="override the automatic split count")
    p.add_argument("--cpu-reps", type=int, default=5, help="timing repetitions on the CPU")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = p.parse_args()
    device = "cuda" if device_or_die(args.device).type == "cuda" else "cpu"
    if device == "cuda" and not paged_attention.HAVE_TRITON:
        die("triton is not installed; the CUDA benchmark times the Triton kernel (pip install triton)")
    cuda = device == "cuda"
    args.batch = args.batch or ([64, 128] if cuda else [4])
    args.context = args.context or ([512, 1024] if cuda else [128, 512])
    check_flags(args, n_head=AT_LEAST_1, head_dim=AT_LEAST_1, cpu_reps=AT_LEAST_1,
                num_splits=(lambda v: 1 <= v <= 64, "between 1 and 64"))
    for name, sizes in (("--batch", args.batch), ("--context", args.context)):
        if any(n < 1 for n in sizes):
            die(f"{name} sizes must be at least 1 (got {sizes})")
    if any(c % BLOCK_SIZE for c in args.context):
        die(f"context lengths must be multiples of the block size {BLOCK_SIZE}, got {args.context}")
    (bench_cuda if cuda else bench_cpu)(args)


if __name__ == "__main__":
    main()
