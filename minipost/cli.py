"""What every script shares and no algorithm needs: flags, device, errors, metrics.

- `RunArgs`, `StageArgs`: the flags every script declares alike (device, seed, resuming; the
  loaded model's dtype, PEFT, chat template), declared once; a script's `Args` inherits them.
- `parse_args(Args)`: a dataclass becomes argparse flags (`lora_r` -> `--lora-r`); each field's
  trailing comment is its `--help` text, so the dataclass stays the single place a flag is defined.
  A `Literal[...]` field takes one of its values, an `X | None` field also `none`.
- `check_args(args)`: the allowed values (from the types) and the shared ranges, checked in one
  place; `setup` calls it, so `main(Args(...))` meets the error the command line gives.
- `setup(args)`: torchrun ranks (via dist.py), the device, bf16 autocast on CUDA, seeds.
- `user_errors()`: a user's mistake (the classes of errors.py: bad data line, bad checkpoint, bad
  flag value) ends the run with one line and exit code 2, no traceback.
- `Metrics`: one JSON object per line in `metrics.jsonl`, written by rank 0 only.
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import random
import re
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from . import dist
from .errors import CheckpointError, DataError, UserError
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


def parse_args(cls, argv=None, description: str | None = None):
    """Build an instance of dataclass `cls` from command-line flags.

    `--help` lists the script's own flags first, then each base class's (RunArgs, StageArgs) under
    its docstring's first line. The values are not checked here but by `check_args`, which `setup`
    calls: a bad value ends the same way from the command line and from `main(Args(...))`."""
    helps = _field_help(cls)
    parser = _Parser(description=description or (cls.__doc__ or "").strip(),
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
        else:  # X | None: "none" means None
            inner = next((t for t in typing.get_args(kind) if t is not type(None)), str)
            group.add_argument(flag, type=lambda s, t=inner: None if s.lower() == "none" else t(s),
                               metavar=inner.__name__.upper(), **kw)
    return cls(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------- shared flags
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


@contextlib.contextmanager
def user_errors():
    """Turn the known kinds of user mistake into one line on stderr and exit code 2.

    A rank launched by torchrun that finished cleanly leaves with `os._exit(0)` once its output is
    flushed: interpreter teardown can race torch's gloo worker threads and abort a finished
    process ("terminate called without an active exception", pytorch/pytorch#179291)."""
    try:
        yield
    except (UserError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def difficulty_arg(text: str):
    """`--difficulty` parsed, or a one-line UserError naming the flag."""
    from .tasks import Difficulty
    try:
        return Difficulty.from_str(text)
    except ValueError as e:
        raise UserError(f"--difficulty: {e}") from None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    autocast: object  # a context-manager factory: bf16 autocast on CUDA, a no-op on CPU

    def __post_init__(self):
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext


def setup(args) -> Runtime:
    """The flags checked (`check_args`), then ranks, device and seed for a script.
    `args.device`: "auto" | "cpu" | "cuda" | "cuda:N"."""
    check_args(args)
    rank, world_size, local_rank = dist.init(args.device)
    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if device.type == "cpu" and getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    # Subnormal floats (|x| < 1.2e-38) take a slow path in CPU arithmetic. Full-model DPO meets
    # them after ~120 steps and ran 2.2x slower by step 400 (0.27 -> 0.8 s a step); flushed to
    # zero, its steps keep their speed (1.85 vs 4.07 minutes for the default run).
    torch.set_flush_denormal(True)
    seed_everything(args.seed + rank)
    return Runtime(device, rank, world_size, rank == 0, None)


class Metrics:
    """Append-only `metrics.jsonl` in the output directory (rank 0 only), plus printed lines.

    Nothing is touched until the first `log`: a run that stops on bad input before training
    leaves the output directory as it was.
    """

    def __init__(self, out_dir, is_main: bool = True, append: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.t0 = time.time()
        self.fresh = not append          # the previous run's file is replaced at the first log
        self.n_lines = 0                 # lines this run's file holds (rank 0); a resume point

    def _open(self):
        if self.fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            self.fresh = False

    def keep_lines(self, n: int, source=None):
        """On resume: keep the first `n` lines (those written before the checkpoint that said
        `n`), whatever step numbers they carry; later lines came from the killed run. `source`:
        the run directory of the checkpoint, when it is not this one (its lines are copied)."""
        self.fresh = False
        self.n_lines = n
        src = Path(source) / "metrics.jsonl" if source else self.path
        if self.is_main and src.exists():
            keep = src.read_text().splitlines()[:n]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict, echo: bool = False):
        if not self.is_main:
            return
        self._open()
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 2))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.n_lines += 1
        if echo:
            from tqdm import tqdm
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()))


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB (Linux reports kB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def require_checkpoint(path, made_by: str):
    """Stop with the command that makes `path` when the previous stage's output is missing."""
    if not Path(path).exists():
        raise UserError(f"{path} does not exist; make it first with: {made_by}")


def default_threads() -> int:
    return int(os.environ.get("MINIPOST_THREADS", "0"))


def write_results(out_dir, stage: str, results: dict):
    """`results.json`: a stage's headline numbers, which the pipeline's scoreboard reads."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"stage": stage, **results}, indent=2))


def load_script_tokenizer(path, chat_template: str = ""):
    """The tokenizer of checkpoint `path` for a train_*.py, or a one-line UserError.

    chat_template: "" (the directory's own template) or "chatml" (`--chat-template`, which
    `check_args` checked). A tokenizer without a pad token (Llama-style) pads with EOS: padded
    positions are masked out anyway.
    """
    from .tokenizer import load_tokenizer
    if not (Path(path) / "tokenizer.json").exists():
        raise UserError(f"{path}: no tokenizer.json (is this a checkpoint directory?)")
    try:
        tokenizer = load_tokenizer(str(path), chat_template or None)
    except Exception as e:  # tokenizers' and json's own error types
        raise UserError(f"{path}: the tokenizer cannot be loaded ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def check_vocab(tokenizer, model, path):
    """Stop when the tokenizer can produce ids the model has no embedding for."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {model.config.vocab_size} embeddings; they do not belong together")


def same_tokenizer(path, other) -> bool:
    """False when both checkpoint directories hold a tokenizer.json and their vocabularies differ:
    the same text would become other ids, which a vocabulary-size check cannot see."""
    files = [Path(p) / "tokenizer.json" for p in (path, other)]
    if not all(f.exists() for f in files):
        return True
    vocab_a, vocab_b = (json.loads(f.read_text()).get("model", {}).get("vocab") for f in files)
    return vocab_a == vocab_b
