"""Reward functions for online RL: the convention, the built-in ones, loading a user's, scoring.

A reward function is Hugging Face TRL's (`GRPOTrainer`'s `reward_funcs`):

    fn(prompts, completions, **columns) -> list[float | None]

`prompts` are the rows' prompts as written (a string, or a list of messages), `completions` the
decoded completions, and every other column of the rows arrives as a keyword argument holding one
value per completion (a prompt sampled G times repeats its row G times). It returns one float per
completion, or None where it does not apply. One departure: a completion is always a string here,
where TRL passes a chat prompt's completion as [{"role": "assistant", "content": ...}]; the
built-ins accept both. A parameter without a default (`answer` below) is a column the function
needs: `check_columns` stops on a row without it, naming file:line and the column.

Several functions combine as TRL combines them: total_i = Σ_f w_f · r_f,i over the functions that
return a number for completion i (None is skipped; all None gives 0). Logged per function:
`rewards/<name>/mean` and `/std` over the completions it scored; `reward/mean` is the total's.

`--reward-fn NAME` is a built-in of `BUILT_IN`; `--reward-fn module:function` (or
`path/to/my_rewards.py:function`) imports the user's. A function that cannot be imported, raises,
returns the wrong number of values or a NaN/inf stops the run with one line naming it (UserError);
`probe` calls each once on an empty completion before anything is written.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import countdown as countdown_task
from . import worlds
from .data import load_jsonl, record_lines
from .errors import DataError, UserError
from .tasks import is_well_formed, verify


def _text(completion) -> str:
    """A completion as text: a string, or TRL's chat form [{"role": "assistant", "content"}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def reference_number(answer) -> str | None:
    """The number of a GSM8K-style answer column: after the LAST "####" when there is one (a whole
    GSM8K solution), else the first number in it; "$" and thousands commas dropped, trailing text
    ignored ("#### $1,234 dollars" → "1234"). A JSON number is taken as it is."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    text = str(answer)
    text = text.rsplit("####", 1)[1] if "####" in text else text
    m = _NUMBER.search(text.replace("$", ""))
    return m.group(0).replace(",", "") if m else None


# ---------------------------------------------------------------------------- built-in functions
def correct(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion ends with a "#### <number>" line (GSM8K's answer format, the
    arithmetic verifier: tasks.verify) equal to the `answer` column's number, else 0.0. The
    column may be a bare number ("56"), "$1,234", "72 dollars" or a whole GSM8K solution."""
    return [verify(_text(c), ref) if (ref := reference_number(a)) is not None else 0.0
            for c, a in zip(completions, answer)]


