"""The serving engine: many requests at once over a paged KV cache (the vLLM recipe, small).

  Scheduler     (scheduler.py, with the BlockManager and the Sequence) Decides at every step which
                sequences run and how many tokens each computes: continuous batching, chunked
                prefill, preemption, prefix caching, round-robin admission.
  ModelRunner   (runner.py) Owns the KV pool and runs the model on a packed batch.
  Engine        Ties them together: add_request / step / abort, and generate() for offline batches;
                its EngineStats count what /metrics reports. No HTTP here: that is serve.py,
                and openai_api.py the OpenAI request and response shapes.
"""

import threading
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import flag
from runner import ModelRunner, kv_cache_blocks, parse_memory
from sampling import SamplingParams, sample
from scheduler import FINISHED, BlockManager, Scheduler, Sequence
from tokenizer import EOT, VOCAB_SIZE, check_prompt, encode, get_tokenizer


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


@dataclass
class RequestOutput:
    """What Engine.generate returns for one prompt."""
    text: str
    token_ids: list
    finish_reason: str


def check_engine_limits(max_num_seqs, max_num_batched_tokens, kv_cache_memory=None, flags=False):
    """The Engine's limits, checked before any model is loaded: ValueError naming the argument or,
    with flags=True, the command-line flag (serve.py's and bench_serve.py's). The KV-cache size
    against the model and the memory is kv_cache_blocks' part, once there is a model."""
    def name(arg):
        return flag(arg) if flags else arg

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


TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds, for /metrics


