"""export.py: the Hugging Face directory loads in transformers and computes our logits; the GGUF file
holds every key and tensor llama.cpp's gpt2 loader reads; both tokenizers encode exactly like tiktoken."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

import export
from gpt import GPT, GPTConfig
from tokenizer import EOT, get_tokenizer
ROOT = Path(__file__).resolve().parent.parent

SAMPLES = [
    "Hello world! It's a test, isn't it? We'll see: they've done 1234 things.",
    "  leading spaces,\ttabs,\n\nnew lines   and trailing spaces   ",
    "naïve café, Ünïcödé: 日本語のテキスト, Ελληνικά, русский, emoji 🤖🚀 and 👩‍👩‍👧",
    "def f(x):\n    return x**2  # code {with} [brackets] <tags> & symbols $%^",
    "GPT-2's BPE merges 'Ġthe' and ĠĊ-style bytes: \x00\x01\x7f",
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128)).eval()


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    return export.export_hf(tiny, tmp_path_factory.mktemp("hf"))


def hf_logits(directory, idx):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(idx).logits


# ----------------------------------------------------------------------------- the tokenizer derivation

def test_derived_merges_equal_openai_vocab_bpe():
    """The merges derived from tiktoken's ranks are OpenAI's vocab.bpe line for line, and the tokens
    are encoder.json's (tiktoken keeps both files in its cache after loading gpt2)."""
    get_tokenizer()
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    files = {name: Path(cache) / hashlib.sha1((base + name).encode()).hexdigest()
             for name in ("vocab.bpe", "encoder.json")}
    tokens, merges = export.gpt2_vocab()
    lines = files["vocab.bpe"].read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#version")
    assert merges == [line for line in lines[1:] if line]
    encoder = json.loads(files["encoder.json"].read_text(encoding="utf-8"))
    assert {t: i for i, t in enumerate(tokens)} == encoder


def test_bytes_to_unicode_is_a_printable_bijection():
    table = export.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


# ----------------------------------------------------------------------------- Hugging Face

def test_hf_config_describes_the_model(hf_dir, tiny):
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_ctx"], cfg["n_positions"], cfg["vocab_size"]) == \
        (2, 4, 64, 128, 128, 50257)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["bos_token_id"] == cfg["eos_token_id"] == EOT
    from checkpoint import read_safetensors_header
    header, _ = read_safetensors_header(hf_dir / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    # transformers' layout: prefixed names, Conv1D [in, out] weights
    assert header["transformer.h.0.attn.c_attn.weight"]["shape"] == [64, 192]
    assert header["transformer.h.0.mlp.c_proj.weight"]["shape"] == [256, 64]
    assert header["transformer.wte.weight"]["shape"] == [50257, 64]


@pytest.mark.parametrize("bias", [True, False])
def test_hf_model_logits_equal_ours(tmp_path, bias):
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, bias=bias)).eval()
    with torch.no_grad():  # non-zero biases and norms, so a missed transpose or tensor shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
    export.export_hf(model, tmp_path)
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        ours = model(idx)
    torch.testing.assert_close(hf_logits(tmp_path, idx), ours, atol=1e-4, rtol=0)


def test_hf_model_logits_equal_ours_124m(tmp_path):
    """The full GPT-2 124M shape (random weights): every tensor in the right place at full width."""
    torch.manual_seed(2)
    model = GPT(GPTConfig()).eval()
    export.export_hf(model, tmp_path)
    idx = torch.randint(0, 50257, (1, 24))
    with torch.no_grad():
        ours = model(idx)
    torch.testing.assert_close(hf_logits(tmp_path, idx), ours, atol=1e-4, rtol=0)


