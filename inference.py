"""Generating from one prompt: a KV cache, prefill then decode, a CUDA graph, CPU weight packing.

Generating one token at a time would recompute attention over the whole prefix at every step. The
KV cache keeps each layer's keys and values, so after the prompt ("prefill") every step feeds only
the newest token ("decode"). Our cache is one contiguous tensor per k and v, preallocated at the
full length and written in place: no allocation or concatenation per step. It plugs into the model
through gpt.py's seam, `cache.attend(layer, q, k, v)`.

A decode step launches hundreds of small kernels. On CUDA we record it once as a CUDA graph and
replay it, one launch per token; a graph needs a step whose shapes never change (the static step,
below). On a CPU the step is bound by reading the weights, and `pack_for_cpu` stores them in the
layout this CPU's matrix libraries read fastest.
"""

import itertools
import math
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from checkpoint import CheckpointError
from common import capture_cuda_graph, die
from gpt import GPT, load_or_die
from sampling import sample
from tokenizer import EOT, TEMPLATES, TextStream, check_prompt, get_tokenizer


# ----------------------------------------------------------------------------- the KV cache and the decode loop

class KVCache:
    """Keys and values of every layer for B sequences of equal length, preallocated as two contiguous
    (n_layer, B, n_head, max_len, head_dim) tensors and written in place."""

    def __init__(self, config, batch_size, max_len, device="cpu", dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
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


def model_device(model):
    return next(model.parameters()).device


def prefill(model, prompt_ids, cache):
    """The whole prompt in one forward pass, filling the cache: the logits of its last position (1, V)."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=cache.positions.device)
    return model.lm_head(model.hidden(idx, pos=cache.positions[:len(prompt_ids)], cache=cache)[:, -1])


def decode_eager(model, token, cache):
    """One new token (1,) through the model, attending over the filled part of the cache: logits (1, V)."""
    pos = cache.positions[cache.length:cache.length + 1]
    return model.lm_head(model.hidden(token.view(1, 1), pos=pos, cache=cache)[:, -1])


@torch.inference_mode()
def generate_tokens(model, prompt_ids, params, static=None):
    """Yield new token ids one at a time, starting from `prompt_ids` (list of ints). Stops after
    params.max_tokens tokens, when the context is full, or at <|endoftext|> (which is not yielded).
    Stop strings are text, not tokens: see TextStream and `generate`. `static`: decode with the
    static step, made once per model by static_step_for (default: on CUDA, as a CUDA graph). On a
    CPU, pack_for_cpu(model) first is faster."""
    device = model_device(model)
    n_ctx = model.config.block_size
    check_prompt(prompt_ids, n_ctx)
    budget = min(params.max_tokens, n_ctx - len(prompt_ids))
    if budget <= 0:
        return
    generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
    step = None
    if ((device.type == "cuda") if static is None else static) and budget > 1:
        step = static_step_for(model, len(prompt_ids) + budget, graph=device.type == "cuda")
        cache = step.cache
    else:
        cache = KVCache(model.config, 1, len(prompt_ids) + budget, device, model.wte.weight.dtype)
    try:
        logits = prefill(model, prompt_ids, cache)
        for i in range(budget):
            token = sample(logits, params.temperature, params.top_k, params.top_p, generator)
            token_id = int(token)  # (once: on a GPU, each int() waits for the device)
            if token_id == EOT:
                return
            yield token_id
            if i < budget - 1:
                logits = step(token) if step is not None else decode_eager(model, token, cache)
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


# ----------------------------------------------------------------------------- the static step and its CUDA graph
# The eager decode step attends over the part of the cache filled so far, so its shapes grow by one
# every token. A CUDA graph replays fixed kernels on fixed addresses, so the step it records must
# never change shape: the static step attends over the whole cache buffer with a mask, and reads
# its position from a tensor. It runs on CPU too, which is how the tests check it without a GPU.
# Capturing costs two warm-up steps and a recording, so the step is kept on the model
# (model._static_step) and replayed by every later generation, as long as it is still valid for it.

class StaticStep:
    """The one-token decode step with static shapes: logits = step(token ids (B,)). With graph=True
    (CUDA only) the step is captured once as a CUDA graph and then replayed: its inputs are copied
    into fixed buffers, and its output is always the same tensor (read it before the next call)."""

    def __init__(self, model, cache, graph=False):
        # (a weak reference: the model keeps its step, and a cycle would keep a deleted model's
        # weights and graph memory on the GPU until Python's cycle collector runs)
        self.model, self.cache, self.graph = weakref.proxy(model), cache, None
        self.weights = weights_fingerprint(model)  # what a graph reads: see static_step_for
        self.lock = threading.Lock()  # held by the generation using the step (see static_step_for)
        device = cache.k.device
        self.idx = torch.zeros(cache.k.size(1), 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), cache.length, dtype=torch.long, device=device)
        cache.static_pos = self.pos
        if graph:
            # the warm-ups and the recording write k, v only at position cache.length, which the
            # prefill or the first real step overwrites
            self.graph, self.logits = capture_cuda_graph(self._forward, warmups=2)
            cache.static_mask = None  # (recorded in the graph) leave the cache usable by the eager prefill

    def _forward(self):
        self.cache.static_mask = self.cache.positions[None] <= self.pos  # keys 0..pos, (1, max_len)
        h = self.model.hidden(self.idx, pos=self.pos, cache=self.cache)
        return self.model.lm_head(h[:, -1])

    def __deepcopy__(self, memo):  # a copied model makes its own step: a CUDA graph cannot be copied
        return None

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


def weights_fingerprint(model):
    """Where every weight lives, and the mode: a graph reads the weights at the addresses it was
    captured with, so a parameter replaced rather than updated in place (or the model moved, cast or
    switched to train mode) changes this, and the step is made again, never replayed over freed memory."""
    return model.training, tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def static_step_for(model, needed, graph):
    """The StaticStep for `model` over a batch-1 KV cache of at least `needed` tokens: the one kept
    on the model while it is still valid (the same weights, room enough, captured as asked), else a
    new one, kept for the calls after it. Its cache is rounded up to a power of two, so a longer
    prompt seldom needs a new capture; what an earlier call left in it lies beyond the new prompt,
    where the step's mask hides it until it is overwritten. The step is returned locked, and the
    caller releases the lock when done: a second generation at the same time (an interleaved
    generator, a thread) gets a step of its own, not kept, instead of sharing a cache."""
    step = getattr(model, "_static_step", None)
    if (step is None or step.weights != weights_fingerprint(model) or step.cache.max_len < needed
            or (step.graph is not None) != graph):
        model._static_step = None  # free the old graph and cache before making new ones (unless in use)
        step = model._static_step = new_static_step(model, needed, graph)
    if not step.lock.acquire(blocking=False):  # in use by another generation
        step = new_static_step(model, needed, graph)
        step.lock.acquire()
    step.cache.length = 0
    return step


def new_static_step(model, needed, graph):
    size = min(model.config.block_size, 1 << max(6, (needed - 1).bit_length()))  # a power of two, at least 64
    return StaticStep(model, KVCache(model.config, 1, size, model_device(model), model.wte.weight.dtype), graph)


# ----------------------------------------------------------------------------- CPU weight packing

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
    timed, size = [], 0
    for linear in linears:
        if size >= TUNE_BYTES:
            break
        timed.append(linear)
        size += linear.weight.numel() * linear.weight.element_size()
    inputs = [torch.zeros(1, linear.in_features, dtype=linear.weight.dtype) for linear in timed]
    best = (math.inf, "linear")
    with torch.inference_mode():
        for layout in candidates:
            try:
                modules = timed if layout == "linear" else [CpuLinear(linear, layout) for linear in timed]
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
    reading the weights (~500 MB per token for the 124M model). How fast a matrix-vector product
    streams them depends on the layout, and which layout wins depends on the CPU (its caches, its
    vector units, the matrix library's build) by as much as a factor of two either way, with no
    rule that predicts it. So, unless `layout` names one ("linear" keeps nn.Linear), each is timed
    (fastest_layout, about a second at load) and the fastest is installed; a layout that cannot run
    here falls back to "linear". Inference only: the new weights are not parameters, so training
    and state_dict no longer see them, and the head gets its own copy of the token embedding. Sets
    model.cpu_layout to the layout chosen; returns the model."""
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


# ----------------------------------------------------------------------------- loading a model to generate with

def load_model(name, device, dtype, int8=False):
    """A model ready to generate with: GPT.from_pretrained, its chat template checked, its weights
    packed for this CPU when it runs on one (`int8`: quantized, see quantize_int8). Raises
    CheckpointError (a bad checkpoint or template), OSError (a failed download, an unreadable file)
    or ValueError (int8 off the CPU)."""
    return ready_to_generate(GPT.from_pretrained(name, device=device, dtype=dtype), name, int8)


def load_model_or_die(name, device, dtype, int8=False):
    """load_model for the scripts: a bad checkpoint is a one-line error, not a traceback."""
    model = load_or_die(name, device=device, dtype=dtype)
    try:
        return ready_to_generate(model, name, int8)
    except (CheckpointError, ValueError) as e:  # (a bad template or overflowing logits; int8 unavailable)
        die(str(e))


def ready_to_generate(model, name, int8=False):
    """`model` with its chat template checked (a name this version knows) and, on a CPU, its weights
    in the layout this CPU reads fastest, or in int8."""
    template = model.checkpoint_info.get("template")
    if template is not None and template not in TEMPLATES:
        raise CheckpointError(f"{name}: config.json names template {template!r}; known: {', '.join(TEMPLATES)}")
    check_logits_finite(model, name)
    if int8:
        return quantize_int8(model)
    return pack_for_cpu(model) if model_device(model).type == "cpu" else model


def quantize_int8(model):
    """Every matrix of `model` in int8, for the CPU: PyTorch's dynamic quantization turns each
    nn.Linear into one with int8 weights (a scale per output row) that quantizes its input on the
    fly, with one scale for the whole input, and multiplies in int8 (fbgemm on x86, VNNI where the
    CPU has it). A decode step reads every weight once, so a quarter of float32's bytes is most of
    the gain. The head gets its own int8 copy of the token embedding (the embedding itself stays
    float32: a lookup reads one row). Since the input's scale is the batch's, a sequence's logits
    depend a little on what shares its forward pass (the engine batches requests): float32's
    "the same alone or batched, to rounding" does not hold as tightly. Inference only. Sets
    model.cpu_layout to "int8"; returns the model. ValueError off the CPU, or in a PyTorch without
    torch.ao.quantization."""
    import warnings
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        raise ValueError(f"this PyTorch ({torch.__version__}) has no dynamic int8 quantization "
                         "(torch.ao.quantization); use --dtype float32 or bfloat16") from None
    if model_device(model).type != "cpu":
        raise ValueError("int8 weights run on the CPU only")
    with warnings.catch_warnings():  # (torch.ao.quantization announces its move to torchao)
        warnings.simplefilter("ignore")
        model = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    model.cpu_layout = "int8"
    return model


@torch.no_grad()
def check_logits_finite(model, name):
    """A CheckpointError unless one token's logits are finite. Each weight can be finite (what the
    loader checks) and their products still overflow (wte * 1e38: logits of 1e76), and then every
    answer would fail at its first token: better said once, at load."""
    token = torch.tensor([[min(EOT, model.config.vocab_size - 1)]], device=model_device(model))
    if not bool(torch.isfinite(model(token)).all()):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        raise CheckpointError(f"{name}: its logits overflow to inf or NaN in {dtype} (weights too large?), "
                              "so it cannot generate")
