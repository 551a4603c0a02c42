"""The model runner: the paged KV pool, and one scheduled batch through the model.

All new tokens of all sequences in a step are packed into one row (StepInputs) and run through
gpt.py's cache seam (PagedKVView); decode-only steps can be replayed as CUDA graphs. How many
blocks the pool gets comes from a memory budget and what the device has free (kv_cache_blocks).
"""

import itertools
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import capture_cuda_graph
from paged_attention import paged_decode_attention, paged_prefill_attention, write_kv


BLOCK = 16  # tokens per KV block


@dataclass
class StepInputs:
    """One step's new tokens, those of every sequence packed into one row: the decodes (one token
    each) first, then the prefills. The tensors are on the model's device; the two lists stay on the
    host, where the prefill loop of PagedKVView.attend reads them."""
    token_ids: torch.Tensor     # (1, N)
    positions: torch.Tensor     # (N,)
    slot_mapping: torch.Tensor  # (N,) where each token's k/v go in the pool: block * BLOCK + offset (-1: nowhere)
    block_tables: torch.Tensor  # (num_seqs, blocks of one full context) int32, padded with block 0
    context_lens: torch.Tensor  # (num_seqs,) int32: each sequence's length once this step is done
    num_decode: int             # the first num_decode sequences bring one new token each
    query_lens: list            # per prefill: how many new tokens it brings
    fresh: list                 # per prefill: nothing cached before its new tokens?


class PagedKVView:
    """gpt.py's cache seam over the paged pool, for one packed step: q, k, v (1, n_head, N, head_dim)
    hold the new tokens of several sequences in one row, laid out as `step` says."""

    def __init__(self, kv, step):
        self.kv = kv  # (2, n_layer, num_blocks, BLOCK, n_head, head_dim)
        self.step = step

    def attend(self, layer, q, k, v):
        step = self.step
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (N, n_head, head_dim)
        k_cache, v_cache = self.kv[0, layer], self.kv[1, layer]
        write_kv(k, v, k_cache, v_cache, step.slot_mapping)
        scale = 1.0 / math.sqrt(q.size(-1))
        num_decode = step.num_decode
        if num_decode == q.size(0):  # decode only (the CUDA-graph path): no Python-side data access
            out = paged_decode_attention(q, k_cache, v_cache, step.block_tables, step.context_lens, scale)
            return out.transpose(0, 1)[None]
        out = torch.empty_like(q)
        if num_decode:
            out[:num_decode] = paged_decode_attention(q[:num_decode], k_cache, v_cache, step.block_tables[:num_decode],
                                                      step.context_lens[:num_decode], scale)
        row = num_decode  # where the current prefill's tokens start in the packed row
        for i, n in enumerate(step.query_lens):
            seq = num_decode + i
            if step.fresh[i]:
                # A whole new prompt: its keys are right here, so plain causal attention (flash
                # attention on a GPU) needs no trip through the block tables.
                qs, ks, vs = (t[row:row + n].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n, D)
                out[row:row + n] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
            else:  # new tokens after a cached prefix: attend over the pool
                out[row:row + n] = paged_prefill_attention(
                    q[row:row + n], k_cache, v_cache, step.block_tables[seq:seq + 1],
                    step.context_lens[seq:seq + 1], torch.tensor([n]), scale)
            row += n
        return out.transpose(0, 1)[None]


