"""Generate text with GPT-2: sampling, a KV cache, streaming output, a chat REPL.

    python generate.py --prompt "The meaning of life is" --temperature 0.8 --top-p 0.95
    python generate.py --model out/sft --chat
    python generate.py --compare gpt2 out/sft --prompt "Name three colors."

Generating one token at a time would recompute attention over the whole prefix at every step. The
KV cache keeps each layer's keys and values, so after the prompt ("prefill") every step feeds only
the newest token ("decode"). Our cache is one contiguous tensor per k and v, preallocated at the
full length, written in place: no allocation or concatenation per step. It plugs into the model
through gpt.py's seam, `cache.attend(layer, q, k, v)`.

The decode step has two forms. The eager step attends over the cache slice filled so far. The
static step never changes shape (it attends over the whole buffer with a mask and takes its
position from a tensor), which is what a CUDA graph needs: on CUDA the step is recorded once per
model (decode_step keeps it for later calls) and replayed, so a token costs one graph launch instead
of hundreds of kernel launches. The static step
runs on CPU too, which is how its correctness is tested on a machine without a GPU.
On a CPU the step is bound by reading the weights, and `pack_for_cpu` stores them in the layout
this CPU's matrix libraries read fastest, measured at load (see the README for what it gives).

Sampling (temperature, top-k, top-p, per row of a batch) and TextStream (bytes -> text that is safe
to print, and stop strings) live here once; serve.py imports them.

A prompt that leaves no room in the context is an error (we never silently drop the start of what
you wrote); in --chat the oldest turns are dropped to make room, and only a single message too long
to fit is refused. Generation stops at <|endoftext|>, at a --stop string, at --max-new-tokens, or
when the context is full.
"""

import argparse
import codecs
import itertools
import math
import os
import shutil
import sys
import textwrap
import threading
import time
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from data import TEMPLATES, encode_prompt
from gpt import EOT, HelpFormatter, default_dtype, die, encode, device_or_die, get_tokenizer, load_or_die


# ----------------------------------------------------------------------------- sampling

@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = all
    stop: list[str] = field(default_factory=list)  # stop strings: never emitted, end the text
    seed: int | None = None


NUCLEUS_CANDIDATES = (1024, 8192)  # top_p looks among the 1024 most likely tokens first, then the 8192


