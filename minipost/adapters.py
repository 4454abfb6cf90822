"""Adapter tuning: small bottleneck modules inside each block, with the base model frozen.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (arXiv 1902.00751). Each
block gets two adapters, one on the attention sublayer's output and one on the MLP's output, both
before the residual addition:
    h = x + Adapter(Sublayer(norm(x))),   Adapter(u) = u + W_up·σ(W_down·u + b_down) + b_up,
with W_down: D → m and W_up: m → D, m ≪ D (the bottleneck). The adapter has its own skip
connection, so with W_up = 0 it is the identity.

Choices and departures:
- σ: the paper only says "a nonlinearity"; we use GELU by default (ReLU selectable).
- Init: the paper initialises near the identity with small random weights; we draw W_down from a
  zero-mean Gaussian with std 1e-2 truncated at 2σ, and set W_up (and both biases) to zero, so the
  model is *exactly* the base at init, as LoRA's B = 0 does.
- The paper also trains each layer norm's parameters per task; we freeze every base parameter.

Implementation: `block.self_attn` and `block.mlp` are wrapped in `WithAdapter(base_layer, adapter)`,
so adapter keys read `model.layers.0.self_attn.adapter.down.weight` and base keys gain
`.base_layer` (as PEFT's LoRA does). peft_format.py saves and loads them (peft_type "BOTTLENECK",
not a PEFT format: PEFT has no bottleneck adapter type).
`lora.disable_adapters(model)` turns these adapters off too.
"""
import torch
import torch.nn as nn

from .lora import PeftLayer

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class BottleneckAdapter(PeftLayer):
    """u + W_up·σ(W_down·u): (…, D) -> (…, D); the identity at init and when `disabled`."""

    def __init__(self, dim: int, adapter_dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.down = nn.Linear(dim, adapter_dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(adapter_dim, dim)
        nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # W_up = 0: exact identity at init
        nn.init.zeros_(self.up.bias)

    def forward(self, u):
        if self.disabled:
            return u
        return u + self.up(self.act(self.down(u)))  # adapter's own skip connection


class WithAdapter(nn.Module):
    """A sublayer followed by an adapter: forward(*args) = adapter(base_layer(*args))."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, *args, **kwargs):
        return self.adapter(self.base_layer(*args, **kwargs))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Decoder blocks: modules with both a `self_attn` and an `mlp` sublayer."""
    return [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]


def apply_adapters(model: nn.Module, dim: int = 16, activation: str = "gelu") -> nn.Module:
    """Insert a bottleneck adapter (width `dim`) after every block's attention and MLP; freeze the
    base; returns `model`."""
    if any(isinstance(m, WithAdapter) for m in model.modules()):
        raise ValueError("model already has adapters")
    blocks = _blocks(model)
    if not blocks:
        raise ValueError("apply_adapters: no blocks with `self_attn` and `mlp` found")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks:
        for name in ("self_attn", "mlp"):
            sublayer = getattr(block, name)
            w = next(sublayer.parameters())
            width = block.input_layernorm.weight.shape[0]  # D, the residual stream width
            adapter = BottleneckAdapter(width, dim, activation).to(device=w.device, dtype=w.dtype)
            setattr(block, name, WithAdapter(sublayer, adapter))
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Unwrap every WithAdapter, leaving the base model (its parameters stay frozen)."""
    for block in _blocks(model):
        for name in ("self_attn", "mlp"):
            sublayer = getattr(block, name)
            if isinstance(sublayer, WithAdapter):
                setattr(block, name, sublayer.base_layer)
    return model


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter, keyed by module path (`model.layers.0.mlp.adapter.up.bias`)."""
    return {f"{path}.{name}": p
            for path, m in model.named_modules() if isinstance(m, BottleneckAdapter)
            for name, p in m.named_parameters()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, detached, keyed as `adapter_params` keys them."""
    return {k: p.detach() for k, p in adapter_params(model).items()}
