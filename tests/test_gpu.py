"""The CUDA paths: the decode CUDA graph, the Triton kernels on real GPU tensors, the serving
engine's captured decode graphs, and a compiled bf16 training step.

Each has a CPU twin that CI runs (the static decode step on CPU in test_generate, the kernels under
TRITON_INTERPRET=1 in test_kernels, the engine on the PyTorch references in test_serve, train_step
in test_train). What only a GPU can show (graph capture and replay, the kernels compiled for the
chip, torch.compile with bf16 autocast) is checked here, so on a machine without CUDA this file is
skipped as a whole. `bash .ci/gpu` runs it on a lent GPU machine, with the benchmarks.

Greedy tokens are compared exactly, as on the CPU. Two different kernels (a graph step against a
full recompute, the paged kernel against SDPA) round differently, so two logits closer than rounding
could swap places: `assert_same_greedy` accepts a divergence only at such a genuine tie, and says so.
"""
import contextlib

import pytest
import torch

from conftest import context_sensitive
from engine import Engine
import inference
from gpt import GPT, GPTConfig
from inference import generate_tokens
import paged_attention
from sampling import SamplingParams
import runner
from test_kernels import DECODE_CASES, PREFILL_CASES, make_paged
from tokenizer import EOT
import training
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by .ci/gpu)")

TIE = 1e-4  # two fp32 logits this close may swap places between kernels that round differently


@pytest.fixture(scope="module")
def model():
    """A small GPT-2 with the real vocabulary, random weights, fp32, on the GPU (full fp32 matmuls:
    TF32 would round the two sides of a comparison differently; train.py turns it on), scaled so
    that its output depends on the context (about half of 100 greedy tokens are distinct)."""
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    torch.manual_seed(0)
    model = context_sensitive(GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256)).eval(), 3.0)
    yield model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = tf32