def test_hf_export_loads_back_into_our_model(hf_dir, tiny):
    back = GPT.from_pretrained(hf_dir)
    assert back.config == tiny.config
    for (name, a), b in zip(tiny.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_hf_f16_export(tmp_path, tiny):
    export.export_hf(tiny, tmp_path, dtype="f16")
    from checkpoint import read_safetensors_header
    header, _ = read_safetensors_header(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        ours = tiny(idx)
    torch.testing.assert_close(hf_logits(tmp_path, idx), ours, atol=2e-2, rtol=0)


def test_hf_tokenizer_encodes_like_tiktoken(hf_dir):
    from transformers import AutoTokenizer
    enc = get_tokenizer()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in SAMPLES:
        ids = enc.encode(text, disallowed_special=())
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    # the special token is one id, and the ids tiktoken gives it with special tokens allowed
    text = "first document<|endoftext|>second"
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.eos_token_id == tok.bos_token_id == EOT
    assert len(tok) == EOT + 1


# ----------------------------------------------------------------------------- GGUF

def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_keys_tensors_and_values(tmp_path, tiny, dtype):
    import gguf
    path = export.export_gguf(tiny, tmp_path / "m.gguf", dtype=dtype, name="tiny")
    raw = path.read_bytes()
    assert raw[:4] == b"GGUF" and struct.unpack_from("<IQQ", raw, 4)[:2] == (3, 2 + 2 + 12 * 2)
    assert struct.unpack_from("<Q", raw, 4 + 4 + 8)[0] == 20 + (dtype == "q8_0")  # metadata keys (q8_0: + general.quantization_version)

    r = gguf.GGUFReader(path)
    expected = {
        "general.architecture": "gpt2", "general.name": "tiny", "general.alignment": 32,
        "general.file_type": {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype],
        "gpt2.context_length": 128, "gpt2.embedding_length": 64, "gpt2.feed_forward_length": 256,
        "gpt2.block_count": 2, "gpt2.attention.head_count": 4,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": EOT, "tokenizer.ggml.eos_token_id": EOT,
    }
    if dtype == "q8_0":
        expected["general.quantization_version"] = 2  # llama.cpp refuses quantized files without it
    for key, value in expected.items():
        assert field(r, key) == value, key
    # the size label as the gguf package's own convention writes it, from every weight in the file
    assert field(r, "general.size_label") == gguf.utility.size_label(sum(t.n_elements for t in r.tensors), 0, 0, 0)
    assert r.fields["gpt2.context_length"].types == [gguf.GGUFValueType.UINT32]
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    types = field(r, "tokenizer.ggml.token_type")
    assert len(types) == 50257 and types[EOT] == 3 and set(types[:EOT]) == {1}
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens[EOT] == "<|endoftext|>" and tokens[220] == "Ġ" and len(field(r, "tokenizer.ggml.merges")) == 50000

    ours = dict(tiny.state_dict())
    mapping = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
               "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias"}
    parts = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
             "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
    for i in range(2):
        for theirs, mine in parts.items():
            for kind in ("weight", "bias"):
                mapping[f"blk.{i}.{theirs}.{kind}"] = f"h.{i}.{mine}.{kind}"
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(mapping)  # output.weight left out: tied to token_embd
    for name, t in tensors.items():
        w = ours[mapping[name]]
        assert list(t.shape) == list(reversed(w.shape)), name  # ggml order: fastest dimension first
        half = dtype != "f32" and w.ndim == 2 and name != "position_embd.weight"  # (kept f32, as llama.cpp's converter keeps it)
        kind = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(dtype) if half else None
        assert t.tensor_type == (kind or gguf.GGMLQuantizationType.F32), name
        back = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        back = back.reshape(w.shape)
        if kind == gguf.GGMLQuantizationType.Q8_0:  # within one quantization step (its block's max|w| / 127)
            step = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((back - w).reshape(step.shape[0], -1, 32).abs() <= step).all(), name
            continue
        # the gguf package reads back exactly our weights rounded to the stored type
        stored = {"f16": torch.float16, "bf16": torch.bfloat16}.get(dtype) if half else torch.float32
        assert torch.equal(back, w.to(stored).float()), name
        assert t.data_offset % 32 == 0
    # llama.cpp's shapes: attn_qkv {n_embd, 3 n_embd}, ffn_up {n_embd, n_ff}, ffn_down {n_ff, n_embd}
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, 192]
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [64, 256]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [256, 64]


