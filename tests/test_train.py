"""Pretraining: data preparation (data.py) and train.py's loop, schedule, accumulation,
exact resumption, DDP, and the bad input and failed writes it turns into one-line errors."""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import file_size_limit, one_line_error, refused_before_any_work
import data
from gpt import GPT, GPTConfig
from tokenizer import EOT, encode
import train
import training
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "64", "--batch-size", "4",
        "--seq-len", "32", "--warmup", "2", "--lr", "3e-3", "--eval-iters", "4", "--sample-tokens", "8",
        "--log-every", "1000"]


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture(scope="module")
def story_data(made_data, tmp_path_factory):
    """The made stories tokenized once for the whole module."""
    return data.prepare_pretrain_data(made_data / "stories.txt", tmp_path_factory.mktemp("data") / "stories")


def read_log(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return train_losses, val_losses


# ----------------------------------------------------------------------------- data.py

def test_chunked_tokenization_equals_whole_document(tmp_path, made_data):
    text = (made_data / "stories.txt").read_text()[:60000]
    src = tmp_path / "play.txt"
    src.write_text(text)
    n = data.tokenize_file(src, tmp_path / "out.bin", workers=2, batch_chars=2000)  # ~30 pieces, 2 processes
    tokens = np.fromfile(tmp_path / "out.bin", dtype=np.uint16)
    assert n == len(tokens)
    # a file without separator lines is one document: one EOT, then the stripped text's exact tokens
    assert tokens.tolist() == [EOT] + encode(text.strip())


def test_separator_lines_split_documents(tmp_path):
    src = tmp_path / "stories.txt"
    src.write_text("\n  First story.\n\n<|endoftext|>\n\n<|endoftext|>\nSecond one, with <|endoftext|> inline.\n")
    data.tokenize_file(src, tmp_path / "out.bin")
    tokens = np.fromfile(tmp_path / "out.bin", dtype=np.uint16).tolist()
    # the empty document between two separators is dropped; the inline marker is plain text
    assert tokens == [EOT] + encode("First story.") + [EOT] + encode("Second one, with <|endoftext|> inline.")


def test_prepare_splits_and_skips_when_done(tmp_path, made_data):
    out = tmp_path / "prep"
    data.prepare_pretrain_data(made_data / "stories.txt", out, val_fraction=0.1)
    meta = json.loads((out / "meta.json").read_text())
    train_tokens, val_tokens = data.load_tokens(out, "train"), data.load_tokens(out, "val")
    assert len(train_tokens) == meta["train_tokens"] and len(val_tokens) == meta["val_tokens"]
    total = len(train_tokens) + len(val_tokens)
    assert len(val_tokens) == int(total * 0.1)
    whole = [EOT] + encode((made_data / "stories.txt").read_text().strip())
    assert np.concatenate([train_tokens, val_tokens]).tolist() == whole
    stamp = (out / "train.bin").stat().st_mtime_ns
    data.prepare_pretrain_data(made_data / "stories.txt", out)
    assert (out / "train.bin").stat().st_mtime_ns == stamp  # done already: not redone


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\n  \n<|endoftext|>\n", "no text"),
                                              (b"caf\xe9 latin-1", "not UTF-8")])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, content, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(SystemExit):
        data.main([str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "train.bin").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "--lr must be a positive number (got -1.0)"),
    ("--lr", "nan", "--lr must be a positive number (got nan)"),
    ("--lr", "inf", "--lr must be a positive number (got inf)"),
    ("--dropout", "2", "--dropout must be at least 0 and below 1 (got 2.0)"),
    ("--grad-clip", "-1", "--grad-clip must be a number >= 0 (got -1.0)"),  # would reverse the gradients
    ("--min-lr", "-0.5", "--min-lr must be a number >= 0 (got -0.5)"),
    ("--warmup", "-5", "--warmup must be a number >= 0 (got -5)"),
    ("--weight-decay", "nan", "--weight-decay must be a number >= 0 (got nan)"),
    ("--seq-len", "0", "--seq-len must be at least 1 (got 0)"),  # not silently the default
    ("--batch-tokens", "0", "--batch-tokens must be at least 1 (got 0)"),
    ("--n-layer", "0", "--n-layer must be at least 1 (got 0)"),
    ("--min-lr", "1", "--min-lr 1.0 is above --lr"),  # the cosine "decay" would rise
])
def test_bad_flag_value_is_a_one_line_error_before_loading_anything(tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.setattr(train, "resolve_data", lambda source: pytest.fail("data loaded before the flags were checked"))
    refused_before_any_work(train.main, [flag, value], tmp_path / "run", message, capsys)


def test_a_token_file_of_odd_size_is_named_in_a_one_line_error(tmp_path, story_data, capsys):
    prepared = tmp_path / "prepared"
    shutil.copytree(story_data, prepared)
    with open(prepared / "val.bin", "ab") as f:
        f.write(b"\0")  # half a token: named here, not np.memmap's "Size of available data is not a multiple of ..."
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(prepared), "--out", str(tmp_path / "run"), *TINY])
    assert e.value.code == 2
    assert f"{prepared / 'val.bin'}: " in (err := one_line_error(capsys)) and "an odd number, so not uint16 tokens" in err
    assert not (tmp_path / "run").exists()


