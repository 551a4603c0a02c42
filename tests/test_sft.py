"""Instruction fine-tuning (sft.py): loss normalization under accumulation, LoRA, the whole run,
exact resumption after a stop or Ctrl-C, and refused resumes."""
import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, file_size_limit, one_line_error, refused_before_any_work, single_thread
from conversations import collate, encode_examples
from gpt import GPT, GPTConfig
from lora import LoRALinear, add_lora, lora_merged, merge_lora
import scoring
import sft
from tokenizer import IGNORE, encode_prompt, get_tokenizer
from training import make_optimizer, train_step

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


def test_quick_run_end_to_end_lowers_val_loss(tiny_checkpoint, made_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "sft.py", "--quick", "--model", str(tiny_checkpoint),
           "--data", str(made_data / "instructions.json"), "--out", str(out), *SMALL]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["sizes"]["train"] == 100 and meta["sizes"]["val"] == 10 and meta["sizes"]["test"] == 10
    assert meta["hyperparameters"]["max_steps"] == 20 and meta["template"] == "alpaca"
    assert meta["losses"]["best_val"] < meta["losses"]["initial_val"] - 0.1
    assert meta["parameters"]["trainable"] == meta["parameters"]["total"]
    assert meta["tokens_per_s"] > 0 and meta["peak_memory_bytes"] is None  # (peak memory: CUDA's figure)
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 10
    assert all(set(r) == {"prompt", "reference", "response"} for r in responses)
    assert all(r["prompt"].endswith("### Response:\n") for r in responses)
    signals = meta["answer_signals"]  # the base model's and the fine-tuned one's, on the same 10 prompts
    assert set(signals) == {"base", "fine_tuned"} and signals["base"]["answers"] == signals["fine_tuned"]["answers"] == 10
    assert all(0 <= s["ended"] <= 1 and 0 <= s["talks_on"] <= 1 and 0 <= s["mean_tokens"] <= 8 for s in signals.values())
    best = GPT.from_pretrained(out)
    assert best.checkpoint_info["template"] == "alpaca"
    assert best.checkpoint_info["step"] == meta["losses"]["best_step"]


