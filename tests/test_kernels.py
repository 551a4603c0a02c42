"""paged_attention.py: the Triton kernels equal their PyTorch references, and the references equal plain
dense attention.

The Triton kernels run on the CPU through Triton's interpreter, which is chosen by TRITON_INTERPRET=1
when Triton itself is first imported: too late in a pytest process that has already imported it (and
setting it would leak into other test files). So the tests marked @interpreted run in a child
pytest process started with TRITON_INTERPRET=1, once for the whole file; in this process each of
them reports the child's verdict for the same test, failure message included. Triton is a required
dependency: without it those tests fail. The other tests (references, dispatch, an ahead-of-time
compile for an H100) run here as usual.
"""
import functools
import inspect
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import paged_attention

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16  # tokens per cache block, as in serve.py
IN_CHILD = os.environ.get("KERNELS_TEST_CHILD") == "1"
INTERPRETED = []  # names of the tests the child runs
_verdicts = {}


def _child_verdicts(tmp_dir):
    """Run the @interpreted tests in a child pytest under TRITON_INTERPRET=1 (once); their outcomes
    by test id ("name[params]"): None for passed, else the failure text."""
    if not _verdicts:
        report = Path(tmp_dir) / "kernels-child.xml"
        env = {**os.environ, "TRITON_INTERPRET": "1", "KERNELS_TEST_CHILD": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
               "-k", " or ".join(INTERPRETED), f"--junitxml={report}"]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert report.exists(), f"the interpreter child produced no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        for case in ET.parse(report).iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is None and case.find("skipped") is not None:
                bad = case.find("skipped")  # a skip in the child is no pass here
            _verdicts[case.get("name")] = None if bad is None else (bad.get("message", "") + "\n" + (bad.text or ""))
    return _verdicts


def interpreted(test):
    """Mark a test to run under Triton's interpreter: in the child it runs; here it relays the verdict."""
    INTERPRETED.append(test.__name__)
    if IN_CHILD:
        return test

    @functools.wraps(test)
    def relay(*args, **kwargs):
        test_id = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
        verdicts = _child_verdicts(kwargs["tmp_path_factory"].getbasetemp())
        assert test_id in verdicts, f"{test_id} did not run in the interpreter child (ran: {sorted(verdicts)})"
        if verdicts[test_id] is not None:
            pytest.fail(f"under TRITON_INTERPRET=1: {verdicts[test_id]}", pytrace=False)

    # the relay needs only tmp_path_factory (for the child's report), plus the test's parameters
    params = [p for name, p in inspect.signature(test).parameters.items() if name != "K"]
    relay.__signature__ = inspect.Signature(
        params + [inspect.Parameter("tmp_path_factory", inspect.Parameter.KEYWORD_ONLY)])
    del relay.__wrapped__
    return relay


@pytest.fixture
def K():
    """The paged_attention module with the Triton path forced on for CPU tensors (only in the interpreter child)."""
    assert paged_attention.HAVE_TRITON, "triton is not importable; it is a required dependency (pip install triton)"
    assert paged_attention.INTERPRET, "K is for the interpreter child only"
    paged_attention.FORCE_TRITON = True
    yield paged_attention
    paged_attention.FORCE_TRITON = False


