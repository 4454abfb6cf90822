"""Shared fixtures for the script tests: one tiny checkpoint per test session.

`tiny_sft_dir` is what every stage script starts from in its end-to-end test: a tiny Llama-style
model (hidden 32, 2 layers) and its tokenizer (ChatML special tokens included), made once per
session by `pretrain.main` with tiny flags (a few seconds on one CPU thread). It is only a few
steps of pretraining, not a real SFT model: the scripts' end-to-end tests check that they run and
save, not what they learn. Tests must not write into it (copy it, or use it as `--init` only).
"""
import os
import sys

import pytest
import torch

# the stage scripts (pretrain.py, train_*.py) live in the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TINY_PRETRAIN = dict(n_docs=300, vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                     num_kv_heads=2, intermediate_size=64, seq_len=64, batch_size=8, max_steps=3,
                     warmup_steps=1, eval_every=1000, eval_windows=4, eval_problems=0, threads=1,
                     device="cpu")


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
