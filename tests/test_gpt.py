"""gpt.py: the model matches Hugging Face's GPT-2 on hub-layout weights, and checkpoints round-trip."""
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
import transformers  # a dev requirement (requirements-dev.txt): parity is checked against it, never skipped
try:
    from transformers.initialization import no_init_weights
except ImportError:  # (transformers 4)
    from transformers.modeling_utils import no_init_weights

from checkpoint import CheckpointError, read_safetensors_header, write_safetensors
from conftest import ROOT
from gpt import GPT, GPTConfig, main
from inference import generate_tokens
from sampling import SamplingParams
from tokenizer import EOT, encode, get_tokenizer

def hub_layout_file(tmp_path, hf_model, with_config=True):
    """Save a transformers GPT2LMHeadModel exactly as the hub's model.safetensors is laid out: no
    `transformer.` prefix, Conv1D [in, out] weights, the `attn.bias` causal-mask buffers present,
    no lm_head (tied)."""
    cfg = hf_model.config
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    n = cfg.n_positions
    for i in range(cfg.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    assert state["h.0.attn.c_attn.weight"].shape == (cfg.n_embd, 3 * cfg.n_embd)  # Conv1D: [in, out]
    write_safetensors(tmp_path / "model.safetensors", state, metadata={"format": "pt"})
    if with_config:
        (tmp_path / "config.json").write_text(cfg.to_json_string())
    return tmp_path


def random_hf(n_layer, n_head, n_embd, n_positions=1024):
    """A transformers GPT2LMHeadModel whose every parameter is random (HF's own init would leave
    biases and LayerNorms at 0 and 1, where a mapping mistake could hide): N(0, 0.02), the LayerNorm
    gains around 1. Built without transformers' init, which takes seconds at 124M, then filled."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                  attn_implementation="eager")
    with no_init_weights():
        hf = transformers.GPT2LMHeadModel(cfg)
    hf.tie_weights()  # (the head is the token embedding, as in the released checkpoints)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # (the tied weight is listed once)
            p.normal_(1.0 if name.split(".")[-2].startswith("ln_") and name.endswith("weight") else 0.0, 0.02)
    return hf.eval()


@pytest.mark.parametrize("n_layer,n_head,n_embd", [
    (12, 12, 768),  # gpt2 (124M), the full config
    (2, 16, 1024),  # gpt2-medium's width and heads
    (2, 20, 1280),  # gpt2-large's
    (1, 25, 1600),  # gpt2-xl's
])
def test_hub_layout_weights_give_hf_logits_and_greedy_tokens(tmp_path, n_layer, n_head, n_embd):
    hf = random_hf(n_layer, n_head, n_embd)
    ours = GPT.from_pretrained(hub_layout_file(tmp_path, hf))
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd) == (n_layer, n_head, n_embd)
    idx = torch.tensor([encode("Hello, my name is GPT-2 and I load OpenAI's weights exactly.")])
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
        assert (got - ref).abs().max().item() < 1e-4
        # 30 greedy tokens, each side with its own KV cache: what generate.py and hf.generate() run
        a = list(generate_tokens(ours, idx[0].tolist(), SamplingParams(max_tokens=30, temperature=0.0)))
        b = hf.generate(idx, max_new_tokens=30, do_sample=False, pad_token_id=EOT)[0, idx.shape[1]:].tolist()
    assert len(a) == 30 and a == b


def test_transformer_prefix_and_no_config_json(tmp_path):
    """A file with `transformer.` prefixed keys and no config.json beside it loads; the head count comes
    from the released size of that width."""
    hf = random_hf(2, 12, 768, n_positions=64)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    write_safetensors(tmp_path / "w.safetensors", state)
    ours = GPT.from_pretrained(tmp_path / "w.safetensors")
    assert ours.config.block_size == 64 and ours.config.n_head == 12
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_load_in_bfloat16_keeps_weight_tying(tmp_path):
    hf = random_hf(1, 12, 768, n_positions=32)
    ours = GPT.from_pretrained(hub_layout_file(tmp_path, hf), dtype=torch.bfloat16)
    assert ours.wte.weight.dtype == torch.bfloat16
    assert ours.lm_head.weight is ours.wte.weight
    want = hf.transformer.wte.weight.to(torch.bfloat16)
    assert torch.equal(ours.wte.weight, want)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32))
    model.save_checkpoint(tmp_path / "ckpt", template="chat", note="hello")
    loaded = GPT.from_pretrained(tmp_path / "ckpt")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.checkpoint_info["template"] == "chat"
    assert loaded.config == GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32)
    # saving the loaded model again writes the identical bytes
    loaded.save_checkpoint(tmp_path / "again", template="chat", note="hello")
    assert (tmp_path / "ckpt/model.safetensors").read_bytes() == (tmp_path / "again/model.safetensors").read_bytes()


def test_bf16_checkpoint_round_trip(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).to(torch.bfloat16)
    model.save_checkpoint(tmp_path)
    loaded = GPT.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_tokenizer_is_gpt2():
    enc = get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert encode("Hello world") == [15496, 995]  # GPT-2's well-known ids for these two words
    assert 50256 not in encode("user text with <|endoftext|> in it")  # never the special token from user text


# ----------------------------------------------------------------------------- malformed files

def tensor_file(path, header, data=b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def small_valid(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model.save_checkpoint(tmp_path / "ok")
    return tmp_path / "ok" / "model.safetensors"


def test_truncated_file(tmp_path):
    good = small_valid(tmp_path)
    bad = tmp_path / "ok" / "model.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* outside"):
        GPT.from_pretrained(tmp_path / "ok")


def test_file_shorter_than_length_prefix(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"x.safetensors: truncated file"):
        GPT.from_pretrained(tmp_path / "x.safetensors")


def test_header_length_past_end(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"x.safetensors: header length 10000 runs past the end"):
        read_safetensors_header(p)


def header_file(path, blob):
    """A safetensors file whose header is the raw bytes `blob`."""
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


@pytest.mark.parametrize("blob, why", [
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply to read"),  # RecursionError in json
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
     r"an integer of more than \d+ digits"),  # Python's int() digit limit: a plain ValueError
])
def test_header_json_the_parser_refuses_is_a_one_line_error(tmp_path, blob, why):
    p = header_file(tmp_path / "x.safetensors", blob)
    with pytest.raises(CheckpointError, match=r"x.safetensors: header is not valid JSON \(" + why + r"\)$"):
        read_safetensors_header(p)


def test_header_over_the_cap_is_refused_before_it_is_read(tmp_path):
    p = tmp_path / "x.safetensors"
    with open(p, "wb") as f:  # a sparse file: 200 MB long, nothing written past the length
        f.write(struct.pack("<Q", 200_000_000) + b"{")
        f.truncate(200_000_016)
    with pytest.raises(CheckpointError, match=r"header length 200,000,000 bytes is over the 100,000,000"):
        read_safetensors_header(p)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_without_waiting(tmp_path, name):
    small_valid(tmp_path)
    fifo = tmp_path / "ok" / name
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would block until a writer came: never
    with pytest.raises(CheckpointError, match=re.escape(f"{fifo}: a FIFO, not a regular file") + "$"):
        GPT.from_pretrained(tmp_path / "ok")


@pytest.mark.parametrize("head, what", [
    (b"GGUF\x03\x00\x00\x00" + bytes(64), "a GGUF file"),
    (b"PK\x03\x04" + bytes(64), "a zip archive"),
    (b"\x80\x02" + bytes(64), "a pickle"),
])
def test_another_format_is_named_by_gpt_py(tmp_path, capsys, head, what):
    p = tmp_path / "model.bin"
    p.write_bytes(head)
    with pytest.raises(SystemExit):
        main([str(p)])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {p}: {what}") and "not a safetensors file" in err, err
    assert "\n" not in err and "runs past the end" not in err


def test_offsets_out_of_range(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234")
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'wte.weight' offsets \[0, 8\] lie outside"):
        read_safetensors_header(p)


def test_overlapping_tensors(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(CheckpointError, match=r"tensors 'a' and 'b' overlap"):
        read_safetensors_header(p)


def test_unknown_dtype(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"wpe.weight": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, bytes(1))
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'wpe.weight' has unknown dtype 'F8_E9'"):
        read_safetensors_header(p)


def test_size_disagrees_with_shape(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError, match=r"tensor 'a' spans 8 bytes but F32\[3\] needs 12"):
        read_safetensors_header(p)


def test_missing_tensor(tmp_path):
    hf = random_hf(1, 12, 768, n_positions=16)
    d = hub_layout_file(tmp_path, hf)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
             if k not in ("lm_head.weight", "transformer.h.0.mlp.c_fc.bias")}
    write_safetensors(d / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'h.0.mlp.c_fc.bias'"):
        GPT.from_pretrained(d)


def test_misshapen_tensor(tmp_path):
    hf = random_hf(1, 12, 768, n_positions=16)
    d = hub_layout_file(tmp_path, hf)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.ln_2.weight"] = torch.ones(767)
    write_safetensors(d / "model.safetensors", state)
    with pytest.raises(CheckpointError, match=r"tensor 'h.0.ln_2.weight' has shape \[767\], the model expects \[768\]"):
        GPT.from_pretrained(d)


@pytest.mark.parametrize("dtype, bad", [(torch.float32, float("nan")), (torch.bfloat16, float("-inf"))])
def test_weights_holding_nan_or_inf_are_refused_naming_the_first_such_tensor(tmp_path, dtype, bad):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).to(dtype)
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[3, 5] = bad  # what a diverged training run saves
        model.ln_f.weight[0] = bad
    model.save_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'model.safetensors'}: tensor 'h.1.mlp.c_fc.weight' "
                                                        "holds NaN or inf values (a diverged training run?)") + "$"):
        GPT.from_pretrained(tmp_path, dtype=dtype)


def test_finite_weights_whose_sum_overflows_still_load(tmp_path):
    # float16 sums 65504 * 2 to inf: a quick sum flags such a tensor, and the exact check clears it
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).to(torch.float16)
    with torch.no_grad():
        model.wpe.weight.fill_(65504.0)
    model.save_checkpoint(tmp_path)
    assert torch.equal(GPT.from_pretrained(tmp_path, dtype=torch.float16).wpe.weight, model.wpe.weight)


def test_not_a_path_or_name(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file or directory, and not one of gpt2"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"directory has no model.safetensors$"):
        GPT.from_pretrained(tmp_path)
    # a train.py run directory: the error names the checkpoint inside it
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").touch()
    with pytest.raises(CheckpointError, match=re.escape(f"no model.safetensors (models inside it: {tmp_path / 'checkpoint'})") + "$"):
        GPT.from_pretrained(tmp_path)


def test_corrupt_checkpoint_config(tmp_path):
    small_valid(tmp_path)
    (tmp_path / "ok" / "config.json").write_text('{"format": "gpt2-chatbot/v1", "config": [3]}')
    with pytest.raises(CheckpointError, match=r'config.json: not a valid checkpoint config \(no "config" object\)$'):
        GPT.from_pretrained(tmp_path / "ok")


def edit_config(directory, edit):
    """Apply edit(info) to the checkpoint's config.json, as a hand edit or another tool would."""
    path = directory / "config.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info))


def test_checkpoint_config_missing_a_size_names_it_instead_of_filling_a_default(tmp_path):
    small_valid(tmp_path)
    edit_config(tmp_path / "ok", lambda info: info["config"].pop("n_head"))
    with pytest.raises(CheckpointError, match=r"config.json: the config has no n_head$"):
        GPT.from_pretrained(tmp_path / "ok")


def test_checkpoint_config_with_an_unknown_key_names_it(tmp_path):
    small_valid(tmp_path)
    edit_config(tmp_path / "ok", lambda info: info["config"].update(n_layers=3))
    with pytest.raises(CheckpointError, match=r"config.json: unknown config key 'n_layers' \(GPTConfig has n_layer, n_head, "):
        GPT.from_pretrained(tmp_path / "ok")


@pytest.mark.parametrize("edit, message", [
    (lambda info: info.update(format="other/v9"), "format 'other/v9' is unknown"),
    (lambda info: info.update(format="gpt2-chatbot/v2"), "format 'gpt2-chatbot/v2' is unknown"),
    (lambda info: info.pop("format"), 'no "format" key'),
])
def test_checkpoint_config_of_another_format_is_refused_naming_it(tmp_path, edit, message):
    small_valid(tmp_path)
    edit_config(tmp_path / "ok", edit)
    with pytest.raises(CheckpointError, match=f"config.json: {message}; this version reads 'gpt2-chatbot/v1' checkpoints$"):
        GPT.from_pretrained(tmp_path / "ok")


def test_weights_of_a_later_layout_are_refused_not_misread(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model.save_checkpoint(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_safetensors(tmp_path / "model.safetensors", state, metadata={"layout": "gpt2-chatbot/v2"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: layout 'gpt2-chatbot/v2' is not one this version reads "
                                              r"\('gpt2-chatbot/v1'\)$"):
        GPT.from_pretrained(tmp_path)


def test_checkpoint_resaved_without_its_metadata_says_what_is_missing(tmp_path):
    # a tool that rewrites the safetensors file (a converter, safetensors' own save_file) drops our
    # metadata, and with it what says the weights are [out, in], not the hub's transposed layout
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model.save_checkpoint(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match=r'model.safetensors: no "layout" in its __metadata__ \(re-saved by another '
                                              r'tool\?\), though config.json beside it is a gpt2-chatbot/v1 checkpoint\'s; '
                                              r'our weights need \{"layout": "gpt2-chatbot/v1"\} there$'):
        GPT.from_pretrained(tmp_path)


def test_hub_config_json_missing_a_size_names_it(tmp_path):
    d = hub_layout_file(tmp_path, random_hf(1, 12, 768, n_positions=16))
    c = json.loads((d / "config.json").read_text())
    del c["n_head"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r"config.json: not a GPT-2 config: it has no n_head$"):
        GPT.from_pretrained(d)


@pytest.mark.parametrize("field, value, message", [
    ("n_layer", "2", r"n_layer must be a positive integer, not '2'"),
    ("n_layer", None, r"n_layer must be a positive integer, not None"),
    ("block_size", -1, r"block_size must be a positive integer, not -1"),
    ("n_embd", 0, r"n_embd must be a positive integer, not 0"),
    ("block_size", 1e12, r"block_size must be a positive integer, not 1000000000000.0"),  # (JSON's 1e12 is a float)
    ("n_layer", 1.0, r"n_layer must be a positive integer, not 1.0"),
    ("n_head", 3, r"n_embd 32 is not a multiple of n_head 3"),
    ("bias", "yes", r"bias must be true or false"),
])
def test_checkpoint_config_with_impossible_values(tmp_path, field, value, message):
    # values a hand edit can leave: caught in one line before any module is built
    small_valid(tmp_path)
    path = tmp_path / "ok" / "config.json"
    info = json.loads(path.read_text())
    info["config"][field] = value
    path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"config.json: " + message):
        GPT.from_pretrained(tmp_path / "ok")


def never_built(monkeypatch):
    """Make building a GPT fail the test: what a config must be checked before (building 10**7 layers
    takes minutes, even on the meta device, and to_empty allocates whatever the config says)."""
    def build(self, config):
        raise AssertionError(f"a model was built for {config}")
    monkeypatch.setattr(GPT, "__init__", build)


@pytest.mark.parametrize("field, value, message", [
    ("block_size", 10**12, r"block_size 1000000000000 disagrees with the weights: model.safetensors holds "
                           r"'wpe.weight' of shape \[16, 32\]$"),
    ("n_embd", 2**20, r"n_embd 1048576 disagrees with the weights: model.safetensors holds 'wte.weight' of shape \[50257, 32\]$"),
    ("vocab_size", 10**10, r"vocab_size 10000000000 disagrees with the weights: model.safetensors holds 'wte.weight'"),
    ("n_layer", 10**7, r"n_layer 10000000 disagrees with the weights: model.safetensors holds 1 layer$"),
])
def test_config_sizes_that_disagree_with_the_weights_fail_before_the_model_is_built(tmp_path, monkeypatch, field, value, message):
    small_valid(tmp_path)
    path = tmp_path / "ok" / "config.json"
    info = json.loads(path.read_text())
    info["config"][field] = value
    path.write_text(json.dumps(info))
    never_built(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config.json: " + message):
        GPT.from_pretrained(tmp_path / "ok")


def test_hub_config_json_with_absurd_layer_count_fails_before_the_model_is_built(tmp_path, monkeypatch):
    d = hub_layout_file(tmp_path, random_hf(1, 12, 768, n_positions=16))
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "n_layer": 10**7}))
    never_built(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config.json: n_layer 10000000 disagrees with the weights: model.safetensors holds 1 layer$"):
        GPT.from_pretrained(d)


def test_hub_file_with_a_stray_high_layer_number_builds_no_more_layers_than_it_holds(tmp_path, monkeypatch):
    hf = random_hf(1, 12, 768, n_positions=16)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.9999999.ln_1.weight"] = torch.ones(768)
    write_safetensors(tmp_path / "w.safetensors", state)
    build = GPT.__init__
    def small_only(self, config):
        assert config.n_layer <= 2, f"a model of {config.n_layer} layers was built"
        build(self, config)
    monkeypatch.setattr(GPT, "__init__", small_only)
    with pytest.raises(CheckpointError, match=r"w.safetensors: unexpected tensor 'h.9999999.ln_1.weight'"):
        GPT.from_pretrained(tmp_path / "w.safetensors")


def test_hub_config_json_with_impossible_head_count(tmp_path):
    hf = random_hf(1, 12, 768, n_positions=16)
    d = hub_layout_file(tmp_path, hf)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "n_head": 7}))
    with pytest.raises(CheckpointError, match=r"config.json: n_embd 768 is not a multiple of n_head 7"):
        GPT.from_pretrained(d)


