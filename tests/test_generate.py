"""generate.py and its libraries: KV-cache correctness (inference.py), the sampler against its reference
(sampling.py), stop strings, UTF-8-safe streaming, the CLI."""
import copy
import io
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, context_sensitive, saying_always
from generate import chat
from gpt import GPT, GPTConfig
from inference import KVCache, StaticStep, generate, generate_tokens
from sampling import (MAX_SEED, BadSamplingParam, SamplingParams, candidates, draw, reference_probs, sample,
                      sample_reference)
from tokenizer import EOT, PromptTooLong, TextStream, encode, encode_prompt, fit_conversation, get_tokenizer

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


def greedy_without_cache(model, ids, n):
    """The reference: recompute the whole sequence for every new token."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model.lm_head(model.hidden(torch.tensor([ids]))[0, -1]).argmax())
            if t == EOT:
                break
            out.append(t)
            ids.append(t)
    return out


def eot_model():
    """A tiny model that always says <|endoftext|>."""
    return saying_always(EOT, block_size=64)


# ----------------------------------------------------------------------------- the KV cache

def test_cached_greedy_equals_uncached_greedy_for_100_tokens(tiny_model, enc):
    model = context_sensitive(copy.deepcopy(tiny_model))
    prompt = encode("The quick brown fox jumps over", enc)
    expected = greedy_without_cache(model, prompt, 100)
    assert len(expected) == 100  # the random model never says EOT here: all 100 tokens are compared
    assert len(set(expected)) > 20  # and what it says depends on what came before
    for static in (False, True):  # the eager step, and the fixed-shape step a CUDA graph records
        params = SamplingParams(max_tokens=100, **GREEDY)
        assert list(generate_tokens(model, prompt, params, static=static)) == expected, f"static={static}"


def test_the_static_step_is_made_once_per_model_and_reused_while_its_weights_stay(tiny_model):
    # A CUDA graph is captured once and replayed by later calls (here its CPU twin, the static step):
    # a later, shorter prompt must not see the keys an earlier call left beyond it.
    model = context_sensitive(copy.deepcopy(tiny_model))
    long_prompt, short_prompt = list(range(1000, 1040)), list(range(2000, 2005))
    params = SamplingParams(max_tokens=20, **GREEDY)
    solo = lambda prompt, n=20: greedy_without_cache(model, prompt, n)  # noqa: E731
    assert list(generate_tokens(model, long_prompt, params, static=True)) == solo(long_prompt)
    step = model._static_step
    assert step.cache.max_len == 64  # 60 tokens, rounded up to a power of two (the context holds 128)
    assert list(generate_tokens(model, short_prompt, params, static=True)) == solo(short_prompt)
    assert model._static_step is step
    assert copy.deepcopy(model)._static_step is None  # a copy makes its own (a CUDA graph cannot be copied)
    with torch.no_grad():
        model.ln_f.weight.mul_(2)  # updated in place: a graph reads the new values, the step stays
    assert list(generate_tokens(model, short_prompt, params, static=True)) == solo(short_prompt)
    assert model._static_step is step
    model.ln_f.weight = torch.nn.Parameter(model.ln_f.weight * 2)  # replaced: a graph would read freed memory
    assert list(generate_tokens(model, short_prompt, params, static=True)) == solo(short_prompt)
    assert model._static_step is not step
    longer = SamplingParams(max_tokens=80, **GREEDY)  # 85 tokens: more than the 64 the cache holds
    assert list(generate_tokens(model, short_prompt, longer, static=True)) == solo(short_prompt, 80)
    assert model._static_step.cache.max_len == 128


def test_two_generations_at_once_on_one_model_do_not_share_a_cache(tiny_model):
    model = context_sensitive(copy.deepcopy(tiny_model))
    a, b = list(range(1000, 1010)), list(range(3000, 3004))
    params = SamplingParams(max_tokens=30, **GREEDY)
    together = list(zip(generate_tokens(model, a, params, static=True), generate_tokens(model, b, params, static=True)))
    assert [x for x, _ in together] == greedy_without_cache(model, a, 30)
    assert [y for _, y in together] == greedy_without_cache(model, b, 30)
    assert not model._static_step.lock.locked()  # released when each generation ended


def test_prefill_in_two_chunks_equals_one_chunk(tiny_model):
    # new tokens after a cached prefix need the offset causal mask
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        full = tiny_model(idx)
        cache = KVCache(tiny_model.config, 1, 32)
        a = tiny_model(idx[:, :12], pos=torch.arange(12), cache=cache)
        b = tiny_model(idx[:, 12:], pos=torch.arange(12, 20), cache=cache)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)


def test_static_step_matches_full_forward_with_batch_of_two(tiny_model):
    # the fixed-shape step (the one a CUDA graph records) attends over the whole buffer with a mask
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        full = tiny_model(idx)[:, -1]
        cache = KVCache(tiny_model.config, 2, 16)
        tiny_model(idx[:, :8], cache=cache)
        logits = StaticStep(tiny_model, cache)(idx[:, 8])
    assert cache.length == 9
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_the_context_limit_and_rejects_overlong_prompts(tiny_model):
    n_ctx = tiny_model.config.block_size
    prompt = list(range(1000, 1000 + n_ctx - 8))
    assert len(list(generate_tokens(tiny_model, prompt, SamplingParams(max_tokens=100, **GREEDY)))) == 8
    with pytest.raises(PromptTooLong, match=f"holds {n_ctx}"):
        next(generate_tokens(tiny_model, list(range(n_ctx)), SamplingParams()))


def test_generation_stops_at_endoftext_without_yielding_it(tiny_model, monkeypatch):
    import inference as gen
    assert list(generate_tokens(eot_model(), [1, 2, 3], SamplingParams(max_tokens=10, **GREEDY))) == []
    script = iter([5, EOT, 7, 8])  # the sampler's picks: what comes after <|endoftext|> must never show

    def scripted(logits, *args, **kwargs):
        return torch.tensor([next(script)])
    monkeypatch.setattr(gen, "sample", scripted)
    assert list(generate_tokens(tiny_model, [1, 2, 3], SamplingParams(max_tokens=10))) == [5]


# ----------------------------------------------------------------------------- sampling

def kept(logits, top_k=0, top_p=1.0):
    """Per row, the set of token ids `candidates` lets sampling draw."""
    ids, probs = candidates(logits, top_k, top_p)
    return [set(i[w > 0].tolist()) for i, w in zip(ids, probs)]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 7.0, 7.0, 7.0]])
    first, second = kept(logits, top_k=2)
    assert first == {1, 3}
    assert len(second) == 2 and second <= {2, 3, 4}  # ties: still exactly k, from the tied best
    ids, probs = candidates(logits, top_k=2)
    torch.testing.assert_close(probs[0], torch.tensor([5.0, 4.0]).softmax(0))  # renormalized over the k
    assert kept(logits) == [set(range(5))] * 2  # 0 = all


@pytest.mark.parametrize("p, keep", [(0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 2}), (0.95, {0, 1, 2, 3}),
                                     (1e-9, {1}), (0.0, {1})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, keep):
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])  # sorted: 0.5 (1), 0.25 (3), 0.15 (2), 0.1 (0)
    assert kept(probs.log(), top_p=p) == [keep]


def test_top_p_takes_one_of_two_tied_tokens_when_one_reaches_p():
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # 0.5 + 0.25 + either 0.125 reaches 0.8
    (got,) = kept(probs.log(), top_p=0.8)
    assert len(got) == 3 and {1, 3} < got


def test_top_p_filters_each_row_on_its_own_and_after_top_k():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.05, 0.05, 0.1, 0.8]]).log()
    assert kept(logits, top_p=0.7) == [{0, 1}, {3}]
    # top_k=2 first: row 0 keeps 0.5 and 0.25, renormalized to 2/3 and 1/3, so p=0.7 needs both
    assert kept(logits, top_k=2, top_p=0.7) == [{0, 1}, {3}]
    assert kept(logits, top_k=2, top_p=0.6) == [{0}, {3}]


def test_top_p_looks_among_the_likeliest_first_and_finds_the_same_set(monkeypatch):
    import sampling
    sizes = set()
    for scale in (1.0, 3.0, 8.0):  # flat to peaked: nuclei of 1 to ~4,500 of these 5,000 tokens
        logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * scale
        for p in (0.5, 0.9, 0.99):
            monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", ())  # a full sort
            want = kept(logits, top_p=p)
            monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (16, 256))
            assert kept(logits, top_p=p) == want, f"scale {scale}, p={p}"
            sizes |= {len(k) for k in want}
    assert min(sizes) <= 16 and any(16 < n <= 256 for n in sizes) and max(sizes) > 256  # every stage ran


def test_draw_picks_tokens_in_proportion_to_their_probabilities():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1) * 3  # (need not sum to 1)
    counts = torch.bincount(draw(probs, torch.rand(20000, generator=torch.Generator().manual_seed(0))), minlength=6) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.015, rtol=0)


@pytest.mark.parametrize("u", [0.0, 1.0])  # torch.rand's least value, and what u * total may round up to
def test_draw_never_picks_a_zero_probability_token(u):
    probs = torch.tensor([[0.0, 0.1, 0.7, 0.2, 0.0, 0.0], [0.0, 0.0, 1e-30, 3e-8, 1.0, 0.0]])
    assert draw(probs, torch.full((2,), u)).tolist() == ([1, 2] if u == 0 else [3, 4])


@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9}, {"top_k": 5}])
def test_nan_logits_are_an_error_not_a_token_past_the_vocabulary(filters):
    logits = torch.randn(2, 100)
    logits[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(logits, 1.0, **filters)


def test_a_batch_with_its_own_settings_and_seeds_per_row_samples_as_each_row_alone():
    # serve.py samples every request of a step in one call; each must get what it would get alone
    logits = torch.randn(7, 3000, generator=torch.Generator().manual_seed(1)) * 4
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 50, 1.0), (1.2, 0, 0.9), (0.9, 100, 0.5), (1e-30, 0, 0.95),
                (1.0, 2000, 1.0)]  # (temperature, top_k, top_p); the last needs more than the first 1024 looked at
    temperature, top_k, top_p = (list(x) for x in zip(*settings))
    for draws in range(3):
        seeds = [10 * draws + i for i in range(7)]
        batch = sample(logits, temperature, top_k, top_p, [torch.Generator().manual_seed(s) for s in seeds])
        alone = [int(sample(logits[i:i + 1], *settings[i], torch.Generator().manual_seed(seeds[i]))) for i in range(7)]
        assert batch.tolist() == alone
        assert batch[0] == logits[0].argmax() and batch[5] == logits[5].argmax()  # greedy, nearly greedy
        assert batch[2] in logits[2].topk(50).indices and batch[4] in logits[4].topk(100).indices
    rows = [2, 3, 4, 6]  # the filtered ones: their candidates and probabilities, in one call and alone
    together = candidates(logits[rows], [top_k[i] for i in rows], [top_p[i] for i in rows])
    for i, ids, probs in zip(rows, *together):
        ids1, probs1 = candidates(logits[i:i + 1], top_k[i], top_p[i])
        alone = {int(t): float(w) for t, w in zip(ids1[0], probs1[0]) if w > 0}
        assert {int(t): float(w) for t, w in zip(ids, probs) if w > 0} == pytest.approx(alone, rel=1e-5), i


def test_sample_greedy_seeded_and_filtered():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    assert sample(logits, 0.0).tolist() == [1, 1, 1]
    draws = lambda seed: sample(logits.repeat(100, 1), 1.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draws(7), draws(7))
    assert set(draws(7).tolist()) == {0, 1, 2, 3}  # unfiltered: every token gets drawn
    filtered = sample(logits.repeat(100, 1), 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(filtered.tolist()) == {1, 3}


# the fast sampler against the reference: (temperature, top_k, top_p), filters alone and together
SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 0, 0.5), (1.0, 40, 1.0), (0.8, 40, 0.7), (1.5, 5, 0.95)]


def fast_probs(logits, temperature, top_k, top_p):
    """What `sample` draws from, as probabilities in vocabulary order (B, V): `candidates` at the
    temperature, renormalized (as `draw` does)."""
    ids, probs = candidates(logits.float() / temperature, top_k, top_p)
    return torch.zeros_like(logits).scatter_(-1, ids, probs / probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_the_fast_sampler_keeps_the_reference_tokens_with_the_reference_probabilities(temperature, top_k, top_p):
    # 3,000 tokens: more than the 1024 the nucleus is looked for among first; flat to peaked rows
    scales = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(2)) * scales
    want = reference_probs(logits, temperature, top_k, top_p)
    got = fast_probs(logits, temperature, top_k, top_p)
    assert torch.equal(got > 0, want > 0)  # the same kept token set, row by row
    assert 1 < int((want > 0).sum(-1).max()) and bool(top_k or top_p < 1) == bool((want == 0).any())  # (meaningful)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_the_fast_sampler_and_the_reference_are_greedy_alike():
    logits = torch.randn(8, 3000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample_reference(logits, 0.0), logits.argmax(-1))


def chi_square(counts, probs):
    """Pearson's statistic of `counts` against `probs` (tokens with probability 0 must never be
    drawn) and its degrees of freedom."""
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0] * counts.sum()
    return float(((counts[probs > 0] - expected) ** 2 / expected).sum()), int((probs > 0).sum()) - 1


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_the_fast_sampler_draws_the_reference_distribution(temperature, top_k, top_p):
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(4)) * 1.5
    n = 100_000
    drawn = sample(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(5))
    counts = torch.bincount(drawn, minlength=60).double()
    want = reference_probs(logits, temperature, top_k, top_p)[0].double()
    stat, df = chi_square(counts, want)
    limit = df + 8 * (2 * df) ** 0.5 + 10  # 8 standard deviations above the mean: never by chance (seeded, too)
    assert stat < limit, f"chi-square {stat:.0f} with {df} degrees of freedom"
    # and the test can tell: the same kept tokens at a temperature 10% off are past the limit
    off = reference_probs(logits, temperature * 1.1)[0].double() * (want > 0)
    assert chi_square(counts, off / off.sum())[0] > limit


def test_sampling_params_check_names_the_field_as_each_caller_does():
    assert SamplingParams().check() == SamplingParams()  # the defaults pass; check returns the params
    SamplingParams(max_tokens=1, temperature=0, top_k=0, top_p=1, seed=MAX_SEED).check()
    flag = lambda field: "--" + field.replace("_", "-")  # noqa: E731
    for bad, message in (({"max_tokens": 0}, "max_tokens 0 must be >= 1"),
                         ({"temperature": -1.0}, "temperature -1.0 must be >= 0 (0 = greedy)"),
                         ({"temperature": float("nan")}, "temperature nan must be"),
                         ({"temperature": float("inf")}, "temperature inf must be"),
                         ({"top_k": -1}, "top_k -1 must be >= 0 (0 = off)"),
                         ({"top_p": 0.0}, "top_p 0.0 must be in (0, 1] (1 = off)"),
                         ({"top_p": 1.5}, "top_p 1.5 must be in (0, 1]"),
                         ({"seed": -1}, f"seed -1 must be between 0 and {MAX_SEED}"),
                         ({"seed": MAX_SEED + 1}, f"seed {MAX_SEED + 1} must be")):
        (field, value), = bad.items()
        with pytest.raises(BadSamplingParam) as e:
            SamplingParams(**bad).check()
        assert str(e.value).startswith(message) and (e.value.field, e.value.value) == (field, value)
        with pytest.raises(ValueError, match="^" + flag(field)):  # (a ValueError, named as the caller says)
            SamplingParams(**bad).check(name=flag)


# ----------------------------------------------------------------------------- streaming text

def stream_all(enc, ids, stop=()):
    s = TextStream(enc, stop)
    pieces = [s.push(t) for t in ids]
    pieces.append(s.finish())
    return s, pieces


def test_stop_string_split_across_tokens_is_detected_and_not_emitted(enc):
    ids = encode("Hello world\nUser: bye", enc)
    stop = "\nUser:"
    assert not any(stop in enc.decode([t]) for t in ids)  # no single token holds the stop string
    s, pieces = stream_all(enc, ids, [stop])
    assert s.stopped and "".join(pieces) == s.text == "Hello world"


def test_a_held_back_prefix_of_a_stop_string_is_released_when_it_cannot_complete(enc):
    s = TextStream(enc, ["\nUser:"])
    assert s.push(encode("Hi", enc)[0]) == "Hi"
    assert s.push(encode("\n", enc)[0]) == ""  # might be the start of "\nUser:"
    rest = "".join(s.push(t) for t in encode("Users are", enc)) + s.finish()
    assert not s.stopped and s.text == "Hi\nUsers are" and rest == "\nUsers are"


def test_the_earliest_of_several_stop_strings_wins(enc):
    s, pieces = stream_all(enc, encode("one. two! three", enc), ["!", "."])
    assert s.stopped and "".join(pieces) == "one"


def test_streaming_never_emits_half_a_character(enc):
    text = "Emoji 🙂🎉👍🏽 and 漢字の文章 ünïcödé 🧑‍🚀!"
    ids = encode(text, enc)
    broken = [t for t in ids if b"\xef\xbf\xbd" in enc.decode([t]).encode()]
    assert broken  # the test is meaningful: some characters really span tokens
    s, pieces = stream_all(enc, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == s.text == text


def test_generate_stops_at_a_stop_string_taken_from_its_own_output(tiny_model, enc):
    prompt = encode("Once upon a time", enc)
    ids = list(generate_tokens(tiny_model, prompt, SamplingParams(max_tokens=30, **GREEDY)))
    text = enc.decode(ids)
    # a stop string that straddles the boundary between the 10th and 11th generated tokens
    cut = len(enc.decode(ids[:10]))
    stop = text[cut - 2:cut + 2]
    got = "".join(generate(tiny_model, prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY), enc))
    assert got == text[:text.index(stop)]


# ----------------------------------------------------------------------------- chat

def test_fit_conversation_drops_oldest_turns_and_keeps_the_system_prompt(enc):
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question {i} " * 5},
                     {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last question"})
    ids, kept = fit_conversation(messages, "chat", n_ctx=100, reserve=20, enc=enc)
    assert len(ids) + 20 <= 100 and ids == encode_prompt(kept, "chat", enc)
    assert kept[0] == messages[0] and kept[1]["role"] == "user" and kept[-1] == messages[-1]
    assert len(kept) < len(messages)
    with pytest.raises(PromptTooLong):
        fit_conversation([{"role": "user", "content": "word " * 200}], "chat", n_ctx=100, reserve=20, enc=enc)


def piped(monkeypatch, data):
    """stdin as a pipe carrying these bytes (chat reads bytes and decodes each line itself)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_chat_answers_each_piped_line_and_skips_blank_ones(monkeypatch, capsys, enc):
    piped(monkeypatch, b"hello\n\nhow are you?\n")
    messages = chat(eot_model(), enc, SamplingParams(max_tokens=20, **GREEDY))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == ["hello", "", "how are you?", ""]  # EOT at once: empty answers


