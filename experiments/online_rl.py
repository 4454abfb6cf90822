"""Which online RL method gains most from one SFT policy with the same number of sampled answers?

    python experiments/online_rl.py                          # every method, seeds 0 1 2, from out/sft
    python experiments/online_rl.py --methods grpo rloo gspo --seeds 0
    python experiments/online_rl.py --budget 19200 -- --max-new-tokens 48   # after --: every script

Claim under test: on the default task, the methods that followed PPO and GRPO (RLOO, REINFORCE++,
GSPO, online DPO) differ from GRPO in the advantage, the unit of the ratio or where the labels
come from, and at an equal budget of sampled completions none of them gains more held-out greedy
pass@1 than GRPO by more than the spread over seeds.

Every method starts from `--init` and samples `--budget` completions in all, at T = 0.7 with the
verifier as the reward (PPO: `--reward gold`, its value model from the policy; online DPO: a
correct answer over a wrong one). A GRPO-style step samples `--prompts` × `--group` completions,
an online-DPO step as many, a PPO iteration `--ppo-batch`, so each gets budget ÷ that many steps;
GSPO takes two optimiser steps on each batch (`--mu 2`, its narrow clip range: with one, GSPO is
GRPO's per-sequence loss), DAPO's dynamic sampling draws more than its budget (its refills are
counted in the table). Then every policy is scored by the same evaluation: greedy pass@1 on
`--eval-problems` held-out problems, and the unbiased pass@k of 8 samples at T = 0.7; the SFT
policy is scored alike, with each seed's sampling seed, for the gain.

Each run gets its folder, `OUT/METHOD/seed-S` (the script's output and `eval.json`); a run whose
`eval.json` exists is not run again, so a stopped sweep continues where it stopped. At the end:
`OUT/runs.jsonl` (one line per method and seed), `OUT/summary.md` (one table per metric, the
methods' mean ± sd over seeds and each seed's value) and, with matplotlib, `OUT/online_rl.png`.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipost.stats import seed_table  # noqa: E402

GRPO_PLAIN = ["--no-dynamic-sampling", "--clip-eps-high", "none"]
# method -> (script, its flags); budget-dependent flags are added by `command`
METHODS = {
    "ppo": ("train_ppo.py", ["--reward", "gold", "--value-init", "policy"]),
    "grpo": ("train_grpo.py", ["--loss-type", "grpo", *GRPO_PLAIN]),
    "dr_grpo": ("train_grpo.py", ["--loss-type", "dr_grpo", "--scale-rewards", "none",
                                  *GRPO_PLAIN]),
    "dapo": ("train_grpo.py", []),                       # train_grpo.py's defaults are DAPO's
    "rloo": ("train_grpo.py", ["--advantage", "rloo", "--loss-type", "dr_grpo", *GRPO_PLAIN]),
    "reinforce_pp": ("train_grpo.py", ["--advantage", "reinforce_pp", "--beta", "0.01",
                                       *GRPO_PLAIN]),
    "reinforce_pp_baseline": ("train_grpo.py", ["--advantage", "reinforce_pp_baseline",
                                                "--beta", "0.01", *GRPO_PLAIN]),
    "gspo": ("train_grpo.py", ["--loss-type", "gspo", "--mu", "2", "--clip-eps", "3e-4",
                               "--clip-eps-high", "4e-4", "--no-dynamic-sampling"]),
    "online_dpo": ("train_dpo.py", ["--online", "--sample-temperature", "0.7"]),
}
METRICS = {"greedy pass@1 gain": "gain", "greedy pass@1": "accuracy",
           "pass@1 at T (of 8)": "pass@1", "pass@8 at T": "pass@8", "minutes": "minutes",
           "completions sampled (thousands)": "completions_k"}


def command(method: str, args, seed: int, out: Path) -> list[str]:
    """The training command of `method` for one seed, its budget turned into steps."""
    script, flags = METHODS[method]
    per_step = args.ppo_batch if script == "train_ppo.py" else args.prompts * args.group
    steps = max(args.budget // per_step, 1)
    common = ["--init", args.init, "--out-dir", str(out), "--seed", str(seed), "--device", "cpu",
              "--threads", str(args.threads), "--eval-problems", "0"]
    if script == "train_grpo.py":
        mu = 2 if "--mu" in flags else 1
        size = ["--batch-prompts", str(args.prompts), "--group-size", str(args.group),
                "--max-steps", str(steps * mu), "--max-minutes", "0", "--pass-k", "0",
                "--eval-every", "0"]
    elif script == "train_ppo.py":
        size = ["--batch-size", str(args.ppo_batch), "--max-steps", str(steps), "--max-minutes", "0",
                "--eval-every", "0"]
    else:
        size = ["--batch-size", str(args.prompts), "--samples", str(args.group),
                "--max-steps", str(steps)]
    extra = shlex.split({"train_grpo.py": args.grpo_flags, "train_ppo.py": args.ppo_flags,
                         "train_dpo.py": args.dpo_flags}[script])
    return [sys.executable, script, *flags, *common, *size, *args.script_flags, *extra]


def completions(method: str, args, out: Path) -> float:
    """Completions a finished run sampled: its logged groups (GRPO-style, refills included) or
    its steps × the completions of one."""
    script = METHODS[method][0]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    if script == "train_grpo.py":
        return sum(x.get("groups_sampled", 0) for x in lines) * args.group
    per_step = args.ppo_batch if script == "train_ppo.py" else args.prompts * args.group
    return max(args.budget // per_step, 1) * per_step


def evaluate_policy(path: str, args, seed: int) -> dict:
    """Greedy pass@1 and the pass@k of 8 samples at T = 0.7 on the held-out problems."""
    import torch
    from minipost import tasks
    from minipost.cli import load_script_tokenizer
    from minipost.evaluate import evaluate_task, heldout_problems
    from minipost.peft import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(path).eval(), load_script_tokenizer(path)
    problems = heldout_problems(tasks.DEFAULT_DIFFICULTY, args.eval_problems)
    greedy = evaluate_task(model, tok, problems, args.max_new_tokens)
    sampled = evaluate_task(model, tok, problems, args.max_new_tokens, temperature=0.7,
                            samples=8, seed=seed)
    return {"accuracy": greedy["accuracy"], "pass@1": sampled["pass@k"][0],
            "pass@8": sampled["pass@8"], "n": greedy["n"]}


def run_one(method: str, args, seed: int, root: Path) -> dict:
    """Train (unless done) and evaluate one method and seed; returns its eval.json."""
    out = root / method / f"seed-{seed}"
    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(method, args, seed, out)
    print("$", " ".join(cmd), f"> {out / 'train.log'}", flush=True)
    t0 = time.time()
    with open(out / "train.log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"online_rl: {method} seed {seed} failed (exit code {rc}); see {out / 'train.log'}")
    res = {"method": method, "seed": seed, "minutes": (time.time() - t0) / 60,
           "completions_k": completions(method, args, out) / 1000,
           **evaluate_policy(str(out), args, seed)}
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def plot(results: list[dict], path: Path) -> None:
    """Greedy pass@1 gain by method: each seed a point, the mean a bar (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 4))
    for i, m in enumerate(methods):
        gains = [r["gain"] for r in results if r["method"] == m]
        ax.bar(i, sum(gains) / len(gains), color="lightsteelblue")
        ax.plot([i] * len(gains), gains, "o", color="black", ms=4)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("held-out greedy pass@1 gain over SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="out/sft", help="the SFT policy every method starts from")
    p.add_argument("--out", default="out/online_rl", help="the sweep's folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=38400, help="completions each run samples")
    p.add_argument("--prompts", type=int, default=16, help="prompts per GRPO/online-DPO step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--ppo-batch", type=int, default=32, help="completions per PPO iteration")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems scored")
    p.add_argument("--max-new-tokens", type=int, default=64, help="budget of the evaluation")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0 = default)")
    p.add_argument("--grpo-flags", default="", help="more flags for train_grpo.py, one string")
    p.add_argument("--ppo-flags", default="", help="more flags for train_ppo.py, one string")
    p.add_argument("--dpo-flags", default="", help="more flags for train_dpo.py, one string")
    p.add_argument("script_flags", nargs=argparse.REMAINDER, help="after --: flags for every script")
    args = p.parse_args(argv)
    args.script_flags = [f for f in args.script_flags if f != "--"]
    root = Path(args.out)
    results = []
    for seed in args.seeds:
        sft = root / "sft" / f"seed-{seed}" / "eval.json"
        if not sft.exists():
            sft.parent.mkdir(parents=True, exist_ok=True)
            sft.write_text(json.dumps(evaluate_policy(args.init, args, seed), indent=1))
        base = json.loads(sft.read_text())["accuracy"]
        for method in args.methods:
            res = run_one(method, args, seed, root)
            results.append({**res, "gain": res["accuracy"] - base})
    with open(root / "runs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    tables = [f"# online RL from {args.init}: {args.budget} completions a run, seeds "
              f"{' '.join(map(str, args.seeds))}\n"]
    for title, key in METRICS.items():
        rows = {m: {r["seed"]: r[key] for r in results if r["method"] == m} for m in args.methods}
        tables.append(f"\n## {title}\n\n" + seed_table(rows, args.seeds).replace(
            "| metric |", "| method |"))
    (root / "summary.md").write_text("".join(tables))
    print("".join(tables))
    plot(results, root / "online_rl.png")
    return results


if __name__ == "__main__":
    main()
