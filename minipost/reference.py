"""The reference policy π_ref of DPO, PPO and GRPO: the initial policy, frozen, in one object.

DPO's loss and the KL terms of PPO and GRPO compare the policy with where it started. Two ways to
keep the starting point, one interface:

- a frozen copy (`copy=True`): the policy deep-copied before training, in eval mode, with no
  gradients; one more model in memory;
- the policy itself with its PEFT layers switched off (`copy=False`, for `--peft lora|adapter`):
  LoRA and adapters never touch the base weights, so the base is the initial policy exactly
  (`lora.disable_adapters`), and no copy is made.

`Reference.logps(fn, *args)` returns `fn(model, *args)` computed by π_ref, under no_grad and in eval
mode: the reference is one fixed distribution, so no dropout (docs/pitfalls.md, "Reference model
in eval mode"). `fn` is the caller's log-prob function: `rollout.completion_logps` for PPO and
GRPO, `dpo.pair_logps` for DPO.
"""
import copy as copy_module
from contextlib import contextmanager

import torch
import torch.nn as nn

from .lora import disable_adapters


@contextmanager
def eval_mode(model: nn.Module):
    """Inside this block `model` is in eval mode; afterwards in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class Reference:
    """π_ref: a frozen copy of `policy`, or (`copy=False`) `policy` with its PEFT layers off.

    Make it before training and before the policy is sharded (FSDP shards in place): the copy is
    taken here, and the adapters-off reference needs PEFT layers already on the policy.
    """

    def __init__(self, policy: nn.Module, copy: bool = True):
        self.policy = policy
        self.model = copy_module.deepcopy(policy).eval().requires_grad_(False) if copy else None
        if not copy:
            with disable_adapters(policy):   # raises now, not at the first step, without PEFT layers
                pass

    @property
    def kind(self) -> str:
        """"copy" or "adapters_off", as the scripts report it."""
        return "copy" if self.model is not None else "adapters_off"

    @torch.no_grad()
    def logps(self, fn, *args, **kwargs):
        """`fn(model, *args, **kwargs)` with model = π_ref: no gradients, eval mode."""
        if self.model is not None:
            return fn(self.model, *args, **kwargs)
        with disable_adapters(self.policy), eval_mode(self.policy):
            return fn(self.policy, *args, **kwargs)
