"""Paged attention: the KV-cache kernels of the serving engine, in Triton, with PyTorch twins.

A server keeps the keys and values of many sequences at once. Giving each sequence one contiguous
(max_len, ...) tensor wastes memory on room it may never use, so the engine (runner.py) keeps, per
layer, a pool of small fixed-size blocks ("pages", as in an OS's virtual memory) and hands them out
as sequences grow:

    k_cache, v_cache: (num_blocks, block_size, n_head, head_dim)   one layer, contiguous
    a token's slot  = block_id * block_size + offset                 (its row in k_cache.view(-1, n_head, head_dim))
    block_tables    : (B, max_blocks) int32, sequence b's i-th block; entries past its length are
                      padding (0 or -1): the kernels never read them; the references may gather
                      them (-1 as block 0) and mask what they read
    context_lens    : (B,) int32, tokens cached for each sequence (new ones included)

An engine holding all layers in one (n_layer, num_blocks, ...) tensor passes `cache[layer]`, a
contiguous view. Three operations:

    write_kv                 scatter the new tokens' k, v into their slots (slot -1 = padding, skipped)
    paged_decode_attention   one query token per sequence attends over its cached context
    paged_prefill_attention  a packed batch of new tokens (several per sequence) attends causally

Each has a plain-PyTorch `_reference` (the definition, and what the engine runs on CPU) and, where
it matters on a GPU, a Triton kernel. The decode kernel is "flash-decoding": with one query per
sequence there is little work per (sequence, head), so a long context is cut into `num_splits`
pieces handled by separate programs, each keeping an online softmax; a second small kernel merges
the pieces using each one's log-sum-exp. Decoding is memory-bound (every cached byte is read once
per token), so the kernel's job is to keep many loads in flight, not to use tensor cores.

Dispatch: the public functions run Triton when the tensors are on CUDA, the reference otherwise.
Tests run the Triton kernels on CPU through Triton's interpreter: with TRITON_INTERPRET=1 set
before Triton is first imported, and FORCE_TRITON = True, CPU tensors go to the kernels too.
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton: the PyTorch references still work

    class _NoTriton:  # just enough for the kernel definitions below to be defined (never run)
        jit = staticmethod(lambda fn: fn)
        constexpr = None

    triton = tl = _NoTriton()
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

# Triton decides when a kernel is defined (and, for its own library functions, when Triton is first
# imported) whether it is compiled for the GPU or interpreted on the CPU: TRITON_INTERPRET=1 must be
# set before the first `import triton` in the process.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FORCE_TRITON = False  # tests set this (under TRITON_INTERPRET=1) to send CPU tensors to the kernels
# Every launch lets the compiler fuse a multiply and an add into one FMA (one rounding instead of two,
# and faster), said explicitly: Triton's own default is not to be relied on.
FP_FUSION = True


def use_triton(t):
    """Run the Triton kernel for tensor `t`? On CUDA yes; on CPU only in the interpreter, when forced."""
    return HAVE_TRITON and (t.is_cuda or (INTERPRET and FORCE_TRITON))


def _check_cache(k_cache, v_cache):
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (num_blocks, block_size, n_head, head_dim), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


# ============================================================================= write_kv

def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write new tokens' keys and values into the cache, in place.
    k, v: (N, n_head, head_dim); slot_mapping: (N,) int64 slots, -1 for a padding token (skipped)."""
    if use_triton(k):
        return write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping):
    _check_cache(k_cache, v_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    # the cache seen as one row per slot: (num_blocks * block_size, n_head, head_dim)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_k, stride_v, n_tokens, row_size,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program i copies tokens i*BLOCK_T ... : each token's (n_head * head_dim) values are one
    # contiguous row, both in k/v and in the cache, so a tile is BLOCK_T rows of row_size.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    t_ok = t < n_tokens
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1).to(tl.int64)  # int64: slot * row_size can pass 2**31
    ok = t_ok[:, None] & (c < row_size)[None, :]
    k = tl.load(k_ptr + t[:, None] * stride_k + c[None, :], mask=ok)
    v = tl.load(v_ptr + t[:, None] * stride_v + c[None, :], mask=ok)
    # A padding token (slot -1) stores nothing: masked out rather than branched around.
    ok = ok & (slot >= 0)[:, None]
    dest = slot[:, None] * row_size + c[None, :]  # the cache is contiguous: slot s is row s
    tl.store(k_cache_ptr + dest, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dest, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    _check_cache(k_cache, v_cache)
    N, n_head, head_dim = k.shape
    # The kernel wants each token's heads as one contiguous row; tokens may be strided (k and v are
    # usually views into the qkv projection's output), which costs nothing to keep.
    if k.stride(2) != 1 or k.stride(1) != head_dim:
        k = k.contiguous()
    if v.stride(2) != 1 or v.stride(1) != head_dim:
        v = v.contiguous()
    if N == 0:
        return
    BLOCK_C = triton.next_power_of_2(n_head * head_dim)
    BLOCK_T = max(1, 4096 // BLOCK_C)  # a tile of about 4K values per program
    _write_kv_kernel[(triton.cdiv(N, BLOCK_T),)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), N, n_head * head_dim,
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, enable_fp_fusion=FP_FUSION)


# ============================================================================= decode: the reference

def gather_kv(k_cache, v_cache, block_tables, length):
    """Keys and values of positions 0..length-1 of every sequence, through the block tables:
    (B, length, n_head, head_dim) each. Whole blocks are copied (one contiguous block_size-row piece
    each, much faster than a row at a time). Positions past a sequence's own length hold garbage
    (whatever its padding entries point at): the caller masks them."""
    B, (block_size, n_head, head_dim) = block_tables.shape[0], k_cache.shape[1:]
    num = -(-length // block_size)  # the blocks that hold positions 0..length-1
    if num > block_tables.shape[1]:
        raise ValueError(f"a context of {length} tokens does not fit in {block_tables.shape[1]} blocks of {block_size}")
    ids = block_tables[:, :num].long().clamp(min=0).reshape(-1)  # padding (-1) past the end: any block is harmless
    k, v = (cache.index_select(0, ids).view(B, num * block_size, n_head, head_dim)[:, :length]
            for cache in (k_cache, v_cache))
    return k, v


def _attend(q, k, v, allowed, scale):
    """softmax(q k^T * scale, over the allowed keys) v, in fp32: PyTorch's scaled_dot_product_attention
    computes exactly this, and reads k and v through their strides (no transposed copy). q (B, H, M, D),
    k/v (B, H, T, D), allowed (B, 1 or H, M, T) bool. A query with no allowed key (a context length of 0)
    gets zeros rather than NaN."""
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=scale)
    return out.nan_to_num(0.0)


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale):
    """q (B, n_head, head_dim): each sequence's one new query; returns (B, n_head, head_dim)."""
    _check_cache(k_cache, v_cache)
    B = q.shape[0]
    if B == 0:
        return q.clone()
    length = int(context_lens.max())
    k, v = gather_kv(k_cache, v_cache, block_tables, length)              # (B, T, H, D)
    allowed = torch.arange(length, device=q.device) < context_lens[:, None].to(q.device)  # (B, T)
    out = _attend(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), allowed[:, None, None, :], scale)
    return out[:, :, 0, :].to(q.dtype)


