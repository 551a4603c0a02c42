"""GPT-2 in one file: the model, OpenAI's weights, the tokenizer and our checkpoint format.

The model is the GPT-2 of OpenAI's 2019 release, written with plain nn.Modules:

    tokens -> wte + wpe -> h[0..L-1] -> ln_f -> lm_head (tied to wte) -> logits
    each block h[i]:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))      (pre-LayerNorm)

Parameter names are OpenAI's (wte, wpe, h.N.ln_1, h.N.attn.c_attn, ..., ln_f), so a released
checkpoint maps onto this model key for key; the only twist is that OpenAI's "Conv1D" layers store
their weight as [in, out] where nn.Linear wants [out, in] (see `load_state_from_file`).

The KV-cache seam
-----------------
`GPT.forward(idx, targets=None, pos=None, cache=None)`. Without a cache every call is plain causal
self-attention over `idx` (training, scoring). With a cache, each attention layer hands its fresh
q, k, v to the cache and gets the attention output back:

    y = cache.attend(layer_index, q, k, v)      # q, k, v, y: (B, n_head, T, head_dim)

The cache stores k and v wherever it likes (a contiguous tensor in generate.py, a pool of paged
blocks in serve.py) and attends q over everything it holds for that sequence, new tokens
included, causally. `pos` (B, T) or (T,) gives each token's absolute position for the position
embedding; it defaults to 0..T-1. That is the whole contract: the model never learns where the
cache keeps things, and the caches never touch the model's weights.

Checkpoints
-----------
A checkpoint is a directory with `model.safetensors` (our own writer, nn.Linear layout, marked so
in the file's metadata) and `config.json` (the GPTConfig plus metadata such as the chat template).
`GPT.from_pretrained` loads that, a Hugging Face hub directory or .safetensors file, or one of the
names gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded once into a cache). Loading never
unpickles anything: safetensors is a JSON header and raw bytes, parsed here by hand. It checks
before it trusts: the header's offsets, the config's sizes against the header's shapes (before the
model is built or allocated), then each tensor's shape and that it holds no NaN or inf. A problem
is a CheckpointError naming the file and the key or tensor.
"""

import argparse
import hashlib
import json
import math
import mmap
import os
import struct
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256  # <|endoftext|>: the document separator in pretraining and the end of an answer in chat


# ----------------------------------------------------------------------------- the model

@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the context length (OpenAI's n_ctx)
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True  # OpenAI's GPT-2 has biases everywhere; False gives a slightly faster model to train


SIZES = {  # the four released models
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout_p = config.dropout  # (a probability: SDPA applies it to the attention weights)
        self.layer_index = 0  # set by GPT: which layer this is, so a cache knows where to store k and v

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            p = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = cache.attend(self.layer_index, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # OpenAI trained with the tanh approximation of GELU; the exact erf form shifts logits by ~1e-3
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the output projection is the input embedding
        for i, block in enumerate(self.h):
            block.attn.layer_index = i
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the position embedding (a lookup table: nanoGPT's
        convention). The token embedding counts once, since the head shares it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx, pos=None, cache=None):
        """The final hidden states (after ln_f), (B, T, n_embd). Callers that need logits for a few
        positions only (generation, serving) apply lm_head to those rows and skip the rest. Callers
        that pass `pos` keep every position below block_size (the caches check their own lengths)."""
        B, T = idx.shape
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x, cache)
        return self.ln_f(x)

    def forward(self, idx, targets=None, pos=None, cache=None):
        """Logits (B, T, vocab). With targets, also the mean cross-entropy over the positions whose
        target is not -100 (the label every masked position carries)."""
        logits = self.lm_head(self.hidden(idx, pos, cache))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
        """gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a checkpoint directory, or a .safetensors file."""
        path = resolve_weights(name_or_path)
        header, _ = read_safetensors_header(path)
        ckpt_dir = path.parent
        info = read_checkpoint_json(ckpt_dir) if is_our_layout(path, header) else {}
        if info:
            config = GPTConfig(**{**info["config"], "dropout": dropout})
        else:
            config = infer_hub_config(path, header, name_or_path)
            config.dropout = dropout
        where = ckpt_dir / "config.json" if (ckpt_dir / "config.json").exists() else path
        check_config(config, where)
        # before anything is built: building 1e7 layers takes minutes even on the meta device, and
        # to_empty below allocates whatever the config says (terabytes for a block_size of 1e12)
        check_config_fits_weights(config, header, where, path)
        # Build on the meta device (no memory, no random init), then materialize directly in the
        # target dtype/device and fill each tensor from the memory-mapped file: never two full copies.
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device=device)
        model.lm_head.weight = model.wte.weight  # to_empty breaks the tie; tie again
        load_state_from_file(model, path, transposed=not info)
        model.checkpoint_info = info  # metadata from config.json (template, ...), {} for hub weights
        return model.eval()

    def save_checkpoint(self, directory, **metadata):
        """Write the project's checkpoint: model.safetensors + config.json, atomically (each file goes
        to a temporary name first, so an interrupted save never leaves a half-written checkpoint)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        replace_atomically(directory / "model.safetensors",
                           lambda tmp: write_safetensors(tmp, state, metadata={"layout": LAYOUT}))
        cfg = {k: v for k, v in asdict(self.config).items() if k != "dropout"}
        write_json_atomic(directory / "config.json", {"format": LAYOUT, "config": cfg, **metadata})


# ----------------------------------------------------------------------------- tokenizer

def get_tokenizer():
    """GPT-2's byte-level BPE from tiktoken (50257 tokens, <|endoftext|> = 50256)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its two files on first use: no network, no tokenizer
        die(f"cannot load GPT-2's tokenizer files ({type(e).__name__}); connect to the internet once, "
            f"or point TIKTOKEN_CACHE_DIR at a folder that holds them")


