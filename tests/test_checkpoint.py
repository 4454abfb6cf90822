import json
import random

import numpy as np
import pytest
import torch

from minipost import checkpoint
from minipost.checkpoint import CheckpointError, load_model, save_model, save_state, load_state
from minipost.model import GPT, GPTConfig, ScoreModel

CFGS = {
    "llama": GPTConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "qwen3": GPTConfig(model_type="qwen3", vocab_size=40, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "qwen2": GPTConfig(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, attention_bias=True),
    "gpt2": GPTConfig.gpt2(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64),
}


def randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", list(CFGS))
def test_save_then_load_gives_identical_logits(name, tmp_path):
    torch.manual_seed(0)
    model = randomised(GPT(CFGS[name]))
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    x = torch.randint(0, 40, (2, 7))
    assert torch.equal(model(x), loaded(x))
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == name and len(cfg["architectures"]) == 1


def test_score_model_round_trip_and_is_refused_as_a_policy(tmp_path):
    torch.manual_seed(0)
    rm = randomised(ScoreModel(CFGS["llama"]))
    save_model(rm, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    loaded = load_model(tmp_path / "rm", head="score").eval()
    x = torch.randint(0, 40, (2, 7))
    assert torch.equal(rm(x), loaded(x))
    with pytest.raises(CheckpointError, match="reward"):
        load_model(tmp_path / "rm")


def test_score_model_from_a_language_model_starts_at_zero(tmp_path):
    save_model(GPT(CFGS["llama"]), tmp_path / "lm")
    vm = load_model(tmp_path / "lm", head="score")
    assert torch.equal(vm(torch.randint(0, 40, (2, 5))), torch.zeros(2, 5))


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = randomised(GPT(CFGS["llama"]))
    save_model(model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(GPT(CFGS["llama"]), tmp_path / "ckpt")
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert before == after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]   # no temporary left behind


def test_clear_errors_for_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_model(tmp_path / "a")
    save_model(GPT(CFGS["llama"]), tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "b")
    save_model(GPT(CFGS["llama"]), tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "c")


def test_training_state_round_trip_restores_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFGS["llama"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 40, (2, 5))).sum().backward()
    opt.step()
    random.seed(3); np.random.seed(3); torch.manual_seed(3)
    save_state(tmp_path / "s", {"optimizer": opt.state_dict(), "step": 7,
                                "rng": checkpoint.rng_state(), "data": {"epoch": 1, "pos": [4, 5]}})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    state = load_state(tmp_path / "s")
    checkpoint.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert state["step"] == 7 and state["data"] == {"epoch": 1, "pos": [4, 5]}
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))