# ============================================================================= decode: the Triton kernels

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the GPU's native instruction


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
                         out_ptr, part_out_ptr, part_lse_ptr,
                         qk_scale,
                         stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
                         stride_cb, stride_cs, stride_ch,
                         n_head, head_dim,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    # Program (b, h, s): sequence b, head h, the s-th of NUM_SPLITS slices of b's context.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(context_lens_ptr + b)
    # Each slice is a whole number of BLOCK_N tiles, so no two programs read the same tile. When the
    # context is short some slices are empty; they still report (lse = -inf, which weighs zero).
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, length)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    # Fold the softmax scale and log2(e) into q once, so the loop works in base 2 with plain exp2.
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale

    # Online softmax over the slice (as in FlashAttention): the running max m, the running sum of
    # exp2(score - m), and the running exp-weighted sum of values, rescaled whenever m grows.
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)  # the tile's token positions in the sequence
        t_ok = t < end
        # Where each token lives: its block from the block table, its offset within the block. A tile
        # spans several blocks, so this is a gather; each token's head_dim row is contiguous.
        block = tl.load(block_tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        row = block * stride_cb + (t % BLOCK_SIZE) * stride_cs + h * stride_ch
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        # One query row: a tl.dot needs at least 16 rows, so a multiply-and-sum does the (1 x D) @ (D x N).
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(t_ok, scores, float("-inf"))
        # Every tile holds at least one real token (t0 < end), so m_new is finite and exp2 never sees inf - inf.
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new

    # An empty slice (l = 0, m = -inf) gives out = 0 and lse = -inf instead of 0/0.
    l_safe = tl.where(l > 0, l, 1.0)
    out = acc / l_safe
    if NUM_SPLITS == 1:  # nothing to merge: write the answer directly and skip the second kernel
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        part = (b * n_head + h) * NUM_SPLITS + s  # part_out (B, H, S, D), part_lse (B, H, S), fp32
        tl.store(part_out_ptr + part * head_dim + d, out, mask=d_ok)
        tl.store(part_lse_ptr + part, m + tl.log2(l_safe))


@triton.jit
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr,
                          stride_ob, stride_oh, n_head, head_dim,
                          NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (b, h): merge the slices. Slice s computed softmax over its keys only; its share of the
    # whole softmax is 2**lse_s / sum_j 2**lse_j, so out = sum_s w_s * out_s / sum_s w_s with
    # w_s = 2**(lse_s - max lse) (subtracting the max keeps the powers in range).
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    part = (b * n_head + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # all slices empty (context length 0): weights all 0
    w = tl.exp2(lse - top)
    outs = tl.load(part_out_ptr + part[:, None] * head_dim + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * outs, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


DECODE_BLOCK_N = 64   # tokens per loop step: 4 blocks of 16, a (64, head_dim) tile of K and of V
MIN_SPLIT_TOKENS = 256  # a slice shorter than this costs more in merging than it gains in parallelism
MAX_SPLITS = 32


def default_num_splits(batch, n_head, max_context, device):
    """Enough slices that the GPU has about two programs per streaming multiprocessor, no more than
    the context can usefully be cut into. A big batch needs no splitting (B * H programs already
    fill the GPU); one long sequence needs a lot. `max_context` is an upper bound (the block table's
    width), so choosing needs no device-to-host sync."""
    device = torch.device(device)
    # (on a CPU only the tests' interpreter runs the kernel: any small count does)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = math.ceil(2 * sms / max(1, batch * n_head))
    most = math.ceil(max_context / MIN_SPLIT_TOKENS)
    return max(1, min(want, most, MAX_SPLITS))


def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    _check_cache(k_cache, v_cache)
    B, n_head, head_dim = q.shape
    _, block_size, cache_heads, cache_dim = k_cache.shape
    if (cache_heads, cache_dim) != (n_head, head_dim):
        raise ValueError(f"q has {n_head} heads of {head_dim}, the cache {cache_heads} of {cache_dim}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if B == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(B, n_head, block_tables.shape[1] * block_size, q.device)
    BLOCK_D = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty(B, n_head, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(B, n_head, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # unused: the kernel writes `out` directly
    _decode_split_kernel[(B, n_head, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        n_head, head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=BLOCK_D, NUM_SPLITS=num_splits,
        num_warps=4, enable_fp_fusion=FP_FUSION)
    if num_splits > 1:
        _decode_reduce_kernel[(B, n_head)](
            part_out, part_lse, out, out.stride(0), out.stride(1), n_head, head_dim,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
            num_warps=1, enable_fp_fusion=FP_FUSION)
    return out


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """One query per sequence over its paged context. q: (B, n_head, head_dim); block_tables (B,
    max_blocks) int32; context_lens (B,) int32, the new token's k/v already written and counted.
    Returns (B, n_head, head_dim) in q's dtype; a sequence of length 0 gets zeros. `num_splits`
    (Triton only): how many slices each context is cut into; None chooses by batch size and length."""
    if use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)


# ============================================================================= prefill (varlen)

def _query_offsets(query_lens_or_cu, batch):
    """Accept (B,) query lengths or (B+1,) cumulative offsets (flash-attn's cu_seqlens): the length
    tells them apart. Returns the (B+1,) offsets as a Python list."""
    x = [int(n) for n in query_lens_or_cu.tolist()]
    if len(x) == batch + 1 and x[0] == 0:
        return x
    if len(x) != batch:
        raise ValueError(f"expected {batch} query lengths or {batch + 1} offsets, got {len(x)} values")
    offsets = [0]
    for n in x:
        offsets.append(offsets[-1] + n)
    return offsets


def paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_lens, scale):
    """Attention for a packed batch of new tokens (varlen), their k/v already written to the cache.

    q: (N, n_head, head_dim), sequence b's new tokens at rows cu[b]:cu[b+1]; `query_lens` (B,) their
    counts, or (B+1,) offsets cu. context_lens (B,): tokens cached per sequence, new ones included,
    so sequence b's j-th new token sits at position context_lens[b] - query_lens[b] + j and attends
    to positions 0..that (its cached prefix, and the new tokens up to itself). Returns (N, n_head, head_dim)."""
    _check_cache(k_cache, v_cache)
    B = block_tables.shape[0]
    cu = _query_offsets(query_lens, B)
    if cu[-1] != q.shape[0]:
        raise ValueError(f"query lengths add up to {cu[-1]} tokens but q has {q.shape[0]}")
    out = torch.empty_like(q)
    lens = [int(n) for n in context_lens.tolist()]
    for b in range(B):
        n, length = cu[b + 1] - cu[b], lens[b]
        if n == 0:
            continue
        if n > length:
            raise ValueError(f"sequence {b}: {n} new tokens but a context of only {length}")
        k, v = gather_kv(k_cache, v_cache, block_tables[b:b + 1], length)       # (1, T, H, D)
        pos = torch.arange(length - n, length, device=q.device)                 # the queries' positions
        allowed = torch.arange(length, device=q.device)[None, :] <= pos[:, None]  # causal: (n, T)
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]                           # (1, H, n, D)
        y = _attend(qb, k.transpose(1, 2), v.transpose(1, 2), allowed[None, None], scale)
        out[cu[b]:cu[b + 1]] = y[0].transpose(0, 1).to(q.dtype)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_ptr, out_ptr,
                    qk_scale,
                    stride_qn, stride_qh, stride_on, stride_oh, stride_tb,
                    stride_cb, stride_cs, stride_ch,
                    head_dim,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (b, h, i): the i-th tile of BLOCK_M new tokens of sequence b, head h. With many queries
    # per program this is ordinary FlashAttention (tl.dot on tensor cores), except that keys and
    # values come through the block table, and the causal mask is shifted by the cached prefix.
    # input_precision="ieee": by default tl.dot rounds float32 inputs to TF32 (a 10-bit mantissa) on
    # NVIDIA tensor cores, and float32 prefill would then not match SDPA; "ieee" multiplies in full
    # float32. For float16/bfloat16 inputs the option is ignored (Triton's tl.dot docs): they use the
    # tensor cores either way.
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    length = tl.load(context_lens_ptr + b)
    prefix = length - q_len  # tokens cached before this step's new ones
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index among the new tokens
    i_ok = i < q_len
    pos = prefix + i  # the queries' positions in the sequence: query at pos sees keys 0..pos
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=i_ok[:, None] & d_ok[None, :], other=0.0)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Keys past the tile's last query are masked for every row: stop there. A tile past the
    # sequence's new tokens (the grid is sized for the longest one) does nothing.
    end = tl.minimum(length, prefix + (tile + 1) * BLOCK_M)
    end = tl.where(tile * BLOCK_M < q_len, end, 0)
    for t0 in range(0, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        block = tl.load(block_tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
        row = block * stride_cb + (t % BLOCK_SIZE) * stride_cs + h * stride_ch
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        scores = tl.where((t[None, :] <= pos[:, None]) & t_ok[None, :], scores, float("-inf"))
        # Key 0 is visible to every query (pos >= 0), so after the first tile each row's max is finite.
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_on + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])


PREFILL_BLOCK_M = 64  # queries per program
PREFILL_BLOCK_N = 64  # keys per loop step


def paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_lens, scale):
    _check_cache(k_cache, v_cache)
    N, n_head, head_dim = q.shape
    block_size = k_cache.shape[1]
    B = block_tables.shape[0]
    if q.dtype != k_cache.dtype:  # tl.dot multiplies q by k as they are
        raise ValueError(f"q is {q.dtype} but the cache is {k_cache.dtype}")
    cu = _query_offsets(query_lens, B)  # on the host: the grid needs the longest query run
    if cu[-1] != N:
        raise ValueError(f"query lengths add up to {cu[-1]} tokens but q has {N}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    longest = max(b - a for a, b in zip(cu, cu[1:])) if B else 0
    if longest == 0:
        return out
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    grid = (B, n_head, triton.cdiv(longest, PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_t, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot wants every dimension >= 16
        num_warps=4, enable_fp_fusion=FP_FUSION)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, query_lens, scale):
    """Varlen prefill: Triton on CUDA, the reference otherwise (same arguments as the reference)."""
    if use_triton(q):
        return paged_prefill_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_lens, scale)
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_lens, scale)
