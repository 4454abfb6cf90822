"""AdamW with weight decay on matrices only, gradient clipping, and a linear-warmup cosine schedule.

Decay applies to 2-D weights (projections, embeddings); norms' gains and biases are left alone, as
in GPT-2/nanoGPT: shrinking a gain towards 0 is not regularisation, it changes the function.

`make_optimizer` returns a `torch.optim.Optimizer`; the scripts, the schedule and resume
checkpoints use only that interface (`step`, `zero_grad`, `param_groups`, `state_dict`,
`load_state_dict`), so any torch.optim optimizer can take its place.
"""
import math
import time

import torch

from . import dist, fast


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of `model` (shared parameters counted once), decay on
    matrices only.

    `fast.AdamW` is `torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)` (the same
    numbers and state dict) without the ~70 MB compiler import of torch.optim's base class; either,
    or any other torch.optim optimizer over `groups`, can be returned here.
    """
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return fast.AdamW(groups, lr=lr, betas=betas, eps=eps)


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """Scale the trainable parameters' gradients to a global L2 norm of at most `max_norm`
    (0 = no clipping); returns the norm before clipping as a plain tensor (under FSDP torch
    returns it as a replicated DTensor, already reduced over the shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                          max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class CosineSchedule:
    """Learning rate = base lr × factor: linear 0→1 over the warm-up steps, then a cosine from 1
    down to `min_ratio` at the end of the run's budget. `step()` after each optimiser step.

    The budget is `total_steps` optimiser steps, or also `max_minutes` of wall-clock time when
    that is set, whichever runs out first. The cosine follows whichever is further along
    (progress = max(steps done / steps allowed, minutes used / minutes allowed)), so a run the
    clock stops on a slow machine still decays its learning rate to the end instead of being cut
    off at full rate in the middle of its schedule. `done()` says when the budget is spent and
    `stopped_by` which part spent it. Under torchrun the clock is the slowest rank's, so every
    rank applies the same learning rate. Minutes used are saved with the schedule for resume.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
                 max_minutes: float = 0.0):
        self.optimizer, self.warmup_steps, self.total_steps = optimizer, warmup_steps, total_steps
        self.min_ratio, self.max_minutes = min_ratio, max_minutes
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0          # optimiser steps taken (torch.optim's name, kept for resume)
        self.minutes_before = 0.0    # minutes used by earlier segments of a resumed run
        self.clock_start = time.time()
        self.time_progress = 0.0     # minutes used / max_minutes, synchronised over ranks
        self._apply()

    def minutes(self) -> float:
        """Wall-clock minutes this run has used (all segments of a resumed run)."""
        return self.minutes_before + (time.time() - self.clock_start) / 60

    def progress(self, step: int) -> float:
        """Fraction of the budget used after `step` optimiser steps (0 → 1)."""
        steps = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return min(1.0, max(steps, self.time_progress))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps and self.time_progress < 1.0:
            return (step + 1) / self.warmup_steps
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def _apply(self):
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)

    def step(self):
        self.last_epoch += 1
        if self.max_minutes:
            # all ranks must agree on the learning rate: take the slowest rank's clock
            self.time_progress = dist.all_reduce_max(self.minutes() / self.max_minutes)
        self._apply()

    def done(self) -> bool:
        """True once the step budget or the time budget is spent (the same on every rank)."""
        return self.last_epoch >= self.total_steps or self.time_progress >= 1.0

    @property
    def stopped_by(self) -> str:
        """Which budget ended the run: "max_steps", "max_minutes", or "" while neither has."""
        if self.last_epoch >= self.total_steps:
            return "max_steps"
        return "max_minutes" if self.time_progress >= 1.0 else ""

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch,
                "minutes": self.minutes(), "time_progress": self.time_progress}

    def load_state_dict(self, state: dict):
        self.base_lrs, self.last_epoch = list(state["base_lrs"]), int(state["last_epoch"])
        self.minutes_before = float(state.get("minutes", 0.0))
        self.time_progress = float(state.get("time_progress", 0.0))
        self.clock_start = time.time()
        self._apply()
