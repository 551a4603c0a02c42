"""The serving engine (engine.py, scheduler.py, runner.py) without HTTP: paged KV cache, prefix cache, preemption, continuous
batching. The yardstick is generate.py: a batch through the engine must give, token for token, what
generating each prompt alone gives."""
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import context_sensitive
from engine import Engine
from gpt import GPT, GPTConfig
from inference import generate_tokens
from runner import BLOCK, parse_memory
from sampling import SamplingParams
import engine as engine_module
import runner
import scheduler
import serve

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a small vocabulary keeps the output layer cheap; ids below it are real GPT-2 tokens all the same;
    # scaled so that the tokens depend on the whole context (a lost KV block changes them)
    return context_sensitive(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=VOCAB)).eval())


VOCAB = 1024


def random_prompts(n, seed, lo=1, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def one_at_a_time(model, prompts, params):
    return [list(generate_tokens(model, p, sp, static=False)) for p, sp in zip(prompts, params)]


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_greedy_batch_matches_one_at_a_time(model):
    prompts = random_prompts(10, seed=1)
    params = [greedy(n) for n in (1, 5, 30, 17, 40, 2, 25, 9, 33, 12)]
    engine = Engine(model, max_num_seqs=6)  # fewer slots than prompts: some join the batch later
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)
    assert all(o.finish_reason == "length" and len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))


def test_offline_generate_shows_progress_in_tokens_and_drops_what_early_stops_leave(model, monkeypatch):
    bars = []

    class Bar:  # records what tqdm would show
        def __init__(self, total, **kwargs):
            self.total, self.n, self.totals = total, 0, [total]
            bars.append(self)

        def update(self, k):
            self.n += k
            self.totals.append(self.total)

        __enter__ = lambda self: self  # noqa: E731
        __exit__ = lambda self, *exc: None  # noqa: E731
    monkeypatch.setattr(engine_module, "tqdm", Bar)
    prompts = random_prompts(3, seed=3)
    params = [greedy(20), greedy(30), SamplingParams(max_tokens=40, temperature=0.0, stop=["e"])]
    outs = Engine(model).generate(prompts, params)
    (bar,) = bars
    assert bar.totals[0] == 90 and bar.n == bar.total == sum(len(o.token_ids) for o in outs)
    assert outs[2].finish_reason == "stop" and bar.total < 90  # the stopped request's rest left the total


@pytest.mark.parametrize("layout", ["in_out", "onednn"])
def test_a_model_in_each_cpu_layout_serves_the_same_tokens(model, layout):
    import copy
    from inference import pack_for_cpu
    packed = pack_for_cpu(copy.deepcopy(model), layout=layout)  # serve.py's CLI takes the fastest on a CPU
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    prompts = random_prompts(6, seed=7)
    params = [greedy(n) for n in (20, 3, 30, 11, 25, 8)]
    outs = Engine(packed, max_num_seqs=4).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)


def test_preemption_keeps_outputs_identical(model):
    prompts = random_prompts(8, seed=2, lo=20, hi=50)
    params = [greedy(40)] * len(prompts)
    engine = Engine(model, num_blocks=128 // BLOCK)  # room for exactly one full context
    free = engine.blocks.num_free
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)
    assert engine.blocks.num_free == free


