"""GSPO's sequence-level ratio and clipping against hand computations, and its equivalence with
GRPO's per-sequence mean at ratio 1."""
import math

import pytest
import torch
from torch.testing import assert_close

from minipost.grpo import grpo_loss, kl_k3
from minipost.gspo import gspo_loss

F64 = dict(dtype=torch.float64)


def _case():
    # seq 0: 2 tokens with log π_θ − log π_old = [0.1, 0.3] (mean 0.2);
    # seq 1: 3 tokens with [−0.3, 0, 0.3] (mean 0); T = 4 with padding
    old_logps = torch.full((2, 4), -1.0, **F64)
    logps = (old_logps + torch.tensor([[0.1, 0.3, 5.0, 5.0], [-0.3, 0.0, 0.3, 5.0]], **F64))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    return logps.requires_grad_(True), old_logps, mask


def test_gspo_ratio_is_the_exponentiated_mean_token_log_ratio():
    # s = [e^0.2, e^0]; A = [1, −2], a wide clip range: L = −(e^0.2·1 + 1·(−2))/2
    logps, old_logps, mask = _case()
    loss, stats = gspo_loss(logps, old_logps, None, torch.tensor([1.0, -2.0], **F64), mask,
                            clip_eps=10.0, clip_eps_high=10.0)
    assert loss.item() == pytest.approx(-(math.exp(0.2) - 2) / 2, rel=1e-12)
    assert stats["policy/ratio_max_dev"].item() == pytest.approx(math.exp(0.2) - 1, rel=1e-12)
    assert stats["policy/clipfrac"].item() == 0.0 and "kl" not in stats
    # ∂L/∂log π_{0,t} = −A_0·s_0/|y_0| /N = −e^0.2/2/2 on both tokens of seq 0 (padding: 0)
    (g,) = torch.autograd.grad(loss, logps)
    assert_close(g[0], torch.tensor([-1, -1, 0, 0], **F64) * math.exp(0.2) / 4)
    assert_close(g[1], torch.tensor([1, 1, 1, 0], **F64) * 2 / 3 / 2)    # −(−2)·1/3, over N = 2


def test_gspo_clips_whole_sequences():
    # s_0 = e^0.2 ≈ 1.22 > 1 + ε_h with A_0 > 0: clipped, no gradient to any token of seq 0
    logps, old_logps, mask = _case()
    loss, stats = gspo_loss(logps, old_logps, None, torch.tensor([1.0, -2.0], **F64), mask,
                            clip_eps=0.2, clip_eps_high=0.2)
    assert loss.item() == pytest.approx(-(1.2 - 2) / 2, rel=1e-12)
    assert stats["policy/clipfrac"].item() == 0.5
    (g,) = torch.autograd.grad(loss, logps)
    assert (g[0] == 0).all() and (g[1, :3] != 0).all()


def test_gspo_at_ratio_one_has_grpos_per_sequence_mean_gradient():
    # μ = 1: π_old = π_θ, so s_i = 1 and ∇s_i = (1/|y_i|) Σ_t ∇log π: GRPO with loss_type="grpo"
    torch.manual_seed(0)
    logps = (-torch.rand(3, 5, **F64)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ref_logps = logps.detach() + 0.3 * torch.randn(3, 5, **F64)
    adv = torch.tensor([0.5, -1.0, 2.0], **F64)
    entropy = torch.rand(3, 5, **F64).requires_grad_(True)
    kw = dict(beta=0.04, entropy=entropy, entropy_coef=0.01)
    gspo, _ = gspo_loss(logps, logps.detach(), ref_logps, adv, mask, **kw)
    grpo, _ = grpo_loss(logps, logps.detach(), ref_logps, adv, mask, loss_type="grpo", **kw)
    assert_close(gspo, grpo)
    assert_close(torch.autograd.grad(gspo, (logps, entropy)), torch.autograd.grad(grpo, (logps, entropy)))


def test_gspo_kl_and_entropy_terms_are_per_sequence_means():
    # ρ = 1, A = 0: L = (1/N) Σ_i (1/|y_i|) Σ_t (β·k3 − c·H); k3 = 1 − ln 2 everywhere (r = 2)
    logps, _, mask = _case()
    ref_logps = logps.detach() + math.log(2)
    entropy = torch.full((2, 4), 0.5, **F64)
    loss, stats = gspo_loss(logps, logps.detach(), ref_logps, torch.zeros(2, **F64), mask,
                            beta=0.1, entropy=entropy, entropy_coef=0.2)
    k3 = 1 - math.log(2)
    assert loss.item() == pytest.approx(0.1 * k3 - 0.2 * 0.5, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(k3, rel=1e-12)
    assert_close(kl_k3(logps, ref_logps)[mask.bool()], torch.full((5,), k3, **F64))


def test_gspo_normalizer_makes_micro_batches_accumulate_to_the_full_batch():
    logps, old_logps, mask = _case()
    adv = torch.tensor([1.0, -2.0], **F64)
    full, _ = gspo_loss(logps, old_logps, None, adv, mask, clip_eps=0.1, clip_eps_high=0.3)
    parts = [gspo_loss(logps[i:i + 1], old_logps[i:i + 1], None, adv[i:i + 1], mask[i:i + 1],
                       clip_eps=0.1, clip_eps_high=0.3, normalizer=2.0)[0] for i in range(2)]
    assert_close(parts[0] + parts[1], full)