def test_dtype_that_is_not_a_string(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has unknown dtype \['F32'\]"):
        read_safetensors_header(p)


def test_shape_that_is_not_a_list(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": 5, "data_offsets": [0, 20]}}, bytes(20))
    with pytest.raises(CheckpointError, match=r"tensor 'a' has a malformed shape"):
        read_safetensors_header(p)


def test_metadata_that_is_not_an_object_of_strings(tmp_path):
    p = tensor_file(tmp_path / "x.safetensors", {"__metadata__": [1]})
    with pytest.raises(CheckpointError, match=r"x.safetensors: __metadata__ must be an object of strings"):
        GPT.from_pretrained(p)


def test_hub_file_with_unnumbered_layers(tmp_path):
    hf = random_hf(1, 12, 768, n_positions=16)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state = {k.replace("h.0.", "h.x."): v for k, v in state.items()}
    write_safetensors(tmp_path / "w.safetensors", state)
    with pytest.raises(CheckpointError, match=r"'h.x...' do not number their layer"):
        GPT.from_pretrained(tmp_path / "w.safetensors")


def test_command_line_describes_a_checkpoint_or_says_in_one_line_what_is_wrong(tmp_path, capsys):
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_checkpoint(tmp_path / "ok", template="chat")
    r = subprocess.run([sys.executable, str(ROOT / "gpt.py"), str(tmp_path / "ok")], capture_output=True, text=True,
                       timeout=120)  # a real process, as a user runs it
    assert r.returncode == 0, r.stderr
    assert "1 layers, 2 heads, 32 wide, context 16, vocabulary 50257" in r.stdout and '  template: "chat"' in r.stdout
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_command_line_cuts_long_metadata_after_a_whole_item_with_an_ellipsis(tmp_path, capsys):
    train_args = {"data": "data/shakespeare", "init": None, **{f"flag_{i}": i * 1.5 for i in range(40)}, "n_layer": None}
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).save_checkpoint(
        tmp_path, train_args=train_args, note="é" * 300, short=[1, 2])
    main([str(tmp_path)])
    lines = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines()[1:])
    shown = lines["train_args"]
    assert shown.endswith(", …") and len(shown) <= 202, shown
    kept = json.loads(shown.removesuffix(", …") + "}")  # whole items only: the rest parses
    assert 5 < len(kept) < len(train_args) and list(kept.items()) == list(train_args.items())[:len(kept)]
    note = lines["note"]  # a string: cut after a whole character (not inside an escape like \u00e9)
    assert note.endswith("…") and len(note) <= 201 and "é" * 30 in json.loads(note.removesuffix("…") + '"'), note
    assert lines["short"] == "[1, 2]"  # what fits is printed whole