@dataclass
class EngineStats:
    """What the engine has done since it started, for serve.py's /metrics. Counted in sequences
    (a request with n choices is n of them) and tokens."""
    prompt_tokens: int = 0      # prompt tokens received
    generation_tokens: int = 0  # tokens generated (<|endoftext|> not counted: it is no output)
    aborted: int = 0            # sequences cancelled (their client went away)
    finished: int = 0           # sequences that left the engine, for any reason
    ttft_counts: list = field(default_factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))  # per bucket, +Inf last
    ttft_sum: float = 0.0       # seconds

    def record_first_token(self, seconds):
        """A time to first token, into the histogram: the first bucket it fits in."""
        self.ttft_sum += seconds
        self.ttft_counts[next((i for i, bound in enumerate(TTFT_BUCKETS) if seconds <= bound), -1)] += 1


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
        self.n_ctx = model.config.block_size
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048
        check_engine_limits(max_num_seqs, max_num_batched_tokens, kv_cache_memory)
        self.device = model.wte.weight.device
        num_blocks = kv_cache_blocks(model, max_num_seqs, num_blocks, kv_cache_memory, gpu_memory_utilization)
        self.runner = ModelRunner(model, num_blocks, cuda_graph, max_graph_batch=max_num_seqs)  # (first: the big allocation)
        self.blocks = BlockManager(num_blocks)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.lock = threading.Lock()
        self.inbox, self.aborts = [], set()
        self.seqs = {}  # seq_id -> Sequence, for every unfinished sequence
        self.stats = EngineStats()

    # --------------------------------------------------------------- the step-level API
    def add_request(self, prompt, params=None, logprobs=None, ignore_eos=False, sink=None, prompt_logprobs=None):
        """Queue a prompt (str or token ids); returns its Sequence. `logprobs`: report the chosen
        token's log-probability and the top-`logprobs` alternatives. `prompt_logprobs`: the same for
        each prompt token after the first (echo), in seq.prompt_entries. params.max_tokens 0:
        generate nothing (only the prompt's logprobs, if asked). `ignore_eos`: keep going past
        <|endoftext|> (benchmarks that want an exact length). A bad request raises ValueError."""
        return self.add_requests([(prompt, params, logprobs, prompt_logprobs)], ignore_eos, sink)[0]

    def add_requests(self, requests, ignore_eos=False, sink=None):
        """Queue [(prompt, params, logprobs[, prompt_logprobs])] all together, or none of them: every
        request is checked (ValueError) before any is queued, so a bad one never leaves the others behind."""
        request_id = next(Sequence._ids)  # (a number no sequence has: the request's own)
        seqs = [self._new_sequence(prompt, params or SamplingParams(), logprobs, ignore_eos, sink, request_id,
                                   *prompt_logprobs) for prompt, params, logprobs, *prompt_logprobs in requests]
        with self.lock:
            self.inbox += seqs
            self.seqs.update((seq.seq_id, seq) for seq in seqs)
        return seqs

    def _new_sequence(self, prompt, params, logprobs, ignore_eos, sink, request_id, prompt_logprobs=None):
        ids = encode(prompt, self.enc) if isinstance(prompt, str) else [int(t) for t in prompt]
        check_prompt(ids, self.n_ctx)  # (not empty, and room for one new token)
        if not all(0 <= t < self.model.config.vocab_size for t in ids):
            raise ValueError(f"a token id is outside the vocabulary (0..{self.model.config.vocab_size - 1})")
        # (max_tokens 0, prefill only, is the engine's own case: every other caller's rule is >= 1)
        (replace(params, max_tokens=1) if params.max_tokens == 0 else params).check()  # (a BadSamplingParam)
        return Sequence(ids, params, self.enc, logprobs, ignore_eos, sink, self.device, request_id, prompt_logprobs)

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
        outputs = self._take_inbox()
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        batch.sort(key=lambda s: s.num_scheduled > 1)  # one-token rows (decodes) first, as the runner packs them (stable)
        wanted = [i for i, seq in enumerate(batch) if seq.needs_prompt_logits]
        if wanted:
            logits, every = self.runner.run_every_token(batch, wanted)
            self._record_prompt_logprobs(batch, every)
        else:
            logits = self.runner.run(batch)
        batch, logits = self._fully_computed(batch, logits)
        outputs += self._prefill_only(batch)
        batch, logits = self._generating(batch, logits)
        if batch:
            outputs += self._emit_tokens(batch, logits)
        return outputs

    def _take_inbox(self):
        """Queue the requests added since the last step and carry out the aborts: the StepOutputs
        of the sequences aborted."""
        with self.lock:
            inbox, self.inbox = self.inbox, []
            aborts, self.aborts = self.aborts, set()
        self.scheduler.waiting.extend(inbox)
        self.stats.prompt_tokens += sum(seq.prompt_len for seq in inbox)
        outputs = []
        for seq_id in aborts:
            seq = self.seqs.get(seq_id)
            if seq is not None and seq.status != FINISHED:
                self.stats.aborted += 1  # (counted first: a watcher that sees the blocks free sees this too)
                self._finish(seq, "abort")
                outputs.append(StepOutput(seq, None, "", "abort"))
        return outputs

    def _fully_computed(self, batch, logits):
        """Account for the tokens the step computed; returns the sequences now fully computed, and
        their rows of `logits`: only they sample a token (a prefill chunk in the middle of a prompt
        has no token and no output)."""
        ready = []
        for i, seq in enumerate(batch):
            seq.num_computed += seq.num_scheduled
            self.blocks.register(seq)  # (full blocks whose k/v are now written, and only those)
            if seq.num_computed == len(seq.tokens):
                ready.append(i)
        if len(ready) == len(batch):
            return batch, logits
        return [batch[i] for i in ready], logits[ready]

    PROMPT_ROWS = 256  # prompt positions scored at a time: their logits over the vocabulary stay small

    @torch.inference_mode()
    def _record_prompt_logprobs(self, batch, every):
        """Each new prompt token's log-probability (and top alternatives) from the logits of the
        position before it: every[i] holds the hidden states of batch[i]'s tokens computed this step."""
        for i, hidden in every.items():
            seq = batch[i]
            # row r predicts prompt token num_computed + r + 1; entry e is that of prompt token e + 1
            first = len(seq.prompt_entries) - seq.num_computed  # the first row whose token is not scored yet
            last = min(len(hidden), seq.prompt_len - 1 - seq.num_computed)  # rows from here predict no prompt token
            for start in range(max(first, 0), last, self.PROMPT_ROWS):  # (rows before `first`: scored before a preemption)
                rows = range(start, min(start + self.PROMPT_ROWS, last))
                log_probs = F.log_softmax(self.model.lm_head(hidden[rows.start:rows.stop])[:, :VOCAB_SIZE].float(), -1)
                targets = torch.tensor(seq.tokens[seq.num_computed + rows.start + 1:seq.num_computed + rows.stop + 1],
                                       device=log_probs.device)
                chosen = log_probs.gather(1, targets[:, None])[:, 0].tolist()
                k = seq.prompt_logprobs
                top = torch.topk(log_probs, k) if k else None
                for j in range(len(rows)):
                    alternatives = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if k else []
                    seq.prompt_entries.append((chosen[j], alternatives))

    def _prefill_only(self, batch):
        """Finish the fully computed sequences that generate nothing (max_tokens 0)."""
        outputs = []
        for seq in batch:
            if seq.prefill_only:
                self._finish(seq, "length")
                outputs.append(StepOutput(seq, None, "", "length"))
        return outputs

    def _generating(self, batch, logits):
        """The sequences of `batch` still to sample a token, and their rows of `logits`."""
        keep = [i for i, seq in enumerate(batch) if seq.status != FINISHED]
        if len(keep) == len(batch):
            return batch, logits
        return [batch[i] for i in keep], logits[keep]

    def _emit_tokens(self, batch, logits):
        """Sample each sequence's next token and turn it into its StepOutput. A sequence whose
        sampling or text fails ends alone (finish_reason "error"), never the step and with it every
        request in flight."""
        logits = logits[:, :VOCAB_SIZE]  # (a padded vocabulary's extra ids are no tokens, nor alternatives)
        tokens, errors = self._sample(batch, logits)
        logprobs = self._logprobs(batch, logits, tokens)
        now = time.perf_counter()
        outputs = []
        for i, seq in enumerate(batch):
            if i in errors:  # this row's sampling failed: it alone ends, with the error for its client
                self._finish(seq, "error")
                outputs.append(StepOutput(seq, None, "", "error", error=errors[i]))
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.stats.record_first_token(now - seq.arrival)
            try:  # (tokens[i] is a Python int: _sample moved them to the host in one transfer)
                outputs.append(self._append(seq, tokens[i], *logprobs.get(i, (None, None))))
            except Exception as e:  # (a bug, or a tokenizer that cannot decode the token)
                traceback.print_exc()
                if seq.status != FINISHED:
                    self._finish(seq, "error")
                outputs.append(StepOutput(seq, None, "", "error", error=e))
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
        """{row: (the sampled token's logprob, [(token id, logprob)] of the top alternatives)} for the
        rows whose request asked for logprobs."""
        out = {}
        rows = [i for i, s in enumerate(batch) if s.logprobs is not None and tokens[i] is not None]
        if rows:
            log_probs = F.log_softmax(logits[rows], dim=-1)
            for j, i in enumerate(rows):
                k = batch[i].logprobs
                top = torch.topk(log_probs[j], k) if k else None
                out[i] = (float(log_probs[j, tokens[i]]),
                          list(zip(top.indices.tolist(), top.values.tolist())) if k else [])
        return out

    def _append(self, seq, token, logprob=None, top=None):
        """Add a sampled token to `seq` and decide whether it is finished."""
        if token == EOT and not seq.ignore_eos:  # the end of the answer: not part of the output
            text, reason = seq.stream.finish(), "stop"
            seq.ended_by_eot = True
        else:
            seq.tokens.append(token)
            self.stats.generation_tokens += 1
            text, reason = seq.stream.push(token), None
            if seq.stream.stopped:
                reason = "stop"
            elif len(seq.tokens) - seq.prompt_len >= seq.params.max_tokens or len(seq.tokens) >= self.n_ctx:
                reason = "length"
            if reason == "length":
                text += seq.stream.finish()
        if reason:
            self._finish(seq, reason)
        return StepOutput(seq, token, text, reason, logprob, top)

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
        self.stats.finished += 1

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
