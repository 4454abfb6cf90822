"""AdamW with weight decay on matrices only, and a linear-warmup cosine schedule.

Decay applies to 2-D weights (projections, embeddings); norms' gains and biases are left alone, as
in GPT-2/nanoGPT: shrinking a gain towards 0 is not regularisation, it changes the function.

Both are written here rather than taken from `torch.optim`: building or stepping any
`torch.optim.Optimizer` imports `torch._dynamo` and sympy (its methods are wrapped to keep the
compiler out of them), ~70 MB of every training process's memory and a second of start-up, for a
compiler none of the scripts runs by default. The state dict keeps torch.optim.AdamW's layout, so
resume checkpoints and `minipost.dist`'s sharded state handling read it unchanged.
"""
import math
import time

import torch

from . import dist


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2).
    For each parameter θ with gradient g, at step t = 1, 2, ...:

        m ← β₁·m + (1 − β₁)·g               v ← β₂·v + (1 − β₂)·g²
        θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)

    On CPU and CUDA the update runs as aten's fused kernel (`torch._fused_adamw_`, the one
    `torch.optim.AdamW(fused=True)` calls): one pass over each parameter's memory for all five
    lines. On other devices, or with `fused=False`, the same lines run as the tensor ops of
    `_adamw_ops`. `param_groups`: dicts with "params" and any of lr, betas, eps, weight_decay.
    """

    def __init__(self, param_groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.fused = fused               # None: wherever aten has the kernel (CPU, CUDA)
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in param_groups]
        self.state = {}   # parameter -> {"step": float32 scalar tensor, "exp_avg", "exp_avg_sq"}

    def zero_grad(self, set_to_none: bool = True):
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2,
                         weight_decay=group["weight_decay"], eps=group["eps"])
            by_kind = {}     # one kernel call per device and dtype, as the fused kernel requires
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in by_kind.items():
                fused = device.type in ("cpu", "cuda") if self.fused is None else self.fused
                states = [self._state(p) for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                # a sharded (FSDP) parameter updates its own shard: the local tensors
                tensors = [[_local(t) for t in ts] for ts in (
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states])]
                if fused:
                    torch._fused_adamw_(*tensors, [], steps, amsgrad=False, maximize=False, **hyper)
                else:
                    _adamw_ops(*tensors, steps, **hyper)

    def _state(self, p):
        if p not in self.state:
            self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        return self.state[p]

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: state keyed by the parameter's position over all groups."""
        index = {p: i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(group["params"])))})
            start += len(group["params"])
        return {"state": {index[p]: dict(s) for p, s in self.state.items()},
                "param_groups": groups}

    def load_state_dict(self, state_dict: dict):
        """Restore hyperparameters and moments (keys may be strings after JSON); moments move to
        each parameter's device and dtype, steps stay float32."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match this model's parameter groups")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: tuple(v) if k == "betas" else v
                          for k, v in saved.items() if k != "params"})
        params = self._params()
        self.state = {}
        for i, saved in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(device=p.device,
                                     dtype=torch.float32 if k == "step" else p.dtype)
                             for k, v in saved.items()}


def _adamw_ops(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps):
    """AdamW's update as plain tensor ops (the docstring's lines, in order), one parameter at a time."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = step.item()
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)                                  # β₁·m + (1 − β₁)·g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def _local(t):
    """A DTensor's local shard (in place updates land in the DTensor), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                   eps: float = 1e-8) -> AdamW:
    """AdamW over the trainable parameters of `model` (shared parameters counted once)."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


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
