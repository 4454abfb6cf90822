"""The whole pipeline in one command: base → SFT → RM → DPO → PPO → GRPO, then a scoreboard.

    python -m minipost.pipeline                       # defaults, everything under out/
    python -m minipost.pipeline --device cpu --threads 2 --out out
    python -m minipost.pipeline --start-at ppo        # re-run from a stage (earlier outputs kept)
    python -m minipost.pipeline --quick --out /tmp/q  # tiny settings, for tests (seconds a stage)
    python -m minipost.pipeline --seeds 0 1 2         # once per seed: out/seed-0, ..., one scoreboard
    python -m minipost.pipeline --task countdown --out out-countdown   # the second built-in task

Each stage runs as its own process (`python <script> --init ... --out-dir ...`), exactly the
command a user would type, so a stage's memory is returned when it ends and a failure names the
stage and the command that re-runs it. `--device`, `--threads`, `--seed`, `--task` and
`--difficulty` are passed to every stage. At the end every stage's `results.json` (written by `cli.write_results`) is read and its
held-out numbers are printed side by side and written to `<out>/scoreboard.md`. Each stage's
curves go to `<out>/<stage>/curves.png` and the stages' key curves, overlaid, to `<out>/curves.png`
beside the scoreboard (minipost.plot; without matplotlib, an optional dependency, one line says so).

With `--seeds S1 S2 ...` the whole pipeline runs once per seed, each in `<out>/seed-S/` (its base
model, SFT and every later stage all from that seed), and `<out>/scoreboard.md` (and `.json`) gives
every stage's numbers as mean ± sd, min – max and each seed's value, rewritten after each seed.
`--skip-done` reuses every stage that already has a `results.json`, so a killed run continues
where it stopped.
"""
import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from minipost.errors import DataError, UserError
from minipost.stats import seed_table, summarize

ROOT = Path(__file__).resolve().parent.parent   # the stage scripts live in the repository root

# (stage, script, inputs: flag -> stage whose output directory it takes)
STAGES = [
    ("base", "pretrain.py", {}),
    ("sft", "train_sft.py", {"init": "base"}),
    ("rm", "train_rm.py", {"init": "sft"}),
    ("dpo", "train_dpo.py", {"init": "sft"}),
    ("ppo", "train_ppo.py", {"init": "sft", "reward_model": "rm"}),
    ("grpo", "train_grpo.py", {"init": "sft"}),
]

# --quick: tiny settings; each stage gets the ones its Args has (scripts are written in parallel,
# so the flag set is read from the script, not assumed)
QUICK = dict(max_steps=2, max_minutes=0.0, eval_problems=8, eval_every=1000, warmup_steps=1,
             batch_size=8, mini_batch_size=4, grad_accum=1, n_train=64, n_pairs=64, n_identity=8,
             n_prompts=64, eval_quick=0, eval_chats=8, eval_rm_problems=8, eval_pairs=8,
             max_new_tokens=16, batch_prompts=2, group_size=4, pass_k=2, ppo_epochs=1,
             policy_problems=8, eval_policy_problems=4)
QUICK_BASE = dict(n_docs=300, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=2, intermediate_size=64, seq_len=64, max_steps=3, eval_every=1000,
                  eval_windows=4)


