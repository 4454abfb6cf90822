"""Curves of one or more runs: every metric of their metrics.jsonl, overlaid, in one PNG.

    python -m minipost.plot out/grpo                          # writes out/grpo/curves.png
    python -m minipost.plot runs/lr-1e-6 runs/lr-1e-5 --out lr.png --metrics 'reward/*,kl'

Each metric gets a panel titled by its name, every run a line in it, labelled by its folder. The
panels are grouped by kind into rows: reward; KL and entropy; clipping and ratios; losses;
evaluation; other. Held-out evaluations (`eval…` names) are drawn as points, with their 95%
interval as error bars where the run logs one (`X_ci95` is the half-width of X's interval,
evaluate.ci95). Left out: records without a step (a run's closing summary), bookkeeping (time,
memory, throughput, counts), and copies of the starting values (`start/…`, `…_before`,
`…_step0`); `before/X` at step 0 (train_dpo.py's first evaluation) is drawn as `eval/X`.

matplotlib is optional and imported by this module only, on the Agg canvas (no display, no global
backend switch); without it the command stops with a one-line error naming the install command.
"""
import argparse
import fnmatch
import json
import math
import os
import re
from pathlib import Path

from .errors import DataError, UserError

KINDS = ("reward", "KL and entropy", "clipping and ratios", "losses", "evaluation", "other")
COLUMNS = 4                      # panels per row
PANEL_INCHES = (3.6, 2.5)        # width, height of one panel
BOOKKEEPING = {"step", "time", "skipped", "steps", "iterations", "minutes", "train_minutes",
               "seconds_per_step", "seconds_per_iteration", "eval_seconds", "gen_seconds",
               "step_seconds", "peak_rss_mb", "tokens_per_s", "pairs_per_s", "trainable_share",
               "truncated"}


def kind_of(name: str) -> str:
    """The panel group of a metric name: one of KINDS."""
    words = re.split(r"[/_]", name)
    if name.startswith("eval"):
        return "evaluation"
    if "kl" in words or "entropy" in words:
        return "KL and entropy"
    if ("clipfrac" in words or "mismatch" in words or name.startswith("policy/ratio")
            or name == "sampler_logp_max_diff"):
        return "clipping and ratios"
    if words[0] == "loss":
        return "losses"
    if "reward" in words or "rewards" in words or words[0] == "gold":
        return "reward"
    return "other"


def _left_out(name: str) -> bool:
    return (name in BOOKKEEPING or name.endswith(("/n", "_ci95", "_before", "_step0"))
            or name.startswith(("start/", "before/")))


def read_curves(run_dir) -> dict:
    """{metric: {"steps": [...], "values": [...], "ci95": [...] or None}} of one run, in the order
    the run first logged each metric. Raises UserError without metrics.jsonl, DataError on a bad
    line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    curves = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, f"not JSON ({e.msg})") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            continue                                   # a run's summary line, not a point
        for key, value in record.items():
            name = key
            if key.startswith("before/") and step == 0:
                name = "eval/" + key.removeprefix("before/")
            if _left_out(name):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            c = curves.setdefault(name, {"steps": [], "values": [], "ci95": []})
            c["steps"].append(step)
            c["values"].append(float(value))
            ci = record.get(key + "_ci95")
            c["ci95"].append(float(ci) if isinstance(ci, (int, float)) else math.nan)
    for c in curves.values():
        if all(math.isnan(x) for x in c["ci95"]):
            c["ci95"] = None
    return curves


def run_labels(run_dirs) -> list[str]:
    """Each run's folder name; where folder names repeat, the path below their common parent."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])
    return [os.path.relpath(Path(d).resolve(), common) for d in run_dirs]