def test_lora_quick_run_on_multi_turn_data_writes_plain_checkpoint(tiny_checkpoint, made_data, tmp_path, capsys,
                                                                    monkeypatch):
    out = tmp_path / "lora"
    asked = []  # (what the answering model's checkpoint says of itself, its answers)
    real = sft.answer_conversations

    def recording(model, *args):
        answers = real(model, *args)
        asked.append((model.checkpoint_info, answers[0]))
        return answers
    monkeypatch.setattr(sft, "answer_conversations", recording)
    sft.main(["--quick", "--model", str(tiny_checkpoint), "--data", str(made_data / "oasst_trees.jsonl"),
              "--out", str(out), "--lora-rank", "4", "--lora-targets", "c_attn,mlp.c_proj", "--max-steps", "6",
              "--pack", *SMALL])
    printed = capsys.readouterr().out
    # the fine-tuned checkpoint answered first (its answers are test_responses.json), then the base model
    (tuned_info, tuned), (base_info, base) = asked
    assert tuned_info == GPT.from_pretrained(out).checkpoint_info and tuned_info["template"] == "chat"
    assert base_info == GPT.from_pretrained(tiny_checkpoint).checkpoint_info and "template" not in base_info
    signals = json.loads((out / "training_metadata.json").read_text())["answer_signals"]
    assert signals == {"fine_tuned": scoring.answer_signals(tuned, "chat"), "base": scoring.answer_signals(base, "chat")}
    assert [r["response"] for r in json.loads((out / "test_responses.json").read_text())] == [a["response"] for a in tuned]
    meta = json.loads((out / "training_metadata.json").read_text())
    trainable = meta["parameters"]["trainable"]
    assert trainable == 2 * 4 * ((64 + 192) + (256 + 64)) and f"{trainable:,} trainable" in printed
    assert re.search(r"packed \d+ training examples into \d+ rows of at most 64 tokens", printed)
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
    err = one_line_error(capsys)
    assert (f"{data}:2: fits no known format" in err) if bad == "data" else (str(model) in err)
    assert not out.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "nan", "--epochs must be a positive number (got nan)"),
    ("--epochs", "inf", "--epochs must be a positive number (got inf)"),
    ("--lr", "-1", "--lr must be a positive number (got -1.0)"),
    ("--lr", "nan", "--lr must be a positive number (got nan)"),
    ("--dropout", "2", "--dropout must be at least 0 and below 1 (got 2.0)"),
    ("--grad-clip", "-1", "--grad-clip must be a number >= 0 (got -1.0)"),  # would reverse the gradients
    ("--min-lr-ratio", "-0.1", "--min-lr-ratio must be between 0 and 1 (the schedule decays to it) (got -0.1)"),
    ("--min-lr-ratio", "1.5", "--min-lr-ratio must be between 0 and 1"),  # the "decay" would rise
    ("--warmup-steps", "-1", "--warmup-steps must be a number >= 0 (got -1)"),
    ("--max-len", "0", "--max-len must be at least 2 (got 0)"),  # not silently the default
])
def test_bad_flag_value_is_one_line_error_before_loading_anything(tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.setattr(sft, "load_conversations", lambda name: pytest.fail("data loaded before the flags were checked"))
    refused_before_any_work(sft.main, [flag, value], tmp_path / "out", message, capsys)


@pytest.mark.parametrize("model", ["out", "out/model.safetensors", "out/last"])
def test_fine_tuning_a_model_into_its_own_directory_is_refused(tmp_path, monkeypatch, capsys, model):
    # `--model X --out X` would save the fine-tuned weights over X's model.safetensors (out/last: the state)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sft, "load_conversations", lambda name: pytest.fail("data loaded before --out was checked"))
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).save_checkpoint(
        tmp_path / ("out/last" if model == "out/last" else "out"))
    before = snapshot(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        sft.main(["--quick", "--model", model, "--out", "out"])
    assert e.value.code == 2
    assert f"--model {tmp_path / model} is the checkpoint this run would write in --out out" in one_line_error(capsys)
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--val-frac", "0.6"], "--val-frac cannot be combined with --quick, which splits its 120 conversations"),
    (["--quick", "--test-frac", "0.6"], "--test-frac cannot be combined with --quick"),
    (["--lora-alpha", "32"], "--lora-alpha needs --lora-rank above 0"),
    (["--lora-targets", "c_fc"], "--lora-targets needs --lora-rank above 0"),
])
def test_a_flag_that_would_be_ignored_is_refused_before_loading_anything(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sft, "load_conversations", lambda name: pytest.fail("data loaded before the flags were checked"))
    refused_before_any_work(sft.main, argv, tmp_path / "out", message, capsys)


# ----------------------------------------------------------------------------- exact resume