class ModelRunner:
    """Holds the KV pool and runs one scheduled batch through the model."""

    def __init__(self, model, num_blocks, cuda_graph=True, max_graph_batch=64):
        self.model = model
        cfg = model.config
        self.device, self.dtype = model.wte.weight.device, model.wte.weight.dtype
        self.n_ctx = cfg.block_size
        self.max_blocks = math.ceil(cfg.block_size / BLOCK)  # block-table width: one full context
        head_dim = cfg.head_dim
        try:
            self.kv = torch.zeros(2, cfg.n_layer, num_blocks, BLOCK, cfg.n_head, head_dim, dtype=self.dtype,
                                  device=self.device)
        except (RuntimeError, MemoryError) as e:  # memory short after all (torch.OutOfMemoryError is a RuntimeError)
            size = num_blocks * self.bytes_per_block(cfg, self.dtype) / 2**30
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot allocate the KV cache ({size:.2f} GiB): {reason}; give less --kv-cache-memory") from None
        self.graphs = {}  # decode batch size -> (CUDA graph, its logits tensor)
        if cuda_graph and self.device.type == "cuda":
            self.capture_graphs(max_graph_batch)

    @staticmethod
    def bytes_per_block(config, dtype):
        return 2 * config.n_layer * BLOCK * config.n_embd * dtype.itemsize

    def pack(self, batch):
        """The StepInputs of a step; `batch` must list the decodes (one token each) before the
        prefills (Engine.step orders it)."""
        ids, positions, slots, tables, context_lens, query_lens, fresh = [], [], [], [], [], [], []
        num_decode = 0
        for seq in batch:
            start, end = seq.num_computed, seq.num_computed + seq.num_scheduled
            if end - start == 1:  # (a one-token prefill chunk is a decode, as attention sees it)
                num_decode += 1
            else:
                query_lens.append(end - start)
                fresh.append(start == 0)
            ids += seq.tokens[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]
            tables.append(seq.block_table + [0] * (self.max_blocks - len(seq.block_table)))
            context_lens.append(end)

        def tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=self.device)
        return StepInputs(tensor(ids)[None], tensor(positions), tensor(slots), tensor(tables, torch.int32),
                          tensor(context_lens, torch.int32), num_decode, query_lens, fresh)

    @torch.inference_mode()
    def run(self, batch):
        """Logits (len(batch), vocab) for the last new token of each sequence. `batch` must list the
        sequences with one new token (decodes) before the prefills (Engine.step orders it)."""
        step = self.pack(batch)
        if step.num_decode == len(batch) and self.graphs:
            size = next((s for s in sorted(self.graphs) if s >= step.num_decode), None)
            if size is not None:
                return self._replay(size, step)[:step.num_decode]
        h = self.model.hidden(step.token_ids, step.positions, cache=PagedKVView(self.kv, step))[0]
        # each sequence's last new token in the packed row: only its logits are needed
        return self.model.lm_head(h[self._last_rows(step)]).float()

    @torch.inference_mode()
    def run_every_token(self, batch, wanted):
        """run(batch), and {i: hidden states (new tokens, n_embd)} of every new token of batch[i] for
        each i in `wanted`: a prompt's own log-probabilities (echo) need each position's, not only
        the last's. (States, not logits: a chunk's logits over the whole vocabulary would be large.)"""
        step = self.pack(batch)
        h = self.model.hidden(step.token_ids, step.positions, cache=PagedKVView(self.kv, step))[0]
        last = self._last_rows(step)
        lens = [1] * step.num_decode + step.query_lens
        every = {i: h[int(last[i]) - lens[i] + 1:int(last[i]) + 1] for i in wanted}
        return self.model.lm_head(h[last]).float(), every

    def _last_rows(self, step):
        """Where each sequence's last new token is in the packed row."""
        return torch.tensor(list(itertools.accumulate([1] * step.num_decode + step.query_lens)), device=self.device) - 1

    # CUDA graphs: a decode step launches hundreds of small kernels; recorded once per batch size
    # and replayed, it is one launch. Shapes inside a graph are fixed, so a step of B sequences
    # runs the graph of the next captured size, the extra rows padding (slot -1: nothing is
    # written; context length 1 over block 0: something harmless is read). cuda_graph=False
    # (serve.py --no-cuda-graph) is the eager path they are checked against.
    @staticmethod
    def graph_batch_sizes(max_batch):
        """The decode batch sizes to capture: powers of two below the engine's batch cap, and the cap
        itself up to 256 (a graph holds its own activations and logits; larger batches run eagerly)."""
        sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256) if s < max_batch]
        return sizes + [max_batch] if max_batch <= 256 else sizes

    def capture_graphs(self, max_batch):
        sizes = self.graph_batch_sizes(max_batch)
        n, dev = max(sizes), self.device
        # the tensors every graph reads: a replay copies its step into their first rows
        self.graph_inputs = StepInputs(
            token_ids=torch.zeros(1, n, dtype=torch.long, device=dev),
            positions=torch.zeros(n, dtype=torch.long, device=dev),
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev),
            context_lens=torch.ones(n, dtype=torch.int32, device=dev),
            num_decode=n, query_lens=[], fresh=[])
        pool = None
        for size in sorted(sizes, reverse=True):  # the largest first: the others reuse its memory pool
            with torch.inference_mode():
                graph, logits = capture_cuda_graph(self._decode_forward(size), warmups=1, pool=pool)
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize()

    def _decode_forward(self, size):
        """The forward pass a graph of `size` decodes records: over the first `size` rows of graph_inputs."""
        inputs = self.graph_inputs
        step = StepInputs(inputs.token_ids[:, :size], inputs.positions[:size], inputs.slot_mapping[:size],
                          inputs.block_tables[:size], inputs.context_lens[:size], size, [], [])
        view = PagedKVView(self.kv, step)
        return lambda: self.model.lm_head(self.model.hidden(step.token_ids, step.positions, cache=view)[0]).float()

    def _replay(self, size, step):
        inputs, n = self.graph_inputs, step.num_decode
        inputs.token_ids[:, :n].copy_(step.token_ids)
        inputs.positions[:n].copy_(step.positions)
        inputs.slot_mapping.fill_(-1)
        inputs.slot_mapping[:n].copy_(step.slot_mapping)
        inputs.block_tables[:n].copy_(step.block_tables)
        inputs.context_lens.fill_(1)
        inputs.context_lens[:n].copy_(step.context_lens)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits




# ----------------------------------------------------------------------------- sizing the pool

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