def test_chat_in_a_terminal_ends_its_prompt_line_at_ctrl_d(monkeypatch, capsys, enc):
    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"hello\n")))  # a line, then Ctrl-D
    chat(eot_model(), enc, SamplingParams(max_tokens=5, **GREEDY))
    assert capsys.readouterr().out.endswith("\n> \n")  # the shell's prompt then starts on a line of its own


def test_chat_answers_in_the_context_of_the_whole_conversation(tiny_model, monkeypatch, capsys, enc):
    params = SamplingParams(max_tokens=8, **GREEDY)
    monkeypatch.setattr(tiny_model, "checkpoint_info", {"template": "chat"}, raising=False)
    piped(monkeypatch, b"Hi!\nWhat is 2+2?\n")
    messages = chat(tiny_model, enc, params)
    first = "".join(generate(tiny_model, encode_prompt(messages[:1], "chat", enc), params, enc)).strip()
    second = "".join(generate(tiny_model, encode_prompt(messages[:3], "chat", enc), params, enc)).strip()
    alone = "".join(generate(tiny_model, encode_prompt(messages[2:3], "chat", enc), params, enc)).strip()
    assert second != alone  # the test can tell: the earlier turns change the answer
    assert [m["content"] for m in messages] == ["Hi!", first, "What is 2+2?", second]
    assert capsys.readouterr().out == f"{first}\n{second}\n"


