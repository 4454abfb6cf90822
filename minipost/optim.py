"""AdamW with weight decay on matrices only, and a linear-warmup cosine schedule.

Decay applies to 2-D weights (projections, embeddings); norms' gains and biases are left alone, as
in GPT-2/nanoGPT: shrinking a gain towards 0 is not regularisation, it changes the function.
"""
import math

import torch


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model` (shared parameters counted once)."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW runs the update for all parameters in one kernel; on CPU it is also faster
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps,
                             fused=fused)


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Scale the trainable parameters' gradients to a global L2 norm of at most `max_norm`
    (0 = no clipping); returns the norm before clipping as a plain tensor (under FSDP torch
    returns it as a replicated DTensor, already reduced over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                          max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """LR multiplier: linear 0→1 over warmup, then cosine 1→min_ratio at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
