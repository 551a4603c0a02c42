"""How good a model is, in numbers: perplexity and bits per byte over a text, accuracy on
multiple-choice questions, and what a chatbot's answers show without a judge.

  perplexity     The mean loss of every token of a text but the first, given the tokens before
                 it, in windows of the model's context that slide by `stride` tokens: each token is
                 scored once, with as much context as its window gives it (the more overlap, the
                 more context, the slower). Bits per byte divides the same loss by the text's UTF-8 bytes instead of
                 its tokens, so models with different tokenizers compare.
  choices        A question and its candidate endings: each ending is scored by the summed
                 log-probability of its tokens after the context. acc takes the best sum; acc_norm
                 the best mean per token, so a long ending is not penalised for its length (the
                 normalisation of the HellaSwag figures llm.c and nanoGPT publish).
  answer signals Answers to held-out prompts, read for three things fine-tuning should change: do
                 they end (with <|endoftext|>) before the token limit, do they go on to write the
                 next turn themselves ("### Instruction", "User:"), and how long are they.
"""

import math

import torch
import torch.nn.functional as F

from conversations import DataError, read_records
from engine import Engine
from sampling import SamplingParams
from tokenizer import EOT, VOCAB_SIZE, PromptTooLong, encode, fit_conversation, format_prompt, token_sizes


# ----------------------------------------------------------------------------- perplexity

def target_logprobs(model, x, rows, cols, targets):
    """log p(targets[j] | the tokens of row rows[j] of `x` up to column cols[j]), in float64 on the
    CPU. `x` is a right-padded batch (causal attention never sees the pad); the head runs on the
    scored positions only, over GPT-2's tokens (a padded vocabulary's extra ids are no tokens)."""
    device = model.wte.weight.device
    hidden = model.hidden(x.to(device))[rows, cols]
    logits = model.lm_head(hidden)[:, :VOCAB_SIZE].float()
    return -F.cross_entropy(logits, targets.to(device), reduction="none").cpu().double()


