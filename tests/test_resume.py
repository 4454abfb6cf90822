"""Resume, graceful stop and the NaN guard, on pretrain.py (docs/pitfalls.md, "Deterministic
resume")."""
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_PRETRAIN
from minipost.resume import NonFiniteError, check_finite, latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FLAGS = {**TINY_PRETRAIN, "hidden_size": 64, "seq_len": 128, "batch_size": 16, "max_steps": 24,
         "save_every": 12, "eval_every": 8}


def cmd(out_dir, **over):
    args = [sys.executable, "pretrain.py", "--out-dir", str(out_dir)]
    for k, v in {**FLAGS, **over}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def metric_lines(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in ("time", "train_minutes", "tokens_per_s",
                                                      "peak_rss_mb")} for x in lines]


def test_killed_and_resumed_run_is_bit_identical_to_a_straight_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(cmd(straight), cwd=ROOT, check=True, capture_output=True, env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)                              # a moment after the checkpoint, mid-step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    subprocess.run(cmd(killed, resume=killed), cwd=ROOT, check=True, capture_output=True, env=env,
                   timeout=300)

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_lines(straight) == metric_lines(killed)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out, max_steps=2000, save_every=0), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert "resume with --resume" in stdout
    assert latest_checkpoint(out) is not None


def test_check_finite_names_step_and_quantity():
    check_finite(3, loss=torch.tensor(1.0), grad_norm=2.0)
    with pytest.raises(NonFiniteError, match="step 7: grad_norm is inf"):
        check_finite(7, loss=1.0, grad_norm=float("inf"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import pretrain
    calls = {"n": 0}
    real = torch.nn.functional

    def cross_entropy(*a, **k):
        calls["n"] += 1
        loss = real.cross_entropy(*a, **k)
        return loss * float("nan") if calls["n"] == 4 else loss   # the 4th training step

    monkeypatch.setattr(pretrain, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    out = tmp_path / "nan"
    args = pretrain.Args(out_dir=str(out), **{**TINY_PRETRAIN, "max_steps": 6, "save_every": 2})
    threads = torch.get_num_threads()
    try:
        with pytest.raises(NonFiniteError, match="step 3: loss is nan"):
            pretrain.main(args)
        assert latest_checkpoint(out).name == "step-00000002"
        assert not (out / "model.safetensors").exists()
        calls["n"] = -100                                           # no NaN this time
        skipped = pretrain.Args(**{**vars(args), "out_dir": str(tmp_path / "skip"),
                                   "skip_nonfinite": True})
        calls["n"] = 0
        pretrain.main(skipped)
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert max(x.get("skipped", 0) for x in lines) == 1


def test_due_is_every_nth_step_and_never_for_0():
    from minipost.resume import due
    assert [s for s in range(10) if due(3, s, s + 1)] == [2, 5, 8]     # steps 3, 6, 9 done
    assert due(4, 2, 5) and not due(4, 4, 7)                          # μ = 3 steps at a time
    assert not any(due(0, s, s + 1) for s in range(10))
