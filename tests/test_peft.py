"""peft.py: one switch for LoRA / adapters, saving the adapter alone, and starting a stage from it."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from minipost import peft
from minipost.adapters import BottleneckAdapter
from minipost.checkpoint import CheckpointError, load_model, save_model
from minipost.lora import LoRALinear
from minipost.model import GPT, GPTConfig, ScoreModel

torch.set_num_threads(1)
IDS = torch.tensor([[1, 5, 9, 4, 7, 2], [3, 3, 8, 6, 1, 0]])


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2))


def trained(model):
    """Give every trainable parameter a random value, so the PEFT model differs from the base."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_none_returns_the_model_unchanged_and_all_trainable():
    model = tiny()
    assert peft.add_peft(model, "none") is model
    assert all(p.requires_grad for p in model.parameters())
    assert peft.trainable_summary(model).endswith("(100.00%)")


def test_lora_dispatch_parses_comma_separated_targets():
    model = peft.add_peft(tiny(), "lora", lora_r=4, lora_alpha=8, lora_targets="q_proj, v_proj")
    wrapped = {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {"q_proj", "v_proj"}
    assert {m.r for m in model.modules() if isinstance(m, LoRALinear)} == {4}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert peft.parse_targets(r".*\.mlp\..*_proj") == r".*\.mlp\..*_proj"   # a regex stays one


def test_adapter_dispatch_and_identity_at_init():
    base = tiny()
    ref = base(IDS)
    model = peft.add_peft(base, "adapter", adapter_dim=4)
    assert sum(isinstance(m, BottleneckAdapter) for m in model.modules()) == 4  # 2 per block
    assert_close(model(IDS), ref, atol=0, rtol=0)
    assert all(("adapter" in n) == p.requires_grad for n, p in model.named_parameters())


def test_peft_options_reads_a_scripts_flags():
    args = SimpleNamespace(peft="lora", lora_r=2, lora_alpha=4.0, lora_dropout=0.0,
                           lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           adapter_dim=16)
    model = peft.add_peft(tiny(), **peft.peft_options(args))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="none"):
        peft.add_peft(tiny(), "prefix")


def test_trainable_summary_counts_a_tied_matrix_once():
    model = peft.add_peft(tiny(), "lora", lora_r=2)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in model.parameters())   # parameters() yields tied ones once
    assert peft.trainable_summary(model) == (
        f"trainable parameters: {n_lora:,} of {total:,} ({100 * n_lora / total:.2f}%)")


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_saved_adapter_loads_back_with_identical_outputs(tmp_path, kind):
    save_model(tiny(), tmp_path / "base")
    model = trained(peft.add_peft(load_model(tmp_path / "base"), kind, lora_r=2, adapter_dim=4))
    peft.save_peft(model, tmp_path / "sft", kind, base_model_name_or_path=str(tmp_path / "base"),
                   extra_config={"minipost": {"stage": "sft"}})
    assert {p.name for p in (tmp_path / "sft").iterdir()} >= {"adapter_config.json",
                                                              "adapter_model.safetensors"}
    assert not (tmp_path / "sft" / "config.json").exists()
    assert json.loads((tmp_path / "sft" / "minipost.json").read_text())["minipost"]["stage"] == "sft"
    loaded = peft.load_peft(load_model(tmp_path / "base"), tmp_path / "sft")
    assert_close(loaded(IDS), model(IDS), atol=1e-6, rtol=0)


def test_lora_output_loads_as_a_merged_model_for_the_next_stage(tmp_path):
    save_model(tiny(), tmp_path / "base")
    model = trained(peft.add_peft(load_model(tmp_path / "base"), "lora", lora_r=2))
    peft.save_peft(model, tmp_path / "sft", "lora", merge=True,
                   base_model_name_or_path=str(tmp_path / "base"))
    via_init = peft.load_model(tmp_path / "sft")     # what `--init out/sft` does
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "sft")               # checkpoint.load_model: checkpoints only
    assert not any(isinstance(m, LoRALinear) for m in via_init.modules())
    assert all(p.requires_grad for p in via_init.parameters())
    assert_close(via_init(IDS), model(IDS), atol=1e-5, rtol=0)
    merged = load_model(tmp_path / "sft" / "merged")  # the --merge copy, an ordinary checkpoint
    assert_close(merged(IDS), model(IDS), atol=1e-5, rtol=0)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight   # still tied
    # a reward model can start from it too (the decoder merged, a fresh score head)
    rm = peft.load_model(tmp_path / "sft", head="score")
    assert isinstance(rm, ScoreModel)
    assert_close(rm.model(IDS), via_init.model(IDS), atol=1e-5, rtol=0)


def test_a_lora_reward_model_loads_merged_as_a_frozen_reward_model(tmp_path):
    save_model(tiny(), tmp_path / "base")
    rm = trained(peft.add_peft(load_model(tmp_path / "base", head="score"), "lora", lora_r=2,
                               modules_to_save=("score",)))
    peft.save_peft(rm, tmp_path / "rm", "lora", base_model_name_or_path=str(tmp_path / "base"))
    loaded = peft.load_reward_models([str(tmp_path / "rm")])     # what train_ppo.py and rank.py do
    assert isinstance(loaded, ScoreModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert_close(loaded(IDS), rm(IDS), atol=1e-5, rtol=0)


def test_adapter_output_cannot_be_an_init_and_says_why(tmp_path):
    save_model(tiny(), tmp_path / "base")
    model = peft.add_peft(load_model(tmp_path / "base"), "adapter", adapter_dim=4)
    peft.save_peft(model, tmp_path / "sft", "adapter", base_model_name_or_path=str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match="cannot be merged"):
        peft.load_model(tmp_path / "sft")
    with pytest.raises(ValueError, match="only LoRA"):
        peft.save_peft(model, tmp_path / "x", "adapter", merge=True)


def test_missing_base_of_an_adapter_is_a_checkpoint_error(tmp_path):
    model = peft.add_peft(tiny(), "lora", lora_r=2)
    peft.save_peft(model, tmp_path / "sft", "lora", base_model_name_or_path=str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="base model"):
        peft.load_model(tmp_path / "sft")


def test_a_directory_is_never_both_a_model_and_an_adapter(tmp_path):
    out = tmp_path / "sft"
    save_model(tiny(), tmp_path / "base")
    peft.save_peft(tiny(), out, "none")
    assert (out / "config.json").exists()
    model = peft.add_peft(load_model(tmp_path / "base"), "lora", lora_r=2)
    peft.save_peft(model, out, "lora", base_model_name_or_path=str(tmp_path / "base"))
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    peft.save_peft(tiny(), out, "none")
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
