"""Reward over-optimisation: best-of-n against a learned reward model, scored by the verifier.

    python -m minipost.pipeline --seeds 0 1 2            # first: out/seed-S/{sft,rm}
    python experiments/overoptimization.py               # then this: seeds 0 1 2
    python experiments/overoptimization.py --samples 16 --problems 50 --seeds 0   # a quick look

Claim under test (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", arXiv
2210.10760): optimising a learned (proxy) reward model harder and harder raises its score
without end, while the true (gold) reward first rises, then peaks and falls; a reward model
trained on more data peaks later and higher.

The optimiser here is best-of-k sampling, the cheapest one Gao et al. study: for each of
`--problems` held-out problems the SFT policy `RUNS/seed-S/sft` samples n = `--samples` answers
at `--temperature`; each reward model scores all of them and the verifier marks each right or
wrong (a cut-off answer is wrong). Best-of-k keeps the answer its reward model scores highest
among k. Its expected gold and proxy reward over every k-subset of the n samples is computed
exactly (`best_of_k`), for k = 1, 2, 4, ..., n, and plotted against √KL with KL(best-of-k ‖
policy) = log k − (k − 1)/k (Stiennon et al. 2020; an upper bound, Beirami et al. 2024).

Reward models: `RUNS/seed-S/rm` (the pipeline's, `train_rm.py`'s defaults: 20,000 pairs) and
`RUNS/seed-S/rm-small` (trained here when missing with `train_rm.py --n-pairs 1000 --max-steps
100`: 3,200 pairs seen instead of 38,400). Written to `OUT`: `bon.jsonl` (one line per seed and
reward model: the curves), `summary.md` (per reward model: gold at k = 1, its peak and where,
gold at k = n, and pairwise accuracy on the policy's own answers, each over seeds) and, with
matplotlib, `overoptimization.png`. A seed already in `bon.jsonl` is not sampled again.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipost.stats import seed_table  # noqa: E402

SMALL_RM = ["--n-pairs", "1000", "--max-steps", "100", "--eval-every", "0"]


def best_of_k(proxy: list[float], gold: list[float], k: int) -> tuple[float, float]:
    """Expected (gold, proxy) reward of best-of-k over all k-subsets of one problem's n samples.

    Sorted by proxy score (ties: the earlier sample ranks lower), the sample of rank r (1 ... n)
    is a k-subset's best exactly when it is in the subset and the other k − 1 come from the r − 1
    below it: C(r − 1, k − 1) of the C(n, k) subsets. The weights sum to 1."""
    n = len(proxy)
    if not 1 <= k <= n or len(gold) != n:
        raise ValueError(f"best_of_k: need 1 <= k <= n = {n} and one gold per sample")
    order = sorted(range(n), key=lambda i: (proxy[i], i))
    total = math.comb(n, k)
    g = p = 0.0
    for r, i in enumerate(order, start=1):
        w = math.comb(r - 1, k - 1) / total
        g, p = g + w * gold[i], p + w * proxy[i]
    return g, p


def kl_best_of_k(k: int) -> float:
    """KL(best-of-k ‖ policy) = log k − (k − 1)/k nats (an upper bound; exact without ties)."""
    return math.log(k) - (k - 1) / k


def ks_of(n: int) -> list[int]:
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == n else ks + [n]


def sample_and_score(runs: Path, seed: int, rms: list[str], args) -> dict:
    """n samples per held-out problem from the seed's SFT policy, each reward model's scores and
    the verifier's marks: {"gold": [[...] per problem], "<rm>": [[...] per problem]}."""
    import torch
    from minipost.cli import load_script_tokenizer
    from minipost.evaluate import chat_prompt_ids, heldout_problems
    from minipost.generate import generate
    from minipost.peft import load_model, load_reward_models
    from minipost.worlds import score
    if args.threads:
        torch.set_num_threads(args.threads)
    policy_dir = runs / f"seed-{seed}" / "sft"
    tok = load_script_tokenizer(str(policy_dir))
    policy = load_model(str(policy_dir)).eval()
    models = {rm: load_reward_models([str(runs / f"seed-{seed}" / rm)], None, "cpu") for rm in rms}
    problems = heldout_problems("", args.problems)
    gen = torch.Generator().manual_seed(seed)
    out = {"gold": [], **{rm: [] for rm in rms}}
    per_call = max(1, args.batch_size // args.samples)
    with torch.no_grad():
        for s in range(0, len(problems), per_call):
            chunk = problems[s:s + per_call]
            prompts = [chat_prompt_ids(tok, p["prompt"]) for p in chunk for _ in range(args.samples)]
            g = generate(policy, prompts, args.max_new_tokens, temperature=args.temperature,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         generator=gen)
            ids, mask = g.sequences
            gold = [0.0 if bool(g.truncated[i]) else float(score("arithmetic", tok.decode(
                g.completion_ids[i][g.completion_mask[i]].tolist(), skip_special_tokens=True),
                chunk[i // args.samples])) for i in range(len(prompts))]
            scores = {rm: m.score_last(ids, mask).float().tolist() for rm, m in models.items()}
            for j in range(len(chunk)):
                part = slice(j * args.samples, (j + 1) * args.samples)
                out["gold"].append(gold[part])
                for rm in rms:
                    out[rm].append(scores[rm][part])
            print(f"  seed {seed}: {min(s + per_call, len(problems))}/{len(problems)} problems",
                  flush=True)
    return out


def curves(sampled: dict, rm: str, n: int) -> dict:
    """Best-of-k's mean gold and proxy reward over problems, for each k, and the proxy's
    pairwise accuracy on the policy's own (right, wrong) answers to the same problem."""
    ks = ks_of(n)
    gold, proxy = [], []
    for k in ks:
        per = [best_of_k(p, g, k) for p, g in zip(sampled[rm], sampled["gold"])]
        gold.append(sum(x[0] for x in per) / len(per))
        proxy.append(sum(x[1] for x in per) / len(per))
    wins = pairs = 0
    for p, g in zip(sampled[rm], sampled["gold"]):
        for a in range(n):
            for b in range(n):
                if g[a] > g[b]:
                    pairs += 1
                    wins += p[a] > p[b]
    return {"k": ks, "kl": [kl_best_of_k(k) for k in ks], "gold": gold, "proxy": proxy,
            "pairwise_accuracy": wins / pairs if pairs else None, "pairs": pairs}


def plot(rows: list[dict], rms: list[str], seeds: list[int], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for rm, color in zip(rms, colors):
        for r in (r for r in rows if r["rm"] == rm):
            x = [math.sqrt(v) for v in r["kl"]]
            label = rm if r["seed"] == seeds[0] else None
            a1.plot(x, r["gold"], "o-", color=color, ms=3, lw=1, label=label)
            a2.plot(x, [p - r["proxy"][0] for p in r["proxy"]], "o--", color=color, ms=3, lw=1,
                    label=label)
    a1.set_ylabel("gold: verifier accuracy of best-of-k")
    a2.set_ylabel("proxy: reward-model score − its best-of-1 score")
    for ax in (a1, a2):
        ax.set_xlabel("√KL(best-of-k ‖ SFT policy), nats^½  (k = 1, 2, 4, ...)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="out", help="the pipeline's folder: RUNS/seed-S/{sft,rm}")
    p.add_argument("--out", default="out/science/overoptimization", help="where results go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reward-models", nargs="+", default=["rm", "rm-small"],
                   help="folders under RUNS/seed-S; rm-small is trained here when missing")
    p.add_argument("--problems", type=int, default=100, help="held-out problems")
    p.add_argument("--samples", type=int, default=64, help="n: answers per problem (k <= n)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer budget")
    p.add_argument("--batch-size", type=int, default=256, help="answers per generate call")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--rm-flags", default="", help="more flags for training rm-small, one string")
    args = p.parse_args(argv)
    if args.samples < 2 or args.problems < 1 or args.temperature <= 0:
        p.error("--samples must be >= 2, --problems >= 1 and --temperature > 0")
    runs, out = Path(args.runs), Path(args.out)
    missing = [str(runs / f"seed-{s}" / d) for s in args.seeds
               for d in ["sft", *[r for r in args.reward_models if r != "rm-small"]]
               if not (runs / f"seed-{s}" / d / "config.json").exists()]
    if missing:
        print(f"overoptimization: no model at {', '.join(missing)}; run `python -m "
              f"minipost.pipeline --seeds {' '.join(map(str, args.seeds))} --out {runs}` first",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bon.jsonl"
    key = dict(problems=args.problems, samples=args.samples, temperature=args.temperature)
    rows = [r for r in (json.loads(x) for x in log.read_text().splitlines())
            if all(r.get(k) == v for k, v in key.items())] if log.exists() else []
    for seed in args.seeds:
        todo = [rm for rm in args.reward_models
                if not any(r["seed"] == seed and r["rm"] == rm for r in rows)]
        if not todo:
            continue
        small = runs / f"seed-{seed}" / "rm-small"
        if "rm-small" in todo and not (small / "results.json").exists():
            cmd = [sys.executable, "train_rm.py", "--init", str(runs / f"seed-{seed}" / "sft"),
                   "--out-dir", str(small), "--seed", str(seed), *SMALL_RM,
                   *(["--threads", str(args.threads)] if args.threads else []),
                   *args.rm_flags.split()]
            print("$", " ".join(cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode:
                print(f"overoptimization: training {small} failed", file=sys.stderr)
                return 1
        t0 = time.time()
        sampled = sample_and_score(runs, seed, todo, args)
        minutes = (time.time() - t0) / 60
        with open(log, "a") as f:
            for rm in todo:
                row = {"seed": seed, "rm": rm, **key, **curves(sampled, rm, args.samples),
                       "sampling_minutes": minutes}
                f.write(json.dumps(row) + "\n")
                rows.append(row)
    table = {}
    for rm in args.reward_models:
        mine = {r["seed"]: r for r in rows if r["rm"] == rm}
        peak = {s: max(range(len(r["gold"])), key=lambda i: r["gold"][i]) for s, r in mine.items()}
        table[f"{rm}: pairwise accuracy, own answers"] = {s: r["pairwise_accuracy"]
                                                         for s, r in mine.items()}
        table[f"{rm}: gold at k = 1"] = {s: r["gold"][0] for s, r in mine.items()}
        table[f"{rm}: gold at its peak"] = {s: r["gold"][peak[s]] for s, r in mine.items()}
        table[f"{rm}: k of the peak"] = {s: float(r["k"][peak[s]]) for s, r in mine.items()}
        table[f"{rm}: gold at k = {args.samples}"] = {s: r["gold"][-1] for s, r in mine.items()}
        table[f"{rm}: proxy gain, k = 1 to {args.samples}"] = {
            s: r["proxy"][-1] - r["proxy"][0] for s, r in mine.items()}
    title = (f"best-of-k from the SFT policy: {args.problems} held-out problems × "
             f"{args.samples} samples at T = {args.temperature}, seeds "
             f"{' '.join(map(str, args.seeds))}")
    text = f"# Reward over-optimisation ({title})\n\n" + seed_table(table, args.seeds)
    (out / "summary.md").write_text(text)
    print(text)
    plot(rows, args.reward_models, args.seeds, out / "overoptimization.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