def per_row(value, rows):
    """One setting for every row, or already a list of one per row -> a list of one per row."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def candidates(logits, top_k=0, top_p=1.0):
    """The tokens that sampling may draw from each row of logits (B, V), most likely first: (ids,
    probs), both (B, n), probs zero where a filter drops the token (`draw` takes them as they are:
    they need not sum to 1). top_k keeps exactly the k most likely tokens (0 = all); top_p then
    keeps the smallest set of most likely tokens whose probability, renormalized over the top_k set,
    reaches p. Each is one value, or a list of one per row. Sorting a 50,257-token row takes
    milliseconds on a CPU, more than a whole decode step of a small model, while a trained model's
    nucleus is usually a small part of the vocabulary: so it is looked for among the 1024 most likely
    tokens first (a partial sort, torch.topk: a tenth of the time or less), then the 8192 most
    likely, and among all only when those hold less than p."""
    logits = logits.float()
    B, V = logits.shape
    k = torch.tensor([n if 0 < n < V else V for n in per_row(top_k, B)], device=logits.device)[:, None]
    p = torch.tensor(per_row(top_p, B), device=logits.device, dtype=torch.float32)[:, None]
    search = (k == V) & (p < 1.0)  # the rows whose nucleus is looked for among the likeliest first
    sizes = [int(k.max())]
    if search.any() and not ((k == V) & (p >= 1.0)).any():  # (a row without filters needs every token)
        least = int(k[k < V].max()) if (k < V).any() else 0  # (a row with top_k needs its k tokens)
        sizes = [n for n in NUCLEUS_CANDIDATES if least <= n < V] + [V]
    for n in sizes:
        # most likely first (a full sort when all are needed: faster than a top-k of every token)
        values, ids = torch.sort(logits, dim=-1, descending=True) if n == V else torch.topk(logits, n, dim=-1)
        in_top_k = torch.arange(n, device=logits.device) < k
        # each row's probabilities over its top_k set (the whole vocabulary without top_k)
        norm = torch.where(k == V, torch.logsumexp(logits, -1, keepdim=True),
                           torch.logsumexp(values.masked_fill(~in_top_k, float("-inf")), -1, keepdim=True))
        probs = (values - norm).exp() * in_top_k
        if n == sizes[-1] or bool((probs.sum(-1, keepdim=True) >= p)[search].all()):  # the nuclei are in
            break
    keep = (probs.cumsum(-1) - probs < p) | (p >= 1.0)  # the more likely tokens had not yet reached p
    keep[:, 0] = True  # the most likely token always stays (even with top_p 0)
    return ids, probs * keep


def draw(probs, u):
    """One index per row of probs (B, n), drawn in proportion to them (they need not sum to 1), given
    a uniform number u in [0, 1) per row (B,): where u falls in their running sum (inverse-CDF
    sampling). What torch.multinomial does, in a twentieth of its time on a CPU for a 50,257-token
    row (0.12 ms against 2.7 ms, one thread); and the random numbers come in, so that each row can
    take its own from its own generator (see uniforms)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # else an id past the end would come out
        raise ValueError("the logits hold NaN or inf (a diverged model?): nothing to sample from")
    # u * total can round up to total itself: kept just below it, the first running sum past it is
    # always that of a token with a nonzero probability
    x = torch.minimum(u[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)  # the first token whose running sum passes x


def uniforms(generators, device):
    """A uniform number in [0, 1) for each row, from that row's own generator where it has one (a
    seeded request's draws then do not depend on which requests share its batch), else from
    PyTorch's global one, in one call for all those rows."""
    u = torch.empty(len(generators), device=device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        u[shared] = torch.rand(len(shared), device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    return u


def sample(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """Logits (B, V) -> next token ids (B,). temperature 0 picks the argmax; top_k and top_p as in
    `candidates`. Each setting, and the generator, is one value for all rows, or a list of one per
    row: serve.py samples a whole batch of requests, each with its own settings and seed, at once."""
    B = logits.size(0)
    temperature, top_k, top_p, generator = (per_row(x, B) for x in (temperature, top_k, top_p, generator))
    rows = [i for i in range(B) if temperature[i] > 0]
    greedy = [i for i in range(B) if temperature[i] <= 0]
    if not rows:
        return logits.argmax(-1)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    if greedy:
        tokens[greedy] = logits[greedy].argmax(-1)
    # shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others
    # to -inf (nearly greedy) instead of overflowing every logit to inf (NaN probabilities)
    # (and the divisor no smaller than float32's least normal: 1e-300 would round to 0, and 0 / 0 is NaN)
    logits = (logits if len(rows) == B else logits[rows]).float()
    t = torch.tensor([max(temperature[i], torch.finfo(torch.float32).tiny) for i in rows], device=logits.device)
    logits = (logits - logits.max(-1, keepdim=True).values).div_(t[:, None])
    u = uniforms([generator[i] for i in rows], logits.device)
    V = logits.size(-1)
    has_filter = [0 < top_k[i] < V or top_p[i] < 1.0 for i in rows]
    filtered = [j for j, f in enumerate(has_filter) if f]
    plain = [j for j, f in enumerate(has_filter) if not f]
    drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    if filtered:  # drawn among the few tokens that may be drawn
        some = logits if not plain else logits[filtered]  # (no copy when every row is filtered)
        ids, probs = candidates(some, [top_k[rows[j]] for j in filtered], [top_p[rows[j]] for j in filtered])
        drawn[filtered] = ids.gather(-1, draw(probs, u[filtered])[:, None]).squeeze(-1)
    if plain:  # drawn among all tokens, in vocabulary order (no sort needed)
        some = logits if not filtered else logits[plain]
        drawn[plain] = draw(some.exp(), u[plain])  # exp(logit - the largest): the probability times a constant
    tokens[rows] = drawn
    return tokens


class TextStream:
    """Token ids in, printable text out. Two things make this more than enc.decode:

    - GPT-2's BPE works on bytes, so one character (an emoji, a CJK ideograph) can span tokens; an
      incremental UTF-8 decoder holds back an unfinished character until its last byte arrives.
    - A stop string may arrive split across tokens ("\\nUs" + "er:"), so any tail of the text that
      could be the start of a stop string is held back until it either completes (stop: it and
      everything after it are dropped) or cannot anymore (it is released).
    """

    def __init__(self, enc, stop=()):
        self.enc = enc
        self.stop = [s for s in stop if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet emitted
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token_id):
        """Add one token; return the new text that is safe to emit now (may be "")."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.enc.decode_single_token_bytes(token_id))
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        longest = len(self.pending)  # (a longer start of a stop string cannot be what pending ends with)
        hold = max((n for s in self.stop for n in range(1, min(len(s), longest + 1))
                    if self.pending.endswith(s[:n])), default=0)
        return self._emit(len(self.pending) - hold)

    def finish(self):
        """Flush what is left (an unfinished character becomes U+FFFD) unless a stop string ended it."""
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._emit(len(self.pending))

    def _emit(self, n):
        out, self.pending = self.pending[:n], ("" if self.stopped else self.pending[n:])
        self.text += out
        return out


# ----------------------------------------------------------------------------- the KV cache

class KVCache:
    """Keys and values of every layer for B sequences of equal length, preallocated as two contiguous
    (n_layer, B, n_head, max_len, head_dim) tensors and written in place."""

    def __init__(self, config, batch_size, max_len, device="cpu", dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.max_len = config.n_layer, max_len
        self.length = 0  # tokens cached so far
        self.positions = torch.arange(max_len, device=device)
        self.static_pos = self.static_mask = None  # set by StaticStep: the fixed-shape path

    def attend(self, layer, q, k, v):
        if self.static_mask is not None:
            return self._attend_static(layer, q, k, v)
        start, end = self.length, self.length + q.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full ({self.max_len} tokens)")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if q.size(2) == 1:  # one new token may see everything cached: no mask to build
            y = F.scaled_dot_product_attention(q, keys, values)
        elif start == 0:  # a fresh prompt: plain causal attention
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # new tokens after a cached prefix: query i sees keys 0..start+i
            mask = torch.ones(q.size(2), end, dtype=torch.bool, device=q.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        if layer == self.n_layer - 1:  # the last layer has stored its k, v: these tokens are cached
            self.length = end
        return y

    def _attend_static(self, layer, q, k, v):
        # Fixed shapes and no Python ints: the write position is a tensor, the mask hides the
        # unwritten part of the buffer. StaticStep moves self.length forward.
        pos = self.static_pos
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=self.static_mask)


class StaticStep:
    """The one-token decode step with static shapes: logits = step(token ids (B,)). With graph=True
    (CUDA only) the step is captured once as a CUDA graph and then replayed: its inputs are copied
    into fixed buffers, and its output is always the same tensor (read it before the next call).
    The tests run the static step on CPU; the graph capture itself needs a GPU to be exercised."""

    def __init__(self, model, cache, graph=False):
        # (a weak reference: decode_step keeps the step on the model, and a cycle would keep a deleted
        # model's weights and graph memory on the GPU until Python's cycle collector runs)
        self.model, self.cache, self.graph = weakref.proxy(model), cache, None
        self.lock = threading.Lock()  # held by the generation using it (see decode_step)
        device = cache.k.device
        B = cache.k.size(1)
        self.idx = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), cache.length, dtype=torch.long, device=device)
        cache.static_pos = self.pos
        if graph:
            # Warm up on a side stream (as CUDA graphs require), then record. Both only write k, v at
            # position cache.length, which the prefill or the first real step overwrites.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            cache.static_mask = None  # (recorded in the graph) leave the cache usable by the eager prefill

    def _forward(self):
        self.cache.static_mask = self.cache.positions[None] <= self.pos  # keys 0..pos, (1, max_len)
        h = self.model.hidden(self.idx, pos=self.pos, cache=self.cache)
        return self.model.lm_head(h[:, -1])

    def __deepcopy__(self, memo):  # (kept on a model by decode_step) a copied model makes its own:
        return None                 # a CUDA graph cannot be copied

    def __call__(self, tokens):
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"KV cache is full ({self.cache.max_len} tokens)")
        self.idx.copy_(tokens.view(-1, 1))
        self.pos.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
            self.cache.static_mask = None  # leave the cache usable by the eager path
        self.cache.length += 1
        return logits


# ----------------------------------------------------------------------------- generation

class CpuLinear(torch.nn.Module):
    """An nn.Linear for CPU inference, its weight stored in another layout that the CPU's matrix
    libraries may read faster in a matrix-vector product (which one is faster depends on the CPU:
    pack_for_cpu measures). The numbers are the same fp32 weights; only their order in memory
    changes, so the output is what nn.Linear computes, to rounding. Layouts:

      "in_out"  [in, out], as OpenAI's Conv1D stored it: x @ W is one addmm (what transformers runs)
      "onednn"  pre-packed once by oneDNN, PyTorch's CPU kernel library, into the blocked layout its
                matrix-vector kernel streams (the packing torch.compile does for frozen CPU models)
    """

    LAYOUTS = ("in_out", "onednn")

    def __init__(self, linear, layout):
        super().__init__()
        weight = linear.weight.detach()
        self.layout, self.out_features = layout, linear.out_features
        if layout == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        else:
            self.weight = weight.t().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        rows = x.reshape(-1, x.shape[-1])
        y = rows @ self.weight if self.bias is None else torch.addmm(self.bias, rows, self.weight)
        return y.view(*x.shape[:-1], self.out_features)


TUNE_BYTES = 512 * 2**20  # weights timed per layout: more than a CPU's last-level cache, so memory is measured


def fastest_layout(linears, candidates):
    """The candidate layout under which a one-row product through each of the first TUNE_BYTES of
    these weights (all of GPT-2 124M's) takes least time: one warm-up sweep, then the best of two.
    A layout this build or dtype cannot run (oneDNN with float16, say) is skipped; "linear" (nn.Linear
    as it is) when none runs."""
    sample, size = [], 0
    for linear in linears:
        if size >= TUNE_BYTES:
            break
        sample.append(linear)
        size += linear.weight.numel() * linear.weight.element_size()
    inputs = [torch.zeros(1, linear.in_features, dtype=linear.weight.dtype) for linear in sample]
    best = (math.inf, "linear")
    with torch.inference_mode():
        for layout in candidates:
            try:
                modules = sample if layout == "linear" else [CpuLinear(linear, layout) for linear in sample]
                times = []
                for _ in range(3 if len(candidates) > 1 else 1):
                    start = time.perf_counter()
                    for module, x in zip(modules, inputs):
                        module(x)
                    times.append(time.perf_counter() - start)
            except (RuntimeError, AttributeError):  # e.g. oneDNN with float16 weights, or its ops missing
                continue
            best = min(best, (min(times[1:] or times), layout))
            del modules  # (one candidate's copy of the weights at a time)
    return best[1]


def pack_for_cpu(model, layout=None):
    """Make a model faster to run on the CPU: store every nn.Linear's weight in the layout this CPU
    reads fastest. A decode step multiplies one row by every weight matrix, so it is bound by
    reading the weights (~500 MB per token for the 124M model), and how fast a matrix-vector product
    streams them depends on the layout and the CPU: on one 2-core VM the oneDNN-packed layout read
    them twice as fast as nn.Linear's BLAS call, on another it was the slowest of the three. So,
    unless `layout` names one ("linear" keeps nn.Linear), each is timed (fastest_layout, about a
    second at load) and the fastest is installed; a layout that cannot run here falls back to
    "linear". Inference only: the new weights are not parameters, so training and state_dict no
    longer see them, and the head gets its own copy of the token embedding. Sets model.cpu_layout
    to the layout chosen; returns the model."""
    if layout not in (None, "linear", *CpuLinear.LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}: linear, {', '.join(CpuLinear.LAYOUTS)}")
    linears = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if isinstance(child, torch.nn.Linear) and child.weight.device.type == "cpu"]
    if not linears:  # (a model on a GPU)
        return model
    candidates = [layout] if layout else ["linear", *CpuLinear.LAYOUTS]
    if not torch.backends.mkldnn.is_available():  # a PyTorch build without oneDNN lacks its ops
        candidates = [c for c in candidates if c != "onednn"]
    model.cpu_layout = fastest_layout([linear for _, _, linear in linears], candidates)
    while model.cpu_layout != "linear" and linears:  # popped: each old weight is freed once replaced,
        module, name, linear = linears.pop()               # so memory peaks at one layer over the model
        setattr(module, name, CpuLinear(linear, model.cpu_layout))
    return model


def decode_step(model, needed, graph):
    """The StaticStep for `model` over a batch-1 KV cache of at least `needed` tokens, made on the first
    call and kept on the model (as model.decode_step) for the calls after it. Capturing a CUDA graph
    takes two warm-up steps and a recording, so a chat, sft.py's test answers or a benchmark that
    generates again replays the graph it already has instead (vLLM too captures its graphs once).
    The cache is rounded up to a power of two, so a longer prompt seldom needs a new capture; what an
    earlier call left in it lies beyond the new prompt, where the step's mask hides it until it is
    overwritten. A graph reads the weights where they were at capture: so the step is made again when
    a parameter was replaced rather than updated in place (or the model was moved, cast or switched to
    train mode), never replayed over freed memory. The caller holds the step's lock until it is done
    with it: a second generation at the same time (an interleaved generator, a thread) gets a step
    of its own, not kept, instead of sharing a cache."""
    weights = (model.training, tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())))
    size = min(model.config.block_size, 1 << max(6, (needed - 1).bit_length()))

    def new_step():
        cache = KVCache(model.config, 1, size, model_device(model), model.wte.weight.dtype)
        step = StaticStep(model, cache, graph)
        step.weights = weights
        return step
    step = getattr(model, "decode_step", None)
    if step is None or step.weights != weights or step.cache.max_len < needed or (step.graph is not None) != graph:
        model.decode_step = None  # free the old graph and cache before making new ones (unless in use)
        step = model.decode_step = new_step()
    if not step.lock.acquire(blocking=False):  # in use by another generation
        step = new_step()
        step.lock.acquire()
    step.cache.length = 0
    return step


class PromptTooLong(ValueError):
    pass


def model_device(model):
    return next(model.parameters()).device


def check_prompt(prompt_ids, n_ctx):
    """Raise ValueError (PromptTooLong if so) unless the prompt leaves room for at least one new token.
    Call it before printing anything: generate_tokens checks too, but only once it is iterated."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= n_ctx:
        raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens; the model's context holds {n_ctx} "
                            f"(prompt plus new tokens)")


@torch.inference_mode()
def generate_tokens(model, prompt_ids, params, static=None):
    """Yield new token ids one at a time, starting from `prompt_ids` (list of ints). Stops after
    params.max_tokens tokens, when the context is full, or at <|endoftext|> (which is not yielded).
    Stop strings are text, not tokens: see TextStream and `generate`. `static`: use StaticStep for
    decoding, made once per model by decode_step (default: on CUDA, as a CUDA graph). On CPU,
    pack_for_cpu(model) first is faster."""
    device = model_device(model)
    n_ctx = model.config.block_size
    check_prompt(prompt_ids, n_ctx)
    budget = min(params.max_tokens, n_ctx - len(prompt_ids))
    if budget <= 0:
        return
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    step = None
    if ((device.type == "cuda") if static is None else static) and budget > 1:
        step = decode_step(model, len(prompt_ids) + budget, graph=device.type == "cuda")
        cache = step.cache
    else:
        cache = KVCache(model.config, 1, len(prompt_ids) + budget, device, model.wte.weight.dtype)
    try:
        # prefill: the whole prompt in one forward pass, logits for the last position only
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        logits = model.lm_head(model.hidden(idx, pos=cache.positions[:len(prompt_ids)], cache=cache)[:, -1])
        for i in range(budget):
            token = sample(logits, params.temperature, params.top_k, params.top_p, generator)
            t = int(token[0])
            if t == EOT:
                return
            yield t
            if i == budget - 1:
                return
            if step is not None:
                logits = step(token)
            else:  # eager decode: attend over the filled part of the cache
                pos = cache.positions[cache.length:cache.length + 1]
                logits = model.lm_head(model.hidden(token.view(1, 1), pos=pos, cache=cache)[:, -1])
    finally:
        if step is not None:  # (also when the caller stops early: closing a generator runs this)
            step.lock.release()


def generate(model, prompt_ids, params, enc=None, **kwargs):
    """Yield the generated text in printable pieces (whole characters, stop strings removed)."""
    stream = TextStream(enc or get_tokenizer(), params.stop)
    for t in generate_tokens(model, prompt_ids, params, **kwargs):
        piece = stream.push(t)
        if piece:
            yield piece
        if stream.stopped:
            return
    piece = stream.finish()
    if piece:
        yield piece


# ----------------------------------------------------------------------------- chat

def strip_answer_start(piece, started):
    """Chat templates cue the answer with "Assistant:" and the model learned " " + content, so an
    answer begins with whitespace nobody wants to see. Feed the pieces of an answer in order, with
    started=False at first: returns (the piece, its leading whitespace dropped until the answer has
    started, started). The one place for this: generate.py (chat and --prompt) and serve.py use it."""
    if not started:
        piece = piece.lstrip()
        started = bool(piece)
    return piece, started


def fit_conversation(messages, template, n_ctx, reserve, enc):
    """Prompt ids for the next answer, dropping the oldest turns (system prompts stay) until the
    prompt leaves `reserve` tokens for the answer, or only the new message is left (PromptTooLong if
    it alone fills the context). Returns (ids, messages kept)."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        ids = encode_prompt(system + turns, template, enc)
        if len(ids) + reserve <= n_ctx or len(turns) == 1:
            break
        turns = turns[1:]
        while turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    if len(ids) >= n_ctx:
        raise PromptTooLong(f"that message makes a prompt of {len(ids)} tokens; the context holds {n_ctx}")
    return ids, system + turns


def chat(model, enc, params, system=None):
    """A multi-turn conversation on stdin/stdout in the checkpoint's template; works piped too.
    Returns the conversation (the turns still within the context)."""
    template = getattr(model, "checkpoint_info", {}).get("template") or "chat"
    n_ctx = model.config.block_size
    reserve = min(params.max_tokens, n_ctx // 4)  # room kept for the answer when dropping old turns
    messages = [{"role": "system", "content": system}] if system else []
    least = len(encode_prompt(messages + [{"role": "user", "content": "hi"}], template, enc))
    if least >= n_ctx:  # (else every message would be refused, for the system prompt's fault)
        die(f"--system makes every prompt at least {least} tokens: the {n_ctx}-token context has no room "
            f"left to answer")
    tty = sys.stdin.isatty()
    stdin = getattr(sys.stdin, "buffer", sys.stdin)  # (a text stream without one, e.g. io.StringIO: as is)
    turn = -1
    if tty:
        print(f"chat ({template} template, {n_ctx}-token context); /reset to start over, "
              f"Ctrl-C stops an answer, Ctrl-D quits")
    while True:
        if tty:
            print("> ", end="", flush=True)
        try:  # bytes, decoded here: a line that is not UTF-8 is refused, not garbled (or fatal)
            raw = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, as Ctrl-D does
            print(file=sys.stderr)
            break
        if not raw:  # Ctrl-D (end of input)
            if tty:
                print()  # end the prompt's line, so the shell's prompt starts on its own
            break
        try:
            line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).strip()
        except UnicodeDecodeError as e:
            print(f"error: that line is not valid UTF-8 (byte {e.start}); it was skipped", file=sys.stderr)
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line:
            continue
        try:
            ids, messages = fit_conversation(messages + [{"role": "user", "content": line}],
                                             template, n_ctx, reserve, enc)
        except PromptTooLong as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        answer, started = "", False
        # with --seed, each answer its own seed: one seed for all would repeat the same draws every turn
        turn += 1
        seeded = params if params.seed is None else replace(params, seed=params.seed + turn)
        try:
            for piece in generate(model, ids, seeded, enc):
                piece, started = strip_answer_start(piece, started)
                answer += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C during an answer stops that answer, not the conversation
            pass
        print(flush=True)
        messages.append({"role": "assistant", "content": answer.rstrip()})
    return messages


# ----------------------------------------------------------------------------- the CLI

def load_model(name, device, dtype):
    model = load_or_die(name, device=device, dtype=dtype)
    template = model.checkpoint_info.get("template")
    if template is not None and template not in TEMPLATES:
        die(f"{name}: config.json names template {template!r}; known: {', '.join(TEMPLATES)}")
    return pack_for_cpu(model) if device.type == "cpu" else model


def answer_ids(model, prompt, enc):
    """A fine-tuned checkpoint is asked in its chat template; a base model continues the text."""
    template = getattr(model, "checkpoint_info", {}).get("template")
    if template:
        return encode_prompt([{"role": "user", "content": prompt}], template, enc)
    return encode(prompt, enc)


def checked_answer_ids(model, prompt, enc, label=""):
    """answer_ids, or a one-line error (starting with the prompt's `label`) if they leave no room to
    answer: checked before printing."""
    ids = answer_ids(model, prompt, enc)
    try:
        check_prompt(ids, model.config.block_size)
    except ValueError as e:
        die(f"{label}{e}")
    return ids


def side_by_side(left, right, titles):
    """Two texts in two columns, wrapped to the terminal's width."""
    width = max(20, (shutil.get_terminal_size().columns - 3) // 2)
    cols = [[t[:width], "-" * width] for t in titles]
    for col, text in zip(cols, (left, right)):
        for para in text.strip().split("\n"):
            col += textwrap.wrap(para, width) or [""]
    n = max(map(len, cols))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(*(c + [""] * (n - len(c)) for c in cols)))


MAX_SEED = 2**63 - 1  # seeds are non-negative signed 64-bit integers (what torch.Generator takes)


def check_args(args):
    """A one-line error for each flag value, or combination, that generate.py cannot honour."""
    for flag, value, ok, rule in (
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
            ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
             ">= 0 (0 = greedy)"),
            ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = off)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
            ("--seed", args.seed, args.seed is None or 0 <= args.seed <= MAX_SEED - (args.num_samples - 1),
             f"between 0 and {MAX_SEED} (less --num-samples - 1: sample i uses seed + i)")):
        if not ok:
            die(f"{flag} {value} must be {rule}")
    if args.compare and args.chat:
        die("--compare answers --prompt; it does not go with --chat")
    if args.compare and not args.prompt:
        die("--compare needs --prompt")
    for flag, given, why in (
            ("--model", args.compare and args.model, "--compare names its two models"),
            ("--num-samples", args.compare and args.num_samples > 1, "--compare shows one answer per model"),
            ("--prompt", args.chat and args.prompt, "--chat reads its messages from the terminal"),
            ("--num-samples", args.chat and args.num_samples > 1, "--chat gives one answer per message"),
            ("--system", args.system is not None and not args.chat, "--system is the system prompt of --chat")):
        if given:
            die(f"{flag} does not apply here: {why}")
    if not args.chat and not args.prompt:
        die("give --prompt TEXT (or --chat)")
    if not all(args.stop):
        die("--stop is empty (it would end every answer before it starts)")
    for i, prompt in enumerate(args.prompt or []):
        if not prompt:
            die(f"{prompt_label(i, len(args.prompt))}--prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 reach argv as lone surrogates
            die(f"{prompt_label(i, len(args.prompt))}--prompt is not valid UTF-8")


def prompt_label(i, n):
    """'prompt 3 of 4: ' for the third of four --prompt's (nothing when there is one): errors name the
    one at fault."""
    return f"prompt {i + 1} of {n}: " if n > 1 else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, epilog=(
        "A prompt longer than the model's context is an error (never truncated); in --chat, the oldest "
        "turns are dropped to keep the conversation within the context."))
    p.add_argument("--model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir (default: gpt2)")
    p.add_argument("--prompt", action="append", help="text (repeatable): a checkpoint with a chat template "
                   "answers it as a user's message in that template; a base model continues it")
    p.add_argument("--chat", action="store_true", help="interactive conversation in the checkpoint's template")
    p.add_argument("--system", help="system prompt for --chat")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "OTHER"),
                   help="answer each --prompt with two models, side by side (each as --prompt would)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=None, help=f"makes sampling repeatable (0 to {MAX_SEED}); "
                   "sample i, or the i-th answer in --chat, uses seed + i")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable), never printed")
    p.add_argument("--num-samples", type=int, default=1, help="answers per prompt (seeds --seed, --seed + 1, ...)")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the device's usual one (bfloat16 on CUDA, float32 elsewhere)")
    args = p.parse_args(argv)
    check_args(args)
    device = device_or_die(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop, args.seed)
    enc = get_tokenizer()

    try:
        if args.compare:
            models = [load_model(name, device, dtype) for name in args.compare]
            n = len(args.prompt)
            ids = [[checked_answer_ids(m, prompt, enc, prompt_label(i, n)) for m in models]
                   for i, prompt in enumerate(args.prompt)]
            for prompt, pair in zip(args.prompt, ids):
                answers = ["".join(generate(m, i, params, enc)) for m, i in zip(models, pair)]
                print(f"\n=== {prompt}\n" + side_by_side(*answers, args.compare), flush=True)
            return
        model = load_model(args.model or "gpt2", device, dtype)
        if args.chat:
            chat(model, enc, params, args.system)
            return
        templated = bool(getattr(model, "checkpoint_info", {}).get("template"))  # (a fine-tuned model)
        n = len(args.prompt)  # all checked before any is answered:
        ids = [checked_answer_ids(model, prompt, enc, prompt_label(i, n)) for i, prompt in enumerate(args.prompt)]
        for prompt, prompt_ids in zip(args.prompt, ids):
            for i in range(args.num_samples):
                if args.num_samples > 1:
                    print(f"\n---------- sample {i + 1}", flush=True)
                seed = None if args.seed is None else args.seed + i
                # a continuation goes on from the prompt; an answer starts on a line of its own
                print(prompt, end="\n" if templated else "", flush=True)
                started = not templated
                for piece in generate(model, prompt_ids, replace(params, seed=seed), enc):
                    piece, started = strip_answer_start(piece, started)
                    print(piece, end="", flush=True)
                print(flush=True)
    except PromptTooLong as e:
        die(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)  # (what a shell reports for Ctrl-C: the output is cut short, not complete)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, and point stdout at
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # /dev/null so the exit flush
        sys.exit(1)                                                       # does not fail a second time


if __name__ == "__main__":
    main()
