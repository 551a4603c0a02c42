"""Preference tuning with DPO (Direct Preference Optimization, Rafailov et al., 2023).

SFT shows the model good answers. Preference data shows it pairs: for one prompt, the answer people
preferred ("chosen") and one they did not ("rejected"). DPO raises the chosen answer's probability
against the rejected one's, measured relative to a frozen reference (the model training started
from), so the model moves only as far as the preferences ask. With the log-ratio of an answer y

    r(y) = log p_model(y | prompt) - log p_reference(y | prompt)     (summed over y's tokens only)

the loss of a pair is -log sigmoid(beta * (r(chosen) - r(rejected))): a logistic regression on the
margin, with no reward model and no sampling. beta * r(y) is the answer's "implicit reward", which
TRL logs as rewards/chosen and rewards/rejected; their difference is rewards/margins, and
rewards/accuracies the share of pairs where the chosen answer's is the higher. Variants: label
smoothing (conservative DPO, for preferences that are sometimes wrong) and IPO, a squared loss on
the margin of mean per-token log-ratios that does not push it to infinity.

With LoRA the reference is the model with its adapters off: the same weights, no second copy.

This file: reading preference pairs in the layouts they are published in, encoding them, and the
loss. dpo.py runs the training.
"""

import contextlib
import copy
import re

import torch
import torch.nn.functional as F

from conversations import DataError, collate, read_records, to_conversation
from lora import adapters_off
from scoring import answer_conversations
from tokenizer import IGNORE, encode_conversation, encode_prompt, get_tokenizer

LOSS_TYPES = ("sigmoid", "ipo")

# ----------------------------------------------------------------------------- reading pairs
# Every layout becomes one form, a pair: {"prompt": a conversation ending with a user turn,
# "chosen": the preferred answer's text, "rejected": the other's}. The layouts:
#   TRL's        {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
#   UltraFeedback binarized: the same keys, chosen and rejected whole conversations (prompt included)
#   messages     {"messages": [...], "chosen": str | {"role": "assistant", ...}, "rejected": ...}
#   HH-RLHF      {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "...same turns, other last answer"}
# Any layout may add "rejected_cut": true (dpo --pairs-from does, for an answer the token limit cut
# short): the rejected answer is then scored without a closing <|endoftext|>, which it never had.

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _from_hh(text):
    """An Anthropic HH-RLHF transcript -> a conversation."""
    parts = HH_TURN.split(text)  # [before, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("an HH-RLHF transcript starts with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": t.strip()} for r, t in zip(parts[1::2], parts[2::2])]


def _answer_and_prefix(side, prompt):
    """(the conversation before the answer, the answer's text) of one side of a pair: a string (the
    answer), a message, or a whole conversation ending with the answer."""
    if isinstance(side, str):
        return prompt, side.strip()
    if isinstance(side, dict):
        side = [side]
    if not isinstance(side, list) or not side:
        raise ValueError("chosen and rejected must be strings, a message, or a list of messages")
    turns = to_conversation({"messages": side})
    if turns[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected must end with an assistant answer")
    before = turns[:-1]
    return (before if any(t["role"] == "user" for t in before) else prompt + before), turns[-1]["content"]


def to_pair(record):
    """One record of any layout above -> a pair. Raises ValueError when it fits none."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise ValueError("a preference record needs 'chosen' and 'rejected'")
    if "prompt" not in record and "messages" not in record and isinstance(record["chosen"], str):
        chosen, rejected = _from_hh(record["chosen"]), _from_hh(record["rejected"])
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("the chosen and rejected transcripts must share every turn but the last answer")
        return checked_pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], record)
    prompt = record.get("messages", record.get("prompt")) or []
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt.strip()}]
    elif prompt:
        prompt = to_conversation({"messages": prompt})
    (before_c, chosen), (before_r, rejected) = (_answer_and_prefix(record[k], prompt) for k in ("chosen", "rejected"))
    if before_c != before_r:
        raise ValueError("chosen and rejected must answer the same conversation")
    return checked_pair(before_c, chosen, rejected, record)


def checked_pair(prompt, chosen, rejected, record):
    """The pair, once its parts are what DPO needs (a question to answer, two answers)."""
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user turn")
    if not chosen or not rejected:
        raise ValueError("an empty chosen or rejected answer")
    if record.get("rejected_cut") not in (None, False, True):
        raise ValueError("rejected_cut must be true or false")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            **({"rejected_cut": True} if record.get("rejected_cut") else {})}


def read_pairs(path):
    """Every pair in a JSON or JSONL file, or DataError naming the file and line at fault."""
    pairs = []
    for line, record in read_records(path):
        try:
            pairs.append(to_pair(record))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{line}: {e}") from None
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def pairs_from_answers(model, conversations, template, max_new_tokens, enc=None, temperature=0.0, seed=0):
    """Preference pairs from what a fine-tuner already has: a dataset's answer as `chosen` and the
    model's own answer to the same prompt (greedy, or sampled at `temperature`, answer i seeded
    with seed + i) as `rejected` (LLMs-from-scratch's recipe, there with a stronger model writing
    the chosen answers), all answered through the engine in one batch.
    An answer the model already gives word for word teaches nothing and is left out. Returns (the
    pairs, how many conversations gave none)."""
    answers, skipped = answer_conversations(model, conversations, template, max_new_tokens, enc or get_tokenizer(),
                                            temperature=temperature, seed=seed)
    pairs = [{"prompt": a["conversation"], "chosen": a["reference"].strip(), "rejected": a["response"].strip(),
              **({"rejected_cut": True} if a["finish_reason"] == "length" else {})} for a in answers]
    kept = [p for p in pairs if p["rejected"] and p["chosen"] and p["rejected"] != p["chosen"]]
    return kept, skipped + len(pairs) - len(kept)


# ----------------------------------------------------------------------------- encoding

def encode_answer(prompt, answer, template, enc=None, closed=True):
    """(ids, labels) of the prompt followed by one answer, with labels on that answer (and its
    closing <|endoftext|>, unless not `closed`) only: earlier answers in a multi-turn prompt are
    context, not learned."""
    ids, labels = encode_conversation(prompt + [{"role": "assistant", "content": answer}], template, enc)
    start = len(encode_prompt(prompt, template, enc))
    end = len(ids) if closed else len(ids) - 1  # (the answer's closing <|endoftext|> is the last token)
    return ids[:end], [IGNORE] * start + labels[start:end]


def encode_pairs(pairs, template, max_len, enc=None):
    """[(chosen example, rejected example)] of the pairs whose both sides fit in max_len tokens of
    input (max_len + 1 with the last token, which is only predicted), and how many did not."""
    encoded, too_long = [], 0
    for p in pairs:
        chosen = encode_answer(p["prompt"], p["chosen"], template, enc)
        rejected = encode_answer(p["prompt"], p["rejected"], template, enc, closed=not p.get("rejected_cut"))
        if max(len(chosen[0]), len(rejected[0])) > max_len + 1:
            too_long += 1
        else:
            encoded.append((chosen, rejected))
    return encoded, too_long


# ----------------------------------------------------------------------------- the loss

def answer_logprobs(model, x, y):
    """Each row's summed log-probability of its learned tokens (y != IGNORE), and their number:
    (B,), (B,). Differentiable: the policy's side of the loss."""
    logits = model(x)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(y.shape).sum(-1), (y != IGNORE).sum(-1)


