"""A script's flags: its `Args` dataclass, the flags every script shares, parsing and checking.

- `RunArgs`, `StageArgs`: the flags every script declares alike (device, seed, resuming; the
  loaded model's dtype, PEFT, chat template), declared once; a script's `Args` inherits them and
  may declare one again to change its default.
- `parse_args(Args)`: a dataclass becomes argparse flags (`lora_r` -> `--lora-r`); each field's
  trailing comment is its `--help` text, so the dataclass stays the single place a flag is defined.
  A `Literal[...]` field takes one of its values, an `X | None` field also `none`, a `list[X]`
  field one or more values and may be repeated (`--reward-fn a --reward-fn b`).
- `check_args(args)`: the allowed values (from the types) and the shared ranges, checked in one
  place; `cli.setup` calls it, so `main(Args(...))` meets the error the command line gives.
- `torch_dtype(args.dtype)`: the one place `--dtype` becomes a torch dtype.
"""
import argparse
import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .errors import UserError
from .resume import latest_checkpoint


def _field_help(cls) -> dict:
    """Trailing `# comments` of a dataclass's fields, read from its source and its base classes'
    (a field a subclass declares again takes the subclass's comment)."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            helps[m.group(1)] = m.group(2).strip()
    return helps


def literal_values(kind) -> tuple:
    """The values a `Literal[...]` type allows; () for any other type."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _owner(cls, name: str):
    """The class of `cls`'s MRO that declares field `name` last (a script's Args, or a base)."""
    return next(k for k in cls.__mro__ if name in inspect.get_annotations(k))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's help with its default; the script's docstring as written (its example
    commands keep their lines)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, exit code 2 (argparse adds the usage)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(cls, argv=None, description: str | None = None, epilog: str | None = None):
    """Build an instance of dataclass `cls` from command-line flags.

    `--help` lists the script's own flags first, then each base class's (RunArgs, StageArgs) under
    its docstring's first line, then `epilog` (the training scripts: `cli.CURVES_HELP`). The
    values are not checked here but by `check_args`, which `cli.setup` calls: a bad value ends the
    same way from the command line and from `main(Args(...))`."""
    helps = _field_help(cls)
    parser = _Parser(description=description or (cls.__doc__ or "").strip(), epilog=epilog,
                     formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    groups = {cls: parser}
    for klass in cls.__mro__[1:]:
        if dataclasses.is_dataclass(klass):
            title = (klass.__doc__ or klass.__name__).strip().splitlines()[0].rstrip(".")
            groups[klass] = parser.add_argument_group(title)

    def place(f):            # the script's own flags first, then each base's, as declared
        owner = _owner(cls, f.name)
        return list(groups).index(owner), list(inspect.get_annotations(owner)).index(f.name)

    for f in sorted(dataclasses.fields(cls), key=place):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = hints[f.name]
        group = groups[_owner(cls, f.name)]
        kw = dict(default=default, help=helps.get(f.name, " ").replace("%", "%%"))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif values := literal_values(kind):    # its values in --help; checked by check_args
            metavar = "{" + ",".join(str(v) if v != "" else "''" for v in values) + "}"
            group.add_argument(flag, type=type(values[0]), metavar=metavar, **kw)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, **kw)
        elif typing.get_origin(kind) is list:  # repeatable: each use adds its values
            inner = typing.get_args(kind)[0]
            group.add_argument(flag, type=inner, nargs="+", action="extend",
                               metavar=inner.__name__.upper(), **kw)
        else:  # X | None: "none" means None
            inner = next((t for t in typing.get_args(kind) if t is not type(None)), str)
            group.add_argument(flag, type=lambda s, t=inner: None if s.lower() == "none" else t(s),
                               metavar=inner.__name__.upper(), **kw)
    return cls(**vars(parser.parse_args(argv)))


