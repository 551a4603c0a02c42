"""Serve GPT-2 to many users at once: a paged KV cache, continuous batching, an OpenAI-compatible API.

    python serve.py --model out/sft --port 8000
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi!"}]}'
    open http://localhost:8000/  (a small chat page)

generate.py answers one prompt at a time with one contiguous KV cache. A server has many requests
in flight, of every length, arriving and leaving at any moment. This is the vLLM recipe, small:

  BlockManager  The KV cache is a pool of fixed-size blocks (16 tokens each, the "pages" of
                kernels.py). A sequence owns a block table: its i-th block holds tokens 16i..16i+15.
                Memory is handed out 16 tokens at a time as sequences grow, so nothing is reserved
                for a length a request may never reach. Full blocks are also remembered by their
                content (prefix caching): a request that starts like an earlier one (a system
                prompt, a chat history) reuses those blocks instead of computing them again.
  Scheduler     Decides, at every step, which sequences run and how many tokens each computes:
                each running sequence decodes one token, and prompts are prefilled in the same
                forward pass while the token budget lasts (continuous batching: requests join and
                leave the batch at any step). A prompt longer than what is left of the budget is
                prefilled in chunks over several steps (chunked prefill), so one long prompt
                never freezes the token streams of everyone else. When blocks run out, the
                youngest sequence is preempted: its blocks are freed and it is recomputed later
                (its generated tokens are kept).
  ModelRunner   Owns the KV pool and runs the model on a packed batch (all new tokens of all
                sequences in one row) through gpt.py's cache seam; decode steps can be replayed
                as CUDA graphs.
  Engine        Ties them together: add_request / step / abort, and generate() for offline batches.
  EngineLoop    The engine in one background thread, with a queue per HTTP request.
  Api           OpenAI request bodies, checked, into engine requests; their results into replies.
  Handler       The HTTP API (standard library http.server): /v1/completions,
                /v1/chat/completions, /v1/models, /health, /metrics, and the chat page at /.
"""

import argparse
import itertools
import json
import math
import os
import queue
import re
import select
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import encode_prompt
from generate import MAX_SEED, SamplingParams, TextStream, load_model, sample, strip_answer_start
from gpt import (EOT, SIZES, CheckpointError, HelpFormatter, default_dtype, die, encode, device_or_die, get_tokenizer,
                 resolve_weights)
from kernels import paged_decode_attention, paged_prefill_attention, write_kv

BLOCK = 16  # tokens per KV block
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, for /metrics