def write_small_instruction_data(path, n=16):
    """n single-turn examples with answers of different lengths. With 2 held out for validation,
    14 train examples make 7 micro-batches of 2 per epoch: an optimizer step of 2 micro-batches
    straddles the epoch boundary, where the batch iterator reshuffles."""
    lines = [json.dumps({"instruction": f"What is {i} plus {i}?",
                         "output": f"{i} plus {i} is {2 * i}." + " Indeed" * (i % 5) * 3}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def resume_run(root, lora=False):
    """A base checkpoint and data in `root`, and the flags of an 8-step run with dropout on (so the
    random state matters), evaluated every 2 steps, given as relative paths (the run saves them absolute)."""
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).save_checkpoint(root / "base")
    write_small_instruction_data(root / "data.jsonl")
    return ["--model", "base", "--data", "data.jsonl", "--max-len", "48", "--batch-size", "2", "--grad-accum", "2",
            "--lr", "1e-3", "--max-steps", "8", "--warmup-steps", "2", "--eval-interval", "2", "--dropout", "0.1",
            "--val-frac", "0.125", "--test-frac", "0", "--max-test", "0"] + (["--lora-rank", "4"] if lora else [])


def tensors(path):
    from checkpoint import iter_safetensors
    return {name: t.clone() for name, t in iter_safetensors(path)}


def assert_same_run(whole, parts):
    """The same val/train loss history, best step, resumable state and exported checkpoint, bit for bit."""
    meta_w, meta_p = (json.loads((d / "training_metadata.json").read_text()) for d in (whole, parts))
    history = meta_w["losses"]["history"]
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8]
    assert meta_p["losses"] == meta_w["losses"]  # every val and train loss, the best and its step
    for name in ("last/model.safetensors", "model.safetensors"):  # the final weights, the best (merged) ones
        a, b = tensors(whole / name), tensors(parts / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_w, opt_p = (torch.load(d / "last" / "training_state.pt", weights_only=True)["optimizer"]["state"]
                    for d in (whole, parts))
    assert all(torch.equal(opt_w[i]["exp_avg_sq"], opt_p[i]["exp_avg_sq"]) for i in opt_w)
    # log.jsonl: a record per step and per evaluation, the resumed run's the same, none twice
    log_w, log_p = ((d / "log.jsonl").read_text().splitlines() for d in (whole, parts))
    assert log_p == log_w
    records = [json.loads(line) for line in log_w]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [(r["step"], r["val_loss"]) for r in records if "val_loss" in r] == [(h["step"], h["val_loss"]) for h in history]
    return meta_p


def test_full_fine_tune_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    flags = resume_run(tmp_path)
    sft.main([*flags, "--out", "whole"])
    sft.main([*flags, "--out", "parts", "--stop-at-step", "3"])  # 3 is not a multiple of the save interval
    printed = capsys.readouterr().out
    assert "stopped at step 3 of 8" in printed and "continue with: python sft.py --resume parts" in printed
    assert json.loads((tmp_path / "parts/last/config.json").read_text())["step"] == 3
    assert not (tmp_path / "parts/training_metadata.json").exists()  # no test answers from an unfinished run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the run was started with relative paths: it resumes from anywhere
    sft.main(["--resume", str(tmp_path / "parts")])  # every other flag comes from the saved state
    meta = assert_same_run(tmp_path / "whole", tmp_path / "parts")
    assert meta["resumed_at_steps"] == [3]


def test_lora_interrupted_by_ctrl_c_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    flags = resume_run(tmp_path, lora=True)
    sft.main([*flags, "--out", "whole"])
    calls = []

    def step_then_ctrl_c(*a, **k):  # a Ctrl-C that arrives during step 3: the step finishes, then it stops
        loss = train_step(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(sft, "train_step", step_then_ctrl_c)
    sft.main([*flags, "--out", "parts"])
    monkeypatch.setattr(sft, "train_step", train_step)
    printed = capsys.readouterr().out
    assert "stopped at step 3 of 8" in printed and "--resume parts" in printed
    # the state holds the frozen base unmerged plus the adapters, so training resumes on the adapters only
    state = tensors(tmp_path / "parts/last/model.safetensors")
    base = tensors(tmp_path / "base/model.safetensors")
    assert torch.equal(state["h.0.attn.c_attn.base.weight"], base["h.0.attn.c_attn.weight"])
    assert state["h.0.attn.c_attn.lora_B"].abs().sum() > 0
    sft.main([*flags, "--out", "parts", "--resume"])  # the original command plus --resume works too
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    merged = GPT.from_pretrained(tmp_path / "parts")  # the exported checkpoint is still a plain (merged) one
    assert merged.checkpoint_info["step"] == json.loads((tmp_path / "parts/training_metadata.json").read_text())[
        "losses"]["best_step"]


def test_a_new_run_refuses_to_overwrite_a_finished_one_unless_told_to(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    flags = [*resume_run(tmp_path), "--max-steps", "2", "--out", "out"]
    sft.main(flags)
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.main(flags)  # the same command twice in a row
    assert e.value.code == 2
    assert "out holds a finished run (step 2): choose another --out, or pass --overwrite" in one_line_error(capsys)
    assert snapshot(tmp_path / "out") == before
    sft.main([*flags, "--overwrite", "--max-steps", "3"])  # asked for: replaced by the new run
    assert json.loads((tmp_path / "out" / "last" / "config.json").read_text())["step"] == 3


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    sft.main([*resume_run(tmp_path), "--max-steps", "2", "--warmup-steps", "4", "--out", "out"])
    assert ("warning: --warmup-steps 4 is not shorter than --max-steps 2: the learning rate only rises, to 5.00e-04 "
            "of --lr 1.00e-03, and never decays") in capsys.readouterr().out


@pytest.fixture(scope="module")
def stopped_lora_run(tmp_path_factory):
    """A LoRA run stopped at step 2 of 8, in a directory that each test copies before changing it."""
    root = tmp_path_factory.mktemp("stopped")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with single_thread():
            flags = resume_run(root, lora=True)
            sft.main([*flags, "--out", "out", "--stop-at-step", "2"])
    finally:
        os.chdir(cwd)
    return root, flags


def snapshot(directory):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, message", [
    ("no state", "--resume elsewhere: no run in elsewhere (no such directory)"),
    ("model config", "differs from this one"),
    ("lora rank", "--lora-rank 8 differs from the saved run's 4"),
    ("template", "--template chat differs from the saved run's default"),
    ("data", "the training data differs"),
    ("corrupt state", "cannot load the training state"),
    ("corrupt weights", "truncated"),
    ("not resumed", "holds an unfinished run (step 2 of 8): continue it with --resume out"),
    ("best deleted", "the best checkpoint so far (step 2) is missing from out"),
    ("device type", "the run was trained on cuda and would continue on cpu"),
    ("stop already passed", "--stop-at-step 2: the saved run is already at step 2"),
])
def test_bad_resume_is_one_line_error_and_overwrites_nothing(stopped_lora_run, tmp_path, monkeypatch, capsys,
                                                              case, message):
    root, flags = stopped_lora_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    saved = tmp_path / "out/last/config.json"  # the run saved absolute paths: point the copy at its own files
    saved.write_text(saved.read_text().replace(str(root.resolve()), str(tmp_path.resolve())))
    monkeypatch.chdir(tmp_path)
    argv = ["--resume", "out"]
    if case == "no state":
        argv = ["--resume", "elsewhere"]
    elif case == "model config":  # the base checkpoint now has another shape
        GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=128)).save_checkpoint(tmp_path / "base")
    elif case == "lora rank":
        argv += ["--lora-rank", "8"]
    elif case == "template":
        argv += ["--template", "chat"]
    elif case == "data":
        write_small_instruction_data(tmp_path / "data.jsonl", n=17)
    elif case == "corrupt state":
        state = tmp_path / "out/last/training_state.pt"
        state.write_bytes(state.read_bytes()[:1000])
    elif case == "corrupt weights":
        weights = tmp_path / "out/last/model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif case == "device type":  # as if it had been trained on a GPU
        config = tmp_path / "out/last/config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "device_type": "cuda"}))
        argv += ["--device", "cpu"]
    elif case == "stop already passed":
        argv += ["--stop-at-step", "2"]
    elif case == "best deleted":
        (tmp_path / "out/model.safetensors").unlink()
    elif case == "not resumed":  # the original command again, without --resume
        argv = [*flags, "--out", "out"]
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.main(argv)
    assert e.value.code == 2
    assert message in one_line_error(capsys)
    assert snapshot(tmp_path / "out") == before