@dataclass
class RunArgs:
    """Flags every training script shares (seed, device, processes, resume checkpoints)."""
    seed: int = 0                   # seed for data, its order, init and sampling
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    fsdp: bool = False              # torchrun: shard weights, grads, Adam state over ranks (FSDP2), not DDP
    threads: int = 0                # CPU threads per process (0 = torch's default)
    grad_checkpointing: bool = False  # recompute blocks in the backward: less memory, ~1/3 more compute
    save_every: int = 100           # write a resume checkpoint every N steps (0 = only on stop)
    keep: int = 2                   # resume checkpoints kept in OUT_DIR/checkpoints
    resume: str = ""                # resume from this run directory (or one of its checkpoints)
    skip_nonfinite: bool = False    # skip a step whose loss or gradient is NaN/inf (else stop)
    report_to: Literal["none", "tensorboard"] = "none"  # tensorboard: also to OUT_DIR/tensorboard
    task: Literal["arithmetic", "countdown"] = "arithmetic"  # built-in task world (worlds.py): arithmetic | countdown


@dataclass
class StageArgs(RunArgs):
    """Flags every post-training stage shares (the models' dtype, PEFT, the chat template)."""
    dtype: Literal["float32", "bfloat16"] = "float32"  # the models' weights as loaded (bf16: big ones)
    peft: Literal["none", "lora", "adapter"] = "none"  # train only a PEFT module (none: every weight)
    lora_r: int = 8                 # LoRA rank r
    lora_alpha: float = 16.0        # LoRA α (the update is scaled by α/r)
    lora_dropout: float = 0.0       # dropout on the LoRA input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LoRA layers, or a regex
    adapter_dim: int = 16           # bottleneck width of --peft adapter
    merge: bool = False             # --peft lora: also write the merged model to OUT_DIR/merged
    chat_template: Literal["", "chatml"] = ""  # '' = the tokenizer's own | chatml: force ChatML


@dataclass
class RewardArgs:
    """Your own task: RL prompts and reward functions (rewards.py; README, "Your own task")."""
    data: str = ""                  # RL prompts JSONL {"prompt", ...}: other columns go to the reward functions ("" = built-in task)
    eval_data: str = ""             # held-out prompts JSONL: each reward function's greedy mean, pass@k ("" = built-in task)
    reward_fn: list[str] = field(default_factory=list)  # a built-in (rewards.py), module:function or my_rewards.py:function; repeatable (none = the task's verifier)
    reward_weights: list[float] = field(default_factory=list)  # weight of each --reward-fn, in order (none = 1 each)
    string_prompts: Literal["chat", "text"] = "chat"  # a string "prompt": a user turn of a chat | raw text to continue (TRL's reading)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """`--dtype` as a torch dtype: the one place the flag's string becomes one."""
    return DTYPES[name]


def check_args(args):
    """Every flag whose type or range limits it, checked before anything is loaded or written:
    a `Literal[...]` field holds one of its values, counts are >= 0, --keep >= 1, --lr > 0,
    --merge needs --peft lora, --resume names a run with a checkpoint. Raises UserError."""
    hints = typing.get_type_hints(type(args)) if dataclasses.is_dataclass(args) else {}
    for f in dataclasses.fields(args) if hints else ():
        allowed, value = literal_values(hints[f.name]), getattr(args, f.name)
        if allowed and value not in allowed:
            raise UserError(f"--{f.name.replace('_', '-')} {value!r}: expected one of "
                            f"{', '.join(repr(a) if a == '' else str(a) for a in allowed)}")
    if getattr(args, "merge", False) and args.peft != "lora":
        raise UserError("--merge needs --peft lora (adapters cannot be merged into the weights)")
    for name in ("max_steps", "save_every", "eval_every", "eval_problems"):
        if getattr(args, name, 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "keep", 1) < 1:
        raise UserError(f"--keep must be >= 1 (resume checkpoints kept), got {args.keep}")
    if getattr(args, "lr", 1.0) <= 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if getattr(args, "resume", ""):
        if not Path(args.resume).exists():
            raise UserError(f"--resume {args.resume}: no such run directory")
        if latest_checkpoint(args.resume) is None:
            raise UserError(f"--resume {args.resume}: no checkpoint found (looked for "
                            f"{args.resume}/checkpoints/step-*)")