def sliding_windows(n_tokens, context, stride):
    """[(begin, end, first)]: windows `stride` apart whose model input is ids[begin:end - 1] (at
    most `context` tokens) and whose targets are ids[first:end], the tokens no earlier window
    scored: every token but the first is scored exactly once."""
    windows, scored_to = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context + 1, n_tokens)
        if end > scored_to:
            windows.append((begin, end, scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(model, ids, stride=None, batch_size=8, enc=None, progress=None):
    """{loss, perplexity, bits_per_byte, tokens, bytes} of the token ids `ids` (a 1-D sequence).
    loss: the mean cross-entropy in nats over every scored token; bits per byte: the same nats over
    the tokens that spell text (not <|endoftext|>), in bits, per byte of that text."""
    context = model.config.block_size
    stride = stride or context
    if not 1 <= stride <= context:  # (a longer stride would leave tokens between windows unscored)
        raise ValueError(f"the stride must be 1 to the model's context ({context}), not {stride}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token{'s' * (len(ids) != 1)}: at least 2 are needed to score one")
    sizes = torch.tensor(token_sizes(enc), dtype=torch.long)
    sizes[EOT] = 0  # a document separator is no text: no bytes, and left out of bits per byte
    windows = sliding_windows(len(ids), context, stride)
    nats = text_nats = 0.0
    n_scored = n_bytes = 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        x = torch.zeros(len(batch), max(end - begin for begin, end, _ in batch) - 1, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (begin, end, first) in enumerate(batch):  # right-padded: causal attention never sees the pad
            x[r, :end - begin - 1] = ids[begin:end - 1]
            rows += [r] * (end - first)
            cols += range(first - begin - 1, end - begin - 1)  # the position whose output predicts each target
            targets.append(ids[first:end])
        targets = torch.cat(targets)
        nll = -target_logprobs(model, x, rows, cols, targets)
        spelled = sizes[targets] > 0
        nats += float(nll.sum())
        text_nats += float(nll[spelled].sum())
        n_scored += len(targets)
        n_bytes += int(sizes[targets].sum())
        if progress:
            progress(len(targets))
    loss = nats / n_scored
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": text_nats / math.log(2) / n_bytes if n_bytes else None,
            "tokens": n_scored, "bytes": n_bytes}


# ----------------------------------------------------------------------------- multiple choice

def read_choice_items(path):
    """[(context, [endings], label)] from a JSONL or JSON file of {context, choices, label} records
    or HellaSwag's released ones ({ctx, endings, label}). An ending follows its context after a
    space unless the context ends in whitespace (as " " + ending is how the text would run on)."""
    items = []
    for line, record in read_records(path):
        try:
            items.append(choice_item(record))
        except ValueError as e:
            raise DataError(f"{path}:{line}: {e}") from None
    if not items:
        raise DataError(f"{path}: no questions in it")
    return items


def choice_item(record):
    """(context, endings, label) of one record, or a ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    keys = ("ctx", "endings") if "endings" in record else ("context", "choices")
    missing = [k for k in (*keys, "label") if k not in record]
    if missing:
        raise ValueError(f"no {', '.join(missing)} (a question is {{context, choices, label}} or HellaSwag's "
                         "{ctx, endings, label})")
    context, endings, label = record[keys[0]], record[keys[1]], record["label"]
    if not isinstance(context, str) or not isinstance(endings, list) or len(endings) < 2 \
            or not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError(f"'{keys[0]}' must be a string and '{keys[1]}' a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.isdigit():  # (HellaSwag's label is an int; some copies quote it)
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"'label' must be the index of the right choice, 0..{len(endings) - 1}, not {label!r}")
    return context, endings, label


def choice_tokens(context, ending, enc, n_ctx):
    """(token ids of context + ending, the number of ending tokens at their end), the context cut
    from the left where the two do not fit the model's context."""
    joined = ending if not context or context[-1].isspace() else " " + ending
    # an empty context: <|endoftext|> stands before the ending, so its first token is predicted too
    ctx_ids, end_ids = encode(context, enc) or [EOT], encode(joined, enc)
    if len(end_ids) >= n_ctx:
        raise ValueError(f"an ending of {len(end_ids)} tokens does not fit the model's context of {n_ctx}")
    return (ctx_ids + end_ids)[-n_ctx:], len(end_ids)


@torch.no_grad()
def score_choices(model, items, enc, batch_size=16, progress=None):
    """For each item, [(summed log-probability of the ending's tokens, their number)] per choice."""
    n_ctx = model.config.block_size
    flat = []
    for i, (context, endings, _) in enumerate(items):
        try:
            flat += [(i, choice_tokens(context, ending, enc, n_ctx)) for ending in endings]
        except ValueError as e:
            raise ValueError(f"question {i + 1}: {e}") from None
    scores = [[] for _ in items]
    for start in range(0, len(flat), batch_size):
        batch = flat[start:start + batch_size]
        x = torch.zeros(len(batch), max(len(ids) for _, (ids, _) in batch) - 1, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, (_, (ids, n)) in enumerate(batch):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            rows += [r] * n
            cols += range(len(ids) - 1 - n, len(ids) - 1)
            targets += ids[-n:]
        logp = target_logprobs(model, x, rows, cols, torch.tensor(targets))
        at = 0
        for i, (_, n) in batch:
            scores[i].append((float(logp[at:at + n].sum()), n))
            at += n
        if progress:  # questions whose every choice is now scored
            progress(sum(len(scores[i]) == len(items[i][1]) for i in {i for i, _ in batch}))
    return scores


def choice_accuracy(items, scores):
    """{acc, acc_norm, questions}: the share of items whose right ending has the best summed
    log-probability (acc), the best mean per token (acc_norm)."""
    acc = sum(max(range(len(s)), key=lambda j: s[j][0]) == label for (_, _, label), s in zip(items, scores))
    norm = sum(max(range(len(s)), key=lambda j: s[j][0] / s[j][1]) == label for (_, _, label), s in zip(items, scores))
    return {"acc": acc / len(items), "acc_norm": norm / len(items), "questions": len(items)}


# ----------------------------------------------------------------------------- answers, and what they show

NEXT_TURN = {"alpaca": "### Instruction", "chat": "User:"}  # what an answer that talks on writes next


def answer_conversations(model, conversations, template, max_new_tokens, enc, max_num_seqs=64, temperature=0.0,
                         seed=0):
    """Greedy answers to each conversation's last question, all through the engine in one batch.
    The prompt is the conversation up to its last answer (oldest turns dropped where it does not
    fit: `conversation` is what was kept); the reference is that answer. Returns ([{prompt,
    conversation, reference, response, finish_reason, tokens}], how many conversations could not be
    asked: no question before their last answer, or a question longer than the context).
    temperature > 0 samples instead, answer i with seed + i (the same answers in any batch)."""
    asked, skipped = [], 0
    for conv in conversations:
        if len(conv) < 2 or conv[-2]["role"] != "user":
            skipped += 1
            continue
        try:
            ids, kept = fit_conversation(conv[:-1], template, model.config.block_size, max_new_tokens, enc)
        except PromptTooLong:
            skipped += 1
            continue
        asked.append((ids, kept, conv[-1]["content"]))
    if not asked:
        return [], skipped
    engine = Engine(model, enc, max_num_seqs=min(max_num_seqs, len(asked)), cuda_graph=False)
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + i if temperature else None)
              for i in range(len(asked))]
    outputs = engine.generate([ids for ids, _, _ in asked], params)
    return [{"prompt": format_prompt(kept, template), "conversation": kept, "reference": reference, "response": out.text,
             "finish_reason": out.finish_reason, "tokens": len(out.token_ids)}
            for (_, kept, reference), out in zip(asked, outputs)], skipped


def answer_signals(answers, template):
    """{ended, talks_on, mean_tokens, answers} of answer_conversations' answers: the share that end
    with <|endoftext|> before the token limit, the share that go on to write the next turn's marker,
    and their mean length in tokens."""
    n = len(answers)
    if not n:
        return {"ended": None, "talks_on": None, "mean_tokens": None, "answers": 0}
    marker = NEXT_TURN[template]
    return {"ended": sum(a["finish_reason"] == "stop" for a in answers) / n,
            "talks_on": sum(marker in a["response"] for a in answers) / n,
            "mean_tokens": sum(a["tokens"] for a in answers) / n, "answers": n}
