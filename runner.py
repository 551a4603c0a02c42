"""The model runner: the paged KV pool, and one scheduled batch through the model.

All new tokens of all sequences in a step are packed into one row and run through gpt.py's cache
seam (PagedKVView); decode-only steps can be replayed as CUDA graphs.
"""

import itertools
import math
import os
import re

import torch
import torch.nn.functional as F

from kernels import paged_decode_attention, paged_prefill_attention, write_kv


BLOCK = 16  # tokens per KV block


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