def test_shared_prefix_hits_the_prefix_cache_and_matches(model):
    system = random_prompts(1, seed=3, lo=50, hi=50)[0]  # three full blocks and a bit
    prompts = [system + tail for tail in random_prompts(6, seed=4, lo=1, hi=20)]
    params = [greedy(20)] * len(prompts)
    engine = Engine(model, max_num_seqs=8)
    first = engine.generate(prompts[:1], params[:1], use_tqdm=False)  # computes and caches the prefix
    rest = engine.generate(prompts[1:], params[1:], use_tqdm=False)  # reuses it
    assert engine.blocks.hits >= 5 * (50 // BLOCK)
    assert [o.token_ids for o in first + rest] == one_at_a_time(model, prompts, params)


def test_whole_prompt_cached_still_computes_one_token(model):
    prompt = random_prompts(1, seed=5, lo=64, hi=64)[0]  # exactly four blocks
    engine = Engine(model)
    a = engine.generate([prompt], greedy(8), use_tqdm=False)[0]
    b = engine.generate([prompt], greedy(8), use_tqdm=False)[0]
    assert engine.blocks.hits == 3  # the block holding the last prompt token is always recomputed
    assert a.token_ids == b.token_ids == one_at_a_time(model, [prompt], [greedy(8)])[0]


def test_hash_collision_never_returns_wrong_kv(model, monkeypatch):
    monkeypatch.setattr(scheduler, "block_hash", lambda parent, ids: 0)  # every block collides
    prompts = random_prompts(6, seed=6, lo=33, hi=60)
    prompts.append(prompts[0][:40] + [7, 8])  # a genuine shared prefix too
    params = [greedy(10)] * len(prompts)
    engine = Engine(model)
    outs = engine.generate(prompts[:3], params[:3], use_tqdm=False)
    outs += engine.generate(prompts[3:], params[3:], use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)


@pytest.mark.parametrize("budget", [2048, 7])  # 7: most prompts prefilled in chunks
def test_block_accounting_with_random_arrivals_aborts_and_preemptions(model, budget):
    rng = random.Random(7)
    engine = Engine(model, num_blocks=12, max_num_seqs=5, max_num_batched_tokens=budget)
    free = engine.blocks.num_free
    prompts = random_prompts(40, seed=8, lo=1, hi=70)
    prompts += [prompts[0][:32] + p for p in random_prompts(10, seed=9, lo=1, hi=20)]  # shared prefixes
    rng.shuffle(prompts)
    live, steps = [], 0
    while prompts or engine.has_work():
        if prompts and rng.random() < 0.4:
            p = prompts.pop()
            sp = SamplingParams(max_tokens=rng.randint(1, 50), temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(99))
            live.append(engine.add_request(p, sp))
        if live and rng.random() < 0.08:
            engine.abort(live.pop(rng.randrange(len(live))).seq_id)
        for out in engine.step():
            if out.finish_reason and out.seq in live:
                live.remove(out.seq)
        steps += 1
        used = sum(b.ref > 0 for b in engine.blocks.blocks)
        assert used + engine.blocks.num_free == len(engine.blocks.blocks)
        assert steps < 5000
    assert engine.scheduler.num_preemptions > 0 and engine.stats.aborted > 0 and engine.blocks.hits > 0
    assert engine.blocks.num_free == free
    assert all(b.ref == 0 for b in engine.blocks.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.seqs


def test_abort_takes_effect_at_next_step(model):
    engine = Engine(model)
    free = engine.blocks.num_free
    seq = engine.add_request([1, 2, 3], greedy(50))
    engine.step()
    assert engine.blocks.num_free < free
    engine.abort(seq.seq_id)
    outs = engine.step()
    assert [(o.seq, o.finish_reason) for o in outs] == [(seq, "abort")]
    assert engine.blocks.num_free == free and not engine.has_work()


def test_stop_string_ends_the_text(model):
    prompt = random_prompts(1, seed=10, lo=10, hi=10)[0]
    full = Engine(model).generate([prompt], greedy(30), use_tqdm=False)[0]
    assert len(full.text) > 10
    stop = full.text[8:11]
    start = full.text.find(stop)
    out = Engine(model).generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:start]
    assert len(out.token_ids) < 30


@pytest.mark.parametrize("budget", [2048, 8])  # 8: chunks sample nothing, so the random streams stay in step
def test_seeded_sampling_matches_generate(model, budget):
    prompts = random_prompts(4, seed=11)
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=100 + i) for i in range(4)]
    outs = Engine(model, max_num_seqs=4, max_num_batched_tokens=budget).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)
    again = Engine(model, max_num_seqs=4, max_num_batched_tokens=budget).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]


@pytest.mark.parametrize("budget", [2048, 5])  # 5: the 12-token prompt takes three steps
def test_logprobs_are_the_models(model, budget):
    prompt = random_prompts(1, seed=12, lo=12, hi=12)[0]
    engine = Engine(model, max_num_seqs=1, max_num_batched_tokens=budget)
    engine.add_request(prompt, greedy(4), logprobs=3)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert len(outs) == 4  # one output per token: the prompt's first chunks report nothing
    ids = prompt + [o.token for o in outs[:-1]]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([ids]))[0, len(prompt) - 1:].float(), -1)
    for i, o in enumerate(outs):
        assert o.logprob == pytest.approx(float(lp[i, o.token]), abs=1e-4)
        assert [t for t, _ in o.top_logprobs] == lp[i].topk(3).indices.tolist()
        assert o.top_logprobs[0][0] == o.token  # greedy picks the most likely


