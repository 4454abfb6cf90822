"""minipost.plot: the panels of a real tiny run, read from the figure's axes; runs overlaid and
labelled by folder; evaluations as points with their 95% intervals; --metrics; the one-line errors
(no run directory, no matplotlib)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipost import plot
from minipost.cli import user_errors
from minipost.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real pretrain.py run with tiny flags, evaluated on the way and at the end."""
    import pretrain
    from conftest import TINY_PRETRAIN
    out = tmp_path_factory.mktemp("plot") / "base"
    threads = torch.get_num_threads()
    try:
        pretrain.main(pretrain.Args(out_dir=str(out), **{**TINY_PRETRAIN, "max_steps": 4,
                                                         "eval_every": 2, "eval_problems": 4}))
    finally:
        torch.set_num_threads(threads)
    return out


def write_run(path: Path, records) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grpo_like(seed: int):
    return [{"step": 0, "eval/accuracy": 0.40 + seed / 100, "eval/accuracy_ci95": 0.04,
             "eval/n": 500, "time": 1.0},
            {"step": 1, "reward/mean": 0.3, "frac_reward_zero_std": 0.5, "kl": 0.0, "loss": 0.01,
             "policy/clipfrac": 0.1, "grad_norm": 1.0, "lr": 1e-6, "skipped": 0},
            {"step": 2, "reward/mean": 0.4, "frac_reward_zero_std": 0.4, "kl": 0.01, "loss": -0.02,
             "policy/clipfrac": 0.2, "grad_norm": 1.1, "lr": 2e-6, "skipped": 0},
            {"step": 2, "eval/accuracy": 0.50, "eval/accuracy_ci95": 0.05, "eval/n": 500,
             "peak_rss_mb": 300.0, "seconds_per_step": 0.2, "stopped_by": "max_steps"},
            {"iterations": 2, "accuracy": 0.5}]                   # a summary line without a step