def encode(text, enc=None):
    """User text -> token ids. "<|endoftext|>" written in the text is ordinary text here, never the
    special token: only our own code places EOT (templates, document separators)."""
    return (enc or get_tokenizer()).encode(text, disallowed_special=())


def pick_device(requested=None):
    """--device if given, else cuda, then mps, then cpu."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_or_die(requested=None):
    """pick_device as a torch.device, for the scripts: a bad or unavailable --device is a one-line error."""
    try:
        device = torch.device(pick_device(requested))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # (torch knows more: xpu, meta, ...)
        die(f"bad --device {requested!r}: use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        die("--device mps, but MPS is not available")
    return device


def default_dtype(device):
    """bfloat16 on CUDA (tensor cores, half the memory traffic), float32 elsewhere: CPUs without
    bf16 matrix units run it slower, and MPS's bf16 support is partial."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# ----------------------------------------------------------------------------- safetensors, by hand
# Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:
# [begin, end]}, "__metadata__": {str: str}}, then the raw tensor bytes, offsets relative to there.

FAMILY = "gpt2-chatbot/"  # our layouts' prefix: a later version's files are refused, never misread
LAYOUT = FAMILY + "v1"  # marks our own files: nn.Linear [out, in] weights, no transpose needed
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A weights file or checkpoint that cannot be loaded; the message names the file and tensor."""


def read_safetensors_header(path):
    """Parse and bounds-check a safetensors header. Returns (header dict, offset of the data)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not all(isinstance(o, int) for o in (begin, end)):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{begin}, {end}] lie outside the "
                                  f"{data_len} data bytes (truncated file?)")
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but "
                                  f"{dtype}{shape} needs {nbytes}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return header, data_start


def iter_safetensors(path):
    """Yield (name, tensor) from a safetensors file. Tensors are views of a copy-on-write memory map,
    so the file's pages are read lazily and never held twice; copy what you keep."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin) if count else \
            torch.empty(0, dtype=dtype)
        yield name, t.view(info["shape"])


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors (tensors in name order, header padded to 8 bytes)."""
    header, offset, items = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append(t)
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in items:
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().tobytes())


