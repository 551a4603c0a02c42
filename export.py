"""Export a checkpoint for other runtimes: a Hugging Face directory, or one GGUF file for llama.cpp.

    python export.py CHECKPOINT --to hf DIR   [--dtype f32|f16|bf16]   # transformers, vLLM, TGI, ...
    python export.py CHECKPOINT --to gguf FILE [--dtype f32|f16|bf16|q8_0]  # llama.cpp, ollama, LM Studio, ...

CHECKPOINT is anything GPT.from_pretrained takes: one of our checkpoint directories, gpt2 ... gpt2-xl,
a Hugging Face directory or a .safetensors file.

Nothing about the model changes on the way out; only the packaging does.

* Hugging Face's GPT2LMHeadModel has our parameter names under a `transformer.` prefix, but stores its
  four "Conv1D" weights as [in, out] (OpenAI's layout) where we store nn.Linear's [out, in]: those four
  are transposed. Beside the weights go a config.json in transformers' GPT-2 schema and the tokenizer
  files (vocab.json, merges.txt) that every GPT-2 runtime reads.
* GGUF is llama.cpp's single-file format: a header of typed key-value metadata (hyper-parameters and
  the whole tokenizer), a table of tensor descriptions, then the raw tensor bytes, each aligned to 32
  bytes. llama.cpp's gpt2 architecture wants nn.Linear's [out, in] layout, which we already have; it
  only renames the tensors (blk.N.attn_qkv, ...). Written here with struct and numpy, no library.

The tokenizer files are derived from tiktoken's GPT-2 encoding (its own cached files), nothing else. tiktoken
knows each token's bytes and rank (= token id); GPT-2's files spell tokens as printable strings
(`bytes_to_unicode`) and list the merges, rank by rank, that build each multi-byte token from two
shorter ones. We recover each merge by running BPE on the token's own bytes with only the
lower-ranked merges allowed: it stops exactly at the two halves the token was made from.

A model trained without biases (GPTConfig.bias=False) is exported with zero biases, which compute
the same thing: neither format has a bias-free GPT-2.
"""

import argparse
import contextlib
import functools
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError, resolve_weights, write_safetensors
from common import die, replace_all_atomically, same_file
from gpt import CONV1D, SIZES, load_or_die
from tokenizer import EOT, get_tokenizer, jinja_template

EOT_TEXT = "<|endoftext|>"


# ----------------------------------------------------------------------------- the tokenizer, spelled out

def bytes_to_unicode():
    """GPT-2's reversible byte -> character map. Vocab and merge files are text, and BPE tokens are raw
    bytes (often pieces of a UTF-8 character), so every byte gets a printable character: bytes that
    already print as themselves keep it, the others (space, control bytes, ...) borrow characters from
    256 upward, in byte order. A space becomes "Ġ" (256 + 32), a newline "Ċ" (256 + 10)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, borrowed = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + borrowed)
            borrowed += 1
    return table


@functools.lru_cache(maxsize=1)
def gpt2_vocab():
    """GPT-2's vocabulary as the files spell it: (tokens, merges). tokens[i] is token i's string
    (bytes_to_unicode form; the last one is <|endoftext|>); merges are "left right" strings in rank
    order, merge r creating token 256 + r. Derived from tiktoken's ranks in about a second."""
    enc = get_tokenizer()
    ranks = enc._mergeable_ranks  # bytes -> rank; a token's rank is its id
    spell = bytes_to_unicode()

    def text(b):
        return "".join(spell[x] for x in b)

    def halves(token, rank):
        # BPE on the token's bytes with merges below `rank` only: always merge the adjacent pair that
        # forms the lowest-ranked token. The token itself is the next merge, so two parts remain.
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs, default=(rank, -1))
            if best >= rank:
                return parts
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    assert [r for _, r in by_rank] == list(range(len(by_rank))), "tiktoken ranks are not 0..n-1"
    tokens = [text(t) for t, _ in by_rank] + [EOT_TEXT]
    assert len(tokens) == EOT + 1 and enc.encode(EOT_TEXT, allowed_special="all") == [EOT]
    merges = []
    for token, rank in by_rank:
        if len(token) > 1:
            left, right = halves(token, rank)  # exactly two, or tiktoken's table is not a BPE merge list
            merges.append(f"{text(left)} {text(right)}")
    return tokens, merges


