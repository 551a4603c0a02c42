"""Preference tuning: pairs read in their published layouts, the DPO loss equal to its formula computed
independently, LoRA's reference equal to a frozen copy, and a run that learns a preference."""
import copy
import json
import math

import pytest
import torch

import dpo
from conftest import one_line_error
from gpt import GPT, GPTConfig
from lora import add_lora
from preference import (DPOObjective, answer_logprobs, dpo_loss, encode_pairs, pair_batches, read_pairs,
                        reference_logprobs, to_pair)
from tokenizer import EOT, IGNORE, encode_prompt, get_tokenizer

PROMPT = [{"role": "user", "content": "What is 2 plus 3?"}]
PAIR = {"prompt": PROMPT, "chosen": "2 plus 3 is 5.", "rejected": "I do not know."}


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()


# ----------------------------------------------------------------------------- reading pairs

@pytest.mark.parametrize("record", [
    {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "I do not know."},  # TRL, strings
    {"prompt": "What is 2 plus 3?",  # UltraFeedback binarized: whole conversations
     "chosen": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
     "rejected": [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "I do not know."}]},
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"}],
     "chosen": {"role": "assistant", "content": "2 plus 3 is 5."}, "rejected": "I do not know."},
    {"chosen": "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.",  # HH-RLHF transcripts
     "rejected": "\n\nHuman: What is 2 plus 3?\n\nAssistant: I do not know."},
], ids=["trl", "ultrafeedback", "messages", "hh-rlhf"])
def test_every_published_layout_reads_as_the_same_pair(record):
    assert to_pair(record) == PAIR


def test_a_multi_turn_hh_transcript_keeps_its_earlier_turns_as_the_prompt():
    turns = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 plus 3?\n\nAssistant: "
    pair = to_pair({"chosen": turns + "5.", "rejected": turns + "No idea."})
    assert [t["role"] for t in pair["prompt"]] == ["user", "assistant", "user"]
    assert (pair["chosen"], pair["rejected"]) == ("5.", "No idea.")