def make_paged(lens, n_head, head_dim, dtype=torch.float32, pad=-1, spare_blocks=5, seed=0):
    """Random K/V caches and random, non-overlapping block tables for sequences of `lens` tokens.
    Returns k_cache, v_cache, block_tables (int32, padded with `pad`), context_lens (int32)."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + BLOCK - 1) // BLOCK for n in lens]
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, BLOCK, n_head, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, n_head, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)  # scattered, in no particular order
    tables = torch.full((len(lens), max(need) + 1), pad, dtype=torch.int32)  # + 1: a padded column always
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used:used + n].int()
        used += n
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


def dense_kv(k_cache, v_cache, table, length):
    """One sequence's keys and values as contiguous (n_head, length, head_dim), by plain indexing."""
    rows = [k_cache[table[t // BLOCK], t % BLOCK] for t in range(length)]
    vals = [v_cache[table[t // BLOCK], t % BLOCK] for t in range(length)]
    return torch.stack(rows, 1), torch.stack(vals, 1)


# ----------------------------------------------------------------------------- write_kv

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@interpreted
def test_write_kv_triton_equals_reference_and_skips_padding_slots(K, dtype):
    n_head, head_dim, num_blocks = 4, 32, 6
    torch.manual_seed(0)
    # k and v as serve.py gets them: strided views into one qkv projection output
    qkv = torch.randn(9, 3, n_head, head_dim)
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, -1, 17, 95, 0, -1, 48, 33, 16], dtype=torch.int64)
    before = torch.randn(num_blocks, BLOCK, n_head, head_dim).to(dtype), torch.randn(num_blocks, BLOCK, n_head, head_dim).to(dtype)
    got = [c.clone() for c in before]
    want = [c.clone() for c in before]
    K.write_kv(k, v, *got, slots)  # Triton (interpreted)
    K.write_kv_reference(k, v, *want, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the written slots hold the new values; every other slot is untouched
    flat_k = got[0].view(-1, n_head, head_dim)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k[keep].to(dtype))
    untouched = torch.ones(num_blocks * BLOCK, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat_k[untouched], before[0].view(-1, n_head, head_dim)[untouched])


# ----------------------------------------------------------------------------- decode

DECODE_CASES = [
    # (lens, n_head, head_dim, num_splits): the block-boundary lengths 1, 15, 16, 17, then longer ones
    ([1, 15, 16, 17], 2, 64, 1),
    ([1, 15, 16, 17], 2, 64, 3),
    ([100, 17, 1], 4, 32, 1),
    ([100, 17, 1], 4, 32, 4),
    ([100, 16], 12, 64, 2),
    ([1024], 2, 64, 1),
    ([1024, 1, 300], 2, 64, 8),
    ([1000], 4, 32, None),  # the automatic choice (2 splits: one sequence, few heads)
]


@pytest.mark.parametrize("lens,n_head,head_dim,num_splits", DECODE_CASES)
@interpreted
def test_decode_triton_equals_reference(K, lens, n_head, head_dim, num_splits):
    k_cache, v_cache, tables, context_lens = make_paged(lens, n_head, head_dim, seed=len(lens) + n_head)
    q = torch.randn(len(lens), 3, n_head, head_dim)[:, 0]  # strided, like a view of the qkv projection
    scale = head_dim ** -0.5
    got = K.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits=num_splits)
    want = K.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, scale)
    assert got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [0, -1])
@interpreted
def test_decode_triton_ignores_block_table_padding(K, pad):
    """Table entries past a sequence's blocks, 0 or -1, change nothing (0 is a real block: it must not be read)."""
    k_cache, v_cache, tables, context_lens = make_paged([200, 5], 2, 64, pad=pad)
    q = torch.randn(2, 2, 64)
    got = K.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125, num_splits=2)
    want = K.paged_decode_attention_reference(q, k_cache, v_cache, tables[:, :13].clamp(min=0), context_lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@interpreted
def test_decode_triton_half_precision_cache(K, dtype):
    """fp16 / bf16 caches: the kernel accumulates in fp32 and returns q's dtype."""
    k_cache, v_cache, tables, context_lens = make_paged([70, 33], 2, 64, dtype=dtype)
    q = torch.randn(2, 2, 64).to(dtype)
    got = K.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125, num_splits=3)
    want = K.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@interpreted
def test_decode_zero_length_sequence_gives_zeros(K):
    """A batch row with context length 0 (padding) yields zeros, not NaN, on both paths and with splits."""
    k_cache, v_cache, tables, _ = make_paged([150, 1], 2, 32)
    context_lens = torch.tensor([150, 0], dtype=torch.int32)
    q = torch.randn(2, 2, 32)
    for splits in (1, 4):
        got = K.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.2, num_splits=splits)
        assert torch.equal(got[1], torch.zeros(2, 32))
        torch.testing.assert_close(got, K.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 0.2))


def test_decode_reference_equals_dense_attention():
    """The reference's gather through the block table gives the same answer as SDPA on contiguous K/V."""
    lens = [1, 16, 17, 50]
    k_cache, v_cache, tables, context_lens = make_paged(lens, 4, 32)
    q = torch.randn(len(lens), 4, 32)
    got = paged_attention.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 32 ** -0.5)
    for b, n in enumerate(lens):
        k, v = dense_kv(k_cache, v_cache, tables[b], n)
        want = F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_num_splits_grow_for_small_batches_and_long_contexts():
    many = paged_attention.default_num_splits(batch=64, n_head=12, max_context=1024, device="cpu")
    one_long = paged_attention.default_num_splits(batch=1, n_head=2, max_context=1024, device="cpu")
    one_short = paged_attention.default_num_splits(batch=1, n_head=2, max_context=64, device="cpu")
    assert many == 1 and one_short == 1
    assert one_long > 1 and one_long <= 1024 // paged_attention.MIN_SPLIT_TOKENS
    assert paged_attention.default_num_splits(batch=1, n_head=4, max_context=1000, device="cpu") == 2  # (a DECODE_CASES row)