def test_out_that_is_a_file_is_one_line_error_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = resume_run(tmp_path)
    (tmp_path / "taken").write_text("someone's file")
    monkeypatch.setattr(sft, "train_step", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as e:
        sft.main([*flags, "--out", "taken"])
    assert e.value.code == 2
    assert "error: --out taken is a file, not a directory" in one_line_error(capsys)
    assert (tmp_path / "taken").read_text() == "someone's file"


def test_failed_save_is_one_line_error_and_leaves_no_temporary_file(stopped_lora_run, tmp_path, monkeypatch, capsys):
    root, _ = stopped_lora_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path / "out")
    # writes past 1 MB fail with "File too large", as on a full disk; the resumed run's first write
    # is the best checkpoint of step 4 (val loss still falling), into out/model.safetensors.tmp
    with file_size_limit(1_000_000), pytest.raises(SystemExit) as e:
        sft.main(["--resume", "out"])
    assert e.value.code == 2
    assert one_line_error(capsys) == "error: cannot write out: File too large"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    # the best checkpoint and the resumable state as they were; the log only gained the records of the
    # steps after the saved state, which the next resume drops (training.log_lines_before)
    log = tmp_path / "out" / "log.jsonl"
    logged_before = before.pop(log)[1].decode()
    assert log.read_text().startswith(logged_before)
    assert {p: v for p, v in snapshot(tmp_path / "out").items() if p != log} == before



