"""cli.Metrics: the watchers' warnings in metrics.jsonl and on stdout, once; --report-to
tensorboard (a fake SummaryWriter, the real one when tensorboard is installed, and its absence)."""
import json
import sys

import pytest

from minipost import cli, diagnostics
from minipost.errors import UserError


def read_lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_watcher_warning_is_one_line_printed_and_one_record_with_its_step(tmp_path, capsys):
    metrics = cli.Metrics(tmp_path)
    metrics.watch("sft")                       # LossPlateau: 20 equal losses is a stuck run
    for step in range(diagnostics.LOSS_FLAT_STEPS + 5):
        metrics.log({"step": step, "loss": 2.0, "grad_norm": 1.0})
    metrics.log({"step": 30, "eval/loss": 2.0}, echo=True)
    warnings = [x for x in read_lines(tmp_path) if "warning" in x]
    assert len(warnings) == 1                  # once, not at every later step
    assert warnings[0]["step"] == diagnostics.LOSS_FLAT_STEPS - 1
    assert warnings[0]["warning"].startswith("the loss has stopped moving")
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning")]
    assert printed == [f"warning (step {diagnostics.LOSS_FLAT_STEPS - 1}): "
                       f"{warnings[0]['warning']}"]
    assert metrics.n_lines == diagnostics.LOSS_FLAT_STEPS + 5 + 1 + 1   # a resume point counts it


def test_floats_keep_6_significant_digits_and_nan_is_null(tmp_path):
    """A GRPO loss of ~1e-9 (zero-mean advantages, ratio 1) must not be logged as 0.0: twenty
    zeros would read as a stuck loss. NaN (PPO's reward-model score without one) is JSON's null."""
    metrics = cli.Metrics(tmp_path)
    metrics.watch("grpo")
    tiny = [(-1) ** s * (1 + s) * 1.234567891e-9 for s in range(diagnostics.LOSS_FLAT_STEPS + 5)]
    for step, loss in enumerate(tiny):
        metrics.log({"step": step, "loss": loss, "lr": 5e-7, "reward/mean": float("nan"),
                     "kl": float("inf"), "n": 3})
    lines = read_lines(tmp_path)       # json.loads would also accept NaN; the text must not hold it
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    assert [x["loss"] for x in lines] == [float(f"{v:.6g}") for v in tiny]
    assert lines[0]["lr"] == 5e-7 and lines[0]["reward/mean"] is None and lines[0]["kl"] is None
    assert lines[0]["n"] == 3
    assert all("warning" not in x for x in lines)


def test_without_watch_or_on_another_rank_nothing_is_watched(tmp_path):
    quiet, other_rank = cli.Metrics(tmp_path / "a"), cli.Metrics(tmp_path / "b", is_main=False)
    other_rank.watch("sft")
    for step in range(diagnostics.LOSS_FLAT_STEPS + 1):
        quiet.log({"step": step, "loss": 2.0})
        other_rank.log({"step": step, "loss": 2.0})
    assert all("warning" not in x for x in read_lines(tmp_path / "a"))
    assert not (tmp_path / "b").exists()


class FakeWriter:
    """The two methods of SummaryWriter that Metrics calls, recording the scalars."""
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.flushes = log_dir, [], 0
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def flush(self):
        self.flushes += 1


def test_report_to_tensorboard_writes_every_number_at_its_step(tmp_path, monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(cli, "summary_writer_class", lambda: FakeWriter)
    metrics = cli.Metrics(tmp_path, report_to="tensorboard")
    assert not FakeWriter.made                 # nothing is made before the first log
    metrics.log({"step": 3, "loss": 1.5, "lr": 1e-3, "skipped": 0, "peft": "lora", "ok": True})
    metrics.log({"eval/accuracy": 0.25, "eval/pass@k": [0.25, 0.5]})   # a summary: last step
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("loss", 1.5, 3), ("lr", 1e-3, 3), ("skipped", 0, 3),
                              ("eval/accuracy", 0.25, 3)]
    assert writer.flushes == 2
    assert [x["step"] for x in read_lines(tmp_path) if "step" in x] == [3]   # jsonl unchanged


def test_report_to_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    with pytest.raises(UserError, match="pip install tensorboard"):
        cli.Metrics(tmp_path, report_to="tensorboard")
    assert not any(tmp_path.iterdir())


def test_report_to_tensorboard_event_files_read_back_the_same_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics = cli.Metrics(tmp_path, report_to="tensorboard")
    for step, loss in [(0, 2.5), (10, 1.25), (20, 0.75)]:
        metrics.log({"step": step, "loss": loss, "grad_norm": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 2.5), (10, 1.25),
                                                                   (20, 0.75)]
    assert set(events.Tags()["scalars"]) == {"loss", "grad_norm"}
