"""What every script shares and no algorithm needs: device, errors, metrics (flags: flags.py).

- `setup(args)`: the flags checked (`flags.check_args`), torchrun ranks (via dist.py), the device,
  bf16 autocast on CUDA, seeds.
- `user_errors()`: a user's mistake (the classes of errors.py: bad data line, bad checkpoint, bad
  flag value) ends the run with one line and exit code 2, no traceback.
- `Metrics`: one JSON object per line in `metrics.jsonl`, written by rank 0 only; with `watch`,
  the failure watchers of diagnostics.py read every record and their warnings are printed and
  logged; with `--report-to tensorboard`, every number is also a TensorBoard scalar.
"""
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import diagnostics, dist
from .errors import CheckpointError, DataError, UserError
from .flags import check_args

# The last lines of every training script's --help (flags.parse_args' epilog).
CURVES_HELP = "How to read the curves (every metric in metrics.jsonl): docs/reading-the-curves.md"


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


def difficulty_arg(text: str, task: str = "arithmetic"):
    """`--difficulty` of `--task` parsed ("" = the task's default), or a one-line UserError
    naming the flag."""
    from .tasks import Difficulty
    from .worlds import default_difficulty
    try:
        d = Difficulty.from_str(text or default_difficulty(task))
        if task == "countdown" and d.words:
            raise ValueError(f"{d}: countdown has no word problems ('w')")
        return d
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
    leaves the output directory as it was. `report_to="tensorboard"` also writes every numeric
    value as a scalar to OUT_DIR/tensorboard (the `tensorboard` package is optional: without it
    this raises a UserError naming the install command); metrics.jsonl stays the record.
    """

    def __init__(self, out_dir, is_main: bool = True, append: bool = False,
                 report_to: str = "none"):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.is_main = is_main
        self.t0 = time.time()
        self.fresh = not append          # the previous run's file is replaced at the first log
        self.n_lines = 0                 # lines this run's file holds (rank 0); a resume point
        self.watchers = []               # diagnostics.Watcher: see `watch`
        # every rank checks, so every rank stops on a missing package, not rank 0 alone
        self.summary_writer = summary_writer_class() if report_to == "tensorboard" else None
        self.board, self.last_step = None, 0

    def watch(self, script: str):
        """From now on feed every logged record to the failure watchers of `script`
        (diagnostics.for_script): each warning is printed once as one line and logged as a
        record {"step", "warning"}. Records without a step (a run's closing summary) are not
        watched; records without the metrics a watcher reads (evaluations) pass it by."""
        self.watchers = diagnostics.for_script(script)

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
        record = {k: _json_number(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self.t0, 2))
        step = self.last_step = record.get("step", self.last_step)   # a summary: the last step
        self._write(record, step)
        if echo:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items()))
        watched = self.watchers if "step" in record else []     # a closing summary is no step
        for warning in diagnostics.check(watched, step, record):
            tqdm.write(f"warning (step {step}): {warning}")
            self._write({"step": step, "warning": warning, "time": record["time"]}, step)

    def _write(self, record: dict, step):
        """One line of metrics.jsonl and, with --report-to tensorboard, its numbers as scalars at
        `step`."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.n_lines += 1
        if self.summary_writer is None:
            return
        if self.board is None:
            self.board = self.summary_writer(log_dir=str(self.path.parent / "tensorboard"))
        for k, v in record.items():
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if number and k not in ("step", "time"):
                self.board.add_scalar(k, v, global_step=step)
        self.board.flush()      # the run may end without a close: every line is on disk


def _json_number(v):
    """A float kept to 6 significant digits (not decimals: an lr of 5e-7 or a loss of 1e-9 must
    not read as 0), and NaN or inf as null, which every JSON parser reads; anything else as is."""
    if not isinstance(v, float):
        return v
    return float(f"{v:.6g}") if math.isfinite(v) else None


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a one-line UserError naming the install command
    (`tensorboard` is an optional dependency, needed only by --report-to tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report-to tensorboard needs the tensorboard package: "
                        "pip install tensorboard") from None
    return SummaryWriter


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
