"""Shared fixtures for the script tests: one tiny checkpoint per test session.

`tiny_sft_dir` is what every stage script starts from in its end-to-end test: a tiny Llama-style
model (hidden 32, 2 layers) and its tokenizer (ChatML special tokens included), made once per
session by `pretrain.main` with tiny flags (a few seconds on one CPU thread). It is only a few
steps of pretraining, not a real SFT model: the scripts' end-to-end tests check that they run and
save, not what they learn. Tests must not write into it (copy it, or use it as `--init` only).

`watched` runs a script with a fake TensorBoard writer and a watcher that fires at once;
`warnings_of(out)` reads the warnings the run logged.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

# the stage scripts (pretrain.py, train_*.py) live in the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TINY_PRETRAIN = dict(n_docs=300, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                     num_kv_heads=2, intermediate_size=64, seq_len=64, batch_size=8, max_steps=3,
                     warmup_steps=1, eval_every=1000, eval_windows=4, eval_problems=0, threads=1,
                     device="cpu", init_std=0.02)  # 0.02: a 3-step model that ends some answers
                                                   # within 24 tokens (train_rm's policy pairs)


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
    """Path (str) of a tiny checkpoint directory usable as any script's `--init`."""
    import pretrain
    out = tmp_path_factory.mktemp("tiny") / "sft"
    threads = torch.get_num_threads()
    try:
        pretrain.main(pretrain.Args(out_dir=str(out), **TINY_PRETRAIN))
    finally:
        torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_sft_dir, tmp_path_factory):
    """Path (str) of a reward model on the tiny checkpoint, its score head drawn at random (std
    0.1, so its scores differ), for PPO's tests."""
    from minipost.checkpoint import save_model
    from minipost.peft import load_model
    torch.manual_seed(0)
    rm = load_model(tiny_sft_dir, head="score")
    torch.nn.init.normal_(rm.score.weight, std=0.1)
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_model(rm, path)
    return str(path)


class FakeSummaryWriter:
    """The two methods of torch's SummaryWriter that cli.Metrics calls, recording the scalars."""

    def __init__(self, log_dir):
        self.log_dir, self.scalars = log_dir, {}

    def add_scalar(self, tag, value, global_step):
        self.scalars.setdefault(tag, []).append((global_step, value))

    def flush(self):
        pass


@pytest.fixture
def watched(monkeypatch):
    """A script run under this fixture reports to a fake TensorBoard (`--report-to tensorboard`,
    whether or not tensorboard is installed) and its loss-plateau watcher fires at the first
    training record (a plateau of one value). Returns the list of writers the run made."""
    from minipost import cli, diagnostics
    writers = []

    def make(log_dir):
        writers.append(FakeSummaryWriter(log_dir))
        return writers[-1]

    monkeypatch.setattr(cli, "summary_writer_class", lambda: make)
    monkeypatch.setattr(diagnostics, "LOSS_FLAT_STEPS", 1)
    return writers


def warnings_of(out) -> list[dict]:
    """The {"step", "warning"} records of a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "warning" in x]