# ----------------------------------------------------------------------------- sequences

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """One prompt and its growing completion. `tokens` is prompt + output; the first `num_computed`
    of them have their keys and values in the cache (blocks of `block_table`). In a step, the
    scheduler sets `num_new`: how many of the others this step computes (one for a decode, the whole
    rest or a chunk of it for a prefill)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids, params, enc, logprobs=None, ignore_eos=False, sink=None, device="cpu"):
        self.seq_id = next(Sequence._ids)
        self.prompt_len = len(prompt_ids)
        self.tokens = list(prompt_ids)
        self.params, self.logprobs, self.ignore_eos = params, logprobs, ignore_eos
        self.sink = sink  # where the server wants this sequence's outputs (a queue.Queue), or None
        self.stream = TextStream(enc, params.stop)  # token ids -> text, stop strings
        self.generator = None
        if params.seed is not None:  # a seeded request samples from its own random stream
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.status, self.finish_reason = WAITING, None
        self.block_table, self.num_computed, self.num_new = [], 0, 0
        self.num_hashed, self.last_hash = 0, None  # leading blocks registered in the prefix cache
        self.arrival, self.first_token_time = time.perf_counter(), None

    @property
    def output_ids(self):
        return self.tokens[self.prompt_len:]


@dataclass
class StepOutput:
    """What one step did for one sequence: the token it sampled and the text that became printable."""
    seq: Sequence
    token: int | None  # None when the sequence was aborted or failed
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprob: float | None = None
    top_logprobs: list | None = None  # [(token id, logprob)], most likely first
    error: Exception | None = None  # set (finish_reason "error") when this sequence alone failed


# ----------------------------------------------------------------------------- the block manager

def block_hash(parent_hash, token_ids):
    """Chained hash of a full block: its tokens and (through the parent's hash) all tokens before it.
    Only a lookup key: a hit is verified against the stored ids before it is trusted."""
    return hash((parent_hash, token_ids))


class KVBlock:
    __slots__ = ("id", "ref", "hash", "token_ids", "parent", "gen")

    def __init__(self, i):
        self.id, self.ref = i, 0
        self.hash = self.token_ids = self.parent = None  # set while registered in the prefix cache
        self.gen = 0  # bumped each time the block is reused for other content


class BlockManager:
    """The pool of KV blocks: allocation, reference counts, and the prefix cache.

    Free blocks wait in least-recently-freed order. A freed block keeps its content and stays
    findable by hash until it is handed out again, so a prefix computed by a finished request can
    still be reused by the next one. A hit is trusted only if the stored token ids match and the
    block's parent is exactly the block matched just before it (same id, same generation): so a
    hash collision costs a cache miss, never wrong keys and values."""

    def __init__(self, num_blocks):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free = OrderedDict.fromkeys(range(num_blocks))  # ordered: evict the oldest first
        self.by_hash = {}  # hash -> block id
        self.hits = self.queries = 0  # prefix-cache counters, in blocks

    @property
    def num_free(self):
        return len(self.free)

    def match_prefix(self, tokens):
        """Block ids holding a cached prefix of `tokens`. Only full blocks before the last token
        count: at least one token is always computed, to produce the logits of the next one."""
        hits, h, parent = [], None, None
        for i in range((len(tokens) - 1) // BLOCK):
            ids = tuple(tokens[i * BLOCK:(i + 1) * BLOCK])
            h = block_hash(h, ids)
            bid = self.by_hash.get(h)
            if bid is None:
                break
            b = self.blocks[bid]
            if b.token_ids != ids or b.parent != parent:
                break
            hits.append(bid)
            parent = (bid, b.gen)
        return hits

    def can_allocate(self, num_tokens, hits):
        # cached blocks nobody holds are in the free list: taking them uses up free blocks too
        needed = math.ceil(num_tokens / BLOCK) - len(hits) + sum(self.blocks[b].ref == 0 for b in hits)
        return needed <= self.num_free

    def allocate(self, seq, hits):
        """Give `seq` blocks for all its tokens, the cached prefix `hits` shared."""
        self.queries += (len(seq.tokens) - 1) // BLOCK
        self.hits += len(hits)
        h = None
        for bid in hits:
            self._take(bid)
            h = self.blocks[bid].hash
        seq.block_table = list(hits) + [self._new() for _ in range(math.ceil(len(seq.tokens) / BLOCK) - len(hits))]
        seq.num_computed = len(hits) * BLOCK
        seq.num_hashed, seq.last_hash = len(hits), h

    def needs_block(self, seq):
        """Does `seq` need one more block for its next token?"""
        return len(seq.tokens) > len(seq.block_table) * BLOCK

    def append_block(self, seq):
        seq.block_table.append(self._new())

    def free_seq(self, seq):
        # Release the last blocks first: they are evicted first, and a prefix's tail is useless
        # without its head, while the head (a shared system prompt) may serve other requests.
        for bid in reversed(seq.block_table):
            b = self.blocks[bid]
            b.ref -= 1
            if b.ref == 0:
                self.free[bid] = None
        seq.block_table, seq.num_computed, seq.num_hashed, seq.last_hash = [], 0, 0, None

    def register(self, seq):
        """Enter `seq`'s newly completed blocks (full, their k/v computed) into the prefix cache."""
        full = min(seq.num_computed, len(seq.tokens)) // BLOCK
        for i in range(seq.num_hashed, full):
            ids = tuple(seq.tokens[i * BLOCK:(i + 1) * BLOCK])
            h = block_hash(seq.last_hash, ids)
            b = self.blocks[seq.block_table[i]]
            if h not in self.by_hash:  # (a duplicate computed alongside another copy stays private)
                prev = self.blocks[seq.block_table[i - 1]] if i else None
                b.hash, b.token_ids, b.parent = h, ids, (prev.id, prev.gen) if prev else None
                self.by_hash[h] = b.id
            seq.last_hash = h
        seq.num_hashed = max(seq.num_hashed, full)

    def _take(self, bid):
        b = self.blocks[bid]
        if b.ref == 0:
            del self.free[bid]
        b.ref += 1

    def _new(self):
        bid, _ = self.free.popitem(last=False)
        b = self.blocks[bid]
        if b.hash is not None:  # its old content is about to be overwritten: forget it
            if self.by_hash.get(b.hash) == bid:
                del self.by_hash[b.hash]
            b.hash = b.token_ids = b.parent = None
        b.gen += 1
        b.ref = 1
        return bid


# ----------------------------------------------------------------------------- the scheduler

class Scheduler:
    """Waiting and running queues, and a budget of `max_num_batched_tokens` tokens per step, spent
    in this order:

      1. Decodes: every running sequence whose prompt is computed gets its one next token, oldest
         first (making room by preempting the youngest when blocks run out). They go first
         because a user is watching each of those streams: a long prompt arriving must not
         freeze them (it would, for as long as its whole prefill takes, without chunking).
      2. Unfinished prefills (running sequences admitted in an earlier step) get their next chunk:
         a prompt once started finishes before newer ones start, so its first token is not
         postponed forever by newcomers.
      3. Waiting sequences are admitted, oldest first, while the budget, the sequence cap and the
         free blocks allow. The last one admitted gets what is left of the budget, which may be
         only a chunk of its prompt: the rest follows in the next steps (chunked prefill). So a
         prompt longer than the whole budget is fine, and a step never idles budget that a
         waiting prompt could use.

    A chunk costs little extra: attention over the cached earlier chunks, and every matmul sees
    the same tokens it would have seen in one piece. A sequence samples its next token only in the
    step that computes the last of its tokens; earlier chunks produce no output at all."""

    def __init__(self, blocks, max_num_seqs, max_num_batched_tokens):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting, self.running = deque(), []  # running: oldest first
        self.num_preemptions = 0

    def schedule(self):
        """The sequences to run this step, in the order decodes, unfinished prefills, admissions;
        each computes its tokens[num_computed:num_computed + num_new]."""
        budget = self.max_num_batched_tokens
        batch = []
        for seq in list(self.running):  # 1. decodes
            if seq.status != RUNNING or budget == 0:  # preempted (the youngest, so all after it too)
                break  # or no budget left: the younger decodes wait for the next step
            if len(seq.tokens) - seq.num_computed > 1:  # a prefill under way: its turn comes in 2.
                continue
            while seq.status == RUNNING and self.blocks.needs_block(seq) and self.blocks.num_free == 0:
                self.preempt(self.running[-1])  # the youngest: never one already in this batch
            if seq.status != RUNNING:  # it was the youngest itself
                break
            if self.blocks.needs_block(seq):
                self.blocks.append_block(seq)
            seq.num_new = 1
            batch.append(seq)
            budget -= 1
        for seq in self.running:  # 2. unfinished prefills (their blocks were all given at admission)
            left = len(seq.tokens) - seq.num_computed
            if left > 1 and budget > 0:
                seq.num_new = min(left, budget)
                batch.append(seq)
                budget -= seq.num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:  # 3. admissions
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq.tokens)
            # Blocks for the whole prompt are taken now, not chunk by chunk: a prefill once started
            # never waits for memory halfway (only decodes grow, one block at a time).
            if not self.blocks.can_allocate(len(seq.tokens), hits):
                break  # strictly first come, first served: nobody overtakes the head of the queue
            self.blocks.allocate(seq, hits)
            self.waiting.popleft()
            seq.status = RUNNING
            self.running.append(seq)
            seq.num_new = min(len(seq.tokens) - seq.num_computed, budget)
            batch.append(seq)
            budget -= seq.num_new
        return batch

    def preempt(self, seq):
        """Free a running sequence's blocks and put it at the front of the queue: it will be prefilled
        again (prompt and the tokens generated so far), usually partly from the prefix cache. A
        sequence halfway through a chunked prefill is preempted the same way: the blocks it has
        computed stay in the prefix cache, the others were never registered."""
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq, reason):
        if seq.status == RUNNING:
            self.running.remove(seq)
            self.blocks.free_seq(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = FINISHED, reason


# ----------------------------------------------------------------------------- the model runner

class PagedKVView:
    """gpt.py's cache seam over the paged pool, for one packed batch: N new tokens of several
    sequences in one row, q, k, v (1, n_head, N, head_dim). The first `num_decode` sequences bring
    one token each (decode), the others several (prefill)."""

    def __init__(self, kv, slot_mapping, num_decode, block_tables, context_lens, query_lens, fresh):
        self.kv = kv  # (2, n_layer, num_blocks, BLOCK, n_head, head_dim)
        self.slot_mapping, self.num_decode = slot_mapping, num_decode
        self.block_tables, self.context_lens, self.query_lens = block_tables, context_lens, query_lens
        self.fresh = fresh  # per prefill sequence: nothing cached before its new tokens?

    def attend(self, layer, q, k, v):
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (N, n_head, head_dim)
        k_cache, v_cache = self.kv[0, layer], self.kv[1, layer]
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        scale = 1.0 / math.sqrt(q.size(-1))
        nd = self.num_decode
        if nd == q.size(0):  # decode only (the CUDA-graph path): no Python-side data access
            out = paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, scale)
            return out.transpose(0, 1)[None]
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], k_cache, v_cache, self.block_tables[:nd],
                                              self.context_lens[:nd], scale)
        row = nd
        for i, n in enumerate(self.query_lens):
            b = nd + i
            if self.fresh[i]:
                # A whole new prompt: its keys are right here, so plain causal attention (flash
                # attention on a GPU) needs no trip through the block tables.
                qs, ks, vs = (t[row:row + n].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, D)
                out[row:row + n] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
            else:  # new tokens after a cached prefix: attend over the pool
                out[row:row + n] = paged_prefill_attention(
                    q[row:row + n], k_cache, v_cache, self.block_tables[b:b + 1],
                    self.context_lens[b:b + 1], torch.tensor([n]), scale)
            row += n
        return out.transpose(0, 1)[None]


