"""reference.py: both kinds of π_ref (a frozen copy, the policy with its adapters off) give the
log-probs of the untouched initial policy after the policy has trained, with no gradient, in eval
mode, and leave the policy as they found it."""
import pytest
import torch

from minipost.model import GPT, GPTConfig
from minipost.peft import add_peft
from minipost.reference import Reference
from minipost.rollout import completion_logps

torch.set_num_threads(1)
CFG = GPTConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2)
IDS = torch.tensor([[3, 5, 9, 4, 7, 2, 11, 6], [0, 0, 8, 6, 1, 13, 5, 9]])   # row 2 left-padded
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
P = 4                                                     # prompt width; completions of 4 tokens


def initial_policy():
    torch.manual_seed(0)
    return GPT(CFG)


def train(model):
    """Stand-in for training: move every trainable weight."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("peft", ["none", "lora", "adapter"])
def test_the_reference_gives_the_initial_policys_logps_after_training(peft):
    with torch.no_grad():
        initial = completion_logps(initial_policy().eval(), IDS, MASK, P, 0.7)      # (2, 4)
    policy = add_peft(initial_policy(), peft, lora_r=2, adapter_dim=4)
    reference = Reference(policy, copy=peft == "none")
    assert reference.kind == ("copy" if peft == "none" else "adapters_off")
    train(policy)
    policy.train()
    ref_logps = reference.logps(completion_logps, IDS, MASK, P, 0.7)
    torch.testing.assert_close(ref_logps, initial, atol=0, rtol=0)                  # bit for bit
    assert not ref_logps.requires_grad
    with torch.no_grad():                                   # the policy itself did move
        assert not torch.allclose(completion_logps(policy, IDS, MASK, P, 0.7), initial)
    assert policy.training and all(m.training for m in policy.modules())   # mode restored


def test_the_reference_runs_in_eval_mode():
    modes = []

    def spy(model, *args):
        modes.append({m.training for m in model.modules()})
        return completion_logps(model, *args)

    for copy in (True, False):
        policy = add_peft(initial_policy(), "none" if copy else "lora", lora_r=2).train()
        Reference(policy, copy=copy).logps(spy, IDS, MASK, P, 1.0)
    assert modes == [{False}, {False}]


def test_the_copy_is_frozen_and_the_adapters_off_reference_needs_adapters():
    policy = initial_policy()
    reference = Reference(policy)
    assert reference.model is not policy and not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    with pytest.raises(ValueError, match="no LoRA layers or adapters"):
        Reference(policy, copy=False)      # a policy without adapters IS its reference: refused