def test_batched_logprobs_match_alone_to_float_rounding(model):
    """What the README claims of batching, and no more: a sequence's log-probabilities in a batch with
    others are the ones it has alone, to float rounding (1e-4), not bit for bit: a batch of another
    shape sums in another order. (So where two tokens are all but tied, a sampled text can part.)"""
    prompts = random_prompts(8, seed=16, lo=5, hi=40)

    def logprobs(engine, batch):
        seqs = engine.add_requests([(p, greedy(6), 1) for p in batch])
        got = {seq.seq_id: [] for seq in seqs}
        while engine.has_work():
            for out in engine.step():
                got[out.seq.seq_id].append((out.token, out.logprob))
        return [got[seq.seq_id] for seq in seqs]
    engine = Engine(model, max_num_seqs=8)
    alone = [logprobs(engine, [p])[0] for p in prompts]
    together = logprobs(engine, prompts)
    for a, b in zip(alone, together):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)


def test_kv_cache_sizing():
    assert parse_memory("256MB") == 256 * 10**6
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("1.5") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="memory size"):
        parse_memory("lots")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=VOCAB)).eval()
    per_block = 2 * 2 * BLOCK * 64 * 4
    assert len(Engine(m, kv_cache_memory=f"{per_block * 20}B").blocks.blocks) == 20
    with pytest.raises(ValueError, match="one full-context sequence needs 8"):
        Engine(m, kv_cache_memory="64KB")


def test_cuda_graphs_cover_every_decode_batch_up_to_the_cap():
    """A decode batch of B replays the smallest captured graph of at least B rows; every batch the
    engine can form (1..max_num_seqs) must have one, up to 256, with no size captured twice."""
    sizes = runner.ModelRunner.graph_batch_sizes
    assert sizes(1) == [1] and sizes(6) == [1, 2, 4, 6] and sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    for cap in (1, 3, 6, 64, 100, 256, 300):
        captured = sizes(cap)
        assert len(set(captured)) == len(captured) and max(captured) <= min(cap, 256)
        assert all(any(s >= b for s in captured) for b in range(1, min(cap, 256) + 1))


def test_a_bad_prompt_in_a_batch_queues_none_of_them(model):
    engine = Engine(model)
    good = random_prompts(2, seed=13)
    with pytest.raises(ValueError, match="context holds 128"):
        engine.generate([good[0], [1] * 200, good[1]], greedy(5), use_tqdm=False)
    with pytest.raises(ValueError, match="seed"):
        engine.generate(good, [greedy(5), SamplingParams(max_tokens=5, seed=2**70)], use_tqdm=False)
    assert not engine.has_work() and engine.num_waiting == 0
    outs = engine.generate(good, greedy(5), use_tqdm=False)  # the next batch gets its own outputs only
    assert [o.token_ids for o in outs] == one_at_a_time(model, good, [greedy(5)] * 2)


def test_generate_ignores_other_sequences_in_the_engine(model):
    engine = Engine(model)
    other = engine.add_request(random_prompts(1, seed=14)[0], greedy(3))  # someone else's request
    prompt = random_prompts(1, seed=15)[0]
    outs = engine.generate([prompt], greedy(6), use_tqdm=False)
    assert outs[0].token_ids == one_at_a_time(model, [prompt], [greedy(6)])[0]
    assert other.finish_reason == "length" and not engine.has_work()


def test_engine_loop_submit_admits_all_or_none(model):
    loop = serve.EngineLoop(Engine(model))  # not started: nothing steps the engine behind our back
    good = ([1, 2, 3], greedy(5), None)
    for bad in (([1] * 200, greedy(5), None), ([1, 2], SamplingParams(max_tokens=5, seed=-1), None)):
        with pytest.raises(ValueError):
            loop.submit([good, bad, good], sink=None)
        assert not loop.engine.has_work() and loop.engine.num_waiting == 0
    assert len(loop.submit([good, good], sink=None)) == 2 and loop.engine.num_waiting == 2


# ----------------------------------------------------------------------------- chunked prefill

def record_schedules(engine):
    """Wrap the scheduler so that each step's [(seq, num_scheduled)] is kept in the returned list."""
    steps, schedule = [], engine.scheduler.schedule

    def wrapped():
        batch = schedule()
        steps.append([(seq, seq.num_scheduled) for seq in batch])
        return batch
    engine.scheduler.schedule = wrapped
    return steps


