import json
import os

import pytest
import torch
import torch.nn as nn

from minipost.lora import (LoRALinear, apply_lora, count_trainable, disable_adapters, merge_lora,
                           unmerge_lora)
from minipost.model import GPT, GPTConfig, ScoreModel
from minipost.peft_format import load_lora, lora_state_dict, save_lora

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_base(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**CFG)).to(dtype).eval()


def train_like(model, seed=1, scale=0.1):
    """Stand-in for training: random B (and A), so the LoRA update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in (m.lora_A.weight, m.lora_B.weight):
                    p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def test_zero_B_gives_base_logits_exactly():
    base = make_base()
    want = base(IDS)
    model = apply_lora(base, r=4, alpha=8)
    assert all(torch.all(m.lora_B.weight == 0) for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model(IDS), want)


def test_forward_is_base_plus_alpha_over_r_times_BAx():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    layer = LoRALinear(base, r=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(2, 6))
        layer.lora_B.weight.copy_(torch.randn(5, 2))
    x = torch.randn(3, 6, dtype=torch.float64)
    # y = W₀x + b + (α/r)·B·A·x with α/r = 3/2
    want = base(x) + 1.5 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), want)


def test_lora_A_is_kaiming_uniform_and_B_zero():
    layer = LoRALinear(nn.Linear(64, 16), r=8, alpha=16)
    bound = 1 / 64 ** 0.5                  # kaiming_uniform(a=√5): √(6 / ((1 + 5)·fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > 0.3 * bound
    assert torch.all(layer.lora_B.weight == 0)


def test_doubling_r_with_alpha_fixed_halves_the_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=False).double()
    A, B = torch.randn(4, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    small, big = LoRALinear(base, r=4, alpha=8), LoRALinear(base, r=8, alpha=8)
    with torch.no_grad():  # the same product B·A: big's extra rank directions are zero
        small.lora_A.weight.copy_(A), small.lora_B.weight.copy_(B)
        big.lora_A.weight.zero_()[:4].copy_(A), big.lora_B.weight.zero_()[:, :4].copy_(B)
    x = torch.randn(3, 6, dtype=torch.float64)
    update_small, update_big = small(x) - base(x), big(x) - base(x)
    assert small.scaling == 2.0 and big.scaling == 1.0
    torch.testing.assert_close(update_big, 0.5 * update_small)


def test_merge_matches_unmerged_and_unmerge_restores_weights_bit_exactly():
    model = train_like(apply_lora(make_base(dtype=torch.float32), r=4, alpha=8))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    want = model(IDS)
    merge_lora(model, unload=False)
    torch.testing.assert_close(model(IDS), want, atol=1e-5, rtol=0)
    q = model.model.layers[0].self_attn.q_proj
    assert q.merged and not torch.equal(q.base_layer.weight, weights[
        "model.layers.0.self_attn.q_proj.base_layer.weight"])
    unmerge_lora(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    torch.testing.assert_close(model(IDS), want, atol=0, rtol=0)


def test_merge_unload_gives_plain_model_with_base_names():
    model = train_like(apply_lora(make_base(), r=4, alpha=8))
    want = model(IDS)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(make_base().state_dict())
    torch.testing.assert_close(model(IDS), want)


def test_only_lora_params_are_trainable_and_receive_grads():
    model = apply_lora(make_base(), r=4, alpha=8, dropout=0.1)
    model.train()
    train_like(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2          # A and B × 7 projections × 2 layers
    model(IDS).sum().backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    n_train, n_total = count_trainable(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_stay_tied_through_apply_merge_and_state_dict_round_trip():
    model = apply_lora(make_base(), r=4, alpha=8)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    train_like(model)
    merge_lora(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = make_base(seed=5)
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(fresh(IDS), model(IDS), atol=0, rtol=0)


def test_tied_lm_head_is_refused_as_a_target():
    with pytest.raises(ValueError, match="tied"):
        apply_lora(make_base(), targets=("lm_head",))


def test_unknown_target_error_names_the_available_linears():
    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(make_base(), targets=("query",))


def test_save_then_load_into_fresh_base_gives_identical_outputs(tmp_path):
    model = train_like(apply_lora(make_base(), r=4, alpha=8, targets=("q_proj", "v_proj")))
    save_lora(model, tmp_path / "adapter", base_model_name_or_path="some/base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["modules_to_save"] is None
    assert sorted(os.listdir(tmp_path)) == ["adapter"]        # no temp dir left behind
    save_lora(model, tmp_path / "adapter")                    # overwriting works too
    loaded = load_lora(make_base(), tmp_path / "adapter")
    assert torch.equal(loaded(IDS), model(IDS))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_is_strict_and_names_the_bad_keys(tmp_path):
    model = train_like(apply_lora(make_base(), r=4, alpha=8, targets=("q_proj",)))
    save_lora(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "k_proj"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing: .*k_proj.lora_A"):
        load_lora(make_base(), tmp_path / "a")


def test_disable_adapters_gives_base_logits_exactly():
    base = make_base()
    want = base(IDS)
    model = train_like(apply_lora(base, r=4, alpha=8))
    assert not torch.allclose(model(IDS), want)
    with disable_adapters(model):
        assert torch.equal(model(IDS), want)
    merge_lora(model, unload=False)                 # also while merged (uses the stored W₀)
    with disable_adapters(model):
        assert torch.equal(model(IDS), want)
    assert not torch.allclose(model(IDS), want)     # re-enabled on exit
    with pytest.raises(ValueError, match="no LoRA"):
        with disable_adapters(make_base()):
            pass


def make_score(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    sm = ScoreModel(GPTConfig(**CFG)).to(dtype).eval()
    with torch.no_grad():
        sm.score.weight.normal_()                    # a trained-looking head, not the zero init
    return sm


def test_modules_to_save_head_trains_and_round_trips(tmp_path):
    model = apply_lora(make_score(), r=2, alpha=4, modules_to_save=("score",))
    assert model.score.weight.requires_grad
    assert "base_model.model.score.weight" in lora_state_dict(model)
    train_like(model)
    with torch.no_grad():
        model.score.weight.mul_(-2)                  # the head trained too
    save_lora(model, tmp_path / "rm", task_type="SEQ_CLS")
    cfg = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["score"] and cfg["task_type"] == "SEQ_CLS"
    fresh = load_lora(make_score(), tmp_path / "rm")   # the same base, as LoRA requires
    assert torch.equal(fresh.score.weight, model.score.weight)
    assert torch.equal(fresh(IDS), model(IDS))


# ---- PEFT / transformers as the reference -------------------------------------------------------

def hf_llama(cls_name="LlamaForCausalLM", **extra):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, max_position_embeddings=64, **extra)
    return getattr(transformers, cls_name)(cfg).float().eval()


def test_lora_state_dict_keys_match_peft():
    peft = pytest.importorskip("peft")
    hf = hf_llama()
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ours = apply_lora(make_base(), r=4, alpha=8)
    want = peft.get_peft_model_state_dict(ref)
    assert set(lora_state_dict(ours)) == set(want)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in want
    for k, v in lora_state_dict(ours).items():
        assert v.shape == want[k].shape, k


def test_modules_to_save_keys_match_peft():
    peft = pytest.importorskip("peft")
    hf = hf_llama("LlamaForSequenceClassification", num_labels=1, pad_token_id=3)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, task_type="SEQ_CLS",
                                                  target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["score"]))
    ours = apply_lora(make_score(), r=2, alpha=4, targets=("q_proj", "v_proj"),
                      modules_to_save=("score",))
    want = peft.get_peft_model_state_dict(ref)
    assert "base_model.model.score.weight" in want  # PEFT strips `modules_to_save.default.`
    assert set(lora_state_dict(ours)) == set(want)


def test_peft_loads_our_adapter_and_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_llama()
    ours = make_base(dtype=torch.float32)
    hf.load_state_dict(ours.state_dict())           # minipost's keys ARE HF Llama keys
    base_logits = ours(IDS).detach()
    torch.testing.assert_close(hf(IDS).logits, base_logits, atol=1e-5, rtol=0)
    train_like(apply_lora(ours, r=4, alpha=8))
    save_lora(ours, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = ref(IDS).logits
        got = ours(IDS)
    assert (got - base_logits).abs().max() > 1e-2     # the adapter does change the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_peft_loads_our_reward_head_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_llama("LlamaForSequenceClassification", num_labels=1, pad_token_id=3)
    ours = make_score(dtype=torch.float32)
    hf.load_state_dict(ours.state_dict())           # ScoreModel's keys are HF's too
    train_like(apply_lora(ours, r=2, alpha=4, modules_to_save=("score",)))
    with torch.no_grad():
        ours.score.weight.normal_()                 # the head "trained" as well
    save_lora(ours, tmp_path / "rm", task_type="SEQ_CLS")
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "rm")).eval()
    ids = IDS.clamp(min=4)                          # no pad token: HF reads the score at the end
    with torch.no_grad():
        want = ref(ids).logits[:, 0]                # (B,)
        got = ours.score_last(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_regex_targets_are_saved_as_given_and_load_back_the_same_layers(tmp_path):
    """A regex (`--lora-targets`) wraps q_proj/v_proj of layer 1 only: the adapter must say so, or a
    load wraps every q_proj/v_proj and misses their weights. minipost and PEFT load it alike."""
    from minipost.peft import add_peft
    regex = r"model\.layers\.1\.self_attn\.(q|v)_proj"
    ours = train_like(add_peft(make_base(dtype=torch.float32), "lora", lora_r=2, lora_alpha=4,
                               lora_targets=regex))
    save_lora(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == regex
    loaded = load_lora(make_base(dtype=torch.float32), tmp_path / "a")
    wrapped = sorted(p for p, m in loaded.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ours(IDS))
    peft = pytest.importorskip("peft")
    hf = hf_llama()
    hf.load_state_dict(make_base(dtype=torch.float32).state_dict())
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS).logits, atol=1e-4, rtol=0)


def test_dotted_target_names_match_path_suffixes_as_in_peft():
    """PEFT's list entries match a module path or its dotted suffix: "self_attn.q_proj" too."""
    model = apply_lora(make_base(), targets=("self_attn.q_proj", "down_proj"))
    wrapped = sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"model.layers.{i}.{n}" for i in (0, 1)
                       for n in ("mlp.down_proj", "self_attn.q_proj")]
