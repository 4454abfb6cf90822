"""The length bias of GRPO's per-sequence normalisation: lengths of right and wrong answers.

    python experiments/length_bias.py --init out/sft     # grpo, dr_grpo, dapo; seeds 0 1 2
    python experiments/length_bias.py --sweep out/online_rl   # reuse experiments/online_rl.py's runs

Claim under test (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
arXiv 2503.20783): GRPO divides each answer's token sum by its own length, so a wrong answer's
penalty is spread thinner the longer it is and a right answer's reward is larger the shorter it
is; over training, wrong answers grow longer than right ones. Dr. GRPO (a constant normaliser,
no std) and DAPO's token mean over the batch remove the bias.

The three methods are trained from the same policy with experiments/online_rl.py's runner (its
folders, its budget of sampled completions, done runs reused), and `train_grpo.py` logs the mean
length of the trained batch's right (reward > 0) and wrong answers at every step
(`completions/mean_length_correct`, `completions/mean_length_wrong`). Written to `--sweep`:
`length_bias.md` (per method, the wrong − right gap in the first and in the last quarter of the
steps, over seeds) and, with matplotlib, `length_bias.png` (both lengths over training, the mean
over seeds).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipost.stats import seed_table  # noqa: E402

METHODS = ["grpo", "dr_grpo", "dapo"]
KEYS = ("completions/mean_length_correct", "completions/mean_length_wrong")


def lengths(run: Path) -> list[tuple[float, float]]:
    """(right, wrong) mean lengths of each logged step that had both."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r[KEYS[0]], r[KEYS[1]]) for r in rows
            if r.get(KEYS[0]) is not None and r.get(KEYS[1]) is not None]


def quarter_gap(pairs: list[tuple[float, float]], last: bool) -> float | None:
    """Mean (wrong − right) length over the first or last quarter of the steps."""
    if not pairs:
        return None
    q = max(1, len(pairs) // 4)
    part = pairs[-q:] if last else pairs[:q]
    return sum(w - c for c, w in part) / len(part)


def plot(series: dict, seeds: list[int], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
        return
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.5), sharey=True)
    for ax, m in zip(axes, METHODS):
        runs = [series[(m, s)] for s in seeds if series.get((m, s))]
        if not runs:
            continue
        steps = min(len(r) for r in runs)
        for i, (name, color) in enumerate((("right", "tab:green"), ("wrong", "tab:red"))):
            mean = [sum(r[t][i] for r in runs) / len(runs) for t in range(steps)]
            ax.plot(range(1, steps + 1), mean, color=color, label=f"{name} answers")
        ax.set_title(m)
        ax.set_xlabel("step")
    axes[0].set_ylabel(f"mean tokens (mean of {len(seeds)} seeds)")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="out/sft", help="the policy every method starts from")
    p.add_argument("--sweep", default="out/online_rl", help="experiments/online_rl.py's folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=7680, help="completions each run samples")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0 = default)")
    p.add_argument("online_rl_flags", nargs=argparse.REMAINDER,
                   help="after --: more flags for experiments/online_rl.py")
    args = p.parse_args(argv)
    sweep = Path(args.sweep)
    todo = [(m, s) for m in METHODS for s in args.seeds
            if not (sweep / m / f"seed-{s}" / "eval.json").exists()]
    if todo:
        sys.path.insert(0, str(ROOT / "experiments"))
        import online_rl
        online_rl.main(["--init", args.init, "--out", str(sweep), "--methods", *METHODS,
                        "--seeds", *map(str, args.seeds), "--budget", str(args.budget),
                        "--threads", str(args.threads),
                        *[f for f in args.online_rl_flags if f != "--"]])
    series = {(m, s): lengths(sweep / m / f"seed-{s}") for m in METHODS for s in args.seeds}
    rows = {}
    for m in METHODS:
        rows[f"{m}: wrong − right, first quarter"] = {
            s: quarter_gap(series[(m, s)], last=False) for s in args.seeds}
        rows[f"{m}: wrong − right, last quarter"] = {
            s: quarter_gap(series[(m, s)], last=True) for s in args.seeds}
    text = ("# Length of wrong minus right answers (tokens), trained batches\n\n"
            + seed_table(rows, args.seeds, fmt="{:.2f}"))
    (sweep / "length_bias.md").write_text(text)
    print(text)
    plot(series, args.seeds, sweep / "length_bias.png")
    return rows


if __name__ == "__main__":
    main()