def test_chat_with_a_seed_is_repeatable_and_seeds_each_answer_on_its_own(tiny_model, monkeypatch, enc):
    import generate as gen
    seeds, real = [], gen.generate

    def recording(model, ids, params, enc):
        seeds.append(params.seed)
        return real(model, ids, params, enc)
    monkeypatch.setattr(gen, "generate", recording)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        piped(monkeypatch, b"one\ntwo\n")
        runs.append(chat(tiny_model, enc, params))
    assert runs[0] == runs[1]  # --seed makes the whole conversation repeatable
    assert seeds == [7, 8, 7, 8]  # and no two answers draw the same random numbers


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(monkeypatch, capsys, enc):
    piped(monkeypatch, b"hello\n\xff\xfe bad\nhow are you?\n")
    messages = chat(eot_model(), enc, SamplingParams(max_tokens=20, **GREEDY))
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "how are you?"]
    assert "not valid UTF-8" in capsys.readouterr().err


def test_ctrl_c_during_an_answer_ends_that_answer_not_the_chat(tiny_model, monkeypatch, capsys, enc):
    import generate as gen
    real = gen.generate

    def interrupted_once(*args, **kwargs):
        if not interrupted_once.done:
            interrupted_once.done = True
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)
    interrupted_once.done = False
    monkeypatch.setattr(gen, "generate", interrupted_once)
    monkeypatch.setattr(tiny_model, "checkpoint_info", {"template": "chat"}, raising=False)
    piped(monkeypatch, b"first\nsecond\n")
    params = SamplingParams(max_tokens=4, **GREEDY)
    messages = chat(tiny_model, enc, params)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["first", "second"]
    assert messages[1]["content"] == ""  # the interrupted answer: nothing was said
    # the chat went on: the second answer is the model's answer to the whole conversation so far
    second = "".join(real(tiny_model, encode_prompt(messages[:3], "chat", enc), params, enc)).strip()
    assert messages[3]["content"] == second