def replace_atomically(path, write):
    """write(tmp) into `path`.tmp, then rename it to `path`: readers see the old file or the new one,
    never half of one. A write that fails (a full disk) deletes the .tmp and raises, `path` untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# OpenAI's Conv1D layers store weight as [in, out] (x @ W); nn.Linear stores [out, in] (x @ W.T).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_state_from_file(model, path, transposed):
    """Copy every tensor of `path` into `model`, one at a time. `transposed`: the file is in the hub's
    Conv1D layout, so the four Conv1D weights are transposed on the way in."""
    params = model.state_dict()
    params.pop("lm_head.weight")  # tied to wte.weight
    seen = set()
    for name, t in iter_safetensors(path):
        key = name.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # HF's causal-mask buffers (not weights), and the tied head
        if key not in params:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (not a GPT-2 weight)")
        if transposed and key.endswith(CONV1D):
            t = t.t()
        if tuple(t.shape) != tuple(params[key].shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, "
                                  f"the model expects {list(params[key].shape)}")
        if t.is_floating_point() and not all_finite(t):  # else generation fails at the first token
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or inf values (a diverged training run?)")
        with torch.no_grad():
            params[key].copy_(t)
        seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def all_finite(t):
    """Whether tensor `t` holds no NaN or inf. A sum is NaN or inf when any element is, and costs a
    fraction of isfinite's pass (no bool tensor the size of the weights); only a sum that overflowed
    from finite values (huge weights, or float16's small range) needs the exact check."""
    return math.isfinite(t.sum()) or bool(torch.isfinite(t).all())


def read_checkpoint_json(directory):
    """Our config.json: {"format": LAYOUT, "config": {every GPTConfig field but dropout}, metadata...}.
    Every size must be there: a default filled in for a missing one would describe another model."""
    path = Path(directory) / "config.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint config ({e})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint config (not a JSON object)")
    if info.get("format") != LAYOUT:
        found = f"format {info['format']!r} is unknown" if "format" in info else "no \"format\" key"
        raise CheckpointError(f"{path}: {found}; this version reads {LAYOUT!r} checkpoints")
    config = info.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint config (no \"config\" object)")
    known = [f.name for f in fields(GPTConfig)]
    unknown = [k for k in config if k not in known]
    if unknown:
        raise CheckpointError(f"{path}: unknown config key {unknown[0]!r} (GPTConfig has {', '.join(known)})")
    missing = [k for k in known if k not in config and k != "dropout"]  # (dropout is a training choice)
    if missing:
        raise CheckpointError(f"{path}: the config has no {', '.join(missing)}")
    return info


