"""experiments/: each script end to end with tiny settings."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_sweep_runs_each_seed_in_its_folder_skips_done_ones_and_tabulates(tmp_path):
    sweep = load("seed_sweep")
    tiny = ["--n-docs", "300", "--vocab-size", "300", "--hidden-size", "32", "--num-layers", "2",
            "--num-heads", "2", "--num-kv-heads", "2", "--intermediate-size", "64",
            "--seq-len", "64", "--max-steps", "2", "--eval-windows", "4", "--eval-problems", "4",
            "--eval-equations", "8"]
    argv = ["--name", "tiny", "--seeds", "0", "1", "--out", str(tmp_path), "--threads", "1",
            "--no-sft", "--", *tiny]
    rows = sweep.main(argv)
    assert set(rows["base: equations, last digit"]) == {0, 1}
    assert (tmp_path / "tiny" / "seed-1" / "base" / "results.json").exists()
    summary = (tmp_path / "tiny" / "summary.md").read_text()
    assert "| base: accuracy |" in summary and "seed 0 | seed 1" in summary
    stamp = (tmp_path / "tiny" / "seed-0" / "base" / "results.json").stat().st_mtime
    sweep.main(argv)                                     # done seeds are not run again
    assert (tmp_path / "tiny" / "seed-0" / "base" / "results.json").stat().st_mtime == stamp


def test_online_rl_runs_each_method_and_seed_in_its_folder_skips_done_ones_and_tabulates(
        tiny_sft_dir, tmp_path):
    """One method of each script (train_ppo, train_grpo with GSPO, train_dpo --online), tiny."""
    sweep = load("online_rl")
    argv = ["--init", tiny_sft_dir, "--out", str(tmp_path), "--methods", "ppo", "gspo",
            "online_dpo", "--seeds", "0", "--budget", "16", "--prompts", "2", "--group", "4",
            "--ppo-batch", "4", "--eval-problems", "4", "--max-new-tokens", "8", "--threads", "1",
            "--grpo-flags", "--n-prompts 40 --micro-batch-size 4",
            "--ppo-flags", "--n-prompts 40 --mini-batch-size 2",
            "--dpo-flags", "--n-pairs 40 --eval-pairs 16 --n-identity 8 --max-length 128",
            "--", "--max-new-tokens", "8"]
    results = sweep.main(argv)
    assert [r["method"] for r in results] == ["ppo", "gspo", "online_dpo"]
    for r in results:
        assert r["n"] == 4 and 0 <= r["pass@1"] <= r["pass@8"] <= 1 and r["minutes"] > 0
        assert (tmp_path / r["method"] / "seed-0" / "model.safetensors").exists()
    gspo = [json.loads(x) for x in (tmp_path / "gspo" / "seed-0" / "metrics.jsonl").read_text()
            .splitlines()]
    assert max(x["step"] for x in gspo) == 4          # budget 16 / (2 × 4) batches, μ = 2 each
    assert results[1]["completions_k"] == 0.016
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["method"] == "ppo"
    summary = (tmp_path / "summary.md").read_text()
    assert "## greedy pass@1 gain" in summary and "| online_dpo |" in summary
    stamp = (tmp_path / "gspo" / "seed-0" / "eval.json").stat().st_mtime
    sweep.main(argv)                                     # done runs are not run again
    assert (tmp_path / "gspo" / "seed-0" / "eval.json").stat().st_mtime == stamp


def test_pass_at_k_samples_each_seed_and_policy_once_and_tabulates_the_gain(tiny_sft_dir,
                                                                             tmp_path):
    """Both policies the same tiny model: GRPO − SFT is within sampling noise, the curve rises."""
    exp = load("pass_at_k")
    for seed in (0, 1):
        for name in ("sft", "grpo"):
            (tmp_path / "runs" / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "runs" / f"seed-{seed}" / name).symlink_to(tiny_sft_dir)
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--seeds", "0", "1",
            "--problems", "3", "--samples", "4", "--max-new-tokens", "8", "--threads", "1"]
    assert exp.main(argv) == 0
    lines = [json.loads(x) for x in (out / "passk.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["policy"]) for r in lines] == [(0, "sft"), (0, "grpo"), (1, "sft"),
                                                         (1, "grpo")]
    for r in lines:
        assert len(r["pass@k"]) == 4 and r["n"] == 3
        assert all(a <= b + 1e-12 for a, b in zip(r["pass@k"], r["pass@k"][1:]))
    summary = (out / "summary.md").read_text()
    assert "| GRPO − SFT at k = 4 |" in summary and "| sft pass@2 |" in summary
    assert exp.main(argv) == 0                           # nothing sampled again
    assert len((out / "passk.jsonl").read_text().splitlines()) == 4
    assert exp.main(["--runs", str(tmp_path / "nowhere"), *argv[2:]]) == 2   # no policies: a clear error


def test_pass_at_k_crossover_is_the_first_k_where_sft_reaches_grpo():
    exp = load("pass_at_k")
    assert exp.crossover([0.5, 0.7, 0.9], [0.6, 0.7, 0.8]) == 2
    assert exp.crossover([0.5, 0.6], [0.6, 0.7]) is None
    assert exp.ks_shown(64) == [1, 2, 4, 8, 16, 32, 64] and exp.ks_shown(6) == [1, 2, 4, 6]


def test_best_of_k_weights_every_k_subset_by_its_best_sample():
    """n = 3, proxy ranks c < a < b. k = 1: the plain mean; k = 2: of the subsets {a,b} {a,c}
    {b,c} the best are b, a, b; k = 3: always b."""
    exp = load("overoptimization")
    proxy, gold = [0.5, 0.9, 0.1], [1.0, 0.0, 1.0]          # a, b, c
    assert exp.best_of_k(proxy, gold, 1) == pytest.approx((2 / 3, 0.5))
    assert exp.best_of_k(proxy, gold, 2) == pytest.approx((1 / 3, (0.9 + 0.5 + 0.9) / 3))
    assert exp.best_of_k(proxy, gold, 3) == pytest.approx((0.0, 0.9))
    assert exp.kl_best_of_k(1) == 0 and exp.kl_best_of_k(4) == pytest.approx(math.log(4) - 0.75)


def test_overoptimization_trains_the_small_rm_samples_once_and_tabulates(tiny_sft_dir, tiny_rm_dir,
                                                                        tmp_path):
    exp = load("overoptimization")
    seed = tmp_path / "runs" / "seed-0"
    seed.mkdir(parents=True)
    (seed / "sft").symlink_to(tiny_sft_dir)
    (seed / "rm").symlink_to(tiny_rm_dir)
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--seeds", "0", "--problems", "3",
            "--samples", "4", "--max-new-tokens", "8", "--threads", "1", "--rm-flags",
            "--n-pairs 48 --n-identity 16 --eval-problems 16 --batch-size 8 --max-steps 2 "
            "--max-length 128 --eval-policy-problems 0 --device cpu"]
    assert exp.main(argv) == 0
    assert (seed / "rm-small" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (out / "bon.jsonl").read_text().splitlines()]
    assert [r["rm"] for r in rows] == ["rm", "rm-small"]
    for r in rows:
        assert r["k"] == [1, 2, 4] and r["kl"][0] == 0 and len(r["gold"]) == 3
        assert r["proxy"][0] <= r["proxy"][1] <= r["proxy"][2]   # best-of-k: the proxy only rises
    assert "| rm-small: gold at its peak |" in (out / "summary.md").read_text()
    assert exp.main(argv) == 0                                   # nothing sampled again
    assert len((out / "bon.jsonl").read_text().splitlines()) == 2


def test_length_bias_runs_the_three_aggregations_and_tabulates_the_gap(tiny_sft_dir, tmp_path):
    exp = load("length_bias")
    argv = ["--init", tiny_sft_dir, "--sweep", str(tmp_path), "--seeds", "0", "--budget", "16",
            "--threads", "1", "--", "--prompts", "2", "--group", "4", "--eval-problems", "4",
            "--max-new-tokens", "8", "--grpo-flags", "--n-prompts 40 --micro-batch-size 4",
            "--", "--max-new-tokens", "8"]
    rows = exp.main(argv)
    for m in ("grpo", "dr_grpo", "dapo"):
        assert (tmp_path / m / "seed-0" / "eval.json").exists()
        assert set(rows[f"{m}: wrong − right, last quarter"]) == {0}
    assert "| dr_grpo: wrong − right, first quarter |" in (tmp_path / "length_bias.md").read_text()
    assert exp.quarter_gap([(10, 12), (10, 14), (11, 11), (9, 15)], last=True) == 6
    assert exp.quarter_gap([], last=False) is None