def parse_memory(text):
    """'256MB', '1.5GiB', '512 KiB' or a bare number of GiB -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 256MB, 2GiB or 1.5 (GiB)")
    unit = (m.group(2) or "GiB").upper()
    power = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4}[unit.replace("I", "")]
    return int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)


def available_memory(device):
    """Bytes free for the KV cache on `device` (None: unknown). CUDA: free device memory; CPU: the
    kernel's estimate of what can be allocated without swapping (MemAvailable), else physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class ModelRunner:
    """Holds the KV pool and runs one scheduled batch through the model."""

    def __init__(self, model, num_blocks, cuda_graph=True, max_graph_batch=64):
        self.model = model
        cfg = model.config
        self.device, self.dtype = model.wte.weight.device, model.wte.weight.dtype
        self.n_ctx = cfg.block_size
        self.max_blocks = math.ceil(cfg.block_size / BLOCK)  # block-table width: one full context
        hd = cfg.n_embd // cfg.n_head
        try:
            self.kv = torch.zeros(2, cfg.n_layer, num_blocks, BLOCK, cfg.n_head, hd, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError) as e:  # memory short after all (torch.OutOfMemoryError is a RuntimeError)
            size = num_blocks * self.bytes_per_block(cfg, self.dtype) / 2**30
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot allocate the KV cache ({size:.2f} GiB): {reason}; give less --kv-cache-memory") from None
        self.graphs = {}
        if cuda_graph and self.device.type == "cuda":
            self.capture_graphs(max_graph_batch)

    @staticmethod
    def bytes_per_block(config, dtype):
        return 2 * config.n_layer * BLOCK * config.n_embd * dtype.itemsize

    def _inputs(self, batch):
        """Pack a step into one row of tokens; `batch` must list the decodes (one token each) before
        the prefills (Engine.step orders it)."""
        dev = self.device
        ids, pos, slots, tables, ctx, qlens, fresh = [], [], [], [], [], [], []
        num_decode = 0
        for seq in batch:
            start, end = seq.num_computed, seq.num_computed + seq.num_new
            if end - start == 1:  # (a one-token prefill chunk is a decode, as attention sees it)
                num_decode += 1
            else:
                qlens.append(end - start)
                fresh.append(start == 0)
            ids += seq.tokens[start:end]
            pos += range(start, end)
            slots += [seq.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
            tables.append(seq.block_table + [0] * (self.max_blocks - len(seq.block_table)))
            ctx.append(end)
        t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
        return (t(ids)[None], t(pos), t(slots), num_decode, t(tables, torch.int32), t(ctx, torch.int32), qlens, fresh)

    @torch.inference_mode()
    def run(self, batch):
        """Logits (len(batch), vocab) for the last new token of each sequence. `batch` must list the
        sequences with one new token (decodes) before the prefills (Engine.step orders it)."""
        idx, pos, slots, nd, tables, ctx, qlens, fresh = self._inputs(batch)
        if nd == len(batch) and self.graphs:
            size = next((s for s in sorted(self.graphs) if s >= nd), None)
            if size is not None:
                return self._replay(size, idx, pos, slots, tables, ctx)[:nd]
        view = PagedKVView(self.kv, slots, nd, tables, ctx, qlens, fresh)
        h = self.model.hidden(idx, pos, cache=view)[0]
        # each sequence's last new token in the packed row: only its logits are needed
        last = torch.tensor(list(itertools.accumulate([1] * nd + qlens)), device=self.device) - 1
        return self.model.lm_head(h[last]).float()

    # CUDA graphs: a decode step launches hundreds of small kernels; recorded once per batch size
    # and replayed, it is one launch. Shapes inside a graph are fixed, so a step of B sequences
    # runs the graph of the next captured size, the extra rows padding (slot -1: nothing is
    # written; context length 1 over block 0: something harmless is read). tests/test_gpu.py
    # checks them on a GPU; --no-cuda-graph is the eager fallback.
    @staticmethod
    def graph_batch_sizes(max_batch):
        """The decode batch sizes to capture: powers of two below the engine's batch cap, and the cap
        itself up to 256 (a graph holds its own activations and logits; larger batches run eagerly)."""
        sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s < max_batch]
        return sizes + [max_batch] if max_batch <= 256 else sizes

    def capture_graphs(self, max_batch):
        sizes = self.graph_batch_sizes(max_batch)
        n = max(sizes)
        dev = self.device
        self.g_idx = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.g_pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.g_slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.g_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.g_ctx = torch.ones(n, dtype=torch.int32, device=dev)
        pool = None
        for s in sorted(sizes, reverse=True):  # the largest first: the others reuse its memory pool
            view = PagedKVView(self.kv, self.g_slots[:s], s, self.g_tables[:s], self.g_ctx[:s], [], [])
            fwd = lambda: self.model.lm_head(self.model.hidden(self.g_idx[:, :s], self.g_pos[:s], cache=view)[0]).float()  # noqa: E731
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                fwd()  # warm-up (compiles the Triton kernels) outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                out = fwd()
            pool = graph.pool()
            self.graphs[s] = (graph, out)
        torch.cuda.synchronize()

    def _replay(self, size, idx, pos, slots, tables, ctx):
        nd = idx.size(1)
        self.g_idx[:, :nd].copy_(idx)
        self.g_pos[:nd].copy_(pos)
        self.g_slots.fill_(-1)
        self.g_slots[:nd].copy_(slots)
        self.g_tables[:nd].copy_(tables)
        self.g_ctx.fill_(1)
        self.g_ctx[:nd].copy_(ctx)
        graph, out = self.graphs[size]
        graph.replay()
        return out


# ----------------------------------------------------------------------------- the engine

@dataclass
class RequestOutput:
    text: str
    token_ids: list
    finish_reason: str


def check_engine_limits(max_num_seqs, max_num_batched_tokens, kv_cache_memory=None, flags=False):
    """The Engine's limits, checked before any model is loaded: ValueError naming the argument or,
    with flags=True, the command-line flag (serve.py's and bench_serve.py's). The KV-cache size
    against the model and the memory is kv_cache_blocks' part, once there is a model."""
    name = (lambda arg: "--" + arg.replace("_", "-")) if flags else (lambda arg: arg)  # noqa: E731
    if max_num_seqs < 1:
        raise ValueError(f"{name('max_num_seqs')} must be at least 1, not {max_num_seqs}")
    if max_num_batched_tokens < 1:  # (any positive budget works: longer prompts are prefilled in chunks)
        raise ValueError(f"{name('max_num_batched_tokens')} must be at least 1, not {max_num_batched_tokens}")
    if max_num_batched_tokens < max_num_seqs:  # else the oldest streams would take the whole budget
        raise ValueError(f"{name('max_num_batched_tokens')} ({max_num_batched_tokens}) must be at least "
                         f"{name('max_num_seqs')} ({max_num_seqs}): every running sequence decodes one token per step")
    if isinstance(kv_cache_memory, str):
        try:
            parse_memory(kv_cache_memory)
        except ValueError as e:
            raise ValueError(f"{name('kv_cache_memory')}: {e}") from None