def test_a_bad_record_is_named_by_file_and_line(tiny, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    with pytest.raises(Exception) as e:
        read_pairs(path)
    assert str(e.value) == f"{path}:2: a preference record needs 'chosen' and 'rejected'"
    tiny.save_checkpoint(tmp_path / "sft", template="chat")
    with pytest.raises(SystemExit):
        dpo.main(["--model", str(tmp_path / "sft"), "--data", str(path), "--out", str(tmp_path / "out")])
    assert f"{path}:2: a preference record needs" in one_line_error(capsys)


@pytest.mark.parametrize("chosen,rejected,why", [
    ("\n\nHuman: Hi\n\nAssistant: ", "\n\nHuman: Hi\n\nAssistant: Go away.", "an empty chosen or rejected answer"),
    ("\n\nHuman: Hi\n\nAssistant: Hello!", "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: More",
     "must share every turn but the last answer"),  # (the rejected side ends with no answer)
], ids=["empty-answer", "ends-with-human"])
def test_an_hh_transcript_pair_without_two_answers_is_refused(chosen, rejected, why):
    with pytest.raises(ValueError, match=why):
        to_pair({"chosen": chosen, "rejected": rejected})


def test_a_prompt_with_an_alpaca_input_reads_back_from_pairs_jsonl_unchanged():
    """dpo --pairs-from writes its pairs to OUT/pairs.jsonl; a resumed run trains on what it reads back."""
    pair = {"prompt": [{"role": "user", "content": "Translate to French.", "input": "Good morning"}],
            "chosen": "Bonjour", "rejected": "Hello"}
    assert to_pair(json.loads(json.dumps(pair))) == pair


def test_only_the_final_answer_is_scored(tiny):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is 2 plus 3?"}]
    [(chosen, rejected)], _ = encode_pairs([{"prompt": prompt, "chosen": "5.", "rejected": "No."}], "chat", 128)
    start = len(encode_prompt(prompt, "chat"))
    for ids, labels in (chosen, rejected):
        assert set(labels[:start]) == {IGNORE} and all(label != IGNORE for label in labels[start:])
        assert ids[start:] == labels[start:]


def test_a_rejected_answer_cut_by_the_token_limit_is_scored_without_a_closing_endoftext():
    """Its <|endoftext|> was never written: scoring it would teach the model not to stop there."""
    pair = to_pair({**PAIR, "rejected_cut": True})
    [(chosen, rejected)], _ = encode_pairs([pair], "chat", 128)
    [(_, closed)], _ = encode_pairs([PAIR], "chat", 128)
    assert chosen[0][-1] == chosen[1][-1] == EOT
    assert rejected == (closed[0][:-1], closed[1][:-1]) and rejected[0][-1] != EOT
    with pytest.raises(ValueError, match="rejected_cut"):
        to_pair({**PAIR, "rejected_cut": "yes"})


# ----------------------------------------------------------------------------- the loss

def independent_answer_logprob(model, ids, labels):
    """Sum of log p(token) over the learned tokens, from a forward pass over the unpadded sequence."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_the_loss_on_a_batch_equals_the_formula_computed_independently(tiny, loss_type, smoothing):
    pairs = [PAIR, {"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.",
                    "rejected": "A colour is a thing that you can see with your eyes."}]
    encoded, _ = encode_pairs(pairs, "alpaca", 128)
    policy = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    beta = 0.3
    x, y = next(pair_batches(encoded, 2))  # padded: the rejected answers are of other lengths
    objective = DPOObjective(tiny, beta, loss_type, smoothing)
    with torch.no_grad():
        mean_loss = float(objective.loss_sum(policy, (x, y), 2)) / 2
    expected, metrics = [], {}
    for chosen, rejected in encoded:
        (pc, pr), (rc, rr) = ([independent_answer_logprob(m, *side) for side in (chosen, rejected)] for m in (policy, tiny))
        if loss_type == "ipo":  # mean log-probabilities per answer token, the loss and the metrics alike
            lc, lr = (sum(label != IGNORE for label in side[1]) for side in (chosen, rejected))
            pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
            expected.append(((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2)
        else:
            z = beta * ((pc - rc) - (pr - rr))
            log_sigmoid = lambda v: -math.log1p(math.exp(-v))  # noqa: E731
            expected.append(-(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z))
        pair = {"rewards/chosen": beta * (pc - rc), "rewards/rejected": beta * (pr - rr),
                "rewards/margins": beta * ((pc - rc) - (pr - rr)), "rewards/accuracies": float(pc - rc > pr - rr),
                "logps/chosen": pc, "logps/rejected": pr}
        metrics = {k: metrics.get(k, 0.0) + v for k, v in pair.items()}
    assert mean_loss == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert objective.metrics.keys() == metrics.keys()
    for key, value in metrics.items():  # (summed over the two pairs)
        assert objective.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_identical_chosen_and_rejected_give_log_2():
    logp = torch.tensor([-12.5, -40.0])
    ref = torch.tensor([-11.0, -39.0])
    losses, chosen, rejected = dpo_loss(logp, logp, ref, ref, beta=1e-3)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen, rejected)


def test_lora_reference_equals_a_separate_frozen_copy(tiny):
    frozen = copy.deepcopy(tiny)
    add_lora(tiny, 4, 16.0, ["c_attn", "c_proj"])
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            if "lora_B" in name:
                p.normal_()  # the adapters now change every answer
    tiny.train()
    encoded, _ = encode_pairs([PAIR], "alpaca", 128)
    x, y = next(pair_batches(encoded, 1))
    assert torch.equal(reference_logprobs(tiny, None, x, y), reference_logprobs(frozen, frozen, x, y))
    assert not torch.allclose(answer_logprobs(tiny, x, y)[0], reference_logprobs(frozen, frozen, x, y))
    assert tiny.training  # (the reference is read in eval mode; the policy goes back to training)


# ----------------------------------------------------------------------------- a run

def learnable_pairs(made_data, n=60):
    """Chosen: the dataset's answer; rejected: a refusal. A tiny model can learn to prefer answers."""
    records = json.loads((made_data / "instructions.json").read_text())[:n]
    return [{"prompt": r["instruction"] + (" " + r["input"] if r["input"] else ""), "chosen": r["output"],
             "rejected": "Sorry, I cannot help with that request."} for r in records]


def test_a_run_raises_the_held_out_margin_and_accuracy_and_writes_a_plain_checkpoint(tiny, made_data, tmp_path, capsys):
    tiny.save_checkpoint(tmp_path / "sft", template="chat")  # (the short template: a cheaper test)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in learnable_pairs(made_data, 40)))
    dpo.main(["--model", str(tmp_path / "sft"), "--data", str(data), "--out", str(tmp_path / "dpo"), "--max-steps", "8",
              "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--beta", "0.1", "--eval-interval", "4",
              "--device", "cpu"])
    meta = json.loads((tmp_path / "dpo" / "training_metadata.json").read_text())
    first, last = meta["held_out"]["first"], meta["held_out"]["last"]
    assert first["rewards/margins"] == 0 and first["loss"] == pytest.approx(math.log(2))  # policy = reference
    assert last["rewards/margins"] > 0.5 and last["rewards/accuracies"] == 1.0 and last["loss"] < first["loss"]
    log = [json.loads(line) for line in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(steps[0])
    model = GPT.from_pretrained(tmp_path / "dpo")
    assert model.checkpoint_info["template"] == "chat"
    assert "preference accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a finished run is never overwritten by accident
        dpo.main(["--model", str(tmp_path / "sft"), "--data", str(data), "--out", str(tmp_path / "dpo")])
    assert "finished run" in one_line_error(capsys)


def test_lora_run_learns_too_and_saves_the_adapters_merged(tiny, made_data, tmp_path):
    tiny.save_checkpoint(tmp_path / "sft", template="chat")
    data = tmp_path / "pairs.json"  # (a JSON list this time)
    data.write_text(json.dumps(learnable_pairs(made_data, 20)))
    dpo.main(["--model", str(tmp_path / "sft"), "--data", str(data), "--out", str(tmp_path / "dpo"), "--max-steps", "4",
              "--batch-size", "2", "--lr", "3e-3", "--lora-rank", "4", "--device", "cpu"])
    meta = json.loads((tmp_path / "dpo" / "training_metadata.json").read_text())
    assert meta["held_out"]["last"]["rewards/margins"] > meta["held_out"]["first"]["rewards/margins"] == 0
    trained = GPT.from_pretrained(tmp_path / "dpo")
    assert not any("lora" in name for name in trained.state_dict())
    assert not torch.equal(trained.h[0].attn.c_attn.weight, tiny.h[0].attn.c_attn.weight)


def test_a_model_with_no_template_is_a_one_line_error(tiny, tmp_path, capsys):
    tiny.save_checkpoint(tmp_path / "base")
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([PAIR]))
    with pytest.raises(SystemExit):
        dpo.main(["--model", str(tmp_path / "base"), "--data", str(data), "--out", str(tmp_path / "out")])
    assert "records no chat template" in one_line_error(capsys)


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny, made_data, tmp_path, monkeypatch, capsys):
    """As sft.py's: the same final weights bit for bit, the same log, none of it twice; the flags come
    from the saved state, and a flag that would change the run is refused."""
    tiny.save_checkpoint(tmp_path / "sft", template="chat")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in learnable_pairs(made_data, 24)))
    flags = ["--model", str(tmp_path / "sft"), "--data", str(data), "--max-steps", "6", "--batch-size", "2",
             "--grad-accum", "2", "--lr", "1e-3", "--eval-interval", "2", "--save-every", "2", "--device", "cpu"]
    dpo.main([*flags, "--out", str(tmp_path / "whole")])
    dpo.main([*flags, "--out", str(tmp_path / "parts"), "--stop-at-step", "3"])
    assert "stopped at step 3 of 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dpo.main(["--resume", str(tmp_path / "parts"), "--beta", "0.5"])
    assert "--beta 0.5 differs from the saved run's 0.1" in one_line_error(capsys)
    pairs = data.read_text()
    data.write_text(pairs.replace("Sorry", "Alas"))  # other pairs
    with pytest.raises(SystemExit):
        dpo.main(["--resume", str(tmp_path / "parts")])
    assert "the preference pairs differ from those of the run saved in" in one_line_error(capsys)
    data.write_text(pairs)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.ln_f.bias.add_(0.5)
    other.save_checkpoint(tmp_path / "sft", template="chat")  # another reference
    with pytest.raises(SystemExit):
        dpo.main(["--resume", str(tmp_path / "parts")])
    assert "differs from the one the run saved in" in one_line_error(capsys)
    tiny.save_checkpoint(tmp_path / "sft", template="chat")
    monkeypatch.chdir(tmp_path)
    dpo.main(["--resume", "parts"])
    whole, parts = (GPT.from_pretrained(tmp_path / d).state_dict() for d in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    logs = [(tmp_path / d / "log.jsonl").read_text() for d in ("whole", "parts")]
    assert logs[0] == logs[1] and [json.loads(line)["step"] for line in logs[0].splitlines()] == [
        0, 1, 2, 2, 3, 4, 4, 5, 6, 6]
    with pytest.raises(SystemExit):
        dpo.main(["--resume", str(tmp_path / "nothing")])
    assert "no run in" in one_line_error(capsys)


def test_sampled_rejected_answers_are_seeded_each_on_its_own(tiny, made_data):
    """--temperature: answer i sampled with seed + i, so the same seed gives the same pairs, and an
    answer does not depend on the others in its batch."""
    from conversations import to_conversation
    from preference import pairs_from_answers
    from scoring import answer_conversations
    enc = get_tokenizer()
    convs = [to_conversation(r) for r in json.loads((made_data / "instructions.json").read_text())[:4]]
    batch, _ = answer_conversations(tiny, convs, "chat", 6, enc, temperature=1.0, seed=3)
    alone = [answer_conversations(tiny, [c], "chat", 6, enc, temperature=1.0, seed=3 + i)[0][0]
             for i, c in enumerate(convs)]
    assert [a["response"] for a in batch] == [a["response"] for a in alone]
    greedy, _ = answer_conversations(tiny, convs, "chat", 6, enc)
    assert [a["response"] for a in batch] != [a["response"] for a in greedy]
    def sampled(seed):
        return pairs_from_answers(tiny, convs, "chat", 6, enc, temperature=1.0, seed=seed)
    assert sampled(3) == sampled(3) != sampled(4)


def test_pairs_made_from_the_models_answers_resume_exactly(tiny, made_data, tmp_path):
    """--pairs-from with Alpaca inputs in the prompts: the resumed run reads OUT/pairs.jsonl and trains
    on the same pairs as the run that made them."""
    word = get_tokenizer().encode(" maybe")[0]
    with torch.no_grad():  # (a random model answers newlines, which strip to nothing: make it say a word)
        tiny.ln_f.bias.copy_(tiny.wte.weight[word] * 100)
    tiny.save_checkpoint(tmp_path / "sft", template="alpaca")
    records = json.loads((made_data / "instructions.json").read_text())
    source = tmp_path / "sft_data.json"
    source.write_text(json.dumps([r for r in records if r["input"]][:8]))
    flags = ["--model", str(tmp_path / "sft"), "--pairs-from", str(source), "--max-new-tokens", "4", "--max-steps", "4",
             "--batch-size", "2", "--eval-interval", "2", "--val-frac", "0.25", "--device", "cpu"]
    dpo.main([*flags, "--out", str(tmp_path / "whole")])
    dpo.main([*flags, "--out", str(tmp_path / "parts"), "--stop-at-step", "2"])
    dpo.main(["--resume", str(tmp_path / "parts")])
    whole, parts = (GPT.from_pretrained(tmp_path / d).state_dict() for d in ("whole", "parts"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert (tmp_path / "whole" / "log.jsonl").read_text() == (tmp_path / "parts" / "log.jsonl").read_text()
    pairs = [json.loads(line) for line in (tmp_path / "whole" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["rejected_cut"] and p["prompt"][0]["input"] for p in pairs)  # (4 tokens: every answer cut)


def test_gradient_accumulation_over_pairs_equals_one_batch(tiny):
    """train_step averages DPO's loss over the pairs of all micro-batches: 2 x 2 pairs is 1 x 4."""
    from training import train_step
    encoded, _ = encode_pairs([PAIR, {**PAIR, "rejected": "Five, I think."}, {**PAIR, "chosen": "It is 5."},
                               {**PAIR, "rejected": "No."}], "chat", 128)
    policy = copy.deepcopy(tiny)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # (away from the reference: the margins are not all 0)
    results = []
    for micro in ([next(pair_batches(encoded, 4))], list(pair_batches(encoded, 2))):
        model = copy.deepcopy(policy).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # (plain SGD: the step is the gradient itself)
        loss = train_step(model, optimizer, micro, 1.0, grad_clip=0, objective=DPOObjective(tiny, 0.1))
        results.append((loss, model.state_dict()))
    (loss_one, one), (loss_two, two) = results
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    assert any(not torch.equal(one[k], policy.state_dict()[k]) for k in one)  # (it did step)