def test_admission_is_fair_between_requests(model):
    """A request with many sequences (prompts x n) must not hold the engine: a later request's first
    sequence goes ahead of the earlier one's remaining ones, at the first free slot."""
    engine = Engine(model, max_num_seqs=2)
    steps = record_schedules(engine)
    big = engine.add_requests([(p, greedy(2), None) for p in random_prompts(6, seed=30)])
    engine.step()  # two of the six are admitted
    small = engine.add_request(random_prompts(1, seed=31)[0], greedy(1))
    while engine.has_work():
        engine.step()
    admitted = []  # in the order they are first scheduled
    for step in steps:
        admitted += [seq for seq, _ in step if seq not in admitted]
    assert admitted.index(small) == 2, [big.index(s) if s in big else "small" for s in admitted]
    assert all(seq.finish_reason == "length" for seq in big + [small])  # and everyone is answered


@pytest.mark.parametrize("budget", [4, 8, 16])  # 4: as many as max_num_seqs, so prefills wait while all four decode
def test_chunked_prefill_matches_one_at_a_time(model, budget):
    prompts = random_prompts(10, seed=20, lo=1, hi=100)  # most longer than a whole step's budget
    params = [greedy(n) for n in (12, 3, 25, 1, 18, 7, 30, 9, 14, 5)]
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=budget)
    steps = record_schedules(engine)
    free = engine.blocks.num_free
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)
    assert all(sum(n for _, n in step) <= budget for step in steps)  # the budget holds in every step
    assert any(n > 1 and seq.prompt_len > budget for step in steps for seq, n in step)  # chunks happened
    assert engine.blocks.num_free == free


def test_a_long_prompt_is_chunked_while_running_sequences_keep_decoding(model):
    budget = 16
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=budget)
    chatting = [engine.add_request(p, greedy(60)) for p in random_prompts(2, seed=21, lo=3, hi=6)]
    engine.step()  # both short prompts prefilled together; from now on they decode
    long_prompt = random_prompts(1, seed=22, lo=100, hi=100)[0]
    long = engine.add_request(long_prompt, greedy(5))
    steps = record_schedules(engine)
    produced = []  # per step: which sequences got a token
    while long.first_token_time is None:
        produced.append([out.seq for out in engine.step()])
    chunks = [n for step in steps for seq, n in step if seq is long]
    # every step: each chatting sequence decodes its one token, first; the prompt gets the rest
    for step, got in zip(steps, produced):
        assert step[:2] == [(chatting[0], 1), (chatting[1], 1)]
        assert got[:2] == chatting
    per_step = budget - len(chatting)
    assert chunks == [per_step] * (len(long_prompt) // per_step) + [len(long_prompt) % per_step]
    assert [long in got for got in produced] == [False] * (len(chunks) - 1) + [True]  # no output until done
    while engine.has_work():
        engine.step()
    prompts = [s.tokens[:s.prompt_len] for s in chatting + [long]]
    params = [greedy(60), greedy(60), greedy(5)]
    assert [s.output_ids for s in chatting + [long]] == one_at_a_time(model, prompts, params)


def test_only_computed_blocks_enter_the_prefix_cache(model):
    prompt = random_prompts(1, seed=23, lo=70, hi=70)[0]
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=20)
    seq = engine.add_request(prompt, greedy(3))
    engine.step()  # 20 tokens computed: one full block, and part of a second
    assert seq.num_computed == 20 and seq.num_hashed == 1
    assert len(engine.blocks.match_prefix(prompt)) == 1
    assert [engine.blocks.blocks[b].hash is not None for b in seq.block_table] == [True] + [False] * 4
    engine.step()  # 40 tokens: two full blocks
    assert seq.num_computed == 40 and len(engine.blocks.match_prefix(prompt)) == 2


def test_chunked_prefill_with_preemption_and_prefix_hits(model):
    system = random_prompts(1, seed=24, lo=40, hi=40)[0]  # two full blocks and a half, shared
    prompts = [system + tail for tail in random_prompts(6, seed=25, lo=5, hi=40)]
    params = [greedy(n) for n in (40, 30, 45, 20, 35, 25)]
    engine = Engine(model, num_blocks=128 // BLOCK, max_num_seqs=4, max_num_batched_tokens=12)  # one full context
    free = engine.blocks.num_free
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, params)
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.hits > 0
    assert engine.blocks.num_free == free and all(b.ref == 0 for b in engine.blocks.blocks)