@interpreted
def test_forced_interpreter_sends_cpu_tensors_to_triton(K):
    assert K.use_triton(torch.zeros(1))


def test_cpu_tensors_use_the_reference():
    """The dispatch rule: without the interpreter and the flag, CPU tensors go to the references."""
    assert not (paged_attention.INTERPRET and paged_attention.FORCE_TRITON)
    assert not paged_attention.use_triton(torch.zeros(1))
    k_cache, v_cache, tables, context_lens = make_paged([30], 2, 32)
    q = torch.randn(1, 2, 32)
    torch.testing.assert_close(paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.1),
                               paged_attention.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 0.1))


# ----------------------------------------------------------------------------- prefill (varlen)

def test_prefill_reference_equals_causal_attention_over_prefix_and_new_tokens():
    """Packed queries of 3 sequences (cached prefixes of 0, 20 and 5 tokens, 7, 1 and 12 new tokens)
    give what causal SDPA over each whole sequence gives for its last rows; both forms of the
    lengths argument, query_lens (B,) and cu_seqlens (B+1,), agree."""
    prefix, new = [0, 20, 5], [7, 1, 12]
    lens = [p + n for p, n in zip(prefix, new)]
    n_head, head_dim = 2, 32
    k_cache, v_cache, tables, context_lens = make_paged(lens, n_head, head_dim)
    q = torch.randn(sum(new), n_head, head_dim)
    scale = head_dim ** -0.5
    got = paged_attention.paged_prefill_attention_reference(q, k_cache, v_cache, tables, context_lens,
                                                    torch.tensor(new, dtype=torch.int32), scale)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    same = paged_attention.paged_prefill_attention(q, k_cache, v_cache, tables, context_lens, cu, scale)
    torch.testing.assert_close(got, same)
    for b in range(3):
        k, v = dense_kv(k_cache, v_cache, tables[b], lens[b])
        # full-length queries: zeros for the prefix rows, ours for the new ones; causal mask, keep the new rows
        qb = torch.zeros(n_head, lens[b], head_dim)
        qb[:, prefix[b]:] = q[cu[b]:cu[b + 1]].transpose(0, 1)
        want = F.scaled_dot_product_attention(qb, k, v, is_causal=True)[:, prefix[b]:]
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], want.transpose(0, 1), atol=1e-5, rtol=1e-5)


