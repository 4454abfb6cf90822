import json

import pytest
import torch
import torch.nn.functional as F

from minipost.adapters import (BottleneckAdapter, WithAdapter, adapter_state_dict, apply_adapters,
                               remove_adapters)
from minipost.lora import count_trainable, disable_adapters
from minipost.model import GPT, GPTConfig
from minipost.peft_format import load_adapters, save_adapters

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def make_base(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).double().eval()


def train_like(model, seed=1, scale=0.1):
    """Stand-in for training: random adapter weights, so the adapters are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_adapter_computes_u_plus_W_up_sigma_W_down_u():
    torch.manual_seed(0)
    a = BottleneckAdapter(8, 3).double()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    u = torch.randn(2, 8, dtype=torch.float64)
    want = u + F.gelu(u @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias
    torch.testing.assert_close(a(u), want)


def test_identity_at_init():
    base = make_base()
    want = base(IDS)
    model = apply_adapters(base, dim=4)
    a = model.model.layers[0].mlp.adapter
    assert torch.all(a.up.weight == 0) and a.down.weight.abs().max() <= 2e-2 and a.down.weight.std() > 0
    assert torch.equal(model(IDS), want)


def test_adapters_sit_after_attention_and_mlp_with_readable_keys():
    model = apply_adapters(make_base(), dim=4)
    keys = set(adapter_state_dict(model))
    assert "model.layers.0.self_attn.adapter.down.weight" in keys
    assert "model.layers.1.mlp.adapter.up.bias" in keys
    assert len(keys) == 2 * 2 * 4                 # 2 layers × (attn, mlp) × (down, up) × (W, b)
    assert isinstance(model.model.layers[1].self_attn, WithAdapter)


def test_only_adapter_params_train():
    model = train_like(apply_adapters(make_base(), dim=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in model.state_dict() if ".adapter." in k}
    model(IDS).sum().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert count_trainable(model)[0] == 2 * 2 * (32 * 4 + 4 + 4 * 32 + 32)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = train_like(apply_adapters(make_base(), dim=4, activation="relu"))
    save_adapters(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapter_dim"] == 4 and cfg["activation"] == "relu"
    loaded = load_adapters(make_base(), tmp_path / "ad")
    assert torch.equal(loaded(IDS), model(IDS))


def test_load_refuses_a_mismatched_model(tmp_path):
    save_adapters(apply_adapters(make_base(), dim=4), tmp_path / "ad")
    other = GPT(GPTConfig(**{**CFG, "num_hidden_layers": 3})).double()
    with pytest.raises(ValueError, match="missing: .*layers.2"):
        load_adapters(other, tmp_path / "ad")


def test_disabled_equals_base_and_remove_restores_base():
    base = make_base()
    want = base(IDS)
    keys = set(base.state_dict())
    model = train_like(apply_adapters(base, dim=4))
    assert not torch.allclose(model(IDS), want)
    with disable_adapters(model):
        assert torch.equal(model(IDS), want)
    remove_adapters(model)
    assert set(model.state_dict()) == keys
    assert torch.equal(model(IDS), want)