def test_a_prefill_preempted_halfway_resumes_from_its_computed_blocks(model):
    # 8 blocks. A (10-token prompt) decodes; B's 100-token prompt takes the other 7 blocks and is
    # prefilled 11 tokens a step. When A's 17th token needs a block, none is free: B, the youngest,
    # is preempted in the middle of its prefill, and later restarts from its blocks in the prefix cache.
    a_prompt, b_prompt = random_prompts(1, seed=26, lo=10, hi=10)[0], random_prompts(1, seed=27, lo=100, hi=100)[0]
    engine = Engine(model, num_blocks=8, max_num_seqs=2, max_num_batched_tokens=12)
    free = engine.blocks.num_free
    left_at_preemption = []
    preempt = engine.scheduler.preempt

    def watched(seq):
        left_at_preemption.append((seq, len(seq.tokens) - seq.num_computed))
        preempt(seq)
    engine.scheduler.preempt = watched
    a, b = engine.add_request(a_prompt, greedy(40)), engine.add_request(b_prompt, greedy(5))
    while engine.has_work():
        engine.step()
    assert left_at_preemption and left_at_preemption[0][0] is b and 1 < left_at_preemption[0][1] < 100
    assert engine.blocks.hits > 0  # B's computed full blocks were found again
    assert [a.output_ids, b.output_ids] == one_at_a_time(model, [a_prompt, b_prompt], [greedy(40), greedy(5)])
    assert engine.blocks.num_free == free and all(blk.ref == 0 for blk in engine.blocks.blocks)


def test_a_prefill_aborted_halfway_frees_its_blocks_and_keeps_its_computed_prefix(model):
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=10)
    free = engine.blocks.num_free
    p, tail = random_prompts(2, seed=28, lo=60, hi=60)
    a = engine.add_request(p, greedy(5))
    engine.step(), engine.step()
    assert a.num_computed == 20 and a.first_token_time is None  # halfway through its prefill
    engine.abort(a.seq_id)
    engine.step()  # (the abort goes through the inbox)
    assert engine.blocks.num_free == free
    b = engine.add_request(p[:40] + tail[:20], greedy(5))
    while engine.has_work():
        engine.step()
    assert engine.blocks.hits == 1  # the one full block A computed (tokens 0..15) was reused
    assert b.output_ids == one_at_a_time(model, [b.tokens[:b.prompt_len]], [greedy(5)])[0]
    assert engine.blocks.num_free == free