def test_a_tiny_run_gives_a_png_with_a_panel_per_metric_grouped_by_kind(tiny_run, tmp_path, mpl):
    out = tmp_path / "curves.png"
    titles = plot.plot_runs([tiny_run], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pretrain.py logs loss, grad_norm, lr while training; eval/loss and the probes on evaluation
    assert titles[0] == "loss"
    assert {"loss", "grad_norm", "lr", "eval/loss", "eval/accuracy"} <= set(titles)
    assert not {"time", "skipped", "step", "eval/n", "peak_rss_mb", "tokens_per_s"} & set(titles)
    runs = {"base": plot.read_curves(tiny_run)}
    fig = plot.make_figure(runs)
    assert [ax.get_title() for ax in fig.axes] == titles
    kinds = [sub._suptitle.get_text() for sub in fig.subfigs]
    assert kinds == ["losses", "evaluation", "other"]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert by_title["loss"].get_lines()[0].get_label() == "base"
    assert len(by_title["eval/loss"].get_lines()[0].get_xdata()) >= 2     # step 2 and the end


def test_runs_are_overlaid_and_labelled_by_folder_and_evaluations_carry_their_intervals(tmp_path,
                                                                                        mpl):
    a = write_run(tmp_path / "seed0" / "grpo", grpo_like(0))
    b = write_run(tmp_path / "seed1" / "grpo", grpo_like(1))
    assert plot.run_labels([a, b]) == ["seed0/grpo", "seed1/grpo"]     # same folder names
    assert plot.run_labels([a, tmp_path / "ppo"]) == ["grpo", "ppo"]
    fig = plot.make_figure(dict(zip(plot.run_labels([a, b]), map(plot.read_curves, [a, b]))))
    assert [ax.get_title() for ax in fig.axes] == [
        "reward/mean", "frac_reward_zero_std", "kl", "policy/clipfrac", "loss", "eval/accuracy",
        "grad_norm", "lr"]
    assert [s._suptitle.get_text() for s in fig.subfigs] == list(plot.KINDS)
    ax = {a.get_title(): a for a in fig.axes}
    assert [ln.get_label() for ln in ax["kl"].get_lines()] == ["seed0/grpo", "seed1/grpo"]
    # held-out points, no line between them; error bars of ± ci95 around each
    bars = ax["eval/accuracy"].containers[0]
    assert bars.has_yerr and bars.lines[0].get_linestyle() == "None"
    (lo_hi,) = bars.lines[2]
    segments = [seg[:, 1].tolist() for seg in lo_hi.get_segments()]
    assert segments == [pytest.approx([0.36, 0.44]), pytest.approx([0.45, 0.55])]


def test_metrics_picks_names_and_globs_and_names_what_the_runs_log(tmp_path, mpl):
    run = write_run(tmp_path / "grpo", grpo_like(0))
    titles = plot.plot_runs([run], tmp_path / "sub.png", metrics=["reward/*", "kl", "eval/*"])
    assert titles == ["reward/mean", "kl", "eval/accuracy"]
    with pytest.raises(UserError, match="--metrics entropy: no run logs it .*reward/mean"):
        plot.plot_runs([run], tmp_path / "none.png", metrics=["entropy"])


def test_read_curves_skips_summaries_and_bookkeeping_and_reads_before_at_step_0_as_eval(tmp_path):
    run = write_run(tmp_path / "dpo", [
        {"step": 0, "before/accuracy": 0.3, "before/accuracy_ci95": 0.04, "before/n": 8},
        {"step": 2, "loss": 0.6, "logps/chosen": -10.0, "skipped": 0, "time": 0.1},
        {"step": 3, "eval/accuracy": 0.5, "eval/accuracy_ci95": 0.05, "before/accuracy": 0.3,
         "loss_step0": 0.69, "eval/identity_example": "I am Pip", "flag": True},
        {"accuracy": 0.5}])
    curves = plot.read_curves(run)
    assert list(curves) == ["eval/accuracy", "loss", "logps/chosen"]
    assert curves["eval/accuracy"] == {"steps": [0, 3], "values": [0.3, 0.5], "ci95": [0.04, 0.05]}
    assert curves["loss"]["ci95"] is None


def test_kind_of_sorts_the_scripts_names_into_panels():
    expect = {"reward": ["reward/mean", "gold/mean", "rlhf_reward", "rewards/margins",
                         "frac_reward_zero_std", "reward/sampled_accuracy"],
              "KL and entropy": ["kl", "policy/approx_kl", "kl_coef", "entropy"],
              "clipping and ratios": ["policy/clipfrac", "value/clipfrac", "policy/ratio_mean",
                                      "sampler_logp_max_diff", "rollout/logp_mismatch"],
              "losses": ["loss", "loss/dpo", "loss/value"],
              "evaluation": ["eval/accuracy", "eval/reward", "eval_policy/accuracy"],
              "other": ["grad_norm", "lr", "completions/clipped_ratio", "logps/chosen",
                        "value/explained_variance"]}
    assert {k: [plot.kind_of(n) for n in names] for k, names in expect.items()} == {
        k: [k] * len(names) for k, names in expect.items()}


def test_a_missing_run_directory_is_one_line_and_exit_code_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minipost.plot", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no metrics.jsonl "
                                             "(is this a run directory?)"]


def test_without_matplotlib_the_error_names_the_install_command(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "grpo", grpo_like(0))
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)              # every matplotlib import fails
    with pytest.raises(SystemExit) as e, user_errors():
        plot.main([str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
    assert not (run / "curves.png").exists()


def test_matplotlib_is_imported_by_the_plot_module_only_and_only_when_drawing():
    r = subprocess.run([sys.executable, "-c", "import sys, minipost.plot, minipost.diagnostics; "
                        "print('matplotlib' in sys.modules)"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.stdout.strip() == "False"
    for path in (ROOT / "minipost").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        uses = any(n.split(".")[0] == "matplotlib" for n in names)
        assert uses == (path.name == "plot.py"), path.name
