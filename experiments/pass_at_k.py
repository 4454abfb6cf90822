"""What does RL change? pass@1 against pass@k of the SFT policy and the GRPO policy.

    python -m minipost.pipeline --seeds 0 1 2            # first: out/seed-S/{sft,grpo}
    python experiments/pass_at_k.py                       # then this: seeds 0 1 2, 100 problems x 64
    python experiments/pass_at_k.py --runs out-countdown --task countdown

Claim under test (Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning
Capacity in LLMs Beyond the Base Model?", arXiv 2504.13837): RL with a verifiable reward raises
pass@1, but it does so by making the answers the policy could already sample more likely, not by
teaching new ones; so at large k the policy before RL catches up with the policy after it, or
overtakes it.

For every seed S the policies `RUNS/seed-S/sft` and `RUNS/seed-S/grpo` (what `python -m
minipost.pipeline --seeds ...` writes) each sample `--samples` = n completions at `--temperature`
for each of `--problems` held-out problems, and the unbiased pass@k of Chen et al. 2021
(`minipost.stats.pass_at_k`) is computed for k = 1 ... n. Written to `OUT`: `passk.jsonl` (one line
per seed and policy: the whole curve and its 95% intervals), `summary.md` (pass@k at a few k and
GRPO's gain there, each the mean ± sd over seeds with every seed's value, and the smallest k at
which the SFT policy reaches the GRPO policy) and, with matplotlib, `pass_at_k.png`. A seed whose
line is in `passk.jsonl` is not sampled again.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipost.stats import seed_table, summarize  # noqa: E402


def sample_curve(path: Path, args, seed: int) -> dict:
    """The pass@k curve (k = 1 ... n) of the policy at `path` on the held-out problems."""
    import torch
    from minipost.cli import load_script_tokenizer
    from minipost.evaluate import evaluate_task, heldout_problems
    from minipost.peft import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(str(path)).eval(), load_script_tokenizer(str(path))
    problems = heldout_problems("", args.problems, task=args.task)
    r = evaluate_task(model, tok, problems, args.max_new_tokens, batch_size=args.batch_size,
                      temperature=args.temperature, samples=args.samples, seed=seed,
                      task=args.task)
    return {"pass@k": r["pass@k"], "ci95": r["pass@k_ci95"], "n": r["n"]}


def crossover(sft: list[float], rl: list[float]) -> int | None:
    """The smallest k at which the SFT policy's pass@k reaches the RL policy's (None: never)."""
    return next((k + 1 for k, (a, b) in enumerate(zip(sft, rl)) if a >= b), None)


def ks_shown(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == n else ks + [n]


def plot(curves: dict, seeds: list[int], path: Path, title: str) -> None:
    """pass@k against k for both policies (mean over seeds, band min–max), and GRPO's gain."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("sft", "tab:blue"), ("grpo", "tab:red")):
        ys = [curves[(s, name)] for s in seeds]
        ks = range(1, len(ys[0]) + 1)
        cols = list(zip(*ys))
        a1.plot(ks, [sum(c) / len(c) for c in cols], color=color, label=f"{name} (mean)")
        a1.fill_between(ks, [min(c) for c in cols], [max(c) for c in cols], color=color,
                        alpha=0.2, lw=0)
    for s in seeds:
        gain = [b - a for a, b in zip(curves[(s, "sft")], curves[(s, "grpo")])]
        a2.plot(range(1, len(gain) + 1), gain, lw=1, label=f"seed {s}")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.legend(fontsize=8)
    a1.set_ylabel("pass@k (held-out)")
    a2.axhline(0, color="gray", lw=0.8)
    a2.set_ylabel("pass@k: GRPO − SFT")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="out", help="the pipeline's folder: RUNS/seed-S/{sft,grpo}")
    p.add_argument("--out", default="out/science/pass_at_k", help="where the results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--task", default="arithmetic", choices=["arithmetic", "countdown"],
                   help="built-in task of the held-out problems (the policies' task)")
    p.add_argument("--problems", type=int, default=100, help="held-out problems")
    p.add_argument("--samples", type=int, default=64, help="n: completions per problem (k <= n)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget")
    p.add_argument("--batch-size", type=int, default=128, help="completions per generate call")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.samples < 1 or args.problems < 1 or args.temperature <= 0:
        p.error("--samples and --problems must be >= 1 and --temperature > 0")
    runs, out = Path(args.runs), Path(args.out)
    missing = [str(runs / f"seed-{s}" / n) for s in args.seeds for n in ("sft", "grpo")
               if not (runs / f"seed-{s}" / n / "config.json").exists()]
    if missing:
        print(f"pass_at_k: no policy at {', '.join(missing)}; run `python -m minipost.pipeline "
              f"--seeds {' '.join(map(str, args.seeds))} --out {runs}` first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log = out / "passk.jsonl"
    done = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    key = dict(task=args.task, problems=args.problems, samples=args.samples,
               temperature=args.temperature)
    curves = {(r["seed"], r["policy"]): r["pass@k"] for r in done
              if all(r.get(k) == v for k, v in key.items())}
    for seed in args.seeds:
        for name in ("sft", "grpo"):
            if (seed, name) in curves:
                continue
            t0 = time.time()
            r = sample_curve(runs / f"seed-{seed}" / name, args, seed)
            row = {"seed": seed, "policy": name, **key, **r, "minutes": (time.time() - t0) / 60}
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            curves[(seed, name)] = r["pass@k"]
            print(f"seed {seed} {name}: pass@1 {r['pass@k'][0]:.3f}, pass@{args.samples} "
                  f"{r['pass@k'][-1]:.3f} ({row['minutes']:.1f} min)", flush=True)
    rows = {}
    for k in ks_shown(args.samples):
        for name in ("sft", "grpo"):
            rows[f"{name} pass@{k}"] = {s: curves[(s, name)][k - 1] for s in args.seeds}
    for k in ks_shown(args.samples):
        rows[f"GRPO − SFT at k = {k}"] = {s: curves[(s, "grpo")][k - 1] - curves[(s, "sft")][k - 1]
                                         for s in args.seeds}
    cross = {s: crossover(curves[(s, "sft")], curves[(s, "grpo")]) for s in args.seeds}
    never = [s for s in args.seeds if cross[s] is None]
    title = (f"{args.task}: {args.problems} held-out problems × {args.samples} samples at "
             f"T = {args.temperature}, seeds {' '.join(map(str, args.seeds))}")
    text = (f"# pass@k of the SFT and the GRPO policy ({title})\n\n"
            + seed_table(rows, args.seeds)
            + "\nSmallest k at which the SFT policy reaches the GRPO policy: "
            + ", ".join(f"seed {s}: {cross[s] if cross[s] else f'none up to {args.samples}'}"
                        for s in args.seeds) + "\n")
    gain1 = summarize([rows["GRPO − SFT at k = 1"][s] for s in args.seeds])
    gain_n = summarize([rows[f"GRPO − SFT at k = {args.samples}"][s] for s in args.seeds])
    text += (f"\nGRPO's gain: {gain1['mean']:+.3f} ± {gain1['sd']:.3f} at k = 1, "
             f"{gain_n['mean']:+.3f} ± {gain_n['sd']:.3f} at k = {args.samples}; "
             f"{len(args.seeds) - len(never)} of {len(args.seeds)} seeds cross over.\n")
    (out / "summary.md").write_text(text)
    print(text)
    plot(curves, args.seeds, out / "pass_at_k.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