def greedy_without_cache(model, ids, n):
    """The reference: recompute the whole sequence for every new token."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax())
            if t == EOT:
                break
            out.append(t)
            ids.append(t)
    return out


def assert_same_greedy(model, prompt, got, want):
    """`got` == `want`, or they part at a tie: where they first differ, both tokens' logits (by a full
    recompute of the shared prefix) are within TIE of each other. (A list that ends earlier ended at
    <|endoftext|>, so that is its token there.)"""
    got, want = got + [EOT], want + [EOT]
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        assert len(got) == len(want), f"{len(got) - 1} tokens, expected {len(want) - 1}"
        return
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:i]], device="cuda"))[0, -1].float()
    gap = abs(float(logits[got[i]] - logits[want[i]]))
    assert gap < TIE, f"token {i}: {got[i]} instead of {want[i]}, whose logit is {gap:.2e} higher (not a tie)"
    print(f"greedy paths part at token {i} of {len(want)}, at a tie ({gap:.1e})")


@contextlib.contextmanager
def recording(cls):
    """Collect every instance of `cls` built inside the block (to look at what a function made)."""
    made, init = [], cls.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
    cls.__init__ = spy
    try:
        yield made
    finally:
        cls.__init__ = init


# ----------------------------------------------------------------------------- generate.py

def test_cuda_graph_decode_equals_uncached_greedy_for_100_tokens_and_later_calls_replay_it(model):
    prompt = list(range(1000, 1020))
    want = greedy_without_cache(model, prompt, 100)
    assert len(want) == 100 and len(set(want)) > 20  # (the output depends on the context)
    model._static_step = None  # (whatever an earlier test left)
    with recording(inference.StaticStep) as steps:
        got = list(generate_tokens(model, prompt, SamplingParams(max_tokens=100, temperature=0.0)))
    assert len(steps) == 1 and steps[0].graph is not None, "the decode step was not captured as a CUDA graph"
    assert_same_greedy(model, prompt, got, want)
    eager = list(generate_tokens(model, prompt, SamplingParams(max_tokens=100, temperature=0.0), static=False))
    assert_same_greedy(model, prompt, eager, want)
    # a second, shorter prompt replays the same graph, over a cache that still holds the first call's keys
    short = list(range(3000, 3005))
    with recording(inference.StaticStep) as steps:
        again = list(generate_tokens(model, short, SamplingParams(max_tokens=50, temperature=0.0)))
    assert steps == [], "the second call captured a new graph instead of replaying the first"
    assert_same_greedy(model, short, again, greedy_without_cache(model, short, 50))


# ----------------------------------------------------------------------------- paged_attention.py on GPU tensors

@pytest.mark.parametrize("lens,n_head,head_dim,num_splits", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernel_on_cuda_equals_reference(lens, n_head, head_dim, num_splits, dtype):
    k_cache, v_cache, tables, context_lens = (t.cuda() for t in make_paged(lens, n_head, head_dim, dtype=dtype))
    q = torch.randn(len(lens), 3, n_head, head_dim, device="cuda").to(dtype)[:, 0]
    scale = head_dim ** -0.5
    assert paged_attention.use_triton(q)
    got = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, num_splits=num_splits)
    want = paged_attention.paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables,
                                                    context_lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("prefix,new,n_head,head_dim", PREFILL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_on_cuda_equals_reference(prefix, new, n_head, head_dim, dtype):
    lens = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, tables, context_lens = (t.cuda() for t in make_paged(lens, n_head, head_dim, dtype=dtype))
    q = torch.randn(sum(new), 3, n_head, head_dim, device="cuda").to(dtype)[:, 0]
    query_lens = torch.tensor(new, dtype=torch.int32, device="cuda")
    got = paged_attention.paged_prefill_attention(q, k_cache, v_cache, tables, context_lens, query_lens, head_dim ** -0.5)
    want = paged_attention.paged_prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables,
                                                     context_lens, query_lens, head_dim ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp32: "ieee" dots, not TF32; bf16: p is rounded too
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_write_kv_kernel_on_cuda_writes_only_its_slots():
    torch.manual_seed(0)
    qkv = torch.randn(9, 3, 4, 32, device="cuda")
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([5, -1, 17, 95, 0, -1, 48, 33, 16], device="cuda")
    caches = [torch.randn(6, 16, 4, 32, device="cuda") for _ in range(2)]
    got, want = [c.clone() for c in caches], [c.clone() for c in caches]
    paged_attention.write_kv(k, v, *got, slots)
    paged_attention.write_kv_reference(k, v, *want, slots)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------- serve.py's engine

def test_engine_with_cuda_graphs_matches_generate(model, monkeypatch):
    """10 prompts through 6 slots: decode batches of 1 to 6 replay the graphs of sizes 1, 2, 4 and 6
    (3 and 5 padded). A budget of 32 tokens per step cuts the longer prompts into chunks, which run
    eagerly through the Triton prefill kernel over the cached part. The same requests through an
    engine without graphs give the same tokens."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (int(n),), generator=g).tolist() for n in torch.randint(1, 80, (10,), generator=g)]
    lengths = [1, 5, 30, 17, 40, 2, 25, 9, 33, 12]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths]
    engine = Engine(model, max_num_seqs=6, max_num_batched_tokens=32, num_blocks=256)  # (not 90% of the GPU)
    assert sorted(engine.runner.graphs) == [1, 2, 4, 6], "decode graphs were not captured"
    prefills = []
    monkeypatch.setattr(runner, "paged_prefill_attention",
                        lambda q, *args: prefills.append(q.is_cuda) or paged_attention.paged_prefill_attention(q, *args))
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert prefills and all(prefills), "no chunk went through the prefill kernel"
    for prompt, p, out in zip(prompts, params, outs):
        assert_same_greedy(model, prompt, out.token_ids, list(generate_tokens(model, prompt, p)))
    eager = Engine(model, max_num_seqs=6, max_num_batched_tokens=32, num_blocks=256, cuda_graph=False)
    eager = eager.generate(prompts, params, use_tqdm=False)
    for prompt, a, b in zip(prompts, outs, eager):
        assert_same_greedy(model, prompt, a.token_ids, b.token_ids)


# ----------------------------------------------------------------------------- train.py's step

def test_compiled_bf16_train_step_learns_a_batch():
    """train.py's configuration on CUDA: torch.compile, bf16 autocast, fused AdamW. The loss on one
    repeated batch must fall, and the weights stay fp32."""
    torch.manual_seed(0)
    raw = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64)).cuda()
    model = torch.compile(raw)
    optimizer = training.make_optimizer(raw, lr=1e-3, device_type="cuda", verbose=False)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    x = torch.randint(0, 50257, (4, 64), device="cuda")
    y = torch.roll(x, -1, 1)
    losses = [training.train_step(model, optimizer, [(x, y)], 1e-3, autocast=autocast) for _ in range(30)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    assert raw.wte.weight.dtype == torch.float32
