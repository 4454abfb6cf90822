"""Every stage script survives (issue 10): a run killed with SIGKILL after a checkpoint and resumed
with --resume ends bit-identical to a straight run (weights and metrics lines); a NaN/inf loss
stops the run with one line and keeps the last good checkpoint, or is skipped and counted. A run
resumed from a checkpoint of its last step, or one of zero steps, never enters its training loop
and still ends as it should."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minipost.resume import NonFiniteError, latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("time", "train_minutes", "tokens_per_s", "pairs_per_s", "peak_rss_mb", "eval_seconds",
          "gen_seconds", "step_seconds", "minutes", "seconds_per_step", "seconds_per_iteration")
COMMON = dict(device="cpu", threads=1, eval_problems=0, seed=0)
SCRIPTS = {
    "train_sft.py": dict(n_train=400, batch_size=8, max_steps=40, save_every=10, eval_every=15,
                         eval_chats=16, eval_quick=0, warmup_steps=2, max_length=128),
    "train_dpo.py": dict(n_pairs=200, n_identity=20, batch_size=8, max_steps=40, save_every=10,
                         eval_every=15, eval_pairs=16, max_length=128, warmup_steps=2),
    "train_grpo.py": dict(n_prompts=64, batch_prompts=2, group_size=4, max_new_tokens=12,
                          max_steps=16, save_every=4, eval_every=6, pass_k=0, max_minutes=0,
                          micro_batch_size=8, beta=0.04),
    "train_ppo.py": dict(n_prompts=64, batch_size=4, mini_batch_size=2, ppo_epochs=2,
                         max_new_tokens=12, max_steps=12, save_every=3, eval_every=5,
                         max_minutes=0, reward="gold", value_init="policy", target_kl=0.5),
    "train_rm.py": dict(n_pairs=200, n_identity=20, batch_size=8, max_steps=40, save_every=10,
                        eval_every=15, max_length=128, warmup_steps=2, policy_problems=16,
                        eval_policy_problems=4, max_new_tokens=16),
}


def cmd(script, init, out_dir, **over):
    args = [sys.executable, script, "--init", str(init), "--out-dir", str(out_dir)]
    for k, v in {**COMMON, **SCRIPTS[script], **over}.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def metric_lines(out_dir):
    lines = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in TIMING} for x in lines]


def final_weights(out_dir):
    return load_file(str(Path(out_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_killed_and_resumed_run_is_bit_identical_to_a_straight_run(script, tiny_sft_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(cmd(script, tiny_sft_dir, straight), cwd=ROOT, check=True, capture_output=True,
                   env=env, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(script, tiny_sft_dir, killed), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.02)                              # a moment after the first checkpoint, mid-step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(cmd(script, tiny_sft_dir, killed, resume=killed), cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_lines(straight) == metric_lines(killed)


@pytest.mark.parametrize("script", ["train_dpo", "train_sft"])
def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(script, tiny_sft_dir,
                                                                     tmp_path, monkeypatch):
    module = __import__(script)
    name = "dpo_loss" if script == "train_dpo" else "batch_loss_sum"
    real, calls = getattr(module, name), {"n": 0}

    def poisoned(*a, **k):            # the 4th training step's loss is NaN
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] != 4:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(module, name, poisoned)
    flags = {**COMMON, **SCRIPTS[script + ".py"], "max_steps": 6, "save_every": 2,
             "eval_every": 0, "init": tiny_sft_dir}
    if script == "train_sft":
        flags["eval_chats"] = 0       # no held-out loss before training: step 1 is the 1st call
    else:
        flags["eval_pairs"] = 4       # scored by pair_logps, not dpo_loss
    out = tmp_path / "nan"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(NonFiniteError, match="step 3: loss is nan"):
            module.main(module.Args(out_dir=str(out), **flags))
        assert latest_checkpoint(out).name == "step-00000002"
        assert not (out / "model.safetensors").exists()
        calls["n"] = 0
        module.main(module.Args(out_dir=str(tmp_path / "skip"), skip_nonfinite=True, **flags))
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert max(x.get("skipped", 0) for x in lines) == 1
    assert (tmp_path / "skip" / "model.safetensors").exists()


FINISHED = {  # tiny in-process runs of 2 steps, checkpointed at the last one
    "pretrain": dict(n_docs=300, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                     num_kv_heads=2, intermediate_size=64, seq_len=64, batch_size=8,
                     warmup_steps=1, eval_every=1, eval_windows=4),
    "train_sft": dict(n_train=40, batch_size=4, eval_every=1, eval_chats=4, eval_quick=0,
                      warmup_steps=1, max_length=128),
    "train_rm": dict(n_pairs=16, n_identity=4, batch_size=4, eval_every=1, max_length=128,
                     warmup_steps=1, policy_problems=0, eval_policy_problems=0),
    "train_dpo": dict(pairs="planted", n_pairs=16, n_identity=4, batch_size=4, eval_every=1,
                      eval_pairs=4, max_length=128, warmup_steps=1, max_new_tokens=8),
    "train_grpo": dict(n_prompts=16, batch_prompts=2, group_size=2, max_new_tokens=8,
                       eval_every=1, pass_k=0, max_minutes=0, micro_batch_size=4),
    "train_ppo": dict(n_prompts=16, batch_size=2, mini_batch_size=2, ppo_epochs=1,
                      max_new_tokens=8, eval_every=1, max_minutes=0, reward="gold",
                      value_init="policy", target_kl=0.5),
}


@pytest.mark.parametrize("script", sorted(FINISHED))
def test_resuming_a_finished_run_ends_it_again_as_it_ended(script, tiny_sft_dir, tmp_path):
    """--resume of a run whose last checkpoint is its last step trains nothing, and ends as the
    run ended: the same final evaluation, results and weights."""
    module = __import__(script)
    flags = {**COMMON, **FINISHED[script], "max_steps": 2, "save_every": 2}
    if script != "pretrain":
        flags["init"] = tiny_sft_dir
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        first = module.main(module.Args(out_dir=str(out), **flags))
        lines, weights = metric_lines(out), final_weights(out)
        assert latest_checkpoint(out).name == "step-00000002"
        again = module.main(module.Args(out_dir=str(out), resume=str(out), **flags))
    finally:
        torch.set_num_threads(threads)
    untimed = lambda res: {k: v for k, v in res.items() if k not in TIMING}   # noqa: E731
    assert untimed(again) == untimed(first)
    assert metric_lines(out) == lines
    assert all(torch.equal(weights[k], v) for k, v in final_weights(out).items())


@pytest.mark.parametrize("script", sorted(FINISHED))
def test_a_run_of_zero_steps_evaluates_and_saves(script, tiny_sft_dir, tmp_path):
    """--max-steps 0: the training loop never runs; what follows it must not need its variables."""
    module = __import__(script)
    flags = {**COMMON, **FINISHED[script], "max_steps": 0}
    if script != "pretrain":
        flags["init"] = tiny_sft_dir
    threads = torch.get_num_threads()
    try:
        module.main(module.Args(out_dir=str(tmp_path / "run"), **flags))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("script", sorted(FINISHED))
def test_eval_every_and_save_every_0_mean_never(script, tiny_sft_dir, tmp_path):
    """One meaning in every script: no evaluation between the start and the end, no checkpoint."""
    module = __import__(script)
    flags = {**COMMON, **FINISHED[script], "max_steps": 3, "eval_every": 0, "save_every": 0}
    if script != "pretrain":
        flags["init"] = tiny_sft_dir
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        module.main(module.Args(out_dir=str(out), **flags))
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    midway = [x for x in lines if 0 < x.get("step", 0) < 3]
    assert midway and not [k for x in midway for k in x if k.startswith("eval")]
    assert not (out / "checkpoints").exists()