# ----------------------------------------------------------------------------- the weights

def named_weights(model):
    """Our parameters by name (lm_head left out: it is wte), with zeros standing in for biases a
    bias=False model does not have, since both formats expect every GPT-2 bias."""
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    C = model.config.n_embd
    widths = {"ln_1": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "ln_2": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
    for i in range(model.config.n_layer):
        for part, width in widths.items():
            state.setdefault(f"h.{i}.{part}.bias", torch.zeros(width))
    state.setdefault("ln_f.bias", torch.zeros(C))
    return {k: v.detach().float().cpu() for k, v in state.items()}


TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- Hugging Face

def hf_config(config, dtype="f32"):
    """config.json in transformers' GPT-2 schema (what GPT2Config, vLLM and TGI read)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None: 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation of GELU, as OpenAI trained with
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    }


def template_name(model):
    """The fine-tuned model's template name (recorded by sft.py), or None for a base model. The
    exports carry it as a Jinja chat template, so `apply_chat_template` in transformers and
    llama-server's chat endpoint format conversations the way the model was trained."""
    return getattr(model, "checkpoint_info", {}).get("template")


HF_FILES = ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt",
            "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


def export_hf(model, directory, dtype="f32"):
    """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer (and vLLM) load."""
    check_vocab(model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in named_weights(model).items():
        if name.endswith(CONV1D):
            t = t.t()  # nn.Linear [out, in] -> Conv1D [in, out]
        state["transformer." + name] = t.to(TORCH_DTYPES[dtype])
    tokens, merges = gpt2_vocab()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    files = {
        # "pt": transformers checks for it
        "model.safetensors": lambda tmp: write_safetensors(tmp, state, metadata={"format": "pt"}),
        "config.json": json_file(hf_config(model.config, dtype)),
        "generation_config.json": json_file({"bos_token_id": EOT, "eos_token_id": EOT}),
        "vocab.json": json_file({t: i for i, t in enumerate(tokens)}),
        "tokenizer.json": json_file(tokenizer_json(tokens, merges)),
        "merges.txt": lambda tmp: tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"),
        "special_tokens_map.json": json_file(special),
        "tokenizer_config.json": json_file({
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model.config.block_size,
            "add_prefix_space": False,
            "add_bos_token": False,  # GPT-2 never starts a text with <|endoftext|> by itself
            "added_tokens_decoder": {str(EOT): {"content": EOT_TEXT, "special": True, "lstrip": False,
                                                "rstrip": False, "normalized": True, "single_word": False}},
            **special,
            **({"chat_template": jinja_template(template_name(model))} if template_name(model) else {}),
        }),
    }
    write_files(directory, files)
    return directory


def tokenizer_json(tokens, merges):
    """tokenizer.json, the `tokenizers` library's one-file format (what transformers' fast tokenizer,
    TGI, transformers.js, candle and mistral.rs read): GPT-2's byte-level BPE from the same vocabulary
    and merges as vocab.json and merges.txt, <|endoftext|> an added special token."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT, "content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,  # GPT-2's regex split, then bytes as printable characters
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens[:EOT])}, "merges": merges},
    }


def json_file(obj):
    """A writer for write_files: `obj` as indented JSON."""
    return lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_files(directory, files):
    """Write {name: write(path)} into `directory`, all or nothing: never a new model beside an old
    tokenizer config (common.replace_all_atomically: every NAME.tmp is written before any is renamed).
    The renames cannot fail halfway for want of space; a target that is a directory, the one thing
    that would make one fail, is refused before anything is written. An error names the file it
    failed on, not the .tmp or nothing (a full disk's error names no file)."""
    directory = Path(directory)
    for name in files:
        if (directory / name).is_dir():
            raise IsADirectoryError(21, "is a directory, not a file this export can replace", str(directory / name))

    def named(path, write):
        def write_naming_path(tmp):
            with errors_naming(path):
                write(tmp)
        return write_naming_path
    replace_all_atomically({directory / name: named(directory / name, write) for name, write in files.items()})


@contextlib.contextmanager
def errors_naming(path):
    """An OSError raised inside names `path`, the file the user asked for, whatever it named."""
    try:
        yield
    except OSError as e:
        e.filename = str(path)
        raise


# ----------------------------------------------------------------------------- GGUF

GGUF_VERSION = 3
ALIGNMENT = 32
# types of metadata values (gguf_type in ggml)
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
# types of tensors (ggml_type), and general.file_type (llama_ftype) for a file of them
GGML_TYPE = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_BF16
Q8_0_BLOCK = 32  # weights per Q8_0 block, stored as one f16 scale and 32 int8s: 34 bytes
# token types (llama_token_type)
NORMAL, CONTROL, UNUSED = 1, 3, 5


def gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    """(type, bytes) of a metadata value. Python's types pick GGUF's: bool, int -> uint32 (counts and
    ids), float -> float32, str, and lists: of str, or of int -> int32 (token types)."""
    if isinstance(v, bool):
        return BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        return UINT32, struct.pack("<I", v)
    if isinstance(v, float):
        return FLOAT32, struct.pack("<f", v)
    if isinstance(v, str):
        return STRING, gguf_string(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return ARRAY, struct.pack("<IQ", STRING, len(v)) + b"".join(gguf_string(x) for x in v)
    if isinstance(v, list) and all(isinstance(x, int) for x in v):
        return ARRAY, struct.pack("<IQ", INT32, len(v)) + np.asarray(v, dtype="<i4").tobytes()
    raise TypeError(f"no GGUF type for {v!r:.40}")


def write_gguf(path, metadata, tensors):
    """Write a GGUF v3 file. metadata: {key: value} (see gguf_value); tensors: {name: (ggml type: f32,
    f16, bf16 or q8_0, numpy array)} in the order to store them, in torch's dimension order (a bf16
    array holds the bits, as int16: numpy has no bfloat16; a q8_0 one the blocks' bytes, each row
    34/32 bytes a weight: see quantize_q8_0).

    Layout (little-endian): "GGUF", version u32, tensor count u64, metadata count u64; the metadata,
    each a string key, a u32 type, the value; the tensor infos, each a name, n_dims u32, the dims
    (ggml lists the fastest-varying first: torch's shape reversed), ggml type u32 and the offset u64 of
    its bytes from the start of the data section; padding to ALIGNMENT; the data, each tensor padded."""
    from tqdm import tqdm

    header = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, value in metadata.items():
        kind, payload = gguf_value(value)
        header += [gguf_string(key), struct.pack("<I", kind), payload]
    offset = 0
    for name, (kind, a) in tensors.items():
        shape = (*a.shape[:-1], a.shape[-1] // (Q8_0_BLOCK + 2) * Q8_0_BLOCK) if kind == "q8_0" else a.shape  # in weights
        header += [gguf_string(name), struct.pack("<I", a.ndim), struct.pack(f"<{a.ndim}Q", *reversed(shape)),
                   struct.pack("<IQ", GGML_TYPE[kind], offset)]
        offset += a.nbytes + (-a.nbytes % ALIGNMENT)
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            head = b"".join(header)
            f.write(head + bytes(-len(head) % ALIGNMENT))
            for _, a in tqdm(tensors.values(), desc=path.name, unit="tensor", disable=None):
                data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
                f.write(data + bytes(-len(data) % ALIGNMENT))
    write_files(path.parent, {path.name: write})
    return path


def gguf_tensors(model, dtype="f32"):
    """Our weights under llama.cpp's gpt2 names, as write_gguf takes them. In f16, bf16 and q8_0 the
    matrices shrink while the 1-D tensors (norms, biases) and the position embedding stay float32,
    as llama.cpp's own converter and llama-quantize do: they are small, its kernels add and normalize
    in float32, and a position embedding is added to every token as it is. A matrix whose rows do
    not split into Q8_0 blocks of 32 is stored in f16, as llama.cpp's converter falls back."""
    w = named_weights(model)
    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = {}
    for name in names:
        out[names[name]] = w[name]
    for i in range(model.config.n_layer):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = w[f"h.{i}.{ours}.{kind}"]  # [out, in], as llama.cpp wants
    # no output.weight: llama.cpp's gpt2 falls back to token_embd when the head is tied
    def stored(name, v):
        if dtype == "f32" or v.ndim == 1 or name == "position_embd.weight":
            return "f32", v.float().numpy()
        if dtype == "bf16":  # (rounded to nearest even by torch, then its bits)
            return "bf16", v.to(torch.bfloat16).view(torch.int16).numpy()
        if dtype == "q8_0" and v.shape[-1] % Q8_0_BLOCK == 0:
            return "q8_0", quantize_q8_0(v.float().numpy())
        return "f16", v.float().numpy().astype(np.float16)
    return {k: stored(k, v) for k, v in out.items()}


def quantize_q8_0(w):
    """A float32 matrix [rows, cols] as llama.cpp's Q8_0 blocks, bit for bit as ggml's reference
    quantizer writes them: each run of 32 weights along a row gets the scale d = max|w| / 127 (stored
    as f16) and the int8s round(w / d), halves away from zero (C's roundf). Returns uint8 [rows,
    cols / 32 * 34]: per block, d's two bytes, then the 32 int8s. A few thousand rows at a time:
    the float64 copies of a whole gpt2-xl embedding would take gigabytes."""
    return np.concatenate([_q8_0_rows(w[i:i + 4096]) for i in range(0, len(w), 4096)])


def _q8_0_rows(w):
    rows, cols = w.shape
    blocks = w.astype(np.float32).reshape(rows, cols // Q8_0_BLOCK, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)  # an all-zero block: d = 0, q = 0
    x = (blocks * inv).astype(np.float64)  # (float32 products, as ggml's; rounded in float64, where |x| + 0.5 is exact)
    q = (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int8)
    scale = d.astype("<f2").view(np.uint8)  # [rows, blocks, 2]
    return np.concatenate([scale, q.view(np.uint8)], axis=-1).reshape(rows, -1)


def gguf_metadata(model, name, dtype="f32"):
    """The key-value header llama.cpp's gpt2 loader reads: hyper-parameters and the tokenizer."""
    c = model.config
    tokens, merges = gpt2_vocab()
    types = [NORMAL] * EOT + [CONTROL]
    # a vocabulary padded beyond GPT-2's (e.g. 50304, a multiple of 64) gets placeholder tokens:
    # llama.cpp sizes the embedding from the token list
    pad = c.vocab_size - len(tokens)
    tokens = tokens + [f"[PAD{i}]" for i in range(pad)]
    types = types + [UNUSED] * pad
    return {
        "general.architecture": "gpt2",
        "general.name": name,
        "general.size_label": size_label(model.num_params(non_embedding=False)),
        "general.file_type": FILE_TYPE[dtype],
        **({"general.quantization_version": 2} if dtype == "q8_0" else {}),  # (ggml's GGML_QNT_VERSION)
        "general.alignment": ALIGNMENT,
        "gpt2.context_length": c.block_size,
        "gpt2.embedding_length": c.n_embd,
        "gpt2.feed_forward_length": 4 * c.n_embd,
        "gpt2.block_count": c.n_layer,
        "gpt2.attention.head_count": c.n_head,
        "gpt2.attention.layer_norm_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",  # byte-level BPE with a merge list
        "tokenizer.ggml.pre": "gpt-2",  # GPT-2's pre-tokenizing regex
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": EOT,
        "tokenizer.ggml.eos_token_id": EOT,
        "tokenizer.ggml.unknown_token_id": EOT,
        "tokenizer.ggml.add_bos_token": False,
        **({"tokenizer.chat_template": jinja_template(template_name(model))} if template_name(model) else {}),
    }


def export_gguf(model, path, dtype="f32", name="gpt2"):
    """Write one GGUF file that llama.cpp runs as its gpt2 architecture."""
    check_vocab(model.config)
    return write_gguf(path, gguf_metadata(model, name, dtype), gguf_tensors(model, dtype))


def size_label(n):
    """A parameter count as GGUF files label it (llama.cpp's convention): K, M, B or T, with at least
    two significant digits: 124M, 1.6B, 7.0M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n > scale or suffix == "K":
            break
    value = n / scale
    whole_digits = len(str(round(value))) if round(value) else 0
    return f"{value:.{max(2 - whole_digits, 0)}f}{suffix}"


def run_name(source):
    """What an export calls its model: the run's folder (train.py keeps a run's model in
    RUN/checkpoint), a file's folder, or a released name as it was given."""
    path = Path(str(source).rstrip("/\\"))
    if path.exists():
        path = path.resolve()
        if path.suffix == ".safetensors":
            path = path.parent
        if path.name in ("checkpoint", "checkpoint.old") and path.parent.name:
            path = path.parent
    return path.name or "gpt2"


def check_vocab(config):
    """Refuse a model whose vocabulary cannot hold GPT-2's tokens: the exports ship GPT-2's tokenizer."""
    if config.vocab_size < EOT + 1:
        raise CheckpointError(f"vocab_size {config.vocab_size} is smaller than GPT-2's tokenizer "
                              f"({EOT + 1} tokens); the exported tokenizer would not fit the model")


# ----------------------------------------------------------------------------- command line

def check_output(fmt, out):
    """Die, before the model is loaded, on an output path that cannot be what `fmt` writes: an empty
    one (an unset shell variable; it would mean the current directory), a directory where the GGUF
    file goes, a file where the Hugging Face directory goes."""
    if not out:
        die(f"--to {fmt}: the output path is empty")
    path = Path(out)
    if fmt == "gguf" and (path.is_dir() or out.endswith(("/", os.sep))):
        die(f"--to gguf {out}: is a directory; give the file to write, e.g. {path / 'model.gguf'}")
    if fmt == "hf" and path.exists() and not path.is_dir():
        die(f"--to hf {out}: is a file; give the directory to write")


def output_files(fmt, out):
    """The files an export to `out` writes."""
    return [Path(out) / name for name in HF_FILES] if fmt == "hf" else [Path(out)]


def check_not_source(fmt, out, checkpoint):
    """Die if the export would write over a file the (loaded) checkpoint is read from, its weights or
    the config.json beside them: `export.py S --to gguf S/model.safetensors`, or `--to hf S`, would
    replace the model with its export and lose what only our config.json holds (the chat template).
    Compared as files (common.same_file), so another spelling of the path or a link to it is caught too."""
    weights = resolve_weights(checkpoint, SIZES)  # already loaded: a local path, nothing is downloaded
    targets = output_files(fmt, out)
    for source in (weights, weights.parent / "config.json"):
        for target in targets + [t.with_name(t.name + ".tmp") for t in targets]:
            if same_file(source, target):
                die(f"--to {fmt} {out} would overwrite {source}, part of the checkpoint being exported; "
                    f"choose another path")


def note_replaced(fmt, out):
    """An earlier export is replaced, as llama.cpp's converter and save_pretrained do, but not silently."""
    old = [p for p in output_files(fmt, out) if p.exists()]
    if old:
        print(f"note: replacing existing {out}" if fmt == "gguf" else
              f"note: replacing existing {', '.join(p.name for p in old)} in {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face directory or a GGUF file.",
                                epilog="examples:  python export.py out/sft --to hf exported/\n"
                                       "           python export.py gpt2 --to gguf gpt2.gguf --dtype f16",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, .safetensors file, or gpt2 / gpt2-medium / ...")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "PATH"),
                   help="hf DIR (transformers, vLLM) or gguf FILE (llama.cpp)")
    p.add_argument("--dtype", choices=[*sorted(TORCH_DTYPES), "q8_0"], default="f32",
                   help="f16 or bf16 halve the size, q8_0 (GGUF only: llama.cpp's int8 blocks) nearly quarters it; "
                        "GGUF keeps norms, biases and the position embedding in f32; default f32")
    args = p.parse_args(argv)
    fmt, out = args.to
    if fmt not in ("hf", "gguf"):
        die(f"--to: unknown format {fmt!r}; choose hf or gguf")
    if fmt == "hf" and args.dtype == "q8_0":
        die("--dtype q8_0 is a GGUF format (llama.cpp's); for --to hf choose f32, f16 or bf16")
    check_output(fmt, out)

    model = load_or_die(args.checkpoint)  # a bad checkpoint or failed download: "cannot load model ..."
    check_not_source(fmt, out, args.checkpoint)
    note_replaced(fmt, out)
    try:
        if fmt == "hf":
            export_hf(model, out, args.dtype)
        else:
            export_gguf(model, out, args.dtype, name=run_name(args.checkpoint))
    except CheckpointError as e:
        die(str(e))
    except OSError as e:  # an unwritable path, a full disk ...
        die(f"{e.filename}: {e.strerror or e}" if e.filename else f"{out}: {e}")
    print(f"wrote {out} ({fmt}, {args.dtype})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: quit without a traceback (every write is all or nothing)
        sys.exit(130)
