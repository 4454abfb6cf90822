"""Scale-out (issue 10): two gloo processes under torchrun take the same optimiser step as one
process with the same global batch (each rank gets its share; losses are normalised globally),
whether the model is replicated (DDP) or sharded (--fsdp, FSDP2 on the CPU), and a run stopped
under torchrun resumes there. PPO and GRPO under torchrun are end-to-end tests here (--fsdp) and
in tests/test_train_ppo.py and tests/test_train_grpo.py (DDP)."""
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
           "train_rm.py": dict(n_pairs=32, n_identity=8, eval_problems=8, lr=2e-3,
                                policy_problems=8, eval_policy_problems=4, max_new_tokens=16)}


def run(script, init, out_dir, nproc, port, *extra):
    flags = list(extra)
    for k, v in {**COMMON, **SCRIPTS[script], "init": init, "out_dir": out_dir}.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    launcher = ([] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node",
                                       str(nproc), "--master_port", str(port)])
    r = subprocess.run([sys.executable, *launcher, script, *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(str(Path(out_dir) / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("script,port", [("train_sft.py", 29611), ("train_dpo.py", 29612),
                                         ("train_rm.py", 29613)])
def test_two_processes_take_the_same_step_as_one(script, port, sharding, tiny_sft_dir, tmp_path):
    one = run(script, tiny_sft_dir, tmp_path / "one", 1, port)
    extra = ["--fsdp"] if sharding == "fsdp" else []
    extra += ["--grad-checkpointing"]      # recomputing activations must not change the step
    two = run(script, tiny_sft_dir, tmp_path / "two", 2, port + (10 if extra else 0), *extra)
    init = load_file(str(Path(tiny_sft_dir) / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k in init)
    assert moved > 5e-4                                  # the steps did change the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("sharding,port", [("ddp", 29614), ("fsdp", 29624)])
def test_grpo_resumed_under_torchrun_matches_a_straight_two_process_run(sharding, port,
                                                                        tiny_sft_dir, tmp_path):
    """Each rank samples from its own generator: the checkpoint holds both ranks' states. With
    --lr-schedule constant GRPO's schedule does not depend on --max-steps, so a 4-step run resumed
    to 8 must equal 8 steps.
    With --fsdp the checkpoint holds the whole weights and Adam moments, gathered from the shards,
    and the resumed run splits them again."""
    flags = dict(device="cpu", threads=1, eval_problems=0, n_prompts=64, batch_prompts=2,
                 group_size=4, max_new_tokens=12, max_minutes=0, pass_k=0, eval_every=0,
                 save_every=4, lr_schedule="constant", init=tiny_sft_dir)

    def grpo(out_dir, port, **over):
        args = ["--fsdp"] if sharding == "fsdp" else []
        for k, v in {**flags, **over, "out_dir": out_dir}.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "train_grpo.py", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    grpo(tmp_path / "straight", port, max_steps=8)
    grpo(tmp_path / "resumed", port + 1, max_steps=4)
    assert "resumed from" in grpo(tmp_path / "resumed", port + 2, max_steps=8,
                                  resume=tmp_path / "resumed" / "checkpoints" / "step-00000004")
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp_sft_resumed_from_a_checkpoint_ends_bit_identical(tiny_sft_dir, tmp_path):
    """A sharded run's checkpoint (weights and Adam moments gathered whole) resumed by a sharded
    run: steps 3-4 replayed from the step-2 checkpoint give exactly the first run's weights."""
    flags = ["--fsdp", "--save-every", "2", "--max-steps", "4"]
    for k, v in {**COMMON, **SCRIPTS["train_sft.py"], "init": tiny_sft_dir}.items():
        if k not in ("save_every", "max_steps"):
            flags += ["--" + k.replace("_", "-"), str(v)]

    def sft(out_dir, port, *extra):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "train_sft.py", *flags, "--out-dir",
                            str(out_dir), *extra], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    assert "fsdp: GPT sharded over 2 processes" in sft(tmp_path / "a", 29631)
    assert "resumed from" in sft(tmp_path / "b", 29632, "--resume",
                                 str(tmp_path / "a" / "checkpoints" / "step-00000002"))
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    init = load_file(str(Path(tiny_sft_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 5e-4
    assert all(torch.equal(a[k], b[k]) for k in a)
