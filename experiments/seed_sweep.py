"""Is a pretraining recipe a reliable instrument? Pretrain (and SFT) it over several seeds.

    python experiments/seed_sweep.py --name default                    # seeds 0 1 2, base + SFT
    python experiments/seed_sweep.py --name wd05 -- --weight-decay 0.5 # flags after -- go to pretrain.py
    python experiments/seed_sweep.py --name default --seeds 0 1 2 3 4 --no-sft

Each seed gets its own folder, `out/sweeps/NAME/seed-S/{base,sft}`, and a stage whose
`results.json` exists is not run again, so a stopped sweep continues where it stopped. The table at
the end (also `out/sweeps/NAME/summary.md`) gives, over seeds, the base model's held-out loss and
accuracy, its arithmetic probe (bare held-out equations: all digits, the last digit alone, the
leading digits alone) and the accuracy after SFT with `train_sft.py`'s defaults. A recipe is a
reliable instrument when the spread over seeds is small; the probe says why it is not: a base that
never learned the units digit's lookup ends far lower after SFT than one that did.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minipost.stats import seed_table  # noqa: E402

COLUMNS = {"base: held-out loss": ("base", "eval/loss"),
           "base: accuracy": ("base", "eval/accuracy"),
           "base: equations": ("base", "eval/equations_accuracy"),
           "base: equations, last digit": ("base", "eval/equations_last_digit"),
           "base: equations, leading digits": ("base", "eval/equations_leading_digits"),
           "sft: accuracy": ("sft", "eval/accuracy")}


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"seed_sweep: failed (exit code {rc}); see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the sweep's folder under --out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    p.add_argument("--out", default="out/sweeps", help="root of every sweep's folders")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0 = default)")
    p.add_argument("--no-sft", action="store_true", help="pretrain only")
    p.add_argument("pretrain_flags", nargs=argparse.REMAINDER,
                   help="after --: flags for pretrain.py")
    args = p.parse_args(argv)
    extra = [f for f in args.pretrain_flags if f != "--"]
    root = Path(args.out) / args.name
    common = ["--device", "cpu", "--threads", str(args.threads)]
    for seed in args.seeds:
        d = root / f"seed-{seed}"
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "base" / "results.json").exists():
            run([sys.executable, "pretrain.py", "--seed", str(seed), "--out-dir", str(d / "base"),
                 *common, *extra], d / "base.log")
        if not args.no_sft and not (d / "sft" / "results.json").exists():
            run([sys.executable, "train_sft.py", "--init", str(d / "base"), "--seed", str(seed),
                 "--out-dir", str(d / "sft"), *common], d / "sft.log")
    rows = {}
    for name, (stage, key) in COLUMNS.items():
        for seed in args.seeds:
            path = root / f"seed-{seed}" / stage / "results.json"
            if path.exists():
                rows.setdefault(name, {})[seed] = json.loads(path.read_text()).get(key)
    table = seed_table(rows, args.seeds)
    (root / "summary.md").write_text(f"# {args.name}: pretrain.py {' '.join(extra)}\n\n{table}")
    print(table)
    return rows


if __name__ == "__main__":
    main()
