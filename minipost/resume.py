"""Surviving a long run: resumable checkpoints, graceful stop, and a guard against NaN/inf.

A resume checkpoint is `OUT_DIR/checkpoints/step-00000100/` holding `model.safetensors` (every
parameter and buffer in its own dtype, fp32 for training) and `state.safetensors` + `state.json`
(optimizer, scheduler, step, RNG states of Python/NumPy/torch/CUDA, the data position and
whatever else the script needs, such as PPO's adaptive KL coefficient). Each is written to a
temporary directory and renamed into place, and only the last `keep` are kept, so a run killed at
any moment (even with SIGKILL) leaves a complete checkpoint to resume from.

Restoring all of it makes a resumed CPU run bit-identical to one that never stopped: same weights,
same optimizer moments, same data order, same random draws (docs/pitfalls.md, "Deterministic
resume").

`due(every, start, end)` is the one rule for when a step falls on `--save-every N` (here) and on
`--eval-every N` (in each script's loop).
"""
import math
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import dist
from .checkpoint import load_state, rng_state, save_state, set_rng_state
from .errors import UserError
from .files import atomic_dir


def due(every: int, start: int, end: int) -> bool:
    """True when training, going from `start` to `end` completed steps, passed a multiple of
    `every`: the steps `--eval-every N` and `--save-every N` fall on (GRPO moves μ steps at a time).
    One meaning in every script: 0 is never (flags.check_args refuses a negative value)."""
    return every > 0 and end // every > start // every


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
    """Every tensor of the model once (tied weights once), whole (collective when sharded)."""
    seen, out = set(), {}
    for name, t in dist.full_state_dict(model).items():
        if t.data_ptr() in seen and t.numel():      # tied weights: saved once
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().cpu().contiguous()
    return out


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler=None, data_state=None,
                    extra=None, keep: int = 2, write: bool = True) -> Path:
    """Write a resume checkpoint for `step` under OUT_DIR/checkpoints and keep the last `keep`.
    `optimizer` may be a dict of optimizers. Under torchrun every rank calls it (a sharded model's
    tensors are gathered, which takes them all) and only the one with `write` writes."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step-{step:08d}"
    tensors, opt_state = _model_tensors(model), _optimizer_state(optimizer)
    if not write:
        return path
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"))
        save_state(tmp, {"step": step, "optimizer": opt_state,
                         "scheduler": scheduler.state_dict() if scheduler is not None else None,
                         "rng": rng_state(), "data": data_state or {}, "extra": extra or {}})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _optimizer_state(optimizer):
    """The optimizer's (or a dict of optimizers') state, sharded moments gathered (collective)."""
    if isinstance(optimizer, dict):
        return {name: dist.full_optimizer_state(opt) for name, opt in optimizer.items()}
    return dist.full_optimizer_state(optimizer)


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
    expected = model.state_dict().keys()
    missing = [n for n in expected if n not in tensors and not n.endswith("lm_head.weight")]
    unexpected = [n for n in tensors if n not in expected]
    if missing or unexpected:
        raise UserError(f"--resume {ckpt}: the checkpoint does not match this model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        "resume with the same flags as the original run")
    state = load_state(ckpt)
    # several models, several optimizers (PPO: model.policy, model.value), else one
    parts = ([(name + ".", getattr(model, name), opt, state["optimizer"][name])
              for name, opt in optimizer.items()] if isinstance(optimizer, dict)
             else [("", model, optimizer, state["optimizer"])])
    if dist.is_sharded(model):       # FSDP: every rank keeps its own shard of the whole tensors
        for prefix, sub, opt, opt_state in parts:
            dist.load_sharded(sub, opt, {k[len(prefix):]: v for k, v in tensors.items()
                                         if k.startswith(prefix)}, opt_state)
    else:
        model.load_state_dict(tensors, strict=False)
        for _, _, opt, opt_state in parts:
            opt.load_state_dict(opt_state)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    state["path"] = str(ckpt)
    return state


def grads_finite(model) -> bool:
    """True when every gradient is finite (one reduction, one host sync)."""
    norms = [p.grad.detach().abs().max() for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def _rank_states(t: torch.Tensor) -> list:
    """Every rank's copy of a same-shaped tensor (an RNG state), on every rank."""
    if not dist.is_initialized():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.world_size())]
    torch.distributed.all_gather(out, t)
    return out