def script_fields(script: Path) -> dict:
    """The Args fields of a stage script and their defaults (the script is imported, not run)."""
    spec = importlib.util.spec_from_file_location(f"_stage_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {f.name: f.default for f in dataclasses.fields(module.Args)}


def flag(name: str, value) -> list[str]:
    name = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    return [name, str(value)]


def stage_command(stage: str, script: str, inputs: dict, args, out=None, seed=None) -> list[str]:
    """The command line of one stage, writing under `out` (default --out) with `seed`."""
    out = Path(args.out if out is None else out)
    fields = script_fields(ROOT / script)
    opts = {"out_dir": out / stage, **{k: out / src for k, src in inputs.items()},
            "device": args.device, "threads": args.threads, "task": args.task,
            "seed": args.seed if seed is None else seed}
    if args.difficulty:
        opts["difficulty"] = args.difficulty
    if args.quick:
        opts.update({**QUICK, **(QUICK_BASE if stage == "base" else {})})
    cmd = [sys.executable, str(ROOT / script)]
    for k, v in opts.items():
        if k in fields:
            cmd += flag(k, v)
    return cmd


# ---------------------------------------------------------------------------- scoreboard
def _pick(d: dict, *keys):
    return next((d[k] for k in keys if d.get(k) is not None), None)


def headline(results: dict) -> dict:
    """A stage's headline numbers from its results.json, whatever its layout: the agreed "before" /
    "after" dicts ({"accuracy", "accuracy_ci95", "well_formed"}), or flat keys."""
    after = results.get("after") if isinstance(results.get("after"), dict) else results
    before = results.get("before") if isinstance(results.get("before"), dict) else {}
    row = {
        "before": _pick(before, "accuracy") if before else _pick(
            results, "accuracy_before", "eval/accuracy_before", "before/accuracy",
            "start/accuracy"),
        "after": _pick(after, "accuracy", "eval/accuracy"),
        "ci95": _pick(after, "accuracy_ci95", "eval/accuracy_ci95"),
        "well_formed": _pick(after, "well_formed", "eval/well_formed"),
        "pass@k": next((f"{v:.3f} ({k})" for k, v in after.items()
                        if k.startswith("pass@") and isinstance(v, float)), None),
        "minutes": _pick(results, "minutes", "train_minutes"),
        "peak_rss_mb": _pick(results, "peak_rss_mb"),
    }
    row["gain"] = (None if row["before"] is None or row["after"] is None
                   else row["after"] - row["before"])
    for name, keys in EXTRAS.get(results.get("stage"), {}).items():
        row[name] = _pick(results, *keys)
    return row


METRIC = {"base": "pass@1, plain completion", "rm": "pairwise accuracy (correct > flawed)"}
# a stage's other held-out numbers worth a line in the multi-seed scoreboard: name -> result keys
EXTRAS = {"base": {"held-out loss": ("eval/loss",)},
          "rm": {"identity pairs": ("eval_identity/accuracy",),
                 "policy's own pairs": ("eval_policy/accuracy",)},
          "dpo": {"identity": ("eval/identity",)},
          "ppo": {"final KL": ("kl",)}}


def scoreboard(out) -> str:
    """Markdown table of every stage's held-out numbers (stages without results.json: "missing")."""
    def num(x, fmt="{:.3f}"):
        return "–" if x is None else fmt.format(x)

    lines = ["| stage | held-out metric | before | after | gain | ±95% | well-formed | pass@k "
             "| minutes | peak RSS MB |", "|" + "---|" * 10]
    for stage, _, _ in STAGES:
        path = Path(out) / stage / "results.json"
        if not path.exists():
            lines.append(f"| {stage} | missing | | | | | | | | |")
            continue
        r = headline(json.loads(path.read_text()))
        lines.append(" | ".join([
            f"| {stage}", METRIC.get(stage, "pass@1, greedy"), num(r["before"]), num(r["after"]),
            num(r["gain"], "{:+.3f}"), num(r["ci95"]), num(r["well_formed"]), r["pass@k"] or "–",
            num(r["minutes"], "{:.1f}"), num(r["peak_rss_mb"], "{:.0f}")]) + " |")
    return "\n".join(lines) + "\n"


def seed_scoreboard(out, seeds) -> tuple[str, dict]:
    """Every stage's numbers over seeds (`<out>/seed-S/<stage>/results.json`): markdown and JSON."""
    rows, summary = {}, {}
    for stage, _, _ in STAGES:
        for s in seeds:
            path = Path(out) / f"seed-{s}" / stage / "results.json"
            if not path.exists():
                continue
            r = headline(json.loads(path.read_text()))
            for name in ("before", "after", "gain", "well_formed", *EXTRAS.get(stage, {}),
                         "minutes"):
                if isinstance(r.get(name), (int, float)):
                    rows.setdefault(f"{stage}: {name}", {})[s] = float(r[name])
    for name, by_seed in rows.items():
        summary[name] = summarize([by_seed[s] for s in seeds if s in by_seed])
        summary[name]["seeds"] = [s for s in seeds if s in by_seed]
    return seed_table(rows, seeds), summary


# ---------------------------------------------------------------------------- curves
# the summary figure: the curves every stage's reader looks at first, each stage a line
SUMMARY_METRICS = ("loss", "reward/mean", "kl", "entropy", "eval/loss", "eval/accuracy")


def can_plot() -> bool:
    """Whether matplotlib, an optional dependency, is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plot_curves(run_dirs, png, metrics=None):
    """`run_dirs`' curves into `png` (minipost.plot.plot_runs), `metrics` those of them some run
    logs (None: all); a run that cannot be drawn is one printed line, never a failed pipeline,
    and without matplotlib nothing is drawn (`main` says so once)."""
    from minipost.plot import plot_runs, read_curves
    if not can_plot():
        return
    try:
        if metrics:
            logged = {name for d in run_dirs for name in read_curves(d)}
            metrics = [m for m in metrics if m in logged] or None
        plot_runs(run_dirs, png, metrics)
    except (UserError, DataError) as e:
        print(f"=== no {png}: {e}", flush=True)


def run_stages(args, out: Path, seed: int) -> None:
    """Every stage from --start-at on, one process each, into `out` with `seed`."""
    names = [s for s, _, _ in STAGES]
    for stage, script, inputs in STAGES[names.index(args.start_at):]:
        if args.skip_done and (out / stage / "results.json").exists():
            print(f"=== {stage}: {out / stage} is done, reused (--skip-done)", flush=True)
            continue
        cmd = stage_command(stage, script, inputs, args, out, seed)
        print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            sys.exit(f"pipeline: stage {stage} failed (exit code {rc}); fix it and re-run with "
                     f"--start-at {stage}")
        print(f"=== {stage} done in {(time.time() - start) / 60:.1f} min", flush=True)
        plot_curves([out / stage], out / stage / "curves.png")
    done = [out / s for s in names if (out / s / "metrics.jsonl").exists()]
    if done:                     # beside the scoreboard: every stage that has run, overlaid
        plot_curves(done, out / "curves.png", SUMMARY_METRICS)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="root directory; stage S writes <out>/<S>")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda, passed to every stage")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per stage (0 = default)")
    p.add_argument("--seed", type=int, default=0, help="seed passed to every stage")
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "countdown"],
                   help="built-in task world of every stage (worlds.py)")
    p.add_argument("--difficulty", default="",
                   help="task difficulty passed to every stage ('' = the task's default)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run the whole pipeline once per seed into <out>/seed-S and write one "
                        "scoreboard of mean, spread and each seed's value (overrides --seed)")
    p.add_argument("--skip-done", action="store_true",
                   help="reuse every stage whose results.json exists (continue a stopped run)")
    p.add_argument("--quick", action="store_true", help="tiny settings (tests, smoke runs)")
    p.add_argument("--start-at", default="base", choices=[s for s, _, _ in STAGES],
                   help="first stage to run; the earlier ones' outputs must exist")
    args = p.parse_args(argv)
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if not can_plot():
        print("note: no curves.png: matplotlib is missing (pip install matplotlib)", flush=True)

    t0 = time.time()
    out = Path(args.out)
    if args.seeds is None:                    # the one-seed quick path: <out>/<stage>
        run_stages(args, out, args.seed)
        board = scoreboard(out)
        (out / "scoreboard.md").write_text(
            f"# minipost scoreboard\n\nHeld-out numbers of every stage "
            f"({(time.time() - t0) / 60:.1f} minutes in all).\n\n{board}")
        print("\n" + board)
        return board

    for i, seed in enumerate(args.seeds):
        print(f"\n##### seed {seed} ({i + 1} of {len(args.seeds)})", flush=True)
        seed_start = time.time()
        run_stages(args, out / f"seed-{seed}", seed)
        (out / f"seed-{seed}" / "scoreboard.md").write_text(
            f"# minipost scoreboard, seed {seed}\n\n{scoreboard(out / f'seed-{seed}')}")
        print(f"##### seed {seed} done in {(time.time() - seed_start) / 60:.1f} min", flush=True)
        board, summary = seed_scoreboard(out, args.seeds[:i + 1])
        (out / "scoreboard.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "scoreboard.md").write_text(
            f"# minipost scoreboard over seeds {' '.join(map(str, args.seeds[:i + 1]))}\n\n"
            f"Every stage's held-out numbers: mean ± sample standard deviation, range, and each "
            f"seed's value ({(time.time() - t0) / 60:.1f} minutes in all).\n\n{board}")
    print("\n" + board)
    return board


if __name__ == "__main__":
    main()