def test_a_system_prompt_that_fills_the_context_is_refused_up_front(tiny_model, monkeypatch, capsys, enc):
    piped(monkeypatch, b"hi\n")
    with pytest.raises(SystemExit):
        chat(tiny_model, enc, SamplingParams(max_tokens=8), system="sys " * 200)
    assert "--system makes every prompt at least" in capsys.readouterr().err
    # one that leaves a little room is accepted, as fit_conversation accepts it (the answer is short)
    monkeypatch.setattr(tiny_model, "checkpoint_info", {"template": "chat"}, raising=False)
    piped(monkeypatch, b"hi\n")
    messages = chat(tiny_model, enc, SamplingParams(max_tokens=64, temperature=0), system="sys " * 110)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_chat_reads_a_text_stream_without_a_byte_buffer_too(monkeypatch, enc):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    messages = chat(eot_model(), enc, SamplingParams(max_tokens=5, **GREEDY))
    assert [m["content"] for m in messages] == ["hello", ""]


def test_a_tiny_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert [int(sample(logits, t, generator=g)) for t in (1e-45, 1e-300, 1e-30)] == [1] * 3


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A fine-tuned-style checkpoint: it names its chat template."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_checkpoint(path, template="chat")
    return path, model


@pytest.fixture(scope="module")
def base_ckpt(ckpt, tmp_path_factory):
    """The same weights saved as a base model: no template, so a prompt is text to continue."""
    path = tmp_path_factory.mktemp("base")
    ckpt[1].save_checkpoint(path)
    return path, ckpt[1]


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_prints_the_greedy_continuation_of_a_base_model(base_ckpt, enc):
    path, model = base_ckpt
    r = run_cli("--model", str(path), "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    expected = "".join(generate(model, encode("Hello there", enc), SamplingParams(max_tokens=12, **GREEDY), enc))
    assert expected.strip()  # the test is meaningful: the model does say something
    assert r.stdout == "Hello there" + expected + "\n"


def test_cli_prompt_asks_a_checkpoint_with_a_template_in_its_template(ckpt, enc, capsys):
    # the same as --compare and --chat: a fine-tuned model is asked, not continued (in-process: the
    # test above runs a real process)
    from generate import main
    path, model = ckpt
    main(["--model", str(path), "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    ids = encode_prompt([{"role": "user", "content": "Hello there"}], "chat", enc)
    expected = "".join(generate(model, ids, SamplingParams(max_tokens=12, **GREEDY), enc))
    continued = "".join(generate(model, encode("Hello there", enc), SamplingParams(max_tokens=12, **GREEDY), enc))
    assert expected.strip() and expected.strip() != continued.strip()  # the two ways really differ
    assert out == "Hello there\n" + expected.lstrip() + "\n"


def test_cli_chat_with_piped_stdin(ckpt, enc, monkeypatch, capsys):
    from generate import main
    path, model = ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\nWhat is 2+2?\n"))  # (not a terminal: no prompt shown)
    main(["--model", str(path), "--chat", "--temperature", "0", "--max-new-tokens", "8"])
    stdout = capsys.readouterr().out
    params = SamplingParams(max_tokens=8, **GREEDY)
    turns = [{"role": "user", "content": "Hi!"}]
    answer = "".join(generate(model, encode_prompt(turns, "chat", enc), params, enc)).strip()
    turns += [{"role": "assistant", "content": answer}, {"role": "user", "content": "What is 2+2?"}]
    second = "".join(generate(model, encode_prompt(turns, "chat", enc), params, enc)).strip()
    assert stdout == f"{answer}\n{second}\n"


BAD_FLAGS = {  # case: (extra flags, what the error must name)
    "negative-temperature": (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    "nan-temperature": (["--temperature", "nan"], "--temperature nan"),
    "huge-seed": (["--seed", str(10**23)], "--seed 1000"),
    "seed-past-the-last-sample": (["--seed", str(2**63 - 1), "--num-samples", "2"], "--seed 9223372036854775807"),
    "top-p-zero": (["--top-p", "0"], "--top-p 0.0"),
    "empty-stop": (["--stop", ""], "--stop is empty"),
    "system-without-chat": (["--system", "be brief"], "--system does not apply"),
    "device-xpu": (["--device", "xpu"], "bad --device 'xpu'"),
    "device-meta": (["--device", "meta"], "bad --device 'meta'"),
    "second-prompt-too-long": (["--prompt", "word " * 200], "prompt 2 of 2: the prompt is"),
}


@pytest.mark.parametrize("case", ["missing", "corrupt", "long-prompt", "long-prompt-base", "empty-prompt",
                                  "compare-chat-without-prompt", "unknown-template", "not-utf8", *BAD_FLAGS])
def test_cli_bad_input_is_a_one_line_error(ckpt, base_ckpt, tmp_path, monkeypatch, capsys, case):
    """In-process (a real process's start is tested by the other CLI tests): any exception other than
    SystemExit fails the test as a traceback would."""
    import generate as gen
    model = {"missing": str(tmp_path / "nope"), "corrupt": str(tmp_path),
             "long-prompt-base": str(base_ckpt[0])}.get(case, str(ckpt[0]))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    prompt = ["--prompt", {"empty-prompt": "", "long-prompt": "word " * 200, "long-prompt-base": "word " * 200,
                           "not-utf8": b"hi \xff".decode("utf-8", "surrogateescape")}.get(case, "hi")]
    flags, named = BAD_FLAGS.get(case, ([], "error:"))
    if case == "unknown-template":
        bad = tmp_path / "bad-template"
        ckpt[1].save_checkpoint(bad, template="foo")
        model, named = str(bad), "names template 'foo'"
    if case == "compare-chat-without-prompt":
        monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
        argv = ["--compare", model, model, "--chat", "--max-new-tokens", "4"]
    else:
        argv = ["--model", model, *prompt, "--max-new-tokens", "4", *flags]
    with pytest.raises(SystemExit) as e:
        gen.main(argv)
    assert e.value.code == 2  # (die's status: a bare sys.exit() would be 0)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], err
    assert out == ""  # nothing printed first: not even the echo of an over-long prompt


def test_cli_output_piped_into_head_ends_quietly(base_ckpt):
    cmd = [sys.executable, str(ROOT / "generate.py"), "--model", str(base_ckpt[0]), "--prompt", "hi",
           "--max-new-tokens", "100", "--num-samples", "20"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.read(10)
    p.stdout.close()  # the reader leaves, as `| head -c 10` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_cli_ctrl_c_exits_130_not_0(base_ckpt, monkeypatch):
    import generate as gen

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(gen, "generate", interrupted)
    with pytest.raises(SystemExit) as e:
        gen.main(["--model", str(base_ckpt[0]), "--prompt", "hi"])
    assert e.value.code == 130  # a shell sees an interrupted run, not a complete one


def test_weights_whose_logits_overflow_are_refused_at_load_in_one_line(base_ckpt, tmp_path, capsys):
    import generate as gen
    model = copy.deepcopy(base_ckpt[1])
    with torch.no_grad():
        model.wte.weight.mul_(1e38)  # each weight finite (the loader's check passes), their sums are not
    model.save_checkpoint(tmp_path / "huge")
    with pytest.raises(SystemExit):
        gen.main(["--model", str(tmp_path / "huge"), "--prompt", "hi"])
    assert capsys.readouterr().err == (f"error: {tmp_path / 'huge'}: its logits overflow to inf or NaN in float32 "
                                       "(weights too large?), so it cannot generate\n")


def test_logits_that_overflow_mid_answer_are_a_one_line_error(base_ckpt, monkeypatch, capsys):
    import generate as gen

    def overflowing(*args, **kwargs):  # a prompt that drives a finite model past float32's range
        yield "An"
        sample(torch.tensor([[0.0, float("inf")]]), 1.0)
    monkeypatch.setattr(gen, "generate", overflowing)
    with pytest.raises(SystemExit):
        gen.main(["--model", str(base_ckpt[0]), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert err.endswith("error: the logits hold NaN or inf (a diverged model?): nothing to sample from\n"), err


def test_cli_compare_prints_two_columns_and_seeded_samples_repeat(ckpt, capsys, monkeypatch, tmp_path, enc):
    from generate import main
    monkeypatch.setenv("COLUMNS", "400")  # wide enough for the checkpoint paths and answers on one row
    path, other = str(ckpt[0]), str(tmp_path / "other")
    torch.manual_seed(1)
    other_model = GPT(ckpt[1].config).eval()
    other_model.save_checkpoint(other, template="chat")
    main(["--compare", path, other, "--prompt", "Name three colors.", "--temperature", "0", "--max-new-tokens", "12"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "=== Name three colors." and [c.strip() for c in lines[1].split(" | ")] == [path, other]
    ids = encode_prompt([{"role": "user", "content": "Name three colors."}], "chat", enc)
    expected = ["".join(generate(m, ids, SamplingParams(max_tokens=12, **GREEDY), enc)).strip()
                for m in (ckpt[1], other_model)]
    assert expected[0] != expected[1]  # the test can tell the columns apart
    columns = [" ".join(" ".join(r.split(" | ")[k] for r in lines[3:]).split()) for k in (0, 1)]
    assert columns == [" ".join(e.split()) for e in expected]  # each column is its own model's answer
    args = ["--model", path, "--prompt", "Hi", "--num-samples", "2", "--seed", "3", "--max-new-tokens", "10"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first  # --seed makes sampling repeatable
    samples = first.split("---------- sample ")[1:]
    assert len(samples) == 2 and samples[0][1:] != samples[1][1:]


@pytest.mark.parametrize("layout", ["in_out", "onednn"])
def test_each_cpu_layout_computes_the_same_logits_and_greedy_tokens(tiny_model, layout):
    import copy
    from inference import CpuLinear, pack_for_cpu
    packed = pack_for_cpu(copy.deepcopy(tiny_model), layout=layout)
    assert packed.cpu_layout == layout
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())  # every matmul is swapped
    swapped = [m for m in packed.modules() if isinstance(m, CpuLinear)]
    assert len(swapped) == 2 * 4 + 1 and all(m.layout == layout for m in swapped)  # head included
    idx = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(packed(idx), tiny_model(idx), atol=1e-5, rtol=1e-5)
    prompt = idx[0].tolist()
    params = SamplingParams(max_tokens=40, temperature=0.0)
    plain = list(generate_tokens(tiny_model, prompt, params))
    assert list(generate_tokens(packed, prompt, params)) == plain
    assert list(generate_tokens(packed, prompt, params, static=True)) == plain


def test_pack_for_cpu_keeps_the_layout_that_measured_fastest(tiny_model, monkeypatch):
    import copy
    from types import SimpleNamespace
    import inference
    clock = iter(range(1_000_000))  # each perf_counter() call advances 1 s ...
    slow = {"linear": 5, "in_out": 1, "onednn": 3}  # ... plus a per-layout cost charged by each matmul
    linear_forward, cpu_forward = torch.nn.Linear.forward, inference.CpuLinear.forward

    def charged(forward, layout_of):
        def f(self, x):
            for _ in range(slow[layout_of(self)]):
                next(clock)
            return forward(self, x)
        return f
    monkeypatch.setattr(inference, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(torch.nn.Linear, "forward", charged(linear_forward, lambda m: "linear"))
    monkeypatch.setattr(inference.CpuLinear, "forward", charged(cpu_forward, lambda m: m.layout))
    model = inference.pack_for_cpu(copy.deepcopy(tiny_model))
    assert model.cpu_layout == "in_out"
    swapped = [m for m in model.modules() if isinstance(m, inference.CpuLinear)]
    assert len(swapped) == 2 * 4 + 1 and all(m.layout == "in_out" for m in swapped)
    slow["onednn"] = 0
    assert inference.pack_for_cpu(copy.deepcopy(tiny_model)).cpu_layout == "onednn"
    slow["linear"] = 0
    model = inference.pack_for_cpu(copy.deepcopy(tiny_model))
    assert model.cpu_layout == "linear" and not any(isinstance(m, inference.CpuLinear) for m in model.modules())


def test_only_the_first_weights_are_timed(monkeypatch):
    import inference
    monkeypatch.setattr(inference, "TUNE_BYTES", 3 * 64 * 64 * 4)
    timed = []
    monkeypatch.setattr(inference.CpuLinear, "forward", lambda self, x: timed.append(self.weight.shape))
    linears = [torch.nn.Linear(64, 64) for _ in range(10)]
    inference.fastest_layout(linears, ["in_out"])
    assert len(timed) == 3  # one sweep over the first 3 (one candidate: no warm-up, no repeat)


def test_pack_for_cpu_skips_a_layout_that_cannot_run(tiny_model, monkeypatch):
    import inference
    linears = [m for m in tiny_model.modules() if isinstance(m, torch.nn.Linear)]

    def refuse(self, x):
        raise RuntimeError("unsupported")
    monkeypatch.setattr(inference.CpuLinear, "forward", refuse)  # no layout but nn.Linear's runs
    assert inference.pack_for_cpu(tiny_model).cpu_layout == "linear"
    assert [m for m in tiny_model.modules() if isinstance(m, torch.nn.Linear)] == linears  # nothing half-swapped
    with pytest.raises(ValueError, match="unknown layout 'packed'"):
        inference.pack_for_cpu(tiny_model, layout="packed")


def test_pack_for_cpu_without_onednn_never_tries_it(tiny_model, monkeypatch):
    import copy
    import inference
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)

    tried = []

    def missing(*args):  # what looking up an op of a library the build lacks raises
        tried.append(args)
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_reorder_linear_weight'")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing, raising=False)
    assert inference.pack_for_cpu(copy.deepcopy(tiny_model), layout="onednn").cpu_layout == "linear"
    model = inference.pack_for_cpu(copy.deepcopy(tiny_model))
    assert model.cpu_layout in ("linear", "in_out")
    assert tried == []  # oneDNN was never tried, not tried and failed
    assert all(m.layout == "in_out" for m in model.modules() if isinstance(m, inference.CpuLinear))


def test_cli_help_shows_each_default_once(capsys):
    from generate import main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "(default: 128)" in out and "(default: 0.8)" in out  # from the formatter, read off the parser
    assert "default 128" not in out and out.count("0.8") == 1  # no hand-written copies to drift


def test_chat_commands_say_what_they_did_and_help_lists_them(ckpt, enc, monkeypatch, capsys):
    import generate as gen
    path, model = ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nHi!\n/reset\n/nope\nHi!\n/quit\nnever sent\n"))
    gen.main(["--model", str(path), "--chat", "--temperature", "0", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    answer = "".join(generate(model, encode_prompt([{"role": "user", "content": "Hi!"}], "chat", enc),
                              SamplingParams(max_tokens=6, **GREEDY), enc)).strip()
    assert out == f"{answer}\n{answer}\n"  # after /reset, "Hi!" is asked afresh; after /quit, nothing
    assert all(f"  {name}" in err for name in ("/help", "/reset", "/quit"))
    assert "(a new conversation)" in err and "(unknown command /nope: /help lists them; nothing was sent)" in err


def test_max_new_tokens_past_the_context_says_how_many_fit(base_ckpt, enc, capsys):
    from generate import main
    path, _ = base_ckpt
    main(["--model", str(path), "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "500"])
    room = 128 - len(encode("Hello there", enc))
    assert capsys.readouterr().err == (f"note: --max-new-tokens 500, but the 128-token context has room for {room} "
                                       "after this prompt: the answer stops when it is full\n")
    main(["--model", str(path), "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "5"])
    assert capsys.readouterr().err == ""  # room enough: nothing to say
    main(["--model", str(path), "--prompt", "Hi", "--prompt", "Hello there", "--max-new-tokens", "500"])
    assert capsys.readouterr().err.splitlines()[1] == (f"note: prompt 2 of 2: --max-new-tokens 500, but the 128-token "
                                                       f"context has room for {room} after this prompt: the answer "
                                                       "stops when it is full")


def test_chat_with_a_model_never_fine_tuned_says_so_in_one_line(base_ckpt, monkeypatch, capsys):
    import generate as gen
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\n"))
    gen.main(["--model", str(base_ckpt[0]), "--chat", "--temperature", "0", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert err == ("note: this model's checkpoint names no chat template of ours (never fine-tuned here?): it "
                   "chats in the 'chat' template, which it may never have learned\n")


# ----------------------------------------------------------------------------- int8 weights on the CPU

def test_int8_replaces_every_matrix_and_keeps_the_logits_close(tiny_model):
    import inference
    model = inference.quantize_int8(copy.deepcopy(tiny_model))
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]  # the head too
    assert model.wte.weight.dtype == torch.float32  # the embedding, a lookup, stays as it was
    ids = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, int8 = tiny_model(ids), model(ids)
    # int8 weights (a scale per row) and inputs: the next-token distributions all but the same
    kl = torch.nn.functional.kl_div(int8.log_softmax(-1), exact.log_softmax(-1), log_target=True,
                                    reduction="batchmean") / ids.shape[1]
    assert kl < 1e-3  # nats per position (measured: 1e-5 on this random model)
    assert (int8 - exact).abs().mean() < 0.03 * exact.std()


def test_int8_through_the_engine_gives_the_tokens_generate_gives(tiny_model):
    """One sequence at a time: the input's int8 scale is the whole forward pass's, so a batch of
    several could shift a near tie (quantize_int8); alone, both paths quantize the same numbers."""
    import inference
    from engine import Engine
    model = inference.quantize_int8(copy.deepcopy(tiny_model))
    prompts = [encode(t) for t in ("Once upon a time", "The cat sat on", "Hello")]
    params = SamplingParams(max_tokens=12, **GREEDY)
    alone = [list(generate_tokens(model, p, params)) for p in prompts]
    engine = Engine(model, max_num_seqs=1)
    assert [engine.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts] == alone


def test_dtype_int8_off_the_cpu_is_a_one_line_error(capsys):
    from common import dtype_or_die
    assert dtype_or_die(torch.device("cpu"), "int8") == (torch.float32, True)
    with pytest.raises(SystemExit):
        dtype_or_die(torch.device("cuda"), "int8")
    assert capsys.readouterr().err == ("error: --dtype int8 runs on the CPU only, not on cuda: add --device cpu "
                                       "(or use bfloat16 on cuda)\n")


@pytest.mark.parametrize("bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                 (False, False, "float32")])
def test_dtype_auto_is_bf16_only_on_a_cpu_that_computes_in_it_and_says_which(monkeypatch, capsys, bf16, amx, expected):
    from common import dtype_or_die
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dtype_or_die(torch.device("cpu"), "auto") == (getattr(torch, expected), False)
    isa = "AVX512-BF16" if bf16 else "AMX"
    why = f"this CPU has {isa}" if expected == "bfloat16" else "this CPU has no native bf16 arithmetic"
    assert capsys.readouterr().err == f"--dtype auto: {expected} ({why})\n"
    assert dtype_or_die(torch.device("mps"), "auto") == (torch.float32, False)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_dtype_auto_on_cuda_is_bf16_only_on_a_gpu_that_computes_in_it(monkeypatch, native, expected):
    from common import dtype_or_die
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert dtype_or_die(torch.device("cuda"), "auto") == (expected, False)


def test_bench_generate_reads_llama_cpps_own_timings():
    """bench_generate.py --llama-cpp times llama.cpp by the figures llama.cpp prints (these lines are
    llama-completion's, GPT-2 124M in q8_0): the total covers prompt, decode and sampling, as our
    timing does; the prompt's token count checks that both read the same prompt."""
    import bench_generate
    log = """0.00.740.981 I common_perf_print:    sampling time =       4.26 ms
0.00.740.990 I common_perf_print:        load time =     285.01 ms
0.00.740.992 I common_perf_print: prompt eval time =      24.26 ms /     6 tokens (    4.04 ms per token,   247.31 tokens per second)
0.00.740.993 I common_perf_print:        eval time =     257.70 ms /    31 runs   (    8.31 ms per token,   120.29 tokens per second)
0.00.740.994 I common_perf_print:       total time =     289.67 ms /    37 tokens
"""
    assert bench_generate.llama_cpp_timings(log) == {"total_ms": 289.67, "prompt_tokens": 6}
    assert bench_generate.llama_cpp_timings("main: error: unknown argument: -no-cnv\n") is None