def reference_logprobs(model, reference, x, y):
    """answer_logprobs of the reference: `reference` when given (a frozen copy), else `model` with
    its adapters off. No gradient, and in eval mode (no dropout: the reference is a fixed function)."""
    with torch.no_grad():
        if reference is not None:
            return answer_logprobs(reference, x, y)[0]
        training = model.training
        model.eval()
        try:
            with adapters_off(model):
                return answer_logprobs(model, x, y)[0]
        finally:
            model.train(training)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid", label_smoothing=0.0):
    """The per-pair loss and the implicit rewards (losses, chosen rewards, rejected rewards), each (B,).
    chosen, rejected: the model's answer log-probabilities; ref_*: the reference's (for IPO, means
    per answer token: see DPOObjective)."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}: {', '.join(LOSS_TYPES)}")
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


class DPOObjective:
    """DPO as training.train_step's objective: a micro-batch is (x, y) with the chosen answers in
    its first half of rows and the rejected ones in the second (one forward pass for both); the
    unit the loss is averaged over is the pair. Sums TRL's metrics over the step into `metrics`.
    IPO works on each answer's mean per-token log-probability, as TRL does, and so do its rewards
    and logps metrics: they describe the margin the loss is trained on."""

    def __init__(self, reference, beta, loss_type="sigmoid", label_smoothing=0.0):
        self.reference, self.beta, self.loss_type, self.label_smoothing = reference, beta, loss_type, label_smoothing
        self.metrics = {}

    def count(self, batch):
        return batch[0].shape[0] // 2

    def loss_sum(self, model, batch, n):
        x, y = batch
        logp, lengths = answer_logprobs(model, x, y)
        ref = reference_logprobs(model, self.reference, x, y)
        if self.loss_type == "ipo":
            logp, ref = logp / lengths, ref / lengths
        losses, rc, rr = dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], self.beta, self.loss_type,
                                  self.label_smoothing)
        for key, v in pair_metrics(rc, rr, logp[:n].detach(), logp[n:].detach()).items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(v.sum())
        return losses.sum()


def pair_metrics(rewards_chosen, rewards_rejected, logps_chosen, logps_rejected):
    """Per pair, under TRL's names: the implicit rewards, their margin, whether the chosen one's is
    the higher, and the model's answer log-probabilities."""
    return {"rewards/chosen": rewards_chosen, "rewards/rejected": rewards_rejected,
            "rewards/margins": rewards_chosen - rewards_rejected,
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
            "logps/chosen": logps_chosen, "logps/rejected": logps_rejected}


def pair_batches(encoded, batch_size):
    """The encoded pairs in order, batch_size at a time, as (x, y): chosen rows then rejected rows."""
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        yield collate([c for c, _ in chunk] + [r for _, r in chunk])


@torch.no_grad()
def evaluate_pairs(model, batches, objective, autocast=contextlib.nullcontext):
    """The mean loss and TRL's metrics (means over pairs) of `objective` on held-out pair batches, the
    model in eval mode (the caller puts it back in train mode)."""
    model.eval()
    probe = copy.copy(objective)  # (its own metrics: the training step's are left alone)
    probe.metrics = {}
    device = next(model.parameters()).device
    loss, pairs = 0.0, 0
    for x, y in batches:
        n = probe.count((x, y))
        with autocast():
            loss += float(probe.loss_sum(model, (x.to(device), y.to(device)), n))
        pairs += n
    return {"loss": loss / pairs, **{k: v / pairs for k, v in probe.metrics.items()}}