def well_formed(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion's last non-empty line, and only it, is "#### <number>"."""
    return [float(is_well_formed(_text(c))) for c in completions]


def countdown(prompts, completions, numbers, target, **kwargs) -> list[float]:
    """1.0 when the expression after "####" uses only `numbers`, each at most once, and equals
    `target` (countdown.verify: parsed and walked, never `eval`), else 0.0."""
    return [countdown_task.verify(_text(c), n, t) for c, n, t in zip(completions, numbers, target)]


def well_formed_expression(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion's last non-empty line, and only it, is "#### <expression>" of
    digits, spaces, ( ) + - * / (countdown's answer format)."""
    return [float(countdown_task.is_well_formed(_text(c))) for c in completions]


BUILT_IN = {"correct": correct, "well_formed": well_formed, "countdown": countdown,
            "well_formed_expression": well_formed_expression}
FORMAT = {"arithmetic": "well_formed", "countdown": "well_formed_expression"}  # per --task


# ---------------------------------------------------------------------------- loading
@dataclass
class RewardFn:
    name: str                     # its name in the logs: the built-in name or the function's
    fn: object                    # fn(prompts, completions, **columns) -> list[float | None]
    weight: float = 1.0           # w in the total Σ w·r
    columns: tuple = ()           # the columns it needs (its parameters without a default)


def required_columns(fn) -> tuple:
    """The columns `fn` names as parameters without a default, after prompts and completions."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _import(spec: str):
    """The function of "module:function" or "path/to/my_rewards.py:function"; UserError if not."""
    where, _, name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise ImportError(f"no such file {where}")
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:          # the user's module may fail in any way while it loads
        raise UserError(f"--reward-fn {spec}: cannot import {where} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward-fn {spec}: {where} has no function {name!r}")
    return fn


def load(specs: list[str], weights: list[float]) -> list[RewardFn]:
    """The reward functions of `--reward-fn` specs, with `--reward-weights` (empty: 1 each)."""
    if weights and len(weights) != len(specs):
        raise UserError(f"--reward-weights has {len(weights)} values for {len(specs)} "
                        "--reward-fn functions: give one weight each, or none")
    if any(not math.isfinite(w) for w in weights):
        raise UserError(f"--reward-weights must be finite, got {weights}")
    fns = []
    for spec, w in zip(specs, weights or [1.0] * len(specs)):
        if ":" in spec:
            fn = _import(spec)
            name = getattr(fn, "__name__", spec.rpartition(":")[2])
        elif spec in BUILT_IN:
            fn, name = BUILT_IN[spec], spec
        else:
            raise UserError(f"--reward-fn {spec}: not a built-in ({', '.join(BUILT_IN)}) nor "
                            "module:function")
        if name in [f.name for f in fns]:
            raise UserError(f"--reward-fn: two functions named {name!r}; their logs would mix")
        try:
            columns = required_columns(fn)
        except (TypeError, ValueError):
            columns = ()
        fns.append(RewardFn(name, fn, float(w), columns))
    return fns


def check_columns(fns: list[RewardFn], rows: list[dict], path=None, lines=None):
    """Every row has every column the functions need: else DataError "{path}:{line}: missing
    field ..." (`lines[i]` the line of row i), or, for built-in rows (no path), a UserError."""
    for i, row in enumerate(rows):
        for f in fns:
            for col in f.columns:
                if col in row:
                    continue
                if path is None:
                    raise UserError(f"reward function {f.name!r} needs column {col!r}, which the "
                                    f"built-in prompts do not have (they have: "
                                    f"{', '.join(k for k in row if k != 'prompt')})")
                raise DataError(path, lines[i] if lines else i + 1,
                                f"missing field {col!r} (reward function {f.name!r} needs it)")


# ---------------------------------------------------------------------------- scoring
def columns_of(rows: list[dict]) -> dict:
    """Every column but "prompt" as a list over the rows (None where a row lacks it)."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")
    return {k: [r.get(k) for r in rows] for k in keys}


def call(f: RewardFn, prompts: list, completions: list[str], columns: dict) -> torch.Tensor:
    """(N,) float64 rewards of one function, NaN where it returned None; UserError when it
    raises or returns anything but N finite numbers or None."""
    n = len(completions)
    try:
        out = f.fn(prompts, completions, **columns)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"reward function {f.name!r} raised {type(e).__name__}: {msg}") from None
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
        raise UserError(f"reward function {f.name!r} returned {got} for {n} completions "
                        "(one float or None per completion)")
    values = []
    for i, v in enumerate(out):
        if v is not None and not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise UserError(f"reward function {f.name!r} returned {type(v).__name__} for "
                            f"completion {i} (a float or None)")
        v = math.nan if v is None else float(v)
        if v != v and out[i] is not None or math.isinf(v):
            raise UserError(f"reward function {f.name!r} returned {v} for completion {i} "
                            "(NaN and inf are not rewards; return None where it does not apply)")
        values.append(v)
    return torch.tensor(values, dtype=torch.float64)


def score(fns: list[RewardFn], prompts: list, completions: list[str], rows: list[dict]
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total (N,) float32, {name: (N,) float64, NaN where None}) for N completions and their rows.

    total_i = Σ_f w_f·r_f,i over the functions not None at i (TRL's nansum; all None gives 0)."""
    columns = columns_of(rows)
    per_fn = {f.name: call(f, prompts, completions, columns) for f in fns}
    total = sum(f.weight * torch.nan_to_num(per_fn[f.name], nan=0.0) for f in fns)
    return total.float(), per_fn


def probe(fns: list[RewardFn], row: dict):
    """Call every function once on `row` with an empty completion (a policy can sample one), so
    a function that raises or returns the wrong shape stops the run before anything is written."""
    score(fns, [row["prompt"]], [""], [row])


def log_stats(per_fn: dict[str, torch.Tensor]) -> dict[str, float]:
    """`rewards/<name>/mean` and `/std` (Bessel-corrected) over the completions each function
    scored (not None); NaN when it scored none."""
    out = {}
    for name, r in per_fn.items():
        r = r[~r.isnan()]
        out[f"rewards/{name}/mean"] = float(r.mean()) if len(r) else math.nan
        out[f"rewards/{name}/std"] = float(r.std()) if len(r) > 1 else 0.0 if len(r) else math.nan
    return out


def is_binary(r: torch.Tensor) -> bool:
    """Whether a function's rewards (NaN: None) are all 0 or 1: then pass@k means something."""
    r = r[~r.isnan()]
    return bool(len(r)) and bool(((r == 0) | (r == 1)).all())



# ---------------------------------------------------------------------------- a script's task
def rl_task(args, difficulty, n_prompts: int, format_reward: float = 0.0, log=print
            ) -> tuple[list[dict], list[dict] | None, list[RewardFn]]:
    """An RL script's prompts and reward functions, from its flags (flags.RewardArgs):
    (training rows, held-out rows or None for the built-in task's held-out problems, functions).

    Rows: `--data`, or `n_prompts` built-in training prompts of `--task` at `difficulty`.
    Functions: `--reward-fn` with `--reward-weights`, else the task's verifier (worlds.REWARD);
    plus the task's format reward at weight `format_reward` when > 0. Every row is checked for
    the columns the functions need and each function is probed once, before anything is written.
    """
    fns = load(list(args.reward_fn) or [worlds.REWARD[args.task]], list(args.reward_weights))
    if format_reward:
        fns += load([FORMAT[args.task]], [format_reward])
    if args.data:
        rows = load_jsonl(args.data, "rl")
        check_columns(fns, rows, args.data, record_lines(args.data))
    else:
        rows = worlds.world(args.task).rl_prompts(n_prompts, "train", difficulty, seed=args.seed)
        check_columns(fns, rows[:1])
    held_out = None
    if args.eval_data:
        held_out = load_jsonl(args.eval_data, "rl")
        check_columns(fns, held_out, args.eval_data, record_lines(args.eval_data))
    probe(fns, rows[0])
    if log:
        strings = any(isinstance(r["prompt"], str) for r in rows + (held_out or [])
                      if args.data or args.eval_data)          # built-in prompts are chats
        reading = ("" if not strings else "; a string prompt is read as " + (
            "raw text to continue (--string-prompts text, TRL's reading)"
            if args.string_prompts == "text" else
            "the user turn of a chat (--string-prompts chat; TRL reads it as raw text: "
            "--string-prompts text)"))
        log(f"prompts: {args.data or f'{len(rows)} built-in {args.task} problems'}{reading}; "
            "reward: " + " + ".join(f"{f.weight:g}·{f.name}" for f in fns))
    return rows, held_out, fns