def kv_cache_blocks(model, max_num_seqs=64, num_blocks=None, kv_cache_memory=None, gpu_memory_utilization=0.9):
    """How many KV blocks Engine gives `model` (see Engine), checked without allocating anything:
    ValueError if they cannot hold one full-context sequence, or do not fit in the memory available."""
    cfg = model.config
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    per_block = ModelRunner.bytes_per_block(cfg, dtype)
    need = math.ceil(cfg.block_size / BLOCK)  # blocks for one full-context sequence
    available = available_memory(device)
    if num_blocks is None:
        if kv_cache_memory is not None:
            budget = parse_memory(kv_cache_memory) if isinstance(kv_cache_memory, str) else int(kv_cache_memory)
        elif device.type == "cuda":
            budget = int(available * gpu_memory_utilization)
        else:  # (CPU: up to 1 GiB, and no more than half the memory free, leaving the rest to the process)
            budget = min(1 << 30, max_num_seqs * need * per_block)
            budget = budget if available is None else min(budget, available // 2)
        num_blocks = budget // per_block
    if available is not None and num_blocks * per_block > available:  # (checked before any allocation:
        # a too-large pool would fail deep in torch, or swap, or spend minutes building block lists)
        raise ValueError(f"the KV cache would take {num_blocks * per_block / 2**30:.2f} GiB, but only "
                         f"{available / 2**30:.2f} GiB of {device.type} memory is available; "
                         f"give less --kv-cache-memory")
    if num_blocks < need:
        raise ValueError(f"the KV cache holds {num_blocks} blocks of {BLOCK} tokens ({num_blocks * per_block / 2**20:.1f} MiB), "
                         f"but one full-context sequence needs {need} ({need * per_block / 2**20:.1f} MiB); "
                         f"give more --kv-cache-memory")
    return num_blocks


class Engine:
    """add_request() queues a prompt; step() runs one forward pass for everything scheduled and
    returns a StepOutput per sequence that moved; abort() cancels. add_request and abort may be
    called from any thread (they go through an inbox that step() drains); step() from one only.

    `max_num_batched_tokens` is the token budget of one step (forward pass); a prompt longer than
    what is left of it is prefilled in chunks over several steps.

    The KV pool gets `num_blocks` blocks, or as many as `kv_cache_memory` bytes hold; on CUDA the
    default is `gpu_memory_utilization` of the free memory, elsewhere 1 GiB (capped at what
    max_num_seqs full contexts need, and at half the memory available)."""

    def __init__(self, model, enc=None, max_num_seqs=64, max_num_batched_tokens=None, num_blocks=None,
                 kv_cache_memory=None, gpu_memory_utilization=0.9, cuda_graph=True):
        self.model, self.enc = model, enc or get_tokenizer()
        cfg = model.config
        self.n_ctx = cfg.block_size
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048
        check_engine_limits(max_num_seqs, max_num_batched_tokens, kv_cache_memory)
        device = model.wte.weight.device
        num_blocks = kv_cache_blocks(model, max_num_seqs, num_blocks, kv_cache_memory, gpu_memory_utilization)
        self.runner = ModelRunner(model, num_blocks, cuda_graph, max_graph_batch=max_num_seqs)  # (first: the big allocation)
        self.blocks = BlockManager(num_blocks)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.device = device
        self.lock = threading.Lock()
        self.inbox, self.aborts = [], set()
        self.seqs = {}  # seq_id -> Sequence, for every unfinished sequence
        # counters for /metrics
        self.prompt_tokens = self.generation_tokens = self.num_aborted = self.num_finished = 0
        self.ttft_counts, self.ttft_sum = [0] * (len(TTFT_BUCKETS) + 1), 0.0  # a histogram, +Inf last

    # --------------------------------------------------------------- the step-level API
    def add_request(self, prompt, params=None, logprobs=None, ignore_eos=False, sink=None):
        """Queue a prompt (str or token ids); returns its Sequence. `logprobs`: report the chosen
        token's log-probability and the top-`logprobs` alternatives. `ignore_eos`: keep going past
        <|endoftext|> (benchmarks that want an exact length). A bad request raises ValueError."""
        return self.add_requests([(prompt, params, logprobs)], ignore_eos, sink)[0]

    def add_requests(self, requests, ignore_eos=False, sink=None):
        """Queue [(prompt, params, logprobs)] all together, or none of them: every request is checked
        (ValueError) before any is queued, so a bad one never leaves the others behind."""
        seqs = [self._new_sequence(prompt, params or SamplingParams(), logprobs, ignore_eos, sink)
                for prompt, params, logprobs in requests]
        with self.lock:
            self.inbox += seqs
            self.seqs.update((seq.seq_id, seq) for seq in seqs)
        return seqs

    def _new_sequence(self, prompt, params, logprobs, ignore_eos, sink):
        ids = encode(prompt, self.enc) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's context holds {self.n_ctx} "
                             f"(prompt plus new tokens)")
        if not all(0 <= t < self.model.config.vocab_size for t in ids):
            raise ValueError(f"a token id is outside the vocabulary (0..{self.model.config.vocab_size - 1})")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise ValueError(f"the seed must be in 0..{MAX_SEED}, not {params.seed}")
        return Sequence(ids, params, self.enc, logprobs, ignore_eos, sink, self.device)

    def abort(self, seq_id):
        """Cancel a sequence; it leaves the engine (and frees its blocks) at the next step."""
        with self.lock:
            self.aborts.add(seq_id)

    def has_work(self):
        with self.lock:
            return bool(self.seqs or self.inbox or self.aborts)

    @property
    def num_waiting(self):
        return len(self.scheduler.waiting) + len(self.inbox)

    @property
    def num_running(self):
        return len(self.scheduler.running)

    def step(self):
        """One forward pass over everything scheduled. Returns the StepOutputs of this step."""
        outputs = []
        with self.lock:
            inbox, self.inbox = self.inbox, []
            aborts, self.aborts = self.aborts, set()
        self.scheduler.waiting.extend(inbox)
        for seq in inbox:
            self.prompt_tokens += seq.prompt_len
        for seq_id in aborts:
            seq = self.seqs.get(seq_id)
            if seq is not None and seq.status != FINISHED:
                self.num_aborted += 1  # (counted first: a watcher that sees the blocks free sees this too)
                self._finish(seq, "abort")
                outputs.append(StepOutput(seq, None, "", "abort"))
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        batch.sort(key=lambda s: s.num_new > 1)  # one-token rows (decodes) first, as the runner packs them (stable)
        logits = self.runner.run(batch)
        ready = []  # rows of the sequences now fully computed: only they sample a token
        for i, seq in enumerate(batch):
            seq.num_computed += seq.num_new
            self.blocks.register(seq)  # (full blocks whose k/v are now written, and only those)
            if seq.num_computed == len(seq.tokens):
                ready.append(i)
        if len(ready) < len(batch):  # a prefill chunk in the middle of a prompt: no token, no output
            batch, logits = [batch[i] for i in ready], logits[ready]
        if not batch:
            return outputs
        tokens, errors = self._sample(batch, logits)
        logprobs = self._logprobs(batch, logits, tokens)
        now = time.perf_counter()
        for i, seq in enumerate(batch):
            if i in errors:  # this row's sampling failed: it alone ends, with the error for its client
                self._finish(seq, "error")
                outputs.append(StepOutput(seq, None, "", "error", error=errors[i]))
                continue
            tok = tokens[i]  # (a Python int: _sample moved them to the host in one transfer)
            if seq.first_token_time is None:
                seq.first_token_time = now
                ttft = now - seq.arrival
                self.ttft_sum += ttft
                self.ttft_counts[next((j for j, b in enumerate(TTFT_BUCKETS) if ttft <= b), -1)] += 1
            outputs.append(self._append(seq, tok, *logprobs.get(i, (None, None))))
        return outputs

    def _sample(self, batch, logits):
        """Every row at once, each with its own settings and seed. Returns (token per row, {row:
        exception}): if that raises (NaN logits, odd parameters, a bug), the rows are sampled one by
        one, so that a row that fails fails alone, its token None, instead of failing the step and
        with it every request in flight. (The seeded rows then draw again: after such a failure,
        their random streams have moved on by one draw.)"""
        params = [s.params for s in batch]
        try:
            return sample(logits, [p.temperature for p in params], [p.top_k for p in params],
                          [p.top_p for p in params], [s.generator for s in batch]).tolist(), {}
        except Exception:
            traceback.print_exc()
        tokens, errors = [], {}
        for i, (s, p) in enumerate(zip(batch, params)):
            try:
                tokens.append(int(sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.generator)[0]))
            except Exception as e:
                traceback.print_exc()
                tokens.append(None)
                errors[i] = e
        return tokens, errors

    def _logprobs(self, batch, logits, tokens):
        out = {}
        rows = [i for i, s in enumerate(batch) if s.logprobs is not None and tokens[i] is not None]
        if rows:
            lp = F.log_softmax(logits[rows], dim=-1)
            for j, i in enumerate(rows):
                k = batch[i].logprobs
                top = torch.topk(lp[j], k) if k else None
                out[i] = (float(lp[j, tokens[i]]),
                          list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
        return out

    def _append(self, seq, tok, logprob=None, top=None):
        """Add a sampled token to `seq` and decide whether it is finished."""
        p = seq.params
        if tok == EOT and not seq.ignore_eos:  # the end of the answer: not part of the output
            text, reason = seq.stream.finish(), "stop"
        else:
            seq.tokens.append(tok)
            self.generation_tokens += 1
            text, reason = seq.stream.push(tok), None
            if seq.stream.stopped:
                reason = "stop"
            elif len(seq.tokens) - seq.prompt_len >= p.max_tokens or len(seq.tokens) >= self.n_ctx:
                reason = "length"
            if reason == "length":
                text += seq.stream.finish()
        if reason:
            self._finish(seq, reason)
        return StepOutput(seq, tok, text, reason, logprob, top)

    def fail_all(self):
        """After a failed step: finish every sequence (reason "error"), free its blocks, and return them."""
        with self.lock:
            self.inbox, self.aborts = [], set()
        seqs = list(self.seqs.values())
        for seq in seqs:
            self._finish(seq, "error")
        return seqs

    def _finish(self, seq, reason):
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.seq_id, None)
        self.num_finished += 1

    # --------------------------------------------------------------- the offline API
    def generate(self, prompts, sampling_params=None, use_tqdm=True, ignore_eos=False):
        """Complete a list of prompts (strings or token-id lists) with one SamplingParams for all or
        one each. Returns a RequestOutput(text, token_ids, finish_reason) per prompt, in order."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        seqs = self.add_requests([(p, sp, None) for p, sp in zip(prompts, sampling_params)], ignore_eos)
        texts = {s.seq_id: [] for s in seqs}
        # The bar counts tokens, not requests: requests batched together finish together, at the end.
        # Its total is every request's token budget, less what those that stopped early left unused.
        budget = {s.seq_id: min(s.params.max_tokens, self.n_ctx - s.prompt_len) for s in seqs}
        with tqdm(total=sum(budget.values()), desc="generating", unit="tok", disable=not use_tqdm) as bar:
            done = 0
            while done < len(seqs):
                for out in self.step():
                    if out.seq.seq_id not in texts:  # someone else's request in the same engine
                        continue
                    texts[out.seq.seq_id].append(out.text)
                    done += out.finish_reason is not None
                bar.total = sum(len(s.output_ids) if s.finish_reason else budget[s.seq_id] for s in seqs)
                bar.update(sum(len(s.output_ids) for s in seqs) - bar.n)
        return [RequestOutput("".join(texts[s.seq_id]), s.output_ids, s.finish_reason) for s in seqs]


# ----------------------------------------------------------------------------- the engine thread

class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    """Sent to the requests still running when the server stops (Ctrl-C, SIGTERM): a 503, not a failure."""

    def api_error(self):
        return ApiError(503, str(self), type="server_error", code="shutting_down")


class EngineLoop:
    """Runs Engine.step() in one background thread. An HTTP handler submits its sequences with a
    queue of its own and reads StepOutputs from it; abort() cancels them (client gone)."""

    def __init__(self, engine, max_waiting=256):
        if max_waiting < 1:  # 0 would refuse every request with 503
            raise ValueError(f"max_waiting must be at least 1, not {max_waiting}")
        self.engine, self.max_waiting = engine, max_waiting
        self.wake = threading.Event()
        self.submit_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stopped = False

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, requests, sink):
        """requests: [(prompt ids, SamplingParams, logprobs)], all admitted or none (QueueFull when
        the queue is full, ValueError when a request is bad)."""
        if len(requests) > self.max_waiting:  # it would be refused forever, even by an idle server
            raise ValueError(f"this request has {len(requests)} sequences (prompts x n); the server queues at "
                             f"most {self.max_waiting} (--max-waiting)")
        with self.submit_lock:
            if self.stopped:  # (the server is shutting down: the engine takes nothing more)
                raise ShuttingDown("the server is shutting down")
            if self.engine.num_waiting + len(requests) > self.max_waiting:
                raise QueueFull(f"the server is busy ({self.engine.num_waiting} requests waiting); try again later")
            seqs = self.engine.add_requests(requests, sink=sink)
        self.wake.set()
        return seqs

    def abort(self, seqs):
        for s in seqs:
            self.engine.abort(s.seq_id)
        self.wake.set()

    def _run(self):
        while not self.stopped:
            self.wake.clear()
            if not self.engine.has_work():
                self.wake.wait(1.0)
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out-of-memory must not leave handlers waiting forever
                traceback.print_exc()
                for seq in self.engine.fail_all():
                    if seq.sink:
                        seq.sink.put(e)
                continue
            for out in outputs:
                if out.seq.sink is not None:  # (a sequence that failed alone: its handler gets the error)
                    out.seq.sink.put(out if out.error is None else out.error)


# ----------------------------------------------------------------------------- the HTTP API

MAX_BODY = 1 << 20  # 1 MiB
# Stop strings are searched in the held-back text after every token of every sequence, and a tail as
# long as the longest of them is held back: unbounded, one request could stall every stream. OpenAI
# allows 4; 256 characters each is far more than any real stop sequence ("\nUser:") needs.
MAX_STOP, MAX_STOP_CHARS = 4, 256
# A refused request's body is still read (up to this much, for up to DRAIN_SECONDS, while it keeps
# coming: DRAIN_IDLE seconds without a byte end it) before the error is sent: a client still sending
# when the socket closes gets a reset instead of the error.
DRAIN_MAX, DRAIN_SECONDS, DRAIN_IDLE = 16 << 20, 5.0, 0.25
STATIC = Path(__file__).resolve().parent / "static" / "chat.html"


class ApiError(Exception):
    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


# OpenAI request fields this server does not implement, with the values that ask for nothing
UNSUPPORTED = {"echo": (False, None), "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "tools": (None, []),
               "response_format": (None, {"type": "text"})}


def _field(body, name, kinds, default, ok=None, rule=""):
    """body[name] checked to be of `kinds` (bool is never a number) and to satisfy `ok`."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or (ok and not ok(value)):
        raise ApiError(400, f"invalid value for '{name}': {value!r}" + (f" ({rule})" if rule else ""), param=name)
    return value