def test_budget_must_be_positive_and_cover_every_running_sequence(model, capsys):
    with pytest.raises(ValueError, match="max_num_batched_tokens must be at least 1"):
        Engine(model, max_num_batched_tokens=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be at least max_num_seqs \(16\)"):
        Engine(model, max_num_seqs=16, max_num_batched_tokens=8)
    for argv, message in ((["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be at least 1"),
                          (["--max-num-batched-tokens", "8", "--max-num-seqs", "16"],
                           "--max-num-batched-tokens (8) must be at least --max-num-seqs (16)")):
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating(model, monkeypatch):
    with pytest.raises(ValueError, match="memory is available"):
        Engine(model, kv_cache_memory="5000TB")  # (at once: no pool, no block list of 3e11 entries)
    # memory short after all (the check can be off): the allocation failure is the same one-line error

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore details")

    monkeypatch.setattr(runner, "available_memory", lambda device: None)
    monkeypatch.setattr(runner.torch, "zeros", no_memory)
    with pytest.raises(ValueError, match=r"cannot allocate the KV cache \(.*\): CUDA out of memory. Tried .*GiB;"):
        Engine(model, kv_cache_memory="1MB")


def test_a_tiny_temperature_samples_like_greedy(model):
    prompts = random_prompts(3, seed=21)
    tiny = SamplingParams(max_tokens=8, temperature=1e-300, seed=0)
    outs = Engine(model).generate(prompts, tiny, use_tqdm=False)
    assert [o.token_ids for o in outs] == one_at_a_time(model, prompts, [greedy(8)] * 3)


@pytest.mark.parametrize("argv, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
    (["--max-num-seqs", "4096"], "--max-num-batched-tokens (2048) must be at least --max-num-seqs (4096)"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be at least 1"),
    (["--kv-cache-memory", "abc"], "--kv-cache-memory: cannot read memory size 'abc'"),
    (["--hf-batch-size", "0"], "--hf-batch-size must be >= 1"),
    (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
])
def test_bench_serve_refuses_bad_flags_before_building_a_model(argv, message, capsys, monkeypatch):
    import bench_serve
    monkeypatch.setattr(bench_serve, "GPT", None)  # (building a model would fail with a traceback)
    with pytest.raises(SystemExit) as e:
        bench_serve.main(["--random-init", "--device", "cpu", "--max-len", "64", "--max-out", "32", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_stopped_engine_loop_takes_no_more_requests(model):
    """During a shutdown, a request that reaches the engine after it stopped is told so (a 503 over
    HTTP), instead of waiting forever for an engine that no longer runs."""
    import queue
    from serve import EngineLoop, ShuttingDown
    loop = EngineLoop(Engine(model)).start()
    loop.stop()
    with pytest.raises(ShuttingDown):
        loop.submit([([1, 2, 3], greedy(2), None)], queue.Queue())


# ----------------------------------------------------------------------------- a padded vocabulary, a failing sequence

def padded_vocab_model():
    """A model whose vocabulary is padded past GPT-2's 50,257 tokens to 50,304 (as nanoGPT pads it),
    its extra ids made the likeliest of all: an id no tokenizer can decode, unless they are masked."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304)).eval()

    def favour_padding(module, inputs, logits):
        logits[..., 50257:] += 1e4
        return logits
    model.lm_head.register_forward_hook(favour_padding)
    return model


def test_a_padded_vocabulary_is_never_sampled_and_serves():
    model = padded_vocab_model()
    params = [SamplingParams(max_tokens=6, temperature=0.0), SamplingParams(max_tokens=6, temperature=1.0, seed=1)]
    outs = Engine(model, num_blocks=64).generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 6 for o in outs)
    assert all(t < 50257 for o in outs for t in o.token_ids)
    assert all(t < 50257 for t in generate_tokens(model, [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0)))


def test_a_sequence_whose_text_fails_ends_alone(model, monkeypatch):
    """A failure inside one sequence's step (here its text stream) ends that sequence with "error";
    the others batched with it go on to their end."""
    engine = Engine(model, num_blocks=64)
    doomed, fine = engine.add_requests([([1, 2, 3], greedy(5), None), ([4, 5, 6], greedy(5), None)])

    def broken(token_id):
        raise KeyError(token_id)
    monkeypatch.setattr(doomed.stream, "push", broken)
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            if out.finish_reason:
                reasons[out.seq.seq_id] = out.finish_reason
    assert reasons == {doomed.seq_id: "error", fine.seq_id: "length"} and len(fine.output_ids) == 5


def test_prompt_logprobs_survive_chunked_prefill_a_cached_prefix_and_preemption(model, monkeypatch):
    monkeypatch.setattr(Engine, "PROMPT_ROWS", 7)  # a chunk's positions scored a few at a time
    prompt = random_prompts(1, seed=31, lo=70, hi=70)[0]
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([prompt]))[0].double(), -1)
    expected = [float(own[p, prompt[p + 1]]) for p in range(len(prompt) - 1)]
    engine = Engine(model, max_num_seqs=4, max_num_batched_tokens=20)
    engine.generate([prompt], greedy(2), use_tqdm=False)  # its blocks are now in the prefix cache
    seq = engine.add_request(prompt, greedy(0), prompt_logprobs=2)  # max_tokens 0: score it only
    engine.step()
    assert seq.num_computed == 20  # computed from the start, the cached blocks not taken: their logits are needed
    engine.step()
    engine.scheduler.preempt(seq)  # halfway: it starts over, and no position is scored twice
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "length" and seq.output_ids == []
    assert [lp for lp, _ in seq.prompt_entries] == pytest.approx(expected, abs=1e-4)
    assert [[t for t, _ in top] for _, top in seq.prompt_entries] == [torch.topk(own[p], 2).indices.tolist()
                                                                      for p in range(len(prompt) - 1)]
    again = engine.add_request(prompt, greedy(3), prompt_logprobs=0)  # scored, then generated as usual
    while engine.has_work():
        engine.step()
    assert [lp for lp, _ in again.prompt_entries] == pytest.approx(expected, abs=1e-4)
    assert again.output_ids == one_at_a_time(model, [prompt], [greedy(3)])[0]
