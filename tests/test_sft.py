"""Instruction fine-tuning (sft.py): loss normalization under accumulation, LoRA, the whole run."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import sft
from data import collate, encode_examples
from gpt import GPT, GPTConfig
from sft import LoRALinear, add_lora, lora_merged, merge_lora
from train import make_optimizer, train_step

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def conversations_of_uneven_length():
    """8 single-turn conversations whose answers run from 1 word to ~60: the case where averaging
    per micro-batch instead of per learned token gives a different loss."""
    lengths = [1, 60, 2, 3, 45, 1, 30, 5]
    return [[{"role": "user", "content": f"Question {i}?"},
             {"role": "assistant", "content": " ".join(["word"] * n)}] for i, n in enumerate(lengths)]


def test_grad_accum_4x2_equals_one_batch_of_8(tiny_model):
    examples, _ = encode_examples(conversations_of_uneven_length(), "chat", max_len=128)
    whole = [collate(examples)]
    micro = [collate(examples[i:i + 2]) for i in range(0, 8, 2)]
    # the micro-batches really are uneven: the mean of their means is not the per-token mean
    losses = [tiny_model(x, y)[1].item() for x, y in micro]
    per_token = tiny_model(*whole[0])[1].item()
    assert abs(sum(losses) / 4 - per_token) > 1e-3

    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    # plain SGD with lr 1: each parameter moves by exactly its gradient, so equal updates = equal gradients
    loss_a = train_step(a, torch.optim.SGD(a.parameters(), lr=1.0), whole, lr=1.0, grad_clip=0)
    loss_b = train_step(b, torch.optim.SGD(b.parameters(), lr=1.0), micro, lr=1.0, grad_clip=0)
    assert loss_a == pytest.approx(per_token, abs=1e-5)
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    moved = 0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), tiny_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=2e-6, msg=name)
        moved += int(not torch.equal(pa, p0))
    assert moved == len(list(tiny_model.parameters()))  # every parameter got a gradient


# ----------------------------------------------------------------------------- LoRA

def lora_batch():
    examples, _ = encode_examples(conversations_of_uneven_length(), "chat", max_len=128)
    return collate(examples[:4])


def trained_lora_model(tiny_model, targets=("c_attn", "c_proj"), steps=3):
    model = copy.deepcopy(tiny_model)
    add_lora(model, rank=4, alpha=8, targets=targets)
    opt = make_optimizer(model, 1e-2, weight_decay=0.0, verbose=False)
    for _ in range(steps):
        train_step(model, opt, [lora_batch()], lr=1e-2)
    return model


def test_lora_wraps_the_chosen_layers_and_only_adapters_train(tiny_model):
    model = copy.deepcopy(tiny_model)
    wrapped = add_lora(model, rank=4, alpha=8, targets=["c_attn", "c_proj"])
    assert wrapped == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_proj",
                       "h.1.attn.c_attn", "h.1.attn.c_proj", "h.1.mlp.c_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}" for w in wrapped for ab in "AB"}
    # 64 wide: c_attn (64 -> 192), c_proj (64 -> 64), mlp.c_proj (256 -> 64); rank 4
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 4 * ((64 + 192) + (64 + 64) + (256 + 64))
    only_mlp = add_lora(copy.deepcopy(tiny_model), 2, 4, ["mlp.c_proj", "c_fc"])
    assert only_mlp == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(copy.deepcopy(tiny_model), 2, 4, ["q_proj"])
    # B starts at zero: the wrapped model is exactly the base model before training
    x, _ = lora_batch()
    torch.testing.assert_close(model(x), tiny_model(x), rtol=0, atol=0)


def test_lora_training_leaves_base_weights_unchanged(tiny_model):
    model = trained_lora_model(tiny_model)
    base = dict(tiny_model.named_parameters())
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace(".base.", ".")
        assert torch.equal(p, base[plain]), f"{name} changed"
    assert all(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_lora_merged_logits_equal_adapter_logits_and_checkpoint_is_plain(tiny_model, tmp_path):
    model = trained_lora_model(tiny_model)
    x, _ = lora_batch()
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - tiny_model(x)).abs().max() > 1e-3  # the adapters do change the model
        with lora_merged(model) as plain:
            assert not any(isinstance(m, LoRALinear) for m in plain.modules())
            torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-5)
            plain.save_checkpoint(tmp_path / "ckpt", template="chat")
        # after the context the adapters and the exact base weights are back
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
        loaded = GPT.from_pretrained(tmp_path / "ckpt")
        torch.testing.assert_close(loaded(x), adapted, rtol=1e-5, atol=1e-5)
        merged = merge_lora(copy.deepcopy(model))
        assert set(merged.state_dict()) == set(tiny_model.state_dict())
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    assert loaded.checkpoint_info["template"] == "chat"


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256)).save_checkpoint(path)
    return path


SMALL = ["--lr", "1e-3", "--max-len", "64", "--batch-size", "2", "--grad-accum", "2", "--max-new-tokens", "8"]


def test_quick_run_end_to_end_lowers_val_loss(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "sft.py", "--quick", "--model", str(tiny_checkpoint),
           "--data", str(shared_data / "instruction-data.json"), "--out", str(out), *SMALL]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["sizes"]["train"] == 100 and meta["sizes"]["val"] == 10 and meta["sizes"]["test"] == 10
    assert meta["hyperparameters"]["max_steps"] == 20 and meta["template"] == "alpaca"
    assert meta["losses"]["best_val"] < meta["losses"]["initial_val"] - 0.1
    assert meta["parameters"]["trainable"] == meta["parameters"]["total"]
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 10
    assert all(set(r) == {"prompt", "reference", "response"} for r in responses)
    assert all(r["prompt"].endswith("### Response:\n") for r in responses)
    best = GPT.from_pretrained(out)
    assert best.checkpoint_info["template"] == "alpaca"
    assert best.checkpoint_info["step"] == meta["losses"]["best_step"]


def test_lora_quick_run_on_multi_turn_data_writes_plain_checkpoint(tiny_checkpoint, shared_data, tmp_path, capsys):
    out = tmp_path / "lora"
    sft.main(["--quick", "--model", str(tiny_checkpoint), "--data", str(shared_data / "oasst_sample_trees.jsonl"),
              "--out", str(out), "--lora-rank", "4", "--lora-targets", "c_attn,mlp.c_proj", "--max-steps", "6",
              *SMALL])
    printed = capsys.readouterr().out
    meta = json.loads((out / "training_metadata.json").read_text())
    trainable = meta["parameters"]["trainable"]
    assert trainable == 2 * 4 * ((64 + 192) + (256 + 64)) and f"{trainable:,} trainable" in printed
    assert meta["template"] == "chat"  # the OpenAssistant paths are multi-turn
    model = GPT.from_pretrained(out)  # a plain checkpoint: loads with no LoRA code involved
    assert model.checkpoint_info["template"] == "chat"
    assert all(r["prompt"].endswith("Assistant:") for r in json.loads((out / "test_responses.json").read_text()))


@pytest.mark.parametrize("bad", ["data", "model"])
def test_bad_input_is_one_line_error_and_writes_nothing(tiny_checkpoint, tmp_path, capsys, bad):
    data = tmp_path / "bad.jsonl"
    good = '{"instruction": "a", "output": "b"}\n'
    data.write_text(good + ('{"prompt": "no answer here"}\n' if bad == "data" else ""))
    out = tmp_path / "out"
    model = tmp_path / "missing" if bad == "model" else tiny_checkpoint
    with pytest.raises(SystemExit) as e:
        sft.main(["--model", str(model), "--data", str(data), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert (f"{data}:2: fits no known format" in err) if bad == "data" else (str(model) in err)
    assert not out.exists()