def select(names, patterns) -> list[str]:
    """The names matching any of `patterns` (exact names or globs such as 'reward/*'), in the
    order of `names`. UserError for a pattern that matches nothing."""
    if not patterns:
        return list(names)
    for p in patterns:
        if not fnmatch.filter(names, p):
            raise UserError(f"--metrics {p}: no run logs it (they log: {', '.join(names)})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _matplotlib():
    """matplotlib's Figure, Agg canvas, Line2D and MaxNLocator, or a one-line UserError naming
    the install command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional dependency: "
                        "pip install matplotlib") from None
    return Figure, FigureCanvasAgg, Line2D, MaxNLocator


def make_figure(runs: dict, metrics=None):
    """A matplotlib Figure: one panel per metric, grouped by kind, every run overlaid.

    runs: {label: read_curves(run_dir)}; metrics: names or globs to keep (None: all)."""
    Figure, FigureCanvasAgg, Line2D, MaxNLocator = _matplotlib()
    names = list(dict.fromkeys(n for curves in runs.values() for n in curves))
    names = select(names, metrics)
    if not names:
        raise UserError(f"nothing to plot: {', '.join(runs)} log no metric with a step")
    groups = {k: [n for n in names if kind_of(n) == k] for k in KINDS}
    groups = {k: v for k, v in groups.items() if v}
    columns = min(COLUMNS, max(len(v) for v in groups.values()))
    rows = {k: math.ceil(len(v) / columns) for k, v in groups.items()}
    width, height = PANEL_INCHES
    fig = Figure(figsize=(columns * width, sum(rows.values()) * height + 0.45 * len(rows) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    colors = {label: f"C{i % 10}" for i, label in enumerate(runs)}
    subfigs = fig.subfigures(len(groups), 1, height_ratios=list(rows.values()), squeeze=False)
    for sub, (kind, group) in zip(subfigs[:, 0], groups.items()):
        sub.suptitle(kind, x=0.01, ha="left", fontweight="bold")
        axes = sub.subplots(rows[kind], columns, squeeze=False).ravel()
        for ax, name in zip(axes, group):
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # steps
            for label, curves in runs.items():
                c = curves.get(name)
                if c is None:
                    continue
                if kind == "evaluation":       # held-out points, with their 95% intervals
                    ax.errorbar(c["steps"], c["values"], yerr=c["ci95"], fmt="o", ms=3,
                                capsize=2, color=colors[label], label=label)
                else:
                    ax.plot(c["steps"], c["values"], lw=1, color=colors[label], label=label,
                            marker="o" if len(c["steps"]) == 1 else None, ms=3)
        for ax in axes[len(group):]:
            ax.remove()
    handles = [Line2D([], [], color=colors[label], label=label) for label in runs]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 6), fontsize=9)
    fig.supxlabel("step", fontsize=9)
    return fig


def plot_runs(run_dirs, out_path, metrics=None) -> list[str]:
    """Write the curves of `run_dirs` (overlaid, labelled by folder) to the PNG `out_path`.

    metrics: names or globs to keep (None: all). Returns the panel titles, kind by kind."""
    run_dirs = [str(d) for d in run_dirs]
    runs = dict(zip(run_labels(run_dirs), (read_curves(d) for d in run_dirs)))
    fig = make_figure(runs, metrics)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def default_out(run_dirs) -> Path:
    """RUN_DIR/curves.png for one run; curves.png in the runs' common parent for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "curves.png"
    return Path(os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])) / "curves.png"


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m minipost.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories holding a metrics.jsonl, drawn overlaid")
    parser.add_argument("--out", default="",
                        help="PNG to write (default: RUN_DIR/curves.png, or curves.png in the "
                             "runs' common parent for several)")
    parser.add_argument("--metrics", default="",
                        help="comma-separated names or globs to draw, e.g. 'reward/*,kl' "
                             "(default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.run_dirs)
    patterns = [p.strip() for p in args.metrics.split(",") if p.strip()]
    titles = plot_runs(args.run_dirs, out, patterns or None)
    print(f"wrote {out}: {len(titles)} panels of {len(args.run_dirs)} run(s)")
    return titles


if __name__ == "__main__":
    from .cli import user_errors
    with user_errors():
        main()
