"""LoRA: freeze a model and learn a low-rank update W + (alpha/r) B A for chosen linear layers, a few
hundred thousand trainable numbers instead of 124M. Adapters fold back into the weights, so what is
saved is always a plain GPT checkpoint.
"""

import contextlib
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + (alpha/r) * x A^T B^T.
    B starts at zero, so training starts from exactly the base model; A starts random so the
    gradient of B is not zero."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def delta(self):
        """The update to the base weight, (out, in), the same layout as nn.Linear.weight."""
        return (self.lora_B @ self.lora_A) * self.scale


def _replace(model, name, module):
    """Put `module` where the submodule called `name` ("h.0.attn.c_attn") is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def add_lora(model, rank, alpha, targets):
    """Freeze every parameter, then wrap the linear layers whose name ends with one of `targets`
    ("c_attn", "c_proj" = both attn.c_proj and mlp.c_proj, "mlp.c_proj", "c_fc", ...) in LoRALinear.
    Returns the wrapped layers' names."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            _replace(model, name, LoRALinear(module, rank, alpha))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--lora-targets {','.join(targets)} match no linear layer "
                         f"(try c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj)")
    return wrapped


def _lora_layers(model):
    """(name, LoRALinear) for every adapted layer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back: a plain GPT."""
    for name, m in _lora_layers(model):
        m.base.weight += m.delta()
        _replace(model, name, m.base)
    return model


@contextlib.contextmanager
def lora_merged(model):
    """Temporarily a plain GPT (adapters folded in), e.g. to save a checkpoint in the middle of
    training; afterwards the adapters and the exact original base weights are back."""
    layers = _lora_layers(model)
    saved = [m.base.weight.detach().clone() for _, m in layers]
    merge_lora(model)
    try:
        yield model
    finally:
        with torch.no_grad():
            for (name, m), w in zip(layers, saved):
                m.base.weight.copy_(w)
                _replace(model, name, m)


@contextlib.contextmanager
def adapters_off(model):
    """The model without its adapters (the base layers put back, untouched) for as long as the
    context lasts: the model training started from, which DPO needs as its reference."""
    layers = _lora_layers(model)
    for name, m in layers:
        _replace(model, name, m.base)
    try:
        yield model
    finally:
        for name, m in layers:
            _replace(model, name, m)