def test_get_batch_targets_are_inputs_shifted():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = data.get_batch(tokens, 10, 2, 5)
    assert x.tolist() == [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert y.tolist() == [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]


# ----------------------------------------------------------------------------- the shared API

def test_lr_schedule_warms_up_linearly_then_follows_a_cosine():
    kw = dict(max_lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert training.lr_at(0, **kw) == pytest.approx(0.1)  # 1/10 of the way up
    assert training.lr_at(4, **kw) == pytest.approx(0.5)
    assert training.lr_at(9, **kw) == pytest.approx(1.0)
    assert training.lr_at(10, **kw) == pytest.approx(1.0)  # the cosine starts at the top
    assert training.lr_at(60, **kw) == pytest.approx(0.55)  # halfway: min + (max - min) / 2
    assert training.lr_at(35, **kw) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert training.lr_at(110, **kw) == pytest.approx(0.1)
    assert training.lr_at(500, **kw) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only_and_skips_frozen(tiny_model):
    tiny_model.h[0].attn.c_attn.weight.requires_grad_(False)  # frozen, as under LoRA
    opt = training.make_optimizer(tiny_model, lr=1e-3, weight_decay=0.1, verbose=False)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {"wte.weight", "wpe.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight",
                       "h.0.mlp.c_proj.weight", "h.1.attn.c_attn.weight", "h.1.attn.c_proj.weight",
                       "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight"}
    assert plain and all(n.endswith(".bias") or ".ln_" in n or n.startswith("ln_f") for n in plain)
    assert len(decayed) + len(plain) == sum(1 for p in tiny_model.parameters()) - 1  # all but the frozen one


def test_flops_and_mfu_of_gpt2_124m():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    # GPT-2 small by hand: token embedding (the head is tied) + 12 blocks + final LayerNorm; no wpe
    d, V = 768, 50257
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n = V * d + 12 * block + 2 * d
    assert model.num_params() == n == 123_653_376
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024  # 6N + 12 * layers * heads * head_dim * T
    assert training.flops_per_token(model.config, model.num_params(), 1024) == expected == 855_166_464
    # 100k tokens/s on an H100 (989 TFLOP/s bf16)
    assert training.mfu(expected, 100_000, 989e12) == pytest.approx(expected * 1e5 / 989e12)
    assert training.mfu(expected, 100_000, None) is None  # unknown peak: no MFU, not a made-up one


def test_accumulating_4_by_2_equals_one_batch_of_8(tiny_model):
    torch.manual_seed(1)
    x = torch.randint(0, 50257, (8, 16))
    y = torch.randint(0, 50257, (8, 16))
    y[0, :15] = -100  # micro-batch 0 learns 1 + 16 tokens, the others many more
    y[2:4, ::2] = -100
    y[5] = -100
    results = []
    for micro in ([(x, y)], [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]):
        model = copy.deepcopy(tiny_model).train()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update IS the gradient
        loss = training.train_step(model, opt, micro, lr=1.0, grad_clip=0)
        results.append((loss, [b - p.detach() for b, p in zip(before, model.parameters())]))
        assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    (loss8, grads8), (loss42, grads42) = results
    with torch.no_grad():
        _, reference = tiny_model(x, y)  # the plain mean over all learned tokens
    assert loss8 == pytest.approx(reference.item(), rel=1e-6)
    assert loss42 == pytest.approx(loss8, rel=1e-6)
    for a, b in zip(grads8, grads42):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_training_state_round_trip(tmp_path, tiny_model):
    opt = training.make_optimizer(tiny_model, lr=1e-3, verbose=False)
    x = torch.randint(0, 50257, (2, 8))
    training.train_step(tiny_model.train(), opt, [(x, x)], lr=1e-3)
    training.save_training_state(tmp_path / "ck", tiny_model, opt, 7, {"data_position": 123}, template="chat")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["template"] == "chat"
    assert not (tmp_path / "ck.tmp").exists() and not (tmp_path / "ck.old").exists()
    torch.manual_seed(5)
    other = GPT(tiny_model.config)
    opt2 = training.make_optimizer(other, lr=1e-3, verbose=False)
    step, extra = training.load_training_state(tmp_path / "ck", other, opt2)
    assert (step, extra) == (7, {"data_position": 123})
    for a, b in zip(tiny_model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:  # every moment and step count of every parameter
        assert s1["state"][k].keys() == s2["state"][k].keys()
        assert all(torch.equal(s1["state"][k][name], s2["state"][k][name]) for name in s1["state"][k])


# ----------------------------------------------------------------------------- train.py end to end

def test_training_lowers_validation_loss(tmp_path, story_data):
    run = tmp_path / "run"
    train.main(["--data", str(story_data), "--out", str(run), "--max-steps", "40", "--eval-every", "40", *TINY])
    _, val = read_log(run)
    assert sorted(val) == [0, 40]
    assert val[40] < val[0] - 2.0, val  # from ~10.8 (uniform over 50257) to well below
    model = GPT.from_pretrained(run / "checkpoint")  # the checkpoint is a loadable model
    assert model.checkpoint_info["step"] == 40


def test_steps_are_counted_from_1_in_the_log_and_printed_lines_as_in_evaluations(tmp_path, story_data, capsys):
    # the 3rd step's line and log record say step 3, as the evaluation after it does, not "step 2/3"
    run = tmp_path / "run"
    train.main(["--data", str(story_data), "--out", str(run), *TINY, "--max-steps", "3", "--log-every", "1"])
    printed = capsys.readouterr().out
    losses, val = read_log(run)
    assert sorted(losses) == [1, 2, 3] and sorted(val) == [0, 3]
    assert f"step      3/3 | loss {losses[3]:.4f}" in printed and "step      3 | val loss" in printed
    assert "step      0/3" not in printed


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, story_data, capsys):
    # --lr 6e-5 --max-steps 2 with the default --warmup 50: the peak is never reached, so say so
    train.main(["--data", str(story_data), "--out", str(tmp_path / "run"), *TINY, "--warmup", "50", "--max-steps", "2",
                "--lr", "6e-5"])
    assert ("warning: --warmup 50 is not shorter than --max-steps 2: the learning rate only rises, to 2.40e-06 of "
            "--lr 6.00e-05, and never decays") in capsys.readouterr().out
    train.main(["--data", str(story_data), "--out", str(tmp_path / "run2"), *TINY, "--max-steps", "3"])  # warmup 2
    assert "warning" not in capsys.readouterr().out


def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, story_data):
    common = ["--data", str(story_data), "--max-steps", "8", "--eval-every", "3", "--dropout", "0.1",
              "--batch-tokens", "256", *TINY]  # 2 micro-batches of 4 x 32 per step, dropout on
    train.main([*common, "--out", str(tmp_path / "whole")])
    train.main([*common, "--out", str(tmp_path / "parts"), "--stop-at-step", "5"])
    stopped, _ = read_log(tmp_path / "parts")
    assert sorted(stopped) == [1, 2, 3, 4, 5]  # a record per step done, numbered from 1
    train.main(["--resume", str(tmp_path / "parts")])  # everything else comes from the saved run
    whole, whole_val = read_log(tmp_path / "whole")
    parts, parts_val = read_log(tmp_path / "parts")
    assert sorted(whole) == list(range(1, 9))
    assert parts == whole  # bit for bit, every step before and after the stop
    assert parts_val == whole_val
    # resumed with a --max-steps it has already passed, the run stops at once instead of running on
    train.main(["--resume", str(tmp_path / "parts"), "--max-steps", "6"])
    assert read_log(tmp_path / "parts")[0] == whole


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; docker stop, systemd, Slurm
def test_ctrl_c_or_sigterm_saves_a_resumable_checkpoint(tmp_path, story_data, stop):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(story_data), "--out",
                             str(run), "--max-steps", "100000", "--eval-every", "100000", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while not ((run / "log.jsonl").exists() and '"loss"' in (run / "log.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.2)
    proc.send_signal(stop)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "continue with --resume" in output and "Traceback" not in output
    steps, _ = read_log(run)
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == len(steps) >= 1


def test_ddp_two_processes_match_one(tmp_path, story_data):
    # global batch 2 x 4 x 32 tokens: two processes with one micro-batch each, or one with two
    common = ["--data", str(story_data), "--max-steps", "4", "--eval-every", "2", "--batch-tokens", "256",
              "--device", "cpu", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), *common, "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    train.main([*common, "--out", str(tmp_path / "one")])
    ddp_losses, ddp_val = read_log(tmp_path / "ddp")
    one_losses, one_val = read_log(tmp_path / "one")
    assert sorted(ddp_losses) == sorted(one_losses) == [1, 2, 3, 4]
    for step in one_losses:
        assert ddp_losses[step] == pytest.approx(one_losses[step], rel=1e-5, abs=1e-5)
    assert sorted(ddp_val) == [0, 2, 4]
    for step in one_val:
        assert ddp_val[step] == pytest.approx(one_val[step], rel=1e-5, abs=1e-5)


def test_preset_with_init_takes_the_model_from_the_weights():
    args = train.parse_args(["--preset", "gpt2-124m", "--init", "gpt2"])
    assert args.init == "gpt2" and args.model is None and args.batch_tokens == 524288
    assert train.parse_args(["--preset", "gpt2-124m"]).model == "gpt2"


# ----------------------------------------------------------------------------- what train.py refuses to lose

@pytest.fixture(scope="module")
def stopped_run(story_data, tmp_path_factory):
    """A run of 3 steps stopped after step 1 (so unfinished), which each test copies before changing it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    flags = ["--data", str(story_data), "--max-steps", "3", "--eval-every", "1000", *TINY]
    train.main([*flags, "--out", str(run), "--stop-at-step", "1"])
    return run, flags


def copy_of(stopped_run, tmp_path):
    run, flags = stopped_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", flags


def snapshot(directory):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_new_run_refuses_to_overwrite_an_unfinished_one(stopped_run, tmp_path, capsys):
    run, flags = copy_of(stopped_run, tmp_path)
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--out", str(run)])  # the same command again, without --resume
    assert e.value.code == 2
    assert f"{run} holds an unfinished run (step 1 of 3): continue it with --resume {run}" in one_line_error(capsys)
    assert snapshot(run) == before  # the log and the checkpoint are untouched


def test_a_new_run_refuses_to_overwrite_a_finished_one_unless_told_to(stopped_run, tmp_path, capsys):
    run, flags = copy_of(stopped_run, tmp_path)
    train.main(["--resume", str(run)])  # finished: step 3 of 3
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--out", str(run)])  # the same command twice in a row
    assert e.value.code == 2
    err = one_line_error(capsys)
    assert f"{run} holds a finished run (step 3): choose another --out, train it on with --resume {run}" in err
    assert "--overwrite" in err and snapshot(run) == before
    train.main([*flags, "--out", str(run), "--overwrite", "--max-steps", "2"])  # asked for: replaced
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 2
    assert sorted(read_log(run)[0]) == [1, 2]


def test_resuming_a_finished_run_says_so_and_redoes_nothing_unless_max_steps_is_raised(stopped_run, tmp_path, capsys):
    run, _ = copy_of(stopped_run, tmp_path)
    train.main(["--resume", str(run)])  # runs to its end, step 3
    before = snapshot(run)
    capsys.readouterr()
    train.main(["--resume", str(run)])  # not evaluated and saved at step 3 again
    assert capsys.readouterr().out == f"note: the run in {run} already finished at step 3 of 3; raise --max-steps to train on\n"
    assert snapshot(run) == before
    train.main(["--resume", str(run), "--max-steps", "2"])
    assert "already finished at step 3, past --max-steps 2" in capsys.readouterr().out
    assert snapshot(run) == before
    train.main(["--resume", str(run), "--max-steps", "4"])  # a raised --max-steps trains on
    assert sorted(read_log(run)[0]) == [1, 2, 3, 4]
    assert json.loads((run / "checkpoint" / "config.json").read_text())["step"] == 4


def test_init_with_a_shape_flag_is_refused_before_loading_anything(tmp_path, monkeypatch, capsys):
    # the run used the weights' 12 layers and saved n_layer 3 in its train_args
    monkeypatch.setattr(train, "resolve_data", lambda source: pytest.fail("data loaded before the flags were checked"))
    refused_before_any_work(train.main, ["--init", "gpt2", "--n-layer", "3"], tmp_path / "run",
                            "--n-layer cannot be combined with --init: the model's shape comes from the weights of gpt2",
                            capsys)


@pytest.mark.parametrize("extra, message", [
    (["--n-layer", "3"], "--resume: --n-layer 3 differs from the saved run's 2 (a resumed run keeps its model"),
    (["--init", "gpt2"], "--resume: --init gpt2 differs from the saved run's none"),
    (["--model", "gpt2"], "--resume: --model gpt2 differs from the saved run's default"),
    (["--out", "elsewhere"], "continues the run in RUN; --out elsewhere names another"),
    ("corrupt", "--resume: the saved run in RUN/checkpoint/config.json is corrupt: train_args batch_size is 'x', "
                "not a value of --batch-size"),
])
def test_resume_refuses_flags_it_would_ignore_and_names_a_corrupt_saved_run(stopped_run, tmp_path, capsys, extra,
                                                                            message):
    run, _ = copy_of(stopped_run, tmp_path)
    if extra == "corrupt":  # not argparse's "argument --batch-size: invalid int value", a flag nobody gave
        config = run / "checkpoint" / "config.json"
        info = json.loads(config.read_text())
        config.write_text(json.dumps({**info, "train_args": {**info["train_args"], "batch_size": "x"}}))
        extra = []
    before = snapshot(run)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run), *extra])
    assert e.value.code == 2
    assert message.replace("RUN", str(run)) in one_line_error(capsys)
    assert snapshot(run) == before


@pytest.mark.parametrize("other", ["narrower", "fewer layers"])
def test_resume_with_the_optimizer_state_of_another_model_is_a_one_line_error(stopped_run, tmp_path, capsys, other):
    run, _ = copy_of(stopped_run, tmp_path)
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=32) if other == "narrower" else dict(n_layer=1, n_embd=64)
    model = GPT(GPTConfig(n_head=4, block_size=64, **shape))
    opt = training.make_optimizer(model, 1e-3, verbose=False)
    x = torch.randint(0, 50257, (1, 8))
    training.train_step(model, opt, [(x, x)], lr=1e-3)  # AdamW's moments exist after a step
    # the weights are this run's; the optimizer state is another model's
    torch.save({"step": 1, "optimizer": opt.state_dict(), "extra": {"data_position": 128}},
               run / "checkpoint" / training.STATE_FILE)
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run)])
    assert e.value.code == 2
    err = one_line_error(capsys)
    assert f"{run / 'checkpoint' / training.STATE_FILE}: " in err
    # the narrower state passes load_state_dict (it compares tensor counts only), and would crash the first step
    assert ("the optimizer's exp_avg for wte.weight has shape [50257, 32], the parameter [50257, 64]" in err
            if other == "narrower" else "not a training state for this model (ValueError" in err)


def test_resume_of_a_directory_with_no_run_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").touch()
    for name, why in [("empty", "train.py keeps a run's state in checkpoint/ inside its --out"),
                      ("missing", "no such directory"), ("file", "not a directory")]:
        with pytest.raises(SystemExit):
            train.main(["--resume", str(tmp_path / name)])
        assert one_line_error(capsys) == f"error: --resume {tmp_path / name}: no run in {tmp_path / name} ({why})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # and nothing was made


def test_resume_skips_a_last_log_line_cut_by_a_kill_and_refuses_a_bad_one_before(stopped_run, tmp_path, capsys):
    run, _ = copy_of(stopped_run, tmp_path)
    log = run / "log.jsonl"
    complete = log.read_text()
    log.write_text('{"step": 1, "lo\n' + complete)  # a bad line that is not the last: a real problem
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run)])
    assert f"{log}:1: not a log record" in one_line_error(capsys)
    assert log.read_text() == '{"step": 1, "lo\n' + complete  # not rewritten
    log.write_text("[" * 100_000 + "]" * 100_000 + "\n" + complete)  # json's RecursionError, not a ValueError
    with pytest.raises(SystemExit):
        train.main(["--resume", str(run)])
    assert f"{log}:1: not a log record" in one_line_error(capsys)
    log.write_text(complete + '{"step": 2, "loss": 4.2')  # a kill in the middle of writing the last record
    train.main(["--resume", str(run)])
    losses, val_losses = read_log(run)
    assert sorted(losses) == [1, 2, 3] and sorted(val_losses) == [0, 3]


@pytest.mark.parametrize("init", ["checkpoint", "checkpoint/model.safetensors"])
def test_init_from_the_checkpoint_the_run_would_write_is_refused(tmp_path, monkeypatch, capsys, init):
    # `--init R/checkpoint --out R` would train, then save over R/checkpoint: the starting weights lost
    run = tmp_path / "run"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)).save_checkpoint(run / "checkpoint")
    before = snapshot(run)
    monkeypatch.setattr(train, "resolve_data", lambda source: pytest.fail("data loaded before --out was checked"))
    with pytest.raises(SystemExit) as e:
        train.main(["--init", str(run / init), "--out", str(run)])
    assert e.value.code == 2
    assert f"--init {run / init} is the checkpoint this run would write in --out {run}" in one_line_error(capsys)
    assert snapshot(run) == before


def test_out_that_is_a_file_is_a_one_line_error_before_training(story_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "taken"
    out.write_text("someone's file")
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(story_data), "--out", str(out), "--max-steps", "2", *TINY])
    assert e.value.code == 2
    assert f"--out {out} is a file, not a directory" in one_line_error(capsys)
    assert out.read_text() == "someone's file"


def test_a_failed_save_is_a_one_line_error_that_leaves_the_last_checkpoint_intact(stopped_run, tmp_path, capsys):
    run, _ = copy_of(stopped_run, tmp_path)
    before = snapshot(run / "checkpoint")
    # room for the weights but not for the AdamW moments (twice their size): torch.save's write fails
    limit = (run / "checkpoint" / "model.safetensors").stat().st_size + 1_000_000
    with file_size_limit(limit), pytest.raises(SystemExit) as e:
        train.main(["--resume", str(run)])
    assert e.value.code == 2
    assert f"cannot write {run / 'checkpoint'}: File too large" in one_line_error(capsys)
    assert not [p for p in run.parent.rglob("*") if ".tmp" in p.name]  # no half-written checkpoint.tmp left
    assert snapshot(run / "checkpoint") == before
    train.main(["--resume", str(run)])  # once there is room, the run goes on from that checkpoint
    assert sorted(read_log(run)[0]) == [1, 2, 3]



def test_a_resumed_run_keeps_the_log_up_to_its_checkpoint_and_an_evaluation_it_will_not_redo(tmp_path):
    from training import log_lines_before
    records = [{"step": 0, "val_loss": 9.0}, {"step": 1, "loss": 8.0}, {"step": 2, "loss": 7.0},
               {"step": 2, "val_loss": 7.5}, {"step": 3, "loss": 6.0}]  # (a checkpoint at step 2)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = lambda evaluates: [json.loads(line) for line in log_lines_before(log, 2, evaluates)]  # noqa: E731
    assert kept(True) == records[:3]  # the evaluation at step 2 is done again on resume
    assert kept(False) == records[:4]  # (a finished run resumed further, 2 not a multiple of --eval-every)


def test_the_loss_plot_draws_the_logs_train_and_validation_losses(tmp_path, monkeypatch, capsys):
    """loss.png: one line of the steps' losses, one of the evaluations', from log.jsonl; without
    matplotlib (optional at run time) a note instead."""
    import matplotlib.pyplot as plt
    from training import plot_losses
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "val_loss": 10.9}, {"step": 1, "loss": 10.8, "lr": 1e-3}, {"step": 2, "loss": 9.5, "lr": 1e-3},
        {"step": 2, "val_loss": 9.7}, {"step": 3, "loss": 8.1, "lr": 1e-3}]))
    drawn = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: drawn.append(fig) or close(fig))
    plot_losses(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG") and not (tmp_path / "loss.png.tmp").exists()
    [fig] = drawn
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].get_lines()}
    assert lines == {"train": ([1, 2, 3], [10.8, 9.5, 8.1]), "validation": ([0, 2], [10.9, 9.7])}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (not installed)
    (tmp_path / "loss.png").unlink()
    plot_losses(log, tmp_path / "loss.png")
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "loss.png").exists()
