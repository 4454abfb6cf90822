import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minipost.dpo import dpo_loss, sequence_logps


def _two_pairs():
    # pair 1: h = (−1 − (−2)) − (−3 − (−2.5)) = 1 − (−0.5) = 1.5
    # pair 2: h = (−4 − (−3)) − (−2 − (−2))   = −1 − 0    = −1.0
    d = dict(dtype=torch.float64)
    return (torch.tensor([-1.0, -4.0], **d), torch.tensor([-3.0, -2.0], **d),
            torch.tensor([-2.0, -3.0], **d), torch.tensor([-2.5, -2.0], **d))


def test_dpo_sigmoid_loss_hand_computed_on_two_pairs():
    # β = 0.5 → βh = [0.75, −0.5]; −log σ(x) = log(1 + e^−x)
    # pair 1: log(1 + e^−0.75) = 0.386871006, pair 2: log(1 + e^0.5) = 0.974076984
    losses, _, _ = dpo_loss(*_two_pairs(), beta=0.5)
    assert_close(losses, torch.tensor([0.386871006, 0.974076984], dtype=torch.float64), rtol=0, atol=1e-8)


def test_cdpo_label_smoothing_hand_computed_on_two_pairs():
    # ε = 0.1: 0.9·log(1+e^−βh) + 0.1·log(1+e^βh)
    # pair 1: 0.9·0.386871006 + 0.1·(0.75 + 0.386871006) = 0.461871006
    # pair 2: 0.9·0.974076984 + 0.1·(0.974076984 − 0.5)  = 0.924076984
    losses, _, _ = dpo_loss(*_two_pairs(), beta=0.5, label_smoothing=0.1)
    assert_close(losses, torch.tensor([0.461871006, 0.924076984], dtype=torch.float64), rtol=0, atol=1e-8)


def test_ipo_loss_hand_computed_on_two_pairs():
    # β = 0.5 → 1/(2β) = 1; (1.5 − 1)² = 0.25, (−1 − 1)² = 4
    losses, _, _ = dpo_loss(*_two_pairs(), beta=0.5, loss_type="ipo")
    assert_close(losses, torch.tensor([0.25, 4.0], dtype=torch.float64))


def test_hinge_loss_hand_computed_on_two_pairs():
    # relu(1 − 0.75) = 0.25, relu(1 + 0.5) = 1.5
    losses, _, _ = dpo_loss(*_two_pairs(), beta=0.5, loss_type="hinge")
    assert_close(losses, torch.tensor([0.25, 1.5], dtype=torch.float64))


def test_dpo_implicit_rewards_are_beta_times_logratio_and_detached():
    # chosen: 0.5·(−1+2) = 0.5, 0.5·(−4+3) = −0.5; rejected: 0.5·(−3+2.5) = −0.25, 0.5·(−2+2) = 0
    pc, pr, rc, rr = _two_pairs()
    pc.requires_grad_(True)
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_close(chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert_close(rejected_rewards, torch.tensor([-0.25, 0.0], dtype=torch.float64))
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_at_policy_equal_ref_is_ln2_with_zero_rewards(label_smoothing):
    torch.manual_seed(0)
    chosen, rejected = -10 * torch.rand(4), -10 * torch.rand(4)
    losses, cr, rr = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1,
                              label_smoothing=label_smoothing)
    assert_close(losses, torch.full((4,), math.log(2)), rtol=0, atol=1e-7)
    assert (cr == 0).all() and (rr == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_dpo_finite_and_correct_at_margins_of_200(dtype, loss_type):
    # h = ±400, β = 1 → sigmoid losses ≈ [0, 400], hinge [0, 401]
    pc = torch.tensor([200.0, -200.0], requires_grad=True)
    pr = torch.tensor([-200.0, 200.0])
    zero = torch.zeros(2)
    losses, _, _ = dpo_loss(pc.to(dtype), pr.to(dtype), zero.to(dtype), zero.to(dtype), beta=1.0,
                            loss_type=loss_type)
    ref, _, _ = dpo_loss(pc.detach().double(), pr.double(), zero.double(), zero.double(), beta=1.0,
                         loss_type=loss_type)
    assert torch.isfinite(losses).all()
    assert_close(losses.double(), ref, rtol=1e-6, atol=1e-6)
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_dpo_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_two_pairs(), loss_type="kto")


def test_sequence_logps_sums_shifted_mask_on_unequal_lengths():
    # token_logps[:, t] scores tokens[:, t+1], so loss_mask[:, 1:] lines up with it.
    # row 0: loss_mask [0, 0, 1, 1] → token_logps[0, 1:3] = −2 + −3 = −5 (mean −2.5)
    # row 1: loss_mask [0, 1, 1, 1] → −1 + −1 + −4 = −6 (mean −2)
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -4.0]], dtype=torch.float64)
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert_close(sequence_logps(token_logps, loss_mask), torch.tensor([-5.0, -6.0], dtype=torch.float64))
    assert_close(sequence_logps(token_logps, loss_mask, mean=True),
                 torch.tensor([-2.5, -2.0], dtype=torch.float64))


def test_sequence_logps_equals_negative_summed_cross_entropy():
    # docs/pitfalls.md, "Log-prob alignment":
    # Σ_mask gathered log-probs == −CE(logits[:, :-1], tokens[:, 1:], sum, ignore_index)
    torch.manual_seed(0)
    B, T, V = 3, 6, 9
    logits = torch.randn(B, T, V, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    labels = tokens.masked_fill(loss_mask == 0, -100)
    for b in range(B):
        ce = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
        assert sequence_logps(token_logps, loss_mask)[b].item() == pytest.approx(-ce.item(), rel=1e-10)


def test_sequence_logps_ignores_non_finite_masked_positions():
    token_logps = torch.tensor([[float("-inf"), -1.0]])
    assert sequence_logps(token_logps, torch.tensor([[0, 0, 1]])).item() == -1.0
