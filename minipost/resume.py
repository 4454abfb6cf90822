"""Surviving a long run: resumable checkpoints, graceful stop, and a guard against NaN/inf.

A resume checkpoint is `OUT_DIR/checkpoints/step-00000100/` holding `model.safetensors` (every
parameter and buffer in its own dtype, fp32 for training) and `state.safetensors` + `state.json`
(optimizer, scheduler, step, RNG states of Python/NumPy/torch/CUDA, the data position and
whatever else the script needs, such as PPO's adaptive KL coefficient). Each is written to a
temporary directory and renamed into place, and only the last `keep` are kept, so a run killed at
any moment (even with SIGKILL) leaves a complete checkpoint to resume from.

Restoring all of it makes a resumed CPU run bit-identical to one that never stopped (PITFALLS.md
item 20): same weights, same optimizer moments, same data order, same random draws.
"""
import math
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import atomic_dir, load_state, rng_state, save_state, set_rng_state
from .cli import UserError


class NonFiniteError(UserError):
    """A loss or gradient that is NaN or inf: the run stops with the step and the quantity."""


def check_finite(step: int, **quantities) -> None:
    """Raise NonFiniteError naming the first non-finite quantity (scalar tensors or floats)."""
    for name, value in quantities.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            raise NonFiniteError(f"step {step}: {name} is {v}; stopping, the last good "
                                 "checkpoint is kept (rerun with --skip-nonfinite to skip such steps)")


class GracefulStop:
    """SIGINT/SIGTERM set `requested` instead of killing the process, so the loop can save first."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass

    def _handle(self, signum, frame):
        if self.requested:            # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _model_tensors(model) -> dict:
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen and t.numel():      # tied weights: saved once
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler=None, data_state=None,
                    extra=None, keep: int = 2) -> Path:
    """Write a resume checkpoint for `step` under OUT_DIR/checkpoints and keep the last `keep`."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{step:08d}"
    with atomic_dir(path) as tmp:
        save_file(_model_tensors(model), str(tmp / "model.safetensors"))
        save_state(tmp, {"step": step, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "rng": rng_state(), "data": data_state or {}, "extra": extra or {}})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint of a run directory (or the checkpoint directory itself)."""
    p = Path(out_dir)
    if (p / "state.json").exists():
        return p
    done = sorted(c for c in (p / "checkpoints").glob("step-*") if (c / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path, model, optimizer, scheduler=None) -> dict:
    """Restore model, optimizer, scheduler and RNG states in place; returns the saved state dict
    (`step`, `data`, `extra`)."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"--resume {path}: no checkpoint found (looked for {path}/checkpoints/step-*)")
    tensors = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"--resume {ckpt}: the checkpoint does not match this model "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}); "
                        "resume with the same flags as the original run")
    state = load_state(ckpt)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    state["path"] = str(ckpt)
    return state


def grads_finite(model) -> bool:
    """True when every gradient is finite (one reduction, one host sync)."""
    norms = [p.grad.detach().abs().max() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