class Api:
    """Turns OpenAI-style requests into engine requests and engine outputs into responses."""

    def __init__(self, engine_loop, model_name, template):
        self.loop, self.model_name, self.template = engine_loop, model_name, template
        self.enc = engine_loop.engine.enc
        self.n_ctx = engine_loop.engine.n_ctx

    def parse(self, body, chat):
        """Validate a request body. Returns (prompts as id lists, params per choice, n, logprobs,
        stream, include_usage)."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        for name, neutral in UNSUPPORTED.items():  # refused, not silently ignored
            if name in body and body[name] not in neutral:
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server has '{self.model_name}'",
                           param="model", code="model_not_found")
        if chat:
            prompts = [self._chat_prompt(body.get("messages"))]
            if body.get("logprobs"):
                raise ApiError(400, "logprobs are supported on /v1/completions only", param="logprobs")
            logprobs = None
        else:
            prompts = self._prompts(body.get("prompt"))
            logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer 0..20")
        longest = max(len(p) for p in prompts)
        if longest >= self.n_ctx:  # no room for even one token, whatever max_tokens says
            what = "messages" if chat else "prompt"
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest} tokens in the {what} alone, which leaves no room for an answer. "
                                f"Please shorten the {what}.", param=what, code="context_length_exceeded")
        default_max = (self.n_ctx - longest) if chat else 16  # OpenAI's defaults: the rest of the context, 16
        # (chat: max_completion_tokens is the newer name; a null max_tokens does not hide it)
        name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
        max_tokens = _field(body, name, (int,), default_max, lambda v: v >= 1, "at least 1")
        if longest + max_tokens > self.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {self.n_ctx} tokens; you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        temperature = float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "0 to 2"))
        top_p = float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "greater than 0, at most 1"))
        top_k = _field(body, "top_k", (int,), 0, lambda v: v >= -1, "-1 or 0 for all, else at least 1")
        n = _field(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "1 to 16")
        seed = _field(body, "seed", (int,), None, lambda v: 0 <= v <= MAX_SEED - (n - 1),
                      f"an integer 0..{MAX_SEED - (n - 1)}: choice i samples with seed + i")
        stop = _field(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings of "
                                f"at most {MAX_STOP_CHARS} characters each", param="stop")
        stream = _field(body, "stream", (bool,), False)
        opts = _field(body, "stream_options", (dict,), {})
        include_usage = bool(opts.get("include_usage")) if stream else False
        params = [SamplingParams(max_tokens, temperature, max(top_k, 0), top_p, stop,
                                 None if seed is None else seed + j) for j in range(n)]
        return prompts, params, n, logprobs, stream, include_usage

    def _prompts(self, prompt):
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > 64:
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of up to 64 of those",
                           param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = encode(p, self.enc)
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.enc.n_vocab for t in p):
                ids = list(p)
            else:
                raise ApiError(400, "each prompt must be a string or a list of token ids", param="prompt")
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            out.append(ids)
        return out

    def _chat_prompt(self, messages):
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                    raise ApiError(400, "message content parts must be text", param="messages")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise ApiError(400, "each message needs a string 'content'", param="messages")
            turns.append({"role": m["role"], "content": content})
        try:
            return encode_prompt(turns, self.template, self.enc)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None

    def token_text(self, tok):
        return self.enc.decode_single_token_bytes(tok).decode("utf-8", errors="replace")


def metrics_text(loop):
    e = loop.engine
    lines = []

    def metric(name, kind, help_, value, labels=""):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

    used = len(e.blocks.blocks) - e.blocks.num_free
    metric("serve_requests_running", "gauge", "Sequences in the running batch.", e.num_running)
    metric("serve_requests_waiting", "gauge", "Sequences waiting to be scheduled.", e.num_waiting)
    metric("serve_kv_blocks_used", "gauge", "KV-cache blocks held by sequences.", used)
    metric("serve_kv_blocks_total", "gauge", f"KV-cache blocks in the pool ({BLOCK} tokens each).", len(e.blocks.blocks))
    metric("serve_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", e.scheduler.num_preemptions)
    metric("serve_prefix_cache_queries_total", "counter", "Full prompt blocks looked up in the prefix cache.", e.blocks.queries)
    metric("serve_prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.", e.blocks.hits)
    metric("serve_prompt_tokens_total", "counter", "Prompt tokens received.", e.prompt_tokens)
    metric("serve_generation_tokens_total", "counter", "Tokens generated.", e.generation_tokens)
    metric("serve_requests_aborted_total", "counter", "Sequences aborted (client gone).", e.num_aborted)
    name = "serve_time_to_first_token_seconds"
    lines += [f"# HELP {name} Time from arrival to the first generated token.", f"# TYPE {name} histogram"]
    counts = list(itertools.accumulate(e.ttft_counts))  # Prometheus buckets are cumulative
    for b, c in zip(TTFT_BUCKETS + ("+Inf",), counts):
        lines.append(f'{name}_bucket{{le="{b}"}} {c}')
    lines += [f"{name}_sum {e.ttft_sum:.6f}", f"{name}_count {counts[-1]}"]
    return "\n".join(lines) + "\n"


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    """One HTTP request (each in its own thread). Responses close the connection (HTTP/1.0 style),
    which keeps streaming simple: the stream ends when the socket does."""

    server_version = "gpt2-serve/1.0"
    default_request_version = "HTTP/1.0"  # answer even garbage with a status line (never HTTP/0.9)
    # Seconds a read or write on the socket may wait: a client that announces a body and never
    # sends it (or stops reading a stream) must not hold a thread forever. Generating does not
    # touch the socket, so a long answer is not cut short by this.
    timeout = 60

    head_only = False  # a HEAD request: headers as for GET, no body
    body_read = False  # has the request body (if any) been read?
    probed = 0.0  # when the last probe went to a client that half-closed (see client_gone)

    def log_message(self, format, *args):  # quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------ plumbing
    def send_bytes(self, status, content_type, data):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self.head_only:
            self.wfile.write(data)

    def send_json(self, status, obj):
        self.send_bytes(status, "application/json", json.dumps(obj).encode())

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unsupported method): JSON too."""
        self.close_connection = True
        self.send_error_json(ApiError(code, message or self.responses.get(code, ("error",))[0]))

    def send_error_json(self, e):
        try:
            self.send_json(e.status, {"error": {"message": e.message, "type": e.type, "param": e.param,
                                                "code": e.code}})
        except OSError:  # the client left without reading it (a reset): nothing to answer, nothing to log
            self.close_connection = True

    def client_gone(self, streaming):
        """Has the client gone away? An end of file on the read side alone does not say: a client may
        shut down its sending half once its request is out (shutdown(SHUT_WR)) and still wait for the
        answer. So at the first EOF, write something the client ignores: while streaming, an SSE
        comment; before the answer, to an HTTP/1.1 client, an interim "100 Continue" (which clients
        must skip, however many come). A peer that has closed entirely answers it with a reset, which
        the next check (a write, or the pending socket error) sees; repeated every second, as a
        half-closed client may close entirely later. An HTTP/1.0 client may not be sent a 1xx, so
        there, EOF before the answer still counts as gone."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            if self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False  # (bytes after the request: not ours to read; the client is there)
            if not streaming and self.request_version < "HTTP/1.1":
                return True
            if time.monotonic() - self.probed >= 1.0:
                self.probed = time.monotonic()
                probe = b": ping\n\n" if streaming else f"{self.protocol_version} 100 Continue\r\n\r\n".encode()
                self.wfile.write(probe)
                self.wfile.flush()
            return bool(self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        except (OSError, ValueError):
            return True

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):  # as GET, without the body (a HEAD response must have none)
        self.head_only = True
        self._dispatch("GET")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    ROUTES = {"/": "GET", "/health": "GET", "/metrics": "GET", "/v1/models": "GET",
              "/v1/completions": "POST", "/v1/chat/completions": "POST"}

    def _dispatch(self, method):
        path = self.path.split("?", 1)[0]
        try:
            if path not in self.ROUTES:
                raise ApiError(404, f"no such endpoint: {path}", code="not_found")
            if method != self.ROUTES[path]:
                raise ApiError(405, f"{path} accepts {self.ROUTES[path]} only, not {method}", code="method_not_allowed")
            api = self.server.api
            if path == "/":
                return self.send_bytes(200, "text/html; charset=utf-8", STATIC.read_bytes())
            if path == "/health":
                return self.send_json(200 if api else 503, {"status": "ok" if api else "loading"})
            if api is None:
                raise ApiError(503, "the model is still loading", type="server_error", code="not_ready")
            if path == "/metrics":
                return self.send_bytes(200, "text/plain; version=0.0.4", metrics_text(api.loop).encode())
            key = self.server.api_key
            if key and self.headers.get("Authorization", "") != f"Bearer {key}":
                raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                               type="authentication_error", code="invalid_api_key")
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": [
                    {"id": api.model_name, "object": "model", "created": self.server.started, "owned_by": "local",
                     "max_model_len": api.n_ctx}]})
            self._generate(api, chat=path == "/v1/chat/completions")
        except ApiError as e:
            self._drain_body()
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client left (or stopped reading); nothing to answer
        except Exception as e:  # a bug must not take the server down, nor leave the client hanging
            traceback.print_exc()
            self.send_error_json(ApiError(500, f"internal error: {e}", type="server_error"))

    def _drain_body(self):
        """Read and drop a body not read yet (a refused request's): a client still sending it when the
        connection closes gets a reset, often before it reads the error. Bounded in bytes and time."""
        if self.body_read:
            return
        self.body_read = True
        try:
            left = min(int(self.headers.get("Content-Length", "0")), DRAIN_MAX)
        except (ValueError, AttributeError):  # (no headers: a malformed request line)
            return
        self.close_connection = True
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while left > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, min(DRAIN_IDLE, deadline - time.monotonic())))
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass
        finally:
            self.connection.settimeout(self.timeout)

    def _body(self):
        if len(set(self.headers.get_all("Content-Length", []))) > 1:  # which one frames the body? (RFC 9110)
            self.close_connection = True
            raise ApiError(400, "the request has conflicting Content-Length headers")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411 if "Content-Length" not in self.headers else 400,
                           "a request body with a valid Content-Length is required") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"the request body is {length} bytes; the limit is {MAX_BODY}")
        if length < 0:
            raise ApiError(400, "negative Content-Length")
        self.body_read = True  # (from here on the body is read, or not worth waiting for)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise ApiError(408, f"the request body did not arrive within {self.timeout} s") from None
        if len(raw) < length:  # the client closed its side early: the body is cut, whatever it parses as
            raise ApiError(400, f"the request body ended after {len(raw)} of the {length} bytes its "
                                "Content-Length announced")
        try:
            return json.loads(raw)
        except RecursionError:  # "[[[[...": nested deeper than the parser's recursion limit
            raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits)
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None

    # ------------------------------------------------------------ completions
    def _generate(self, api, chat):
        prompts, params, n, logprobs, stream, include_usage = api.parse(self._body(), chat)
        sink = queue.Queue()
        requests = [(ids, p, logprobs) for ids in prompts for p in params]
        try:
            seqs = api.loop.submit(requests, sink)
        except QueueFull as e:
            raise ApiError(503, str(e), type="server_error", code="queue_full") from None
        except ShuttingDown as e:
            raise e.api_error() from None
        except ValueError as e:  # (parse() checks first; the engine's own checks are the last word)
            raise ApiError(400, str(e)) from None
        index = {s.seq_id: i for i, s in enumerate(seqs)}  # choice index = prompt * n + sample
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": api.model_name}
        if include_usage:
            head["usage"] = None  # OpenAI's schema: null on every chunk, the numbers on the last one
        prompt_tokens = sum(len(p) for p in prompts)  # once per prompt, however many choices (as OpenAI counts)
        choices = [{"text": [], "shown": 0, "released": 0, "pending": [], "offset": 0, "reason": None,
                    "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
                    "started": not chat}  # a chat answer has not started until its first non-space
                   for _ in seqs]
        try:
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                if chat:
                    for i in range(len(seqs)):
                        self._event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                          "logprobs": None, "finish_reason": None}]})
            for out in self._outputs(sink, len(seqs), stream):
                i = index[out.seq.seq_id]
                c = choices[i]
                c["reason"] = out.finish_reason
                if out.token is not None and logprobs is not None and out.logprob is not None:
                    c["pending"].append(self._logprob_item(api, out))
                text = out.text
                if chat:  # the template cues the answer after "Assistant:"; the model answers " ..."
                    text, c["started"] = strip_answer_start(text, c["started"])
                c["text"].append(text)
                c["shown"] += len(text.encode("utf-8", "surrogatepass"))  # (bytes: see _release_logprobs)
                lp = None if logprobs is None else self._release_logprobs(c, out.finish_reason)
                if stream and (text or out.finish_reason or lp and lp["tokens"]):
                    if chat:
                        choice = {"index": i, "delta": {"content": text} if text else {},
                                  "logprobs": None, "finish_reason": out.finish_reason}
                    else:
                        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
                    self._event({**head, "choices": [choice]})
            if any(c["reason"] is None for c in choices):  # (one choice failed: the others are not awaited)
                api.loop.abort(seqs)
            # Every generated token counts, also those a stop string consumed (they were computed; OpenAI
            # counts them the same way), though the text and the logprobs end where the stop string began.
            completion_tokens = sum(len(s.output_ids) for s in seqs)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            if stream:
                if include_usage:
                    self._event({**head, "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
            body = {**head, "object": "chat.completion" if chat else "text_completion", "usage": usage, "choices": []}
            for i, c in enumerate(choices):
                text = "".join(c["text"])
                if chat:
                    body["choices"].append({"index": i, "message": {"role": "assistant", "content": text},
                                            "logprobs": None, "finish_reason": c["reason"]})
                else:
                    lp = None if logprobs is None else c["logprobs"]
                    body["choices"].append({"index": i, "text": text, "logprobs": lp, "finish_reason": c["reason"]})
            self.send_json(200, body)
        except (ClientGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            api.loop.abort(seqs)  # free the blocks now; nobody is listening
            self.close_connection = True
        except BaseException:
            api.loop.abort(seqs)
            raise

    def _outputs(self, sink, count, stream):
        """StepOutputs from the engine until all `count` sequences have finished; checks between
        outputs that the client is still there."""
        done, checked = 0, time.monotonic()
        while done < count:
            if time.monotonic() - checked > 0.05:  # a few times a second, busy or not
                if self.client_gone(stream):
                    raise ClientGone()
                checked = time.monotonic()
            try:
                out = sink.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(out, Exception):
                error = (out.api_error() if isinstance(out, ShuttingDown)
                         else ApiError(500, f"the engine failed: {out}", type="server_error"))
                if not stream:
                    raise error
                # the 200 and the headers are sent already: report it in the stream, then end it
                self._event({"error": {"message": error.message, "type": error.type, "param": None, "code": error.code}})
                return
            if out.finish_reason:
                done += 1
            yield out

    def _logprob_item(self, api, out):
        tok = api.token_text(out.token)
        top = {api.token_text(t): lp for t, lp in out.top_logprobs}
        top[tok] = out.logprob
        return tok, out.logprob, top, len(api.enc.decode_single_token_bytes(out.token))

    def _release_logprobs(self, c, finish_reason):
        """The logprob entries of choice `c` whose token's text has been given out, as a logprobs object
        (the new ones only). The text of a token may be held back (it could be the start of a stop
        string), so its entry waits with it; a token the stop string consumed never gets one, nor does
        <|endoftext|>: the tokens spell the text (a token the stop string begins inside of keeps its
        entry: part of its text is in the answer). At "length" the text is all out: all entries go.
        Counted in bytes, not characters: a character split across tokens (an emoji) is one character
        of text but two or more tokens, each of which has its entry."""
        new = {key: [] for key in c["logprobs"]}
        while c["pending"] and (c["released"] < c["shown"] or finish_reason == "length"):
            tok, lp, top, nbytes = c["pending"].pop(0)
            c["released"] += nbytes
            for key, value in zip(new, (tok, lp, top, c["offset"])):
                new[key].append(value)
            c["offset"] += len(tok)
        if finish_reason:
            c["pending"].clear()
        for key, values in new.items():  # (the whole answer's, for a response that is not streamed)
            c["logprobs"][key] += values
        return new

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process alive
    request_queue_size = 128  # listen backlog: bursts of connections wait instead of being refused

    def __init__(self, address, api_key=None, verbose=False):
        super().__init__(address, Handler)
        self.api = None  # set by attach() once the model is loaded; until then /health says 503
        self.api_key, self.verbose, self.started = api_key, verbose, int(time.time())

    def attach(self, engine_loop, model_name, template="chat"):
        self.api = Api(engine_loop, model_name, template)


def make_server(engine=None, host="127.0.0.1", port=0, api_key=None, model_name="gpt2", template="chat",
                max_waiting=256, verbose=False):
    """A Server bound to host:port (0 = any free port: see server.server_address), its engine loop
    started. Call server.serve_forever() (in a thread, for tests); server.shutdown() stops it."""
    server = Server((host, port), api_key, verbose)
    if engine is not None:
        server.attach(EngineLoop(engine, max_waiting).start(), model_name, template)
    return server


# ----------------------------------------------------------------------------- the CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: the best available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and KV cache (default: bfloat16 on CUDA, float32 elsewhere)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one forward pass (a step's token budget, at least --max-num-seqs): running "
                        "decodes come first, longer prompts are prefilled in chunks over several steps; smaller = "
                        "steadier streams, larger = faster first tokens and throughput")
    p.add_argument("--max-waiting", type=int, default=256, help="queued sequences beyond which requests get 503")
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV-cache size, e.g. 256MB or 2GiB or 1.5 (GiB) (default on CUDA: --gpu-memory-utilization "
                        "of the free memory; elsewhere 1 GiB, at most half the free memory and what --max-num-seqs full "
                        "contexts need)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on CUDA")
    p.add_argument("--served-model-name", default=None, help="the model id in the API (default: --model)")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = p.parse_args(argv)
    try:
        check_engine_limits(args.max_num_seqs, args.max_num_batched_tokens, args.kv_cache_memory, flags=True)
    except ValueError as e:
        die(str(e))
    if not 0 < args.gpu_memory_utilization <= 1:
        die("--gpu-memory-utilization must be in (0, 1]")
    if args.max_waiting < 1:  # 0 would answer every request 503
        die("--max-waiting must be >= 1")
    if not 0 <= args.port < 65536:
        die("--port must be in 0..65535")
    if args.api_key == "":  # (an empty key would silently turn authentication off)
        die("--api-key is empty: give a key, or leave the flag out to serve without one")
    if args.model not in SIZES or Path(args.model).exists():  # a path: check it before listening
        try:                                                   # (a hub name downloads while loading)
            resolve_weights(args.model)
        except CheckpointError as e:
            die(str(e))
    device = device_or_die(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)  # systemd, `docker stop`, `kill`: stop as on Ctrl-C

    server = loop = None
    try:
        # Listen first, so /health can say "loading" (503) while the weights come in.
        try:
            server = make_server(host=args.host, port=args.port, api_key=args.api_key, verbose=args.verbose)
        except OSError as e:
            die(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        host, port = server.server_address[:2]
        print(f"listening on http://{host}:{port}/ (loading {args.model})", flush=True)
        model = load_model(args.model, device, dtype)  # (a bad checkpoint: a one-line error, exit 2)
        template = model.checkpoint_info.get("template", "chat")  # (load_model refused an unknown one)
        try:
            engine = Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
                            cuda_graph=not args.no_cuda_graph)
        except ValueError as e:
            die(str(e))
        loop = EngineLoop(engine, args.max_waiting).start()
        server.attach(loop, args.served_model_name or args.model, template)
        print(f"ready: {args.model} on {device} ({dtype}), KV cache {len(engine.blocks.blocks)} blocks of {BLOCK} "
              f"tokens = {len(engine.blocks.blocks) * BLOCK} tokens", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        # A second Ctrl-C or SIGTERM must not cut this short. The listener closes first; then the
        # engine thread stops, between two steps (a process that exits while that thread is inside a
        # torch kernel is aborted by the C++ runtime, SIGABRT, instead of ending); then the requests
        # still running are told why they end. (Stopped while loading, there is no engine yet.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("shutting down", flush=True)
        if server is not None:
            server.shutdown()  # no new connections (a request already in a handler gets a 503)
        if loop is not None:
            loop.stop()
            sinks = {id(seq.sink): seq.sink for seq in loop.engine.fail_all() if seq.sink is not None}.values()
            for sink in sinks:
                sink.put(ShuttingDown("the server is shutting down"))
            # the handlers are daemon threads, gone when main returns: let them take it to their clients
            deadline = time.monotonic() + 2
            while any(not sink.empty() for sink in sinks) and time.monotonic() < deadline:
                time.sleep(0.01)


if __name__ == "__main__":
    main()