def is_our_layout(path, header):
    """Whether `path` holds our layout (nn.Linear weights, a GPTConfig in config.json beside it), as
    its metadata says, rather than the hub's. Refused: a later version of our layout, and weights
    beside our config.json that lost the marker (re-saved by another tool): whether they are [out, in]
    or transposed is then unknown, and square matrices would load either way, wrong."""
    layout = (header.get("__metadata__") or {}).get("layout")
    if layout == LAYOUT:
        return True
    if layout is not None and layout.startswith(FAMILY):
        raise CheckpointError(f"{path}: layout {layout!r} is not one this version reads ({LAYOUT!r})")
    try:
        fmt = json.loads((path.parent / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None  # no config.json, or not ours: infer_hub_config reads it or says what is wrong
    if isinstance(fmt, str) and fmt.startswith(FAMILY):
        raise CheckpointError(f"{path}: no \"layout\" in its __metadata__ (re-saved by another tool?), though "
                              f"config.json beside it is a {fmt} checkpoint's; our weights need "
                              f"{{\"layout\": \"{LAYOUT}\"}} there")
    return False


def check_config(config, where):
    """A CheckpointError naming `where` unless the config describes a model that can be built: a
    config.json edited by hand (or written by something else) fails here in one line, not deep in
    nn.Module construction."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: {name} must be a positive integer, not {value!r}")
    if config.n_embd % config.n_head:
        raise CheckpointError(f"{where}: n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    if not isinstance(config.bias, bool):
        raise CheckpointError(f"{where}: bias must be true or false, not {config.bias!r}")


def check_config_fits_weights(config, header, where, path):
    """A CheckpointError naming the config key (in `where`, the config's file) unless the vocabulary,
    width, context and layer count are those of the weights in `path`, read from its header alone.
    These are the sizes that decide how much the model allocates; the shape of every other tensor
    follows from them and is checked as it is loaded."""
    shapes = {k.removeprefix("transformer."): v["shape"] for k, v in header.items() if k != "__metadata__"}
    for key, sizes in (("wte.weight", ("vocab_size", "n_embd")), ("wpe.weight", ("block_size", "n_embd"))):
        if key not in shapes:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        if len(shapes[key]) != 2:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shapes[key]}, expected 2 dimensions")
        for size, dim in zip(sizes, shapes[key]):
            if getattr(config, size) != dim:
                raise CheckpointError(f"{where}: {size} {getattr(config, size)} disagrees with the weights: "
                                      f"{path.name} holds {key!r} of shape {shapes[key]}")
    layers = {k.split(".")[1] for k in shapes if k.startswith("h.")}
    if config.n_layer != len(layers):
        raise CheckpointError(f"{where}: n_layer {config.n_layer} disagrees with the weights: "
                              f"{path.name} holds {len(layers)} layer{'s' if len(layers) != 1 else ''}")


def infer_hub_config(path, header, name):
    """The GPTConfig of a hub-layout file: from its HF config.json when there is one, else from the
    tensor shapes (the head count, which shapes do not show, from the released sizes' widths)."""
    if str(name) in SIZES:
        return GPTConfig(**SIZES[str(name)])
    hf = Path(path).parent / "config.json"
    if hf.exists():
        try:
            c = json.loads(hf.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{hf}: not valid JSON ({e})") from None
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if not isinstance(c, dict) or k not in c]
        if missing:
            raise CheckpointError(f"{hf}: not a GPT-2 config: it has no {', '.join(missing)}")
        return GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                         block_size=c.get("n_positions", c.get("n_ctx", 1024)), vocab_size=c["vocab_size"])
    shapes = {k.removeprefix("transformer."): v["shape"] for k, v in header.items() if k != "__metadata__"}
    for key in ("wte.weight", "wpe.weight"):
        if key not in shapes:
            raise CheckpointError(f"{path}: missing tensor {key!r}")
        if len(shapes[key]) != 2:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shapes[key]}, expected 2 dimensions")
    vocab, n_embd = shapes["wte.weight"]
    layers = [k.split(".")[1] for k in shapes if k.startswith("h.")]
    bad = next((k for k in layers if not k.isdigit()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor names 'h.{bad}...' do not number their layer")
    n_layer = len(set(layers))  # (not 1 + the highest number: a stray 'h.9999999.' would build 10**7 layers)
    heads = {s["n_embd"]: s["n_head"] for s in SIZES.values()}
    if n_embd not in heads:
        raise CheckpointError(f"{path}: width {n_embd} is not a released GPT-2 size; put a config.json with n_head beside it")
    return GPTConfig(n_layer=n_layer, n_head=heads[n_embd], n_embd=n_embd, block_size=shapes["wpe.weight"][0], vocab_size=vocab)


# ----------------------------------------------------------------------------- downloads

HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"


def cache_dir():
    """Where downloads live: $GPT2_CACHE_DIR, else ~/.cache/gpt2-chatbot."""
    return Path(os.environ.get("GPT2_CACHE_DIR") or Path.home() / ".cache" / "gpt2-chatbot")


def resolve_weights(name_or_path):
    """A model name (downloaded into the cache once), a checkpoint directory, or a .safetensors file
    -> the path of the .safetensors file to load."""
    name = str(name_or_path)
    if name in SIZES and not Path(name).exists():
        return download(HUB_URL.format(name=name), cache_dir() / name / "model.safetensors")
    p = Path(name)
    if p.is_dir():
        p = p / "model.safetensors"
        if not p.exists():
            # a train.py run directory keeps its model one level down, in checkpoint/
            inside = sorted(str(q.parent) for q in Path(name).glob("*/model.safetensors"))
            more = ", ..." if len(inside) > 3 else ""
            hint = f" (models inside it: {', '.join(inside[:3])}{more})" if inside else ""
            raise CheckpointError(f"{name_or_path}: directory has no model.safetensors{hint}")
        return p
    if not p.exists():
        raise CheckpointError(f"{name}: no such file or directory, and not one of {', '.join(SIZES)}")
    return p


def download(url, dest, sha256=None, chunk_size=1 << 16, timeout=30):
    """Download `url` to `dest` unless it is already there, with a progress bar.

    The bytes go to `dest.part` and are renamed to `dest` only when complete and verified; if a
    `.part` is left over from an interrupted run, the download resumes from its end with an HTTP
    Range request. The size is checked against the server's (a connection cut where the size is
    unknown is caught too), and the SHA-256 against `sha256` or, failing that, the hub's
    `X-Linked-Etag` (the LFS object's SHA-256). A mismatch deletes the file."""
    import requests
    from tqdm import tqdm

    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    # identity: sizes and Range offsets are then those of the file itself (requests would otherwise ask
    # for gzip, and Content-Length would count the compressed bytes while we write decompressed ones)
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    cut = False
    with requests.get(url, stream=True, headers=headers, timeout=timeout) as r:
        if r.status_code == 416:  # our .part is already whole (or bogus): start again
            part.unlink()
            return download(url, dest, sha256, chunk_size, timeout)
        r.raise_for_status()
        encoded = r.headers.get("Content-Encoding", "identity").lower() != "identity"
        if r.status_code != 206 or encoded:  # the server ignored the Range header (or compressed anyway,
            have = 0                          # so offsets mean nothing): start from zero
        if encoded:  # (what arrives is decompressed: the server's sizes don't apply)
            total = None
        elif r.status_code == 206 and "Content-Range" in r.headers:
            total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
        else:
            total = have + int(r.headers.get("Content-Length", 0)) or None
        etag = (r.headers.get("X-Linked-Etag") or "").strip('"')
        expected = sha256 or (etag if len(etag) == 64 else None)
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                          desc=dest.name, disable=None) as bar:
            try:
                for chunk in r.iter_content(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
            except requests.exceptions.RequestException:
                cut = True  # a cut connection: what arrived is kept in .part (resumable unless compressed)
    size = part.stat().st_size
    if cut or (total is not None and size != total):
        if encoded:
            part.unlink()
        of = f" of {total}" if total is not None else ""
        again = "run again to resume" if not encoded else "run again to start over"
        raise IOError(f"download of {url} stopped at {size}{of} bytes; {again}")
    if expected:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != expected:
            part.unlink()
            raise IOError(f"checksum mismatch for {url}: got sha256 {h.hexdigest()}, expected {expected}; "
                          f"the bad file was deleted")
    os.replace(part, dest)
    return dest


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == []
        return action.help if nothing else super()._get_help_string(action)


def same_file(a, b):
    """Whether paths `a` and `b` name one file or directory: the same path once resolved (".."; links;
    relative to here), or, both existing, one file under two names (a hard link). What the scripts
    check before writing, so that an output never replaces the input it was made from."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def die(message):
    """Print a one-line error and exit: what the scripts do with bad input instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_or_die(name, **kwargs):
    """GPT.from_pretrained(name, **kwargs) for the scripts: a bad checkpoint or a failed download is a
    one-line error, not a traceback."""
    try:
        return GPT.from_pretrained(name, **kwargs)
    except CheckpointError as e:
        die(str(e))
    except OSError as e:  # a failed download, an unreadable file
        die(f"cannot load model {name!r}: {e}")


def brief(value, width=200):
    """`value` as JSON in about `width` characters. Longer, it is cut at a clean boundary and ends in
    "…": an object or list after its last whole item, a string after a character."""
    text = json.dumps(value)
    if len(text) <= width:
        return text
    if isinstance(value, (dict, list)):
        items = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()] if isinstance(value, dict) \
            else [json.dumps(v) for v in value]
        text = "{" if isinstance(value, dict) else "["
        for item in items:
            if len(text) + len(item) + 2 > width:
                break
            text += item + ", "
        return text + "…"
    if isinstance(value, str):  # the longest start whose JSON (escapes and all) fits
        n = width
        while len(json.dumps(value[:n])) > width:
            n -= 1
        return json.dumps(value[:n])[:-1] + "…"  # (without its closing quote: the string goes on)
    return text[:width] + "…"  # (a number of 200 digits)


def main(argv=None):
    """`python gpt.py MODEL`: load a model as every script does and describe it (a quick check that a
    checkpoint, a hub file or a downloaded name is whole and what it holds)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Loads MODEL and describes it.",
                                formatter_class=HelpFormatter)
    p.add_argument("model", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | checkpoint dir | .safetensors file")
    args = p.parse_args(argv)
    model = load_or_die(args.model)
    c = model.config
    print(f"{args.model}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, context {c.block_size}, "
          f"vocabulary {c.vocab_size}; {model.num_params(non_embedding=False):,} parameters")
    for key, value in model.checkpoint_info.items():
        if key != "config":
            print(f"  {key}: {brief(value)}")


if __name__ == "__main__":
    main()
