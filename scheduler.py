"""Which sequences run at each step of the serving engine, and where their keys and values live.

  Sequence      One prompt and its growing completion: its tokens, how many of them are in the
                KV cache, and the blocks that hold them.
  BlockManager  The KV cache is a pool of fixed-size blocks (16 tokens each, the "pages" of
                paged_attention.py). A sequence owns a block table: its i-th block holds tokens 16i..16i+15.
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
                (its generated tokens are kept). Waiting requests are admitted round robin, so
                one request's many sequences never make a later request wait for all of them.

Nothing here runs the model: engine.py does, through runner.py.
"""

import itertools
import math
import time
from collections import Counter, OrderedDict, deque

import torch

from runner import BLOCK
from tokenizer import TextStream


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    """One prompt and its growing completion. `tokens` is prompt + output; the first `num_computed`
    of them have their keys and values in the cache (blocks of `block_table`). In a step, the
    scheduler sets `num_scheduled`: how many of the others this step computes (one for a decode, the
    whole rest or a chunk of it for a prefill)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids, params, enc, logprobs=None, ignore_eos=False, sink=None, device="cpu",
                 request_id=None, prompt_logprobs=None):
        self.seq_id = next(Sequence._ids)
        # the sequences of one request (its prompts, n times each) share this: admission is fair between requests
        self.request_id = self.seq_id if request_id is None else request_id
        self.prompt_len = len(prompt_ids)
        self.tokens = list(prompt_ids)
        self.params, self.logprobs, self.ignore_eos = params, logprobs, ignore_eos
        # echo: the log-probability of each prompt token after the ones before it (and of the top
        # `prompt_logprobs` alternatives), filled in as the prompt is computed; params.max_tokens 0:
        # nothing is generated, the prompt only computed (and scored)
        self.prompt_logprobs, self.prompt_entries = prompt_logprobs, []
        self.ended_by_eot = False  # (the <|endoftext|> is no output token, but it was generated)
        self.sink = sink  # where the server wants this sequence's outputs (a queue.Queue), or None
        self.stream = TextStream(enc, params.stop)  # token ids -> text, stop strings
        self.generator = None
        if params.seed is not None:  # a seeded request samples from its own random stream
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.status, self.finish_reason = WAITING, None
        self.block_table, self.num_computed, self.num_scheduled = [], 0, 0
        self.num_hashed, self.last_hash = 0, None  # leading blocks registered in the prefix cache
        self.arrival, self.first_token_time = time.perf_counter(), None

    @property
    def output_ids(self):
        return self.tokens[self.prompt_len:]

    @property
    def needs_prompt_logits(self):
        """Still to score its prompt: every prompt position must then be computed, none taken from the cache."""
        return self.prompt_logprobs is not None and len(self.prompt_entries) < self.prompt_len - 1

    @property
    def prefill_only(self):
        """max_tokens 0: nothing is generated (the prompt is computed, and scored if asked)."""
        return self.params.max_tokens == 0


def block_hash(parent_hash, token_ids):
    """Chained hash of a full block: its tokens and (through the parent's hash) all tokens before it.
    Only a lookup key: a hit is verified against the stored ids before it is trusted."""
    return hash((parent_hash, token_ids))


class KVBlock:
    """One block of the pool: who holds it (`ref`), and, while it is in the prefix cache, what it holds."""
    __slots__ = ("id", "ref", "hash", "token_ids", "parent", "version")

    def __init__(self, i):
        self.id, self.ref = i, 0
        self.hash = self.token_ids = self.parent = None  # set while registered in the prefix cache
        self.version = 0  # bumped each time the block is reused for other content


class BlockManager:
    """The pool of KV blocks: allocation, reference counts, and the prefix cache.

    Free blocks wait in least-recently-freed order. A freed block keeps its content and stays
    findable by hash until it is handed out again, so a prefix computed by a finished request can
    still be reused by the next one. A hit is trusted only if the stored token ids match and the
    block's parent is exactly the block matched just before it (same id, same version): so a
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
            parent = (bid, b.version)
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
                b.hash, b.token_ids, b.parent = h, ids, (prev.id, prev.version) if prev else None
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
        b.version += 1
        b.ref = 1
        return bid


class WaitingQueue:
    """The sequences waiting to run, by request: round robin between requests, so that one request's
    many sequences (64 prompts, n=4) do not all go ahead of a later request's first. next_fair() is
    the oldest sequence of the request that has had the fewest sequences admitted (of equals, the
    oldest request); a preempted sequence goes back to the front."""

    def __init__(self):
        self.by_request = OrderedDict()  # request_id -> deque of its waiting sequences, never empty
        self.admitted = Counter()  # request_id -> sequences admitted while the request had some waiting
        self.size = 0

    def __len__(self):
        return self.size

    def __iter__(self):
        for seqs in self.by_request.values():
            yield from seqs

    def __contains__(self, seq):
        return seq in self.by_request.get(seq.request_id, ())

    def extend(self, seqs):
        for seq in seqs:
            self.by_request.setdefault(seq.request_id, deque()).append(seq)
            self.size += 1

    def appendleft(self, seq):
        self.by_request.setdefault(seq.request_id, deque()).appendleft(seq)
        self.by_request.move_to_end(seq.request_id, last=False)
        self.size += 1

    def next_fair(self):
        return self.by_request[min(self.by_request, key=self.admitted.__getitem__)][0]  # (min: the first of equals)

    def admit(self, seq):
        self.admitted[seq.request_id] += 1
        self.remove(seq)

    def remove(self, seq):
        seqs = self.by_request[seq.request_id]
        seqs.remove(seq)
        if not seqs:
            del self.by_request[seq.request_id]
            self.admitted.pop(seq.request_id, None)
        self.size -= 1


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
      3. Waiting sequences are admitted while the budget, the sequence cap and the free blocks
         allow, round robin between requests (WaitingQueue). The last one admitted gets what is
         left of the budget, which may be only a chunk of its prompt: the rest follows in the next
         steps (chunked prefill). So a prompt longer than the whole budget is fine, and a step
         never idles budget that a waiting prompt could use.

    A chunk costs little extra: attention over the cached earlier chunks, and every matmul sees
    the same tokens it would have seen in one piece. A sequence samples its next token only in the
    step that computes the last of its tokens; earlier chunks produce no output at all."""

    def __init__(self, blocks, max_num_seqs, max_num_batched_tokens):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting, self.running = WaitingQueue(), []  # running: oldest first
        self.num_preemptions = 0

    def schedule(self):
        """The sequences to run this step, in the order decodes, unfinished prefills, admissions;
        each computes its tokens[num_computed:num_computed + num_scheduled]."""
        batch = []
        budget = self._schedule_decodes(batch, self.max_num_batched_tokens)
        budget = self._continue_prefills(batch, budget)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_decodes(self, batch, budget):
        """1. One token for each running sequence whose prompt is computed. Returns the budget left."""
        for seq in list(self.running):
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
            seq.num_scheduled = 1
            batch.append(seq)
            budget -= 1
        return budget

    def _continue_prefills(self, batch, budget):
        """2. The next chunk of each prefill under way (its blocks were all given at admission)."""
        for seq in self.running:
            left = len(seq.tokens) - seq.num_computed
            if left > 1 and budget > 0:
                seq.num_scheduled = min(left, budget)
                batch.append(seq)
                budget -= seq.num_scheduled
        return budget

    def _admit_waiting(self, batch, budget):
        """3. Waiting sequences, fairly between requests, while the budget, the sequence cap and the blocks allow."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.next_fair()
            hits = [] if seq.needs_prompt_logits else self.blocks.match_prefix(seq.tokens)
            # Blocks for the whole prompt are taken now, not chunk by chunk: a prefill once started
            # never waits for memory halfway (only decodes grow, one block at a time).
            if not self.blocks.can_allocate(len(seq.tokens), hits):
                break  # nobody overtakes the one whose turn it is: else a long prompt could wait forever
            self.blocks.allocate(seq, hits)
            self.waiting.admit(seq)
            seq.status = RUNNING
            self.running.append(seq)
            seq.num_scheduled = min(len(seq.tokens) - seq.num_computed, budget)
            batch.append(seq)
            budget -= seq.num_scheduled

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