PREFILL_CASES = [
    # (cached prefixes, new tokens, n_head, head_dim): fresh prompts, one-token steps, a query run
    # longer than one 64-query tile over a 100-token prefix, a head_dim below tl.dot's minimum of 16
    ([0, 20, 5], [7, 1, 12], 2, 32),
    ([100, 0], [70, 3], 4, 64),
    ([0, 3], [1, 0], 2, 8),
]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prefix,new,n_head,head_dim", PREFILL_CASES)
def test_prefill_triton_equals_reference(K, prefix, new, n_head, head_dim, dtype):
    lens = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables, context_lens = make_paged(lens, n_head, head_dim, dtype=dtype)
    q = torch.randn(sum(new), 3, n_head, head_dim).to(dtype)[:, 0]  # strided, like a view of the qkv projection
    got = K.paged_prefill_attention(q, k_cache, v_cache, tables, context_lens, torch.tensor(new), head_dim ** -0.5)
    want = K.paged_prefill_attention_reference(q, k_cache, v_cache, tables, context_lens, torch.tensor(new),
                                               head_dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_prefill_of_one_token_is_decode():
    k_cache, v_cache, tables, context_lens = make_paged([9, 33], 2, 32)
    q = torch.randn(2, 2, 32)
    one = torch.ones(2, dtype=torch.int32)
    torch.testing.assert_close(
        paged_attention.paged_prefill_attention_reference(q, k_cache, v_cache, tables, context_lens, one, 0.3),
        paged_attention.paged_decode_attention_reference(q, k_cache, v_cache, tables, context_lens, 0.3))


def test_references_reject_inconsistent_lengths():
    k_cache, v_cache, tables, context_lens = make_paged([9, 33], 2, 32)
    with pytest.raises(ValueError, match="does not fit"):  # 33 tokens need 3 blocks of 16
        paged_attention.paged_decode_attention_reference(torch.randn(2, 2, 32), k_cache, v_cache, tables[:, :2],
                                                 context_lens, 0.3)
    with pytest.raises(ValueError, match="add up to"):
        paged_attention.paged_prefill_attention_reference(torch.randn(5, 2, 32), k_cache, v_cache, tables, context_lens,
                                                  torch.tensor([2, 2]), 0.3)
    with pytest.raises(ValueError, match="new tokens but a context"):
        paged_attention.paged_prefill_attention_reference(torch.randn(12, 2, 32), k_cache, v_cache, tables, context_lens,
                                                  torch.tensor([10, 2]), 0.3)


# ----------------------------------------------------------------------------- the real GPU build

def test_kernels_compile_for_h100():
    """The interpreter runs kernels as NumPy and forgives what the GPU compiler does not; compiling
    each kernel ahead of time for an H100 (sm_90, with the ptxas that ships in Triton's wheel)
    checks the CUDA path on a machine without a GPU. Like Triton's JIT on real GPT-2 shapes, we tell
    the compiler that pointers, strides and head_dim are multiples of 16, and check that the decode
    kernel then reads K and V with 16-byte vector loads: bandwidth is what decoding is made of."""
    assert paged_attention.HAVE_TRITON, "triton is not importable; it is a required dependency (pip install triton)"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, signature, constexprs, num_warps=4):
        names = list(signature)
        aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride") or n in ("head_dim", "row_size")]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "enable_fp_fusion": paged_attention.FP_FUSION})
        assert compiled.asm["cubin"], f"{fn} produced no cubin"
        return compiled.asm["ptx"]

    i32 = "i32"
    for dt in ("fp16", "bf16", "fp32"):
        for splits in (1, 4):
            ptx = build(paged_attention._decode_split_kernel,
                  {"q_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}", "block_tables_ptr": "*i32",
                   "context_lens_ptr": "*i32", "out_ptr": f"*{dt}", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32",
                   "qk_scale": "fp32", "stride_qb": i32, "stride_qh": i32, "stride_ob": i32, "stride_oh": i32,
                   "stride_tb": i32, "stride_cb": i32, "stride_cs": i32, "stride_ch": i32, "n_head": i32,
                   "head_dim": i32, "BLOCK_SIZE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
                   "NUM_SPLITS": "constexpr"},
                  {"BLOCK_SIZE": BLOCK, "BLOCK_N": paged_attention.DECODE_BLOCK_N, "BLOCK_D": 64, "NUM_SPLITS": splits})
            assert "ld.global.v4" in ptx, f"decode kernel ({dt}) does not use 16-byte loads"
            assert ".local" not in ptx, f"decode kernel ({dt}) spills registers"
        build(paged_attention._write_kv_kernel,
              {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}",
               "slot_ptr": "*i64", "stride_k": i32, "stride_v": i32, "n_tokens": i32, "row_size": i32,
               "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"},
              {"BLOCK_T": 4, "BLOCK_C": 1024})
        build(paged_attention._prefill_kernel,
              {"q_ptr": f"*{dt}", "k_cache_ptr": f"*{dt}", "v_cache_ptr": f"*{dt}", "block_tables_ptr": "*i32",
               "context_lens_ptr": "*i32", "cu_ptr": "*i32", "out_ptr": f"*{dt}", "qk_scale": "fp32",
               "stride_qn": i32, "stride_qh": i32, "stride_on": i32, "stride_oh": i32, "stride_tb": i32,
               "stride_cb": i32, "stride_cs": i32, "stride_ch": i32, "head_dim": i32,
               "BLOCK_SIZE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
              {"BLOCK_SIZE": BLOCK, "BLOCK_M": paged_attention.PREFILL_BLOCK_M, "BLOCK_N": paged_attention.PREFILL_BLOCK_N,
               "BLOCK_D": 64})
    build(paged_attention._decode_reduce_kernel,
          {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "stride_ob": i32, "stride_oh": i32,
           "n_head": i32, "head_dim": i32, "NUM_SPLITS": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"},
          {"NUM_SPLITS": 5, "BLOCK_S": 8, "BLOCK_D": 64}, num_warps=1)