class Run:
    """The resume glue every train_*.py shares, so each script adds four calls:

        run = Run(args, rt, metrics, model, optimizer, scheduler)
        state = run.restore()          # None on a fresh run, else {"step", "data", "extra"}
        ... in the loop, after backward + clipping:
        if run.finite(step, loss, gnorm): optimizer.step()
        ... at the END of the loop body (after its metrics and eval lines):
        if run.end_of_step(step + 1, lambda: data_state, lambda: extra): return  (stopped)

    `args` needs --save-every, --keep, --resume, --skip-nonfinite and --out-dir. A checkpoint is
    written every `save_every` steps and when SIGINT/SIGTERM arrives (then the run stops). It also
    records how many metrics lines were written, so a resumed run cuts the file back to exactly
    them. A run resumed from a checkpoint of its last step never enters its loop: what comes after
    the loop (final evaluation, results, save) must not read variables only the loop sets; what it
    reports of the last step goes into `extra`. Under torchrun every rank joins (per-rank RNG
    states and `per_rank` tensors are gathered) and rank 0 writes; the stop decision is
    all-reduced, so no rank waits alone in a collective.
    """

    def __init__(self, args, rt, metrics, model, optimizer, scheduler=None):
        self.args, self.rt, self.metrics = args, rt, metrics
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.skipped = 0
        self.start_step = self.last_saved = 0
        self.stop = None

    def restore(self) -> dict | None:
        """--resume: model, optimizer, scheduler, RNG states and the metrics file as they were at
        the checkpoint. Call it last before the loop (after anything that draws random numbers)."""
        self.stop = GracefulStop()
        if not self.args.resume:
            return None
        state = load_checkpoint(self.args.resume, self.model, self.optimizer, self.scheduler)
        extra = state["extra"]
        if extra.get("world_size", 1) != self.rt.world_size:
            raise UserError(f"--resume {state['path']}: saved by {extra.get('world_size', 1)} "
                            f"processes, resumed with {self.rt.world_size}; use the same number")
        if "torch_rng" in extra:            # this rank's own stream (sampling differs per rank)
            torch.set_rng_state(extra["torch_rng"][self.rt.rank])
        self.start_step = self.last_saved = state["step"]
        self.skipped = extra.get("skipped", 0)
        self.metrics.keep_lines(extra.get("metrics_lines", 0),
                                source=Path(state["path"]).parent.parent)   # run/checkpoints/step-N
        if self.rt.is_main:
            print(f"resumed from {state['path']} at step {state['step']}")
        return state

    def finite(self, step: int, loss, grad_norm) -> bool:
        """True: take the optimiser step. A NaN/inf loss or gradient norm raises NonFiniteError
        (one line naming the step and the quantity), or with --skip-nonfinite returns False and
        counts the skip (the caller leaves the weights untouched)."""
        if bool(torch.isfinite(torch.as_tensor(loss)).all()) and \
                bool(torch.isfinite(torch.as_tensor(grad_norm))):
            return True
        if not self.args.skip_nonfinite:
            self.close()
            check_finite(step, loss=torch.as_tensor(loss).sum(), grad_norm=grad_norm)
        self.skipped += 1
        return False

    def save(self, step: int, data_state=None, extra=None):
        extra = {**(extra or {}), "skipped": self.skipped, "world_size": self.rt.world_size,
                 "metrics_lines": self.metrics.n_lines,
                 "torch_rng": _rank_states(torch.get_rng_state())}
        if data_state and "per_rank" in data_state:   # e.g. each rank's sampling generator
            data_state = {**data_state, "per_rank": [_rank_states(t) for t in
                                                     data_state["per_rank"]]}
        save_checkpoint(self.args.out_dir, step, self.model, self.optimizer, self.scheduler,
                        data_state, extra, keep=self.args.keep, write=self.rt.is_main)
        self.last_saved = step

    def end_of_step(self, step: int, data_state=dict, extra=dict) -> bool:
        """After `step` completed steps: checkpoint when due or when a stop was asked for.
        `data_state` and `extra` are callables (only called when saving). True = stop now."""
        stop = self.stop is not None and self.stop.requested
        if self.rt.world_size > 1:
            stop = bool(dist.all_reduce_sum(torch.tensor([float(stop)])) > 0)
        if stop or due(self.args.save_every, self.last_saved, step):
            self.save(step, data_state(), extra())
        if stop:
            self.close()
            if self.rt.is_main:
                print(f"stopped at step {step}; resume with --resume {self.args.out_dir}")
        return stop

    def close(self):
        """Give SIGINT/SIGTERM back to their previous handlers."""
        if self.stop is not None:
            self.stop.restore()
            self.stop = None


def per_rank_state(data: dict, rank: int) -> dict:
    """The `per_rank` entries of a restored data state, for this rank (see Run.save)."""
    return [states[rank] for states in data.get("per_rank", [])]
