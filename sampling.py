"""Choosing the next token.

The model gives one logit per vocabulary token. Sampling divides them by the temperature, keeps the
top_k most likely tokens, then the smallest set of most likely ones whose probability reaches top_p
(the nucleus), and draws one in proportion to its renormalized probability. `sample_reference` says
that in a dozen lines; `sample` draws from the same distribution, fast, for a whole batch at once,
and is the one every caller uses (inference.py's decode loop, the engine, train.py's progress
samples). tokenizer.py's TextStream turns the chosen tokens back into text.
"""

import math
from dataclasses import dataclass, field

import torch

from tokenizer import VOCAB_SIZE

MAX_SEED = 2**63 - 1  # seeds are non-negative signed 64-bit integers (what torch.Generator takes)


@dataclass
class SamplingParams:
    """How to choose each token and when to stop. `check()` holds the one set of rules for the
    values, for every caller; it is a call, not done at construction, so that each caller decides
    when and how a bad value is refused (a flag error, an HTTP 400, a config file's error)."""

    max_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = all
    stop: list[str] = field(default_factory=list)  # stop strings: never emitted, end the text
    seed: int | None = None

    def check(self, name=lambda field: field, samples=1):
        """Raise BadSamplingParam at the first field that breaks its rule in RULES, called `name(field)`
        in the message: each caller names a field as its users know it (generate.py's --top-p, the
        API's 'top_p'). Returns self. The values must already be numbers: checking types (JSON, a
        config file) is the caller's job, and so are its own extra limits. `samples`: how many samples
        are drawn with these params, sample i seeded with seed + i, so the seed must leave them room."""
        for field_name, ok, must in RULES:
            value = getattr(self, field_name)
            if not ok(value):
                raise BadSamplingParam(name(field_name), field_name, value, must)
        last = MAX_SEED - (samples - 1)
        if self.seed is not None and self.seed > last:
            raise BadSamplingParam(name("seed"), "seed", self.seed,
                                   f"at most {last} for {samples} samples (sample i uses seed + i)")
        return self


RULES = (  # (field, test, what it must be); nan fails every comparison, so it is refused too
    ("max_tokens", lambda v: v >= 1, ">= 1"),
    ("temperature", lambda v: 0 <= v < math.inf, ">= 0 (0 = greedy)"),
    ("top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    ("seed", lambda v: v is None or 0 <= v <= MAX_SEED, f"between 0 and {MAX_SEED}"),
)


class BadSamplingParam(ValueError):
    """A SamplingParams field outside its range. The message reads `NAME VALUE must be MUST`;
    .field, .value and .must let a caller word the error its own way."""

    def __init__(self, name, field, value, must):
        super().__init__(f"{name} {value} must be {must}")
        self.field, self.value, self.must = field, value, must


class NothingToSample(ValueError):
    """A row of logits holds NaN or inf: a diverged model, or weights too large for their dtype."""


# ----------------------------------------------------------------------------- the reference sampler

def sample_reference(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Logits (B, V) -> next token ids (B,), one setting for every row, as the textbook says it."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = reference_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def reference_probs(logits, temperature, top_k=0, top_p=1.0):
    """Each token's probability of being drawn (B, V), in vocabulary order."""
    probs, ids = (logits.float() / temperature).softmax(-1).sort(-1, descending=True)
    if top_k > 0:
        probs[:, top_k:] = 0
        probs /= probs.sum(-1, keepdim=True)  # top_p counts over the top_k tokens
    if top_p < 1:
        probs[probs.cumsum(-1) - probs >= top_p] = 0  # the more likely tokens had already reached p
        probs /= probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, ids, probs)


# ----------------------------------------------------------------------------- the fast, batched sampler
# The same draw as sample_reference, built for speed and for a batch of requests. Sorting all 50,257
# logits costs more on a CPU than a small model's whole decode step, while a trained model's nucleus
# is usually a small part of the vocabulary: so `candidates` looks for it among the likeliest tokens
# first, with a partial sort. torch.multinomial costs about twenty times what an inverse-CDF draw
# does (`draw`), which also lets the random numbers come from outside: each row of a batch brings
# its own temperature, top_k, top_p and generator (`uniforms`), so a seeded request gets the same
# random numbers whichever requests share its batch: given the same logits, the same token. (Its
# logits in a batch agree with its logits alone only to float rounding: a batch of another shape sums
# in another order.)

NUCLEUS_CANDIDATES = (1024, 8192)  # top_p looks among the 1024 most likely tokens first, then the 8192


def per_row(value, rows):
    """One setting for every row, or already a list of one per row -> a list of one per row."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def candidates(logits, top_k=0, top_p=1.0):
    """The tokens that sampling may draw from each row of logits (B, V), most likely first: (ids,
    probs), both (B, n), probs zero where a filter drops the token (`draw` takes them as they are:
    they need not sum to 1). top_k keeps exactly the k most likely tokens (0 = all); top_p then
    keeps the smallest set of most likely tokens whose probability, renormalized over the top_k set,
    reaches p. Each is one value, or a list of one per row. The nucleus is looked for among the
    NUCLEUS_CANDIDATES most likely tokens in turn (torch.topk: a tenth of a full sort's time or
    less), and among all only when those hold less than p."""
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
    sampling): what torch.multinomial does, with the random numbers coming in (see uniforms)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # else an id past the end would come out
        raise NothingToSample("the logits hold NaN or inf (a diverged model?): nothing to sample from")
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
    row: the engine samples a whole batch of requests, each with its own settings and seed, at once."""
    B = logits.size(0)
    logits = logits[:, :VOCAB_SIZE]  # a padded vocabulary's extra ids are no tokens: never drawn
    temperature, top_k, top_p, generator = (per_row(x, B) for x in (temperature, top_k, top_p, generator))
    rows = [i for i in range(B) if temperature[i] > 0]
    greedy = [i for i in range(B) if not temperature[i] > 0]  # (nan too: never an uninitialized token)
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