def test_q8_0_blocks_are_the_gguf_packages_reference_quantization_byte_for_byte():
    """llama.cpp's Q8_0 as ggml's reference quantizer (and the gguf package, its Python twin) writes
    it: per 32 weights an f16 scale max|w| / 127, then round(w / scale) with halves away from zero
    (0.5 -> 1, -0.5 -> -1, where numpy's round would give 0), and an all-zero block all zeros."""
    import gguf
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)).numpy()
    w[0, :32] = 0
    w[1, :32] = [127, 0.5, -0.5, 1.5, -2.5] + [0] * 27
    ours = export.quantize_q8_0(w)
    assert ours.shape == (6, 3 * 34) and ours.dtype == np.uint8
    assert ours.tobytes() == gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).tobytes()
    assert ours[0, :34].tolist() == [0] * 34
    assert ours[1, :2].view("<f2")[0] == 1 and ours[1, 2:7].view(np.int8).tolist() == [127, 1, -1, 2, -3]
    tall = torch.randn(4099, 64, generator=torch.Generator().manual_seed(1)).numpy()  # (across a chunk of rows)
    assert export.quantize_q8_0(tall).tobytes() == gguf.quants.quantize(tall, gguf.GGMLQuantizationType.Q8_0).tobytes()


def test_q8_0_falls_back_to_f16_for_rows_that_do_not_split_into_blocks():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=48, block_size=16, vocab_size=50257)).eval()
    kinds = {name: kind for name, (kind, a) in export.gguf_tensors(model, "q8_0").items() if a.ndim == 2}
    assert kinds.pop("position_embd.weight") == "f32"
    assert kinds.pop("blk.0.ffn_down.weight") == "q8_0"  # rows of 4 * 48 = 192 weights: 6 blocks
    assert set(kinds.values()) == {"f16"}  # rows of 48: one and a half blocks


def gguf_bpe_encode(text, tokens, merges):
    """A small GPT-2 BPE run from the GGUF's own token and merge lists: split with GPT-2's regex,
    spell each piece's bytes as characters, merge the lowest-ranked pair until none is left."""
    table = export.bytes_to_unicode()
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    out = []
    for piece in regex.findall(get_tokenizer()._pat_str, text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(word, word[1:]))]
            best, i = min(pairs)
            if best == len(rank):
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [ids[w] for w in word]
    return out


def test_gguf_tokenizer_reproduces_tiktoken(tmp_path, tiny):
    import gguf
    r = gguf.GGUFReader(export.export_gguf(tiny, tmp_path / "m.gguf"))
    tokens, merges = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.merges")
    enc = get_tokenizer()
    for text in SAMPLES:
        assert gguf_bpe_encode(text, tokens, merges) == enc.encode(text, disallowed_special=()), text


def test_gguf_padded_vocab_gets_unused_tokens(tmp_path):
    """A vocabulary padded past GPT-2's 50257 (a multiple of 64 trains faster) gets placeholder
    tokens, since llama.cpp sizes the embedding from the token list."""
    import gguf
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304))
    r = gguf.GGUFReader(export.export_gguf(model, tmp_path / "m.gguf"))
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 50304 == len(set(tokens))
    assert set(types[EOT + 1:]) == {5} and types[EOT] == 3
    assert list(r.tensors[0].shape) == [32, 50304]


# ----------------------------------------------------------------------------- command line

def test_size_labels_follow_the_gguf_packages_convention():
    import gguf
    for n in (454, 999, 1000, 1001, 31_415, 454_000, 7_000_000, 124_439_808, 354_823_168, 999_999_999,
              1_557_611_200, 13_000_000_000, 2_000_000_000_000):
        assert export.size_label(n) == gguf.utility.size_label(n, 0, 0, 0), n


