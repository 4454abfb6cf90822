import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRETRAIN, warnings_of
from minipost.checkpoint import load_model
from minipost.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_pretrain_end_to_end_saves_a_loadable_checkpoint_and_metrics(tmp_path):
    import pretrain
    threads = torch.get_num_threads()
    try:
        final = pretrain.main(pretrain.Args(out_dir=str(tmp_path / "base"),
                                            **{**TINY_PRETRAIN, "max_steps": 4, "eval_every": 2,
                                               "eval_problems": 4}))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "base"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.jsonl", "results.json"]:
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in x for x in lines) and lines[-1]["eval/n"] == 4
    assert 0.0 <= final["eval/accuracy"] <= 1.0 and final["eval/loss"] > 0
    assert 0.0 <= final["eval/equations_last_digit"] <= 1.0   # the arithmetic probe ran
    model, tok = load_model(out), load_tokenizer(out)
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.eos_token_id == tok.eos_token_id != tok.pad_token_id
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))


def test_pretrain_warns_once_in_metrics_jsonl_and_reports_to_tensorboard(tmp_path, watched):
    import pretrain
    threads = torch.get_num_threads()
    try:
        pretrain.main(pretrain.Args(out_dir=str(tmp_path / "base"), report_to="tensorboard",
                                    **{**TINY_PRETRAIN, "max_steps": 12}))
    finally:
        torch.set_num_threads(threads)
    (warning,) = warnings_of(tmp_path / "base")          # the loss is watched from the first line
    assert warning["step"] == 1 and warning["warning"].startswith("the loss has stopped moving")
    (writer,) = watched
    assert writer.log_dir == str(tmp_path / "base" / "tensorboard")
    assert [s for s, _ in writer.scalars["loss"]] == [1, 11, 12]
    assert "eval/loss" in writer.scalars and "grad_norm" in writer.scalars


def test_negative_eval_every_is_a_user_error(tmp_path):
    import pretrain
    from minipost.cli import UserError
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError, match="--eval-every must be >= 0"):
            pretrain.main(pretrain.Args(out_dir=str(tmp_path / "base"),
                                        **{**TINY_PRETRAIN, "eval_every": -1}))
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "base").exists()


def test_pretrain_help_explains_every_flag():
    import pretrain
    from dataclasses import fields
    r = subprocess.run([sys.executable, "pretrain.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for f in fields(pretrain.Args):
        assert "--" + f.name.replace("_", "-") in r.stdout


def test_bad_flag_value_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "pretrain.py", "--difficulty", "three", "--out-dir",
                        str(tmp_path / "x"), "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "difficulty" in r.stderr
    assert not (tmp_path / "x" / "config.json").exists()


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes(tmp_path):
    flags = []
    for k, v in {**TINY_PRETRAIN, "max_steps": 2, "eval_problems": 4}.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", "pretrain.py", *flags,
                        "--out-dir", str(tmp_path / "ddp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ddp" / "model.safetensors").exists()
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"step": 1,' in x]) == 1   # only rank 0 writes


def test_the_same_seed_twice_gives_bit_identical_base_weights(tmp_path):
    # the instrument: a seed is a seed (data, tokenizer, init, order), run after run
    import pretrain
    from safetensors.torch import load_file
    threads = torch.get_num_threads()
    try:
        for name in ("a", "b", "c"):
            pretrain.main(pretrain.Args(out_dir=str(tmp_path / name),
                                        **{**TINY_PRETRAIN, "max_steps": 4, "eval_problems": 0,
                                           "seed": 1 if name == "c" else 0}))
    finally:
        torch.set_num_threads(threads)
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b", "c"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert not all(torch.equal(a[k], c[k]) for k in a if k in c)      # another seed, another model
