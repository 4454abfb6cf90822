"""experiments/: each script end to end with tiny settings."""
import importlib.util
from pathlib import Path

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
