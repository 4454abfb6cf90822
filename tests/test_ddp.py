"""Scale-out (issue 10): two gloo processes under torchrun take the same optimiser step as one
process with the same global batch (each rank gets its share; losses are normalised globally),
and a run killed under torchrun resumes there. PPO and GRPO under torchrun are end-to-end tests
in tests/test_train_ppo.py and tests/test_train_grpo.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(device="cpu", threads=1, eval_problems=0, seed=0, max_steps=2, warmup_steps=1,
              eval_every=0, save_every=0, batch_size=8, max_length=96)
SCRIPTS = {"train_sft.py": dict(n_train=64, eval_chats=8, eval_quick=0, grad_accum=2, lr=1e-2),
           "train_dpo.py": dict(n_pairs=32, n_identity=8, eval_pairs=8, lr=1e-3),
           "train_rm.py": dict(n_pairs=32, n_identity=8, eval_problems=8, lr=2e-3)}


def run(script, init, out_dir, nproc, port):
    flags = []
    for k, v in {**COMMON, **SCRIPTS[script], "init": init, "out_dir": out_dir}.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    launcher = ([] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node",
                                       str(nproc), "--master_port", str(port)])
    r = subprocess.run([sys.executable, *launcher, script, *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(Path(out_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("script,port", [("train_sft.py", 29611), ("train_dpo.py", 29612),
                                         ("train_rm.py", 29613)])
def test_two_processes_take_the_same_step_as_one(script, port, tiny_sft_dir, tmp_path):
    one = run(script, tiny_sft_dir, tmp_path / "one", 1, port)
    two = run(script, tiny_sft_dir, tmp_path / "two", 2, port)
    init = load_file(str(Path(tiny_sft_dir) / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k in init)
    assert moved > 5e-4                                  # the steps did change the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.slow
def test_grpo_resumed_under_torchrun_matches_a_straight_two_process_run(tiny_sft_dir, tmp_path):
    """Each rank samples from its own generator: the checkpoint holds both ranks' states. GRPO's
    schedule does not depend on --max-steps, so a 4-step run resumed to 8 must equal 8 steps."""
    flags = dict(device="cpu", threads=1, eval_problems=0, n_prompts=64, batch_prompts=2,
                 group_size=4, max_new_tokens=12, max_minutes=0, pass_k=0, eval_every=0,
                 save_every=4, init=tiny_sft_dir)

    def grpo(out_dir, port, **over):
        args = []
        for k, v in {**flags, **over, "out_dir": out_dir}.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "train_grpo.py", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    grpo(tmp_path / "straight", 29614, max_steps=8)
    grpo(tmp_path / "resumed", 29615, max_steps=4)
    assert "resumed from" in grpo(tmp_path / "resumed", 29616, max_steps=8,
                                  resume=tmp_path / "resumed" / "checkpoints" / "step-00000004")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