def test_max_samples_takes_a_seeded_subset_and_quick_its_120():
    convs = list(range(500))
    args = lambda **kw: argparse.Namespace(**{"quick": False, "max_samples": None, "seed": 1, **kw})  # noqa: E731
    assert sft.sampled(convs, args()) == convs
    five = sft.sampled(convs, args(max_samples=5))
    assert len(set(five)) == 5 and five == sft.sampled(convs, args(max_samples=5)) != sft.sampled(convs, args(max_samples=5, seed=2))
    quick = args(quick=True)
    assert len(sft.sampled(convs, quick)) == 120 and quick.val_frac == quick.test_frac == 1 / 12
    assert sft.sampled(convs[:7], args(max_samples=50)) == convs[:7]


def test_no_mask_learns_the_prompt_too():
    conversation = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]
    args = argparse.Namespace(val_frac=0.25, test_frac=0.0, seed=0, no_mask=True)
    split = sft.split_and_encode(args, [conversation] * 4, "alpaca", 128, get_tokenizer())
    ids, labels = split.train_examples[0]
    assert labels == ids
    assert split.train_stats["learned_tokens"] == sum(len(ids) - 1 for ids, _ in split.train_examples)
    args.no_mask = False
    ids, labels = sft.split_and_encode(args, [conversation] * 4, "alpaca", 128, get_tokenizer()).train_examples[0]
    prompt = len(encode_prompt(conversation[:1], "alpaca"))
    assert labels[:prompt] == [IGNORE] * prompt and labels[prompt:] == ids[prompt:]  # (the answer alone)


def test_packed_rows_give_every_example_the_loss_and_gradients_it_has_alone(tiny_model):
    """--pack: examples share a row but never attend across their boundaries, and positions restart
    with each, so the loss and its gradients are those of the examples padded one per row."""
    from conversations import collate_packed, pack_examples
    enc = get_tokenizer()
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("Hi", "Hello there, friend."), ("Name a fruit.", "Apple."), ("2 + 2?", "4"),
                          ("Say something long.", "This answer goes on for a while, word after word, to fill a row."),
                          ("Bye", "Goodbye.")]]
    examples, _ = encode_examples(convs, "chat", 64, enc, log=lambda *a: None)
    rows = pack_examples(examples, 48)
    assert [e for row in rows for e in row] == examples  # all of them, in order, none split
    assert len(rows) < len(examples) and all(sum(len(ids) - 1 for ids, _ in row) <= 48 for row in rows)
    model = tiny_model.train()

    def loss_and_grads(batch):
        model.zero_grad()
        _, loss = model(batch[0], batch[1], *batch[2:3], segments=batch[3] if len(batch) > 2 else None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    packed, alone = loss_and_grads(collate_packed(rows)), loss_and_grads(collate(examples))
    assert torch.allclose(packed[0], alone[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(packed[1], alone[1]))
    x, _, _, segments = collate_packed(rows)
    with pytest.raises(ValueError, match="restarting per example"):  # (positions 0..T-1 would be silently wrong)
        model(x, segments=segments)