def test_cli_exports_a_checkpoint_both_ways(tmp_path, tiny, capsys):
    import gguf
    tiny.save_checkpoint(tmp_path / "ckpt", template="chat")
    export.main([str(tmp_path / "ckpt"), "--to", "gguf", str(tmp_path / "m.gguf"), "--dtype", "f16"])
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(r, "general.name") == "ckpt" and field(r, "general.file_type") == 1
    tiny.save_checkpoint(tmp_path / "story-run" / "checkpoint")  # train.py's layout: the run is the name
    for source in ("story-run/checkpoint", "story-run/checkpoint/", "story-run/checkpoint/model.safetensors"):
        assert export.run_name(tmp_path / source) == "story-run", source
    assert export.run_name("gpt2-medium") == "gpt2-medium"  # a released name, as given
    export.main([str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")])
    assert GPT.from_pretrained(tmp_path / "hf").config == tiny.config
    assert "wrote" in capsys.readouterr().out


def run_cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "\n" not in err and "Traceback" not in err
    return err


def test_cli_bad_input_is_one_line_error(tmp_path, tiny, capsys):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint at all")
    assert "error:" in run_cli_error(capsys, junk, "--to", "hf", tmp_path / "out")
    assert "no such file" in run_cli_error(capsys, tmp_path / "missing", "--to", "gguf", tmp_path / "m.gguf")
    assert "unknown format" in run_cli_error(capsys, junk, "--to", "onnx", tmp_path / "x")
    assert "q8_0 is a GGUF format" in run_cli_error(capsys, junk, "--to", "hf", tmp_path / "x", "--dtype", "q8_0")
    tiny.save_checkpoint(tmp_path / "ckpt")
    # unwritable destinations: a path beneath a regular file cannot be created
    for fmt, dest in (("hf", junk / "dir"), ("gguf", junk / "sub" / "m.gguf")):
        err = run_cli_error(capsys, tmp_path / "ckpt", "--to", fmt, dest)
        assert err.startswith("error:") and str(junk) in err


def test_cli_help_and_no_traceback_in_a_real_process(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT)
    assert "--to" in run("--help").stdout
    p = run(tmp_path, "--to", "gguf", tmp_path / "m.gguf")  # a directory without model.safetensors
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_fine_tuned_export_carries_its_chat_template(tmp_path, tiny, template):
    """transformers' apply_chat_template formats a conversation exactly as our template does, text and
    tokens (it tokenizes the rendered text in one go; what generate.py feeds the model must be the
    same ids), and the GGUF file carries the same template for llama-server; a base model exports none."""
    import gguf
    from transformers import AutoTokenizer

    from tokenizer import encode_prompt, format_prompt, jinja_template
    tiny.save_checkpoint(tmp_path / "ckpt", template=template)
    model = GPT.from_pretrained(tmp_path / "ckpt")
    export.export_hf(model, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    conversations = [
        [{"role": "user", "content": "Name a color."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Fix the spelling.", "input": "teh cat"}],  # alpaca's Input section
        # an "input" on a system message: neither side takes alpaca's with-input preamble for it
        [{"role": "system", "content": "Be brief.", "input": "x"}, {"role": "user", "content": "Hi"}],
    ]
    cue = {"alpaca": "### Response:\n", "chat": "\nAssistant:"}[template]  # what asks the model to answer
    for messages in conversations:
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            format_prompt(messages, template)
        assert tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == \
            encode_prompt(messages, template)
        # without a generation prompt: the conversation as it stands, no cue after its last turn
        assert format_prompt(messages, template).endswith(cue)
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == \
            format_prompt(messages, template).removesuffix(cue)
        answered = messages + [{"role": "assistant", "content": "Blue."}]  # the text training sees
        assert tok.apply_chat_template(answered, tokenize=False, add_generation_prompt=False) == \
            format_prompt(answered, template)
    export.export_gguf(model, tmp_path / "m.gguf")
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.chat_template") == jinja_template(template)
    export.export_hf(tiny, tmp_path / "base")
    assert "chat_template" not in json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    # and back: the export loads in the template it was fine-tuned in (generate.py --chat, serve.py use it)
    assert GPT.from_pretrained(tmp_path / "hf").checkpoint_info == {"template": template}
    assert GPT.from_pretrained(tmp_path / "base").checkpoint_info == {}


def test_an_hf_export_shows_its_template_and_another_tools_template_is_not_taken_for_ours(tmp_path, tiny, capsys):
    from gpt import main as describe
    tiny.save_checkpoint(tmp_path / "ckpt", template="alpaca")
    export.export_hf(GPT.from_pretrained(tmp_path / "ckpt"), tmp_path / "hf")
    describe([str(tmp_path / "hf")])
    assert '  template: "alpaca"' in capsys.readouterr().out
    config = tmp_path / "hf" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": "{{ messages }}"}))
    assert GPT.from_pretrained(tmp_path / "hf").checkpoint_info == {}  # someone else's: no template of ours
    config.write_text("{not json")
    assert GPT.from_pretrained(tmp_path / "hf").checkpoint_info == {}  # the weights load all the same


def test_cli_failed_download_says_which_model(tmp_path, monkeypatch, capsys):
    """Offline, a named model's download fails with the message every other script gives."""
    import requests

    import checkpoint

    def offline(url, dest, **kwargs):
        raise requests.ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries")
    monkeypatch.setattr(checkpoint, "download", offline)
    err = run_cli_error(capsys, "gpt2", "--to", "gguf", tmp_path / "m.gguf")
    assert err.startswith("error: cannot load model 'gpt2': ") and "huggingface.co" in err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("fmt,dest,message", [
    ("hf", "", "--to hf: the output path is empty"),
    ("gguf", "", "--to gguf: the output path is empty"),
    ("gguf", ".", "--to gguf .: is a directory"),
    ("gguf", "sub/", "--to gguf sub/: is a directory"),
    ("hf", "notes.txt", "--to hf notes.txt: is a file"),
])
def test_cli_output_path_that_cannot_be_written_is_refused_before_loading(tmp_path, monkeypatch, capsys,
                                                                          fmt, dest, message):
    """An empty path (an unset shell variable) does not mean the current directory; a directory is
    not a GGUF file nor a file an HF directory. Refused first: the checkpoint does not even exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    err = run_cli_error(capsys, tmp_path / "missing", "--to", fmt, dest)
    assert err.startswith(f"error: {message}")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "keep me"


def test_hf_export_writes_exactly_its_listed_files(hf_dir):
    assert sorted(os.listdir(hf_dir)) == sorted(export.HF_FILES)


def test_cli_full_disk_leaves_the_old_export_whole_and_names_the_file(tmp_path, tiny, monkeypatch, capsys):
    """A write that fails midway (a full disk) removes its .tmp files, leaves the previous export as
    it was (no new weights beside old tokenizer files), and says which file could not be written."""
    from conftest import file_size_limit
    tiny.save_checkpoint(tmp_path / "ckpt")
    hf, gguf_file = tmp_path / "hf", tmp_path / "old.gguf"
    export.main([str(tmp_path / "ckpt"), "--to", "hf", str(hf)])
    gguf_file.write_bytes(b"the previous export")
    before = {name: (hf / name).read_bytes() for name in os.listdir(hf)}

    def full_disk(path, tensors, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_safetensors", full_disk)
    err = run_cli_error(capsys, tmp_path / "ckpt", "--to", "hf", hf)
    assert err == f"error: {hf / 'model.safetensors'}: No space left on device"
    assert {name: (hf / name).read_bytes() for name in os.listdir(hf)} == before

    with file_size_limit(1_000_000):  # a real failed write: the tokenizer header alone is larger
        err = run_cli_error(capsys, tmp_path / "ckpt", "--to", "gguf", gguf_file)
    assert err == f"error: {gguf_file}: File too large"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "old.gguf"]
    assert gguf_file.read_bytes() == b"the previous export"

    monkeypatch.undo()  # a directory in the way of one of the files: refused before any is replaced
    (hf / "vocab.json").unlink()
    (hf / "vocab.json").mkdir()
    before = {name: (hf / name).read_bytes() for name in os.listdir(hf) if name != "vocab.json"}
    err = run_cli_error(capsys, tmp_path / "ckpt", "--to", "hf", hf)
    assert err.startswith(f"error: {hf / 'vocab.json'}: is a directory")
    assert {name: (hf / name).read_bytes() for name in os.listdir(hf) if name != "vocab.json"} == before


@pytest.mark.parametrize("fmt,dest", [
    ("gguf", "ckpt/model.safetensors"),
    ("gguf", "ckpt/config.json"),
    ("gguf", "ckpt/../ckpt/model.safetensors"),
    ("gguf", "hardlink.safetensors"),  # the same file under another name
    ("hf", "ckpt"),
    ("hf", "ckpt/."),
    ("hf", "link"),  # a symlink to the checkpoint directory
])
def test_cli_refuses_to_overwrite_the_checkpoint_it_exports(tmp_path, tiny, monkeypatch, capsys, fmt, dest):
    """The export never replaces the files it reads: the checkpoint keeps its weights and its
    config.json (with the chat template, which the HF layout would lose)."""
    monkeypatch.chdir(tmp_path)
    tiny.save_checkpoint(tmp_path / "ckpt", template="chat")
    os.link(tmp_path / "ckpt" / "model.safetensors", tmp_path / "hardlink.safetensors")
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    before = {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")}
    err = run_cli_error(capsys, "ckpt", "--to", fmt, dest)
    assert err.startswith(f"error: --to {fmt} {dest} would overwrite ") and "part of the checkpoint" in err
    assert {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")} == before
    assert GPT.from_pretrained(tmp_path / "ckpt").checkpoint_info["template"] == "chat"



def test_cli_notes_an_earlier_export_it_replaces(tmp_path, tiny, capsys):
    """Exporting again over an earlier export replaces it, as llama.cpp's converter and save_pretrained
    do, with a one-line note naming what is replaced; other files in the directory are left alone."""
    tiny.save_checkpoint(tmp_path / "ckpt")
    for fmt, dest in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf")):
        export.main([str(tmp_path / "ckpt"), "--to", fmt, str(dest)])
        assert "replacing" not in capsys.readouterr().out
    (tmp_path / "hf" / "README.md").write_text("mine")
    export.main([str(tmp_path / "ckpt"), "--to", "gguf", str(tmp_path / "m.gguf")])
    assert f"note: replacing existing {tmp_path / 'm.gguf'}\n" in capsys.readouterr().out
    export.main([str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")])
    assert f"note: replacing existing {', '.join(export.HF_FILES)} in {tmp_path / 'hf'}\n" in capsys.readouterr().out
    assert (tmp_path / "hf" / "README.md").read_text() == "mine"


def test_hf_export_in_bf16_loads_back_as_the_rounded_weights(tmp_path, tiny):
    export.export_hf(tiny, tmp_path / "hf", "bf16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = GPT.from_pretrained(tmp_path / "hf")
    for name, w in tiny.state_dict().items():
        assert torch.equal(back.state_dict()[name], w.to(torch.bfloat16).float()), name


TOKENIZER_TEXTS = ["Hello world", "  two  spaces\n\n\tand tabs   \n", "emoji 🤖👍🏽 and 日本語のテキスト, 한국어",
                   "a<|endoftext|>b <|endoftext|>", "don't I'll we've THEY'RE", "x" * 300, "  ", "\u2028\u00a0é"]


def test_tokenizer_json_encodes_and_decodes_as_tiktoken(hf_dir):
    """tokenizer.json in the `tokenizers` library itself (what TGI, transformers.js, candle read)."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    enc = get_tokenizer()
    assert tok.get_vocab_size() == 50257 and tok.token_to_id("<|endoftext|>") == EOT
    for text in TOKENIZER_TEXTS:
        ids = enc.encode(text, allowed_special="all")  # <|endoftext|> in the text is the special token there
        assert tok.encode(text).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text, text
