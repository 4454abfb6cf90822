"""LoRA: low-rank adaptation of frozen linear layers; peft_format.py saves them in PEFT's format.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv 2106.09685):
    h = W₀x + ΔWx = W₀x + (α/r)·B·A·x,   A ∈ ℝ^{r×d_in} random,  B ∈ ℝ^{d_out×r} zero,
so the model is unchanged at init (ΔW = 0) and only A and B train. The α/r scaling keeps the update
size comparable across ranks (some codes scale by α alone or not at all; docs/pitfalls.md, "LoRA
scaling, init and merge"). Like PEFT, dropout is applied to the LoRA path's input only, and A is
Kaiming-uniform(a=√5), i.e. nn.Linear's default.

The layer paths and parameter names are Hugging Face's (`q_proj.base_layer.weight`,
`q_proj.lora_A.weight`), so peft_format.py saves an adapter that `peft.PeftModel.from_pretrained`
loads on the matching `transformers` model. A scalar head (reward or value model) can train
alongside LoRA via `modules_to_save`.

Departure from PEFT: a `modules_to_save` module is trained in place, not as a copy, so
`disable_adapters` does not restore its original weights (PEFT keeps the original beside the copy).

`disable_adapters(model)` is the one switch for every PEFT layer of minipost (LoRA here, bottleneck
adapters in adapters.py): inside it the model computes the base model exactly, which is how
reference.py gives DPO, PPO and GRPO their reference model without a second copy.
"""
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PeftLayer(nn.Module):
    """Base of every minipost PEFT layer: when `disabled` is True it computes the base model exactly."""

    disabled: bool = False


class LoRALinear(PeftLayer):
    """y = base(x) + (α/r)·B(A(dropout(x))) around a frozen nn.Linear (Hu et al. 2021, eq. 3).

    Merging: `merge()` writes W₀ + (α/r)·B·A into the base weight (computed in fp32, cast back) and
    keeps a copy of the original W₀ in its own dtype. We store the weight, not the delta, because
    subtracting the delta back is not bit-exact ((w + d) − d ≠ w in floating point, and much worse in
    bf16; peft #2502); the price is one extra copy of each wrapped weight while merged. The copy also
    lets a merged layer compute the base exactly when disabled.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base  # PEFT's name, so state-dict keys read `q_proj.base_layer.weight`
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0 at init: the model starts as the base
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("original_weight", None, persistent=False)  # W₀ while merged
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        if self.merged and self.disabled:
            return F.linear(x, self.original_weight, self.base_layer.bias)
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        return y + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

    @torch.no_grad()
    def merge(self):
        """W ← W₀ + (α/r)·B·A, so the forward pass costs what the base costs."""
        if self.merged:
            return
        w = self.base_layer.weight
        self.original_weight = w.detach().clone()
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # (out, in)
        w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore W₀ bit-exactly from the stored copy."""
        if not self.merged:
            return
        self.base_layer.weight.copy_(self.original_weight)
        self.original_weight = None
        self.merged = False


def _tied_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings)."""
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


def _find_modules(model: nn.Module, names) -> list[tuple[str, nn.Module]]:
    """Modules whose path is a name in `names` or ends with `.name` (PEFT's modules_to_save match)."""
    found = []
    for name in names:
        hits = [(p, m) for p, m in model.named_modules() if p == name or p.endswith("." + name)]
        if not hits:
            raise ValueError(f"modules_to_save: no module named {name!r} in the model")
        found += hits
    return found


def _matches(path: str, target: str) -> bool:
    """PEFT's match of a `target_modules` list entry: the module path itself or a dotted suffix of
    it ("q_proj" and "self_attn.q_proj" both match `model.layers.0.self_attn.q_proj`)."""
    return path == target or path.endswith("." + target)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, modules_to_save=()) -> nn.Module:
    """Wrap the target nn.Linear layers in LoRALinear and freeze everything else; returns `model`.

    Args:
        r, alpha, dropout: rank, scale (the update is multiplied by α/r), dropout on the LoRA input.
        targets: names matched against the end of each module path, whole dotted components
            (`q_proj` and `self_attn.q_proj` match `model.layers.0.self_attn.q_proj`), or a string,
            a regex on the full path; both as PEFT matches its `target_modules`. They are kept on
            the model (`lora_targets`) for `applied_targets`, so a load wraps the same layers.
            The LM head and embeddings are never targets by default: a tied head shares the
            embedding matrix, and merging LoRA into it would change the embeddings, so tied layers
            are refused.
        modules_to_save: names of modules (e.g. a reward model's `score` head) that stay fully
            trainable and are saved with the adapter.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers")
    if isinstance(targets, str):
        match = lambda path: re.fullmatch(targets, path) is not None
    else:
        targets = tuple(targets)
        match = lambda path: any(_matches(path, t) for t in targets)
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(p, m) for p, m in linears if match(p)]
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p, _ in linears})
        raise ValueError(f"no nn.Linear matched targets {targets!r}; available Linear names: {names}")
    tied = _tied_param_ids(model)
    for path, m in chosen:
        if id(m.weight) in tied:
            raise ValueError(f"{path} shares its weight with another module (tied embeddings); "
                             "LoRA on it would change the tied matrix on merge")
    to_save = _find_modules(model, modules_to_save)
    for path, m in to_save:
        if any(id(p) in tied for p in m.parameters()):
            raise ValueError(f"modules_to_save: {path} has tied parameters")

    for p in model.parameters():
        p.requires_grad_(False)
    for path, m in chosen:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(m, r, alpha, dropout))
    for _, m in to_save:
        for p in m.parameters():
            p.requires_grad_(True)
    model.lora_modules_to_save = list(modules_to_save)  # read by saved_modules, save_lora
    model.lora_targets = targets                         # read by applied_targets
    return model


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Merge every LoRALinear; with `unload`, replace each by its plain (merged) nn.Linear.

    unload=True gives a plain model that saves as an ordinary checkpoint (and cannot be unmerged);
    unload=False keeps the wrappers, merged, so `unmerge_lora` can restore the base weights exactly.
    Parameters stay in place, so tied embeddings stay tied. Frozen flags are left as they are.
    """
    for path, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            if unload:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, m.base_layer)
    if unload:
        for attr in ("lora_modules_to_save", "lora_targets"):
            if hasattr(model, attr):
                delattr(model, attr)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, unload=False)`: every base weight is restored bit-exactly."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    return model


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside this block every PEFT layer (LoRA, bottleneck adapter) computes the base model exactly.

    Raises if the model has none: a "reference model" equal to the policy would silently make the
    DPO loss ln 2 forever.
    """
    layers = [m for m in model.modules() if isinstance(m, PeftLayer)]
    if not layers:
        raise ValueError("disable_adapters: the model has no LoRA layers or adapters")
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, previous):
            m.disabled = d


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by module path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each module apply_lora's `modules_to_save` named: they train beside LoRA."""
    return _find_modules(model, getattr(model, "lora_modules_to_save", ()))


def applied_targets(model: nn.Module) -> str | list[str]:
    """The targets that make apply_lora wrap exactly the model's LoRA layers again: the regex it was
    given, or those of its names that wrapped a layer (the last name components when the model does
    not say)."""
    layers = lora_layers(model)
    targets = getattr(model, "lora_targets", None)
    if isinstance(targets, str):   # the last components would wrap every layer of those names
        return targets
    if targets is None:
        return sorted({p.rsplit(".", 1)[-1] for p in layers})
    return sorted(t for t in targets if any(_matches(p, t) for p in layers))
