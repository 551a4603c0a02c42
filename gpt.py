"""GPT-2, written with plain nn.Modules, and OpenAI's weights loaded into it.

    tokens -> wte + wpe -> h[0..L-1] -> ln_f -> lm_head (tied to wte) -> logits
    each block h[i]:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))      (pre-LayerNorm)

The KV-cache seam
-----------------
`GPT.forward(idx, targets=None, pos=None, cache=None)`. Without a cache every call is plain causal
self-attention over `idx` (training, scoring). With a cache, each attention layer hands its fresh
q, k, v to the cache and gets the attention output back:

    y = cache.attend(layer_index, q, k, v)      # q, k, v, y: (B, n_head, T, head_dim)

The cache stores k and v wherever it likes (a contiguous tensor in inference.py's KVCache, a pool of
paged blocks in runner.py's PagedKVView) and attends q over everything it holds for that sequence, new tokens
included, causally. `pos` (B, T) or (T,) gives each token's absolute position for the position
embedding; it defaults to 0..T-1. That is the whole contract: the model never learns where the
cache keeps things, and the caches never touch the model's weights.

OpenAI's weights
----------------
The parameter names are OpenAI's (wte, wpe, h.N.ln_1, h.N.attn.c_attn, ..., ln_f), so a released
checkpoint maps onto this model key for key. The one twist: OpenAI's "Conv1D" layers store their
weight as [in, out] where nn.Linear wants [out, in], so those four weights are transposed on the
way in. How the files are read, checked and downloaded is checkpoint.py's business.
"""

import argparse
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import (CheckpointError, all_finite, check_config, iter_safetensors, read_model_config,
                        read_safetensors_header, resolve_weights, write_checkpoint)
from common import HelpFormatter, brief, die

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

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


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

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:  # `mask` (B, 1, T, T), True where a query may attend: packed examples (packing_mask)
            p = self.dropout_p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
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

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


def packing_mask(segments):
    """(B, 1, T, T) attention mask for rows of packed examples: causal, and within a segment only, so
    each example sees exactly what it would alone (a block-diagonal causal mask)."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return (same & causal)[:, None]


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

    def hidden(self, idx, pos=None, cache=None, segments=None):
        """The final hidden states (after ln_f), (B, T, n_embd). Callers that need logits for a few
        positions only (generation, serving) apply lm_head to those rows and skip the rest. Callers
        that pass `pos` keep every position below block_size (the caches check their own lengths).
        `segments` (B, T): a row packs several examples (conversations.pack_examples), numbered; each token
        attends only within its own, and `pos` (B, T) restarts at 0 with each."""
        B, T = idx.shape
        if segments is not None and (pos is None or cache is not None):
            raise ValueError("packed rows (segments) need their positions restarting per example (pos), and no cache")
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        mask = None if segments is None else packing_mask(segments)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x, cache, mask)
        return self.ln_f(x)

    def forward(self, idx, targets=None, pos=None, cache=None, segments=None):
        """Logits (B, T, vocab). With targets, also the mean cross-entropy over the positions whose
        target is not -100 (the label every masked position carries)."""
        logits = self.lm_head(self.hidden(idx, pos, cache, segments))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, dropout=0.0):
        """gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a checkpoint directory, or a .safetensors file."""
        path = resolve_weights(name_or_path, SIZES)
        header, _ = read_safetensors_header(path)
        sizes, info, where, hub = read_model_config(path, header, name_or_path, SIZES, [f.name for f in fields(GPTConfig)])
        config = GPTConfig(**sizes, dropout=dropout)
        check_config(config, header, where, path)  # before anything is built or allocated
        # Build on the meta device (no memory, no random init), then materialize directly in the
        # target dtype/device and fill each tensor from the memory-mapped file: never two full copies.
        with torch.device("meta"):
            model = cls(config).to(dtype)
        model.to_empty(device=device)
        model.lm_head.weight = model.wte.weight  # to_empty breaks the tie; tie again
        load_state_from_file(model, path, transposed=hub)
        model.checkpoint_info = info  # metadata from our config.json (template, ...); hub weights: their template, if ours
        return model.eval()

    def save_checkpoint(self, directory, **metadata):
        """Write the project's checkpoint (checkpoint.py): model.safetensors + config.json, atomically."""
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        config = {k: v for k, v in asdict(self.config).items() if k != "dropout"}
        write_checkpoint(directory, state, config, metadata)


# OpenAI's Conv1D layers store weight as [in, out] (x @ W); nn.Linear stores [out, in] (x @ W.T).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_state_from_file(model, path, transposed):
    """Copy every tensor of `path` into `model`, one at a time. `transposed`: the file is in OpenAI's
    Conv1D layout (the hub's), so the four Conv1D weights are transposed on the way in."""
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


# ----------------------------------------------------------------------------- for the scripts

def load_or_die(name, **kwargs):
    """GPT.from_pretrained(name, **kwargs) for the scripts: a bad checkpoint or a failed download is a
    one-line error, not a traceback."""
    try:
        return GPT.from_pretrained(name, **kwargs)
    except CheckpointError as e:
        die(str(e))
    except OSError as e:  # a failed download, an unreadable file
        die(f"cannot load model {name!r}: {e}")


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
