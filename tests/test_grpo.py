import math

import pytest
import torch
from torch.testing import assert_close

from minipost.grpo import (group_advantages, grpo_loss, kl_k3, reinforce_pp_advantages,
                           rloo_advantages)
from minipost.model import entropies

F64 = dict(dtype=torch.float64)


def test_group_advantages_hand_computed():
    # group 1 [1, 2, 3]: mean 2, unbiased std 1 → [−1, 0, 1]
    # group 2 [0, 0, 4]: mean 4/3, deviations [−4/3, −4/3, 8/3],
    #   unbiased var = (16/9 + 16/9 + 64/9)/2 = 16/3, std = 4/√3 → [−1/√3, −1/√3, 2/√3]
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], **F64)
    s3 = math.sqrt(3)
    assert_close(group_advantages(rewards, 3, eps=0.0),
                 torch.tensor([-1, 0, 1, -1 / s3, -1 / s3, 2 / s3], **F64))
    assert_close(group_advantages(rewards, 3, scale=None),
                 torch.tensor([-1, 0, 1, -4 / 3, -4 / 3, 8 / 3], **F64))
    # default eps = 1e-4 is added to the std
    assert group_advantages(rewards, 3)[2].item() == pytest.approx(1 / (1 + 1e-4), rel=1e-12)


def test_group_advantages_constant_group_gives_zeros_and_no_nan():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]), 4)
    assert torch.isfinite(adv).all()
    assert (adv[:4] == 0).all()
    assert (adv[4:] != 0).all()


def test_group_advantages_std_is_scale_invariant_and_dr_grpo_scales_linearly():
    torch.manual_seed(0)
    rewards = torch.rand(12, **F64)
    assert_close(group_advantages(rewards * 7.0, 4, eps=0.0), group_advantages(rewards, 4, eps=0.0))
    assert_close(group_advantages(rewards * 7.0, 4, scale=None), 7.0 * group_advantages(rewards, 4, scale=None))


def test_group_advantages_rejects_bad_shapes_and_scale():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 4, scale="max")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 1)


DR_GRPO_C = {"dr_grpo": 8.0}   # Dr. GRPO's constant: N = 2 sequences × a budget of 4 tokens


def _two_sequences():
    # seq 0 has 2 tokens, seq 1 has 3 tokens, T = 4; ρ = 1 everywhere
    logps = torch.full((2, 4), -1.0, **F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    return logps.requires_grad_(True), logps.detach().clone(), mask


@pytest.mark.parametrize("loss_type,expected", [
    # A = [1, −3], β = 0 → per-token loss −A: seq 0 [−1, −1], seq 1 [3, 3, 3]
    ("grpo", 1.0),       # mean(mean(−1, −1), mean(3, 3, 3)) = (−1 + 3)/2
    ("dapo", 1.4),       # (−2 + 9) / 5 tokens
    ("dr_grpo", 0.875),  # (−2 + 9) / (N·budget = 2·4)
])
def test_grpo_loss_aggregations_hand_computed_on_unequal_lengths(loss_type, expected):
    logps, old_logps, mask = _two_sequences()
    adv = torch.tensor([1.0, -3.0], **F64)
    loss, stats = grpo_loss(logps, old_logps, None, adv, mask, beta=0.0, loss_type=loss_type,
                            normalizer=DR_GRPO_C.get(loss_type))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert "kl" not in stats
    assert stats["policy/clipfrac"].item() == 0 and stats["policy/ratio_max_dev"].item() == 0


@pytest.mark.parametrize("loss_type,pg,kl_weight", [("grpo", 1.0, 1.0), ("dapo", 1.4, 1.0), ("dr_grpo", 0.875, 5 / 8)])
def test_grpo_loss_kl_term_hand_computed(loss_type, pg, kl_weight):
    # ref_logps = logps + ln 2 → r = π_ref/π = 2, k3 = 2 − 1 − ln 2 = 0.3068528 on every token
    # grpo/dapo average it over tokens (×1); dr_grpo sums 5 tokens over N·budget = 8 (×5/8)
    logps, old_logps, mask = _two_sequences()
    ref_logps = logps.detach() + math.log(2)
    loss, stats = grpo_loss(logps, old_logps, ref_logps, torch.tensor([1.0, -3.0], **F64), mask,
                            beta=0.1, loss_type=loss_type, normalizer=DR_GRPO_C.get(loss_type))
    k3 = 1 - math.log(2)
    assert loss.item() == pytest.approx(pg + 0.1 * k3 * kl_weight, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(k3, rel=1e-12)


def test_grpo_loss_clip_higher():
    # A = 1, ρ = 1.25: symmetric ε = 0.2 clips to 1.2; ε_high = 0.28 leaves it at 1.25
    logps = torch.tensor([[math.log(1.25)]], **F64)
    args = (logps, torch.zeros(1, 1, **F64), None, torch.tensor([1.0], **F64), torch.ones(1, 1))
    loss, stats = grpo_loss(*args, beta=0.0)
    assert loss.item() == pytest.approx(-1.2) and stats["policy/clipfrac"].item() == 1.0
    loss, stats = grpo_loss(*args, beta=0.0, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats["policy/clipfrac"].item() == 0.0


def test_grpo_constant_reward_group_has_zero_policy_gradient_and_only_kl_remains():
    torch.manual_seed(0)
    adv = group_advantages(torch.ones(4, **F64), 4)  # all zero
    logps = (-torch.rand(4, 5, **F64)).requires_grad_(True)
    old_logps = logps.detach() + 0.05 * torch.randn(4, 5, **F64)  # ρ ≠ 1
    ref_logps = logps.detach() + 0.3 * torch.randn(4, 5, **F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    loss0, _ = grpo_loss(logps, old_logps, ref_logps, adv, mask, beta=0.0)
    (g0,) = torch.autograd.grad(loss0, logps)
    assert (g0 == 0).all()
    loss, _ = grpo_loss(logps, old_logps, ref_logps, adv, mask, beta=0.04)
    (g,) = torch.autograd.grad(loss, logps)
    k3 = torch.where(mask.bool(), kl_k3(logps, ref_logps), 0.0)
    kl_only = 0.04 * (k3.sum(1) / mask.sum(1)).mean()
    (g_kl,) = torch.autograd.grad(kl_only, logps)
    assert_close(g, g_kl)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_grpo_normalizer_makes_unequal_micro_batches_accumulate_to_full_batch_gradient(loss_type):
    torch.manual_seed(0)
    N, T = 5, 6
    lengths = [6, 1, 3, 2, 5]
    mask = torch.zeros(N, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logps = (-torch.rand(N, T, **F64)).requires_grad_(True)
    old_logps = logps.detach() + 0.1 * torch.randn(N, T, **F64)
    ref_logps = logps.detach() + 0.1 * torch.randn(N, T, **F64)
    adv = torch.randn(N, **F64)
    # Dr. GRPO's constant: N × a budget of T tokens
    full, _ = grpo_loss(logps, old_logps, ref_logps, adv, mask, loss_type=loss_type,
                        normalizer=float(N * T) if loss_type == "dr_grpo" else None)
    (g_full,) = torch.autograd.grad(full, logps)
    # the caller's global denominators: total tokens (dapo), N·budget (dr_grpo), N (grpo)
    normalizer = {"dapo": float(mask.sum()), "dr_grpo": float(N * T), "grpo": float(N)}[loss_type]
    # micro-batches of 2 and 3 sequences, each padded only to its own longest sequence
    acc = 0
    for rows, t in ((slice(0, 2), 6), (slice(2, 5), 5)):
        part, _ = grpo_loss(logps[rows, :t], old_logps[rows, :t], ref_logps[rows, :t], adv[rows],
                            mask[rows, :t], loss_type=loss_type, normalizer=normalizer)
        acc = acc + part
    (g_acc,) = torch.autograd.grad(acc, logps)
    assert_close(acc, full)
    assert_close(g_acc, g_full)


def test_dapo_micro_batches_without_normalizer_do_not_match_full_batch():
    # the bug: (x1/n1 + x2/n2)/2 ≠ (x1 + x2)/(n1 + n2)
    # (docs/pitfalls.md, "Loss aggregation and gradient accumulation")
    logps, old_logps, mask = _two_sequences()
    adv = torch.tensor([1.0, -3.0], **F64)
    full, _ = grpo_loss(logps, old_logps, None, adv, mask, beta=0.0, loss_type="dapo")
    halves = [grpo_loss(logps[i:i + 1], old_logps[i:i + 1], None, adv[i:i + 1], mask[i:i + 1],
                        beta=0.0, loss_type="dapo")[0] for i in range(2)]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(1.0)  # (−1 + 3)/2
    assert full.item() == pytest.approx(1.4)


def test_grpo_unknown_loss_type_raises():
    logps, old_logps, mask = _two_sequences()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, old_logps, None, torch.zeros(2), mask, loss_type="bnpo")


def test_k3_is_non_negative_and_finite_for_extreme_log_ratios():
    torch.manual_seed(0)
    logps = torch.randn(1000) * 5
    ref_logps = torch.randn(1000) * 5
    extreme = torch.tensor([200.0, -200.0, 0.0])
    for lp, rp in ((logps, ref_logps), (extreme, -extreme)):
        k3 = kl_k3(lp, rp)
        assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert kl_k3(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-1.0], dtype=torch.bfloat16)) == 0


def _categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], **F64)  # π
    q = torch.tensor([0.2, 0.5, 0.3], **F64)  # π_ref
    return p, q, (p * (p / q).log()).sum()     # exact KL(π ‖ π_ref) = 0.1837…


def test_monte_carlo_k1_and_k3_means_match_exact_kl():
    p, q, kl = _categoricals()
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)  # samples from π
    k1 = p.log()[x] - q.log()[x]
    k3 = kl_k3(p.log()[x], q.log()[x])
    assert k1.mean().item() == pytest.approx(kl.item(), abs=0.01)
    assert k3.mean().item() == pytest.approx(kl.item(), abs=0.01)


def test_k3_in_the_loss_does_not_give_the_reverse_kl_gradient_but_k2_does():
    # exact on-policy expectations Σ_x π(x)·∇k(x) (π as a fixed weight, as sampling would give)
    p, q, _ = _categoricals()
    theta = p.log().clone().requires_grad_(True)

    def grad(f):  # ∇_θ f(log π_θ)
        return torch.autograd.grad(f(torch.log_softmax(theta, 0)), theta)[0]

    w = p  # detached sampling weights
    g_exact = grad(lambda logp: (logp.exp() * (logp - q.log())).sum())   # ∇ KL(π‖π_ref)
    g_k2 = grad(lambda logp: (w * 0.5 * (logp - q.log()) ** 2).sum())
    g_k3 = grad(lambda logp: (w * kl_k3(logp, q.log())).sum())
    g_fwd = grad(lambda logp: -(q * logp).sum())                         # ∇ KL(π_ref‖π)
    assert_close(g_k2, g_exact)
    assert (g_k3 - g_exact).norm() > 0.1 * g_exact.norm()  # ≈13% off here
    assert_close(g_k3, g_fwd)  # k3-in-loss follows the forward KL instead


def test_dr_grpo_needs_its_constant_normalizer():
    """Dr. GRPO divides by a constant (N × the token budget), not by the padded width of the
    batch: the same rows padded 3 columns wider must give the same loss."""
    logps, old_logps, mask = _two_sequences()
    adv = torch.tensor([1.0, -3.0], **F64)
    with pytest.raises(ValueError, match="normalizer"):
        grpo_loss(logps, old_logps, None, adv, mask, beta=0.0, loss_type="dr_grpo")
    wide = [torch.nn.functional.pad(t, (0, 3)) for t in (logps, old_logps, mask)]
    narrow, _ = grpo_loss(logps, old_logps, None, adv, mask, beta=0.0, loss_type="dr_grpo",
                          normalizer=16.0)
    padded, _ = grpo_loss(wide[0], wide[1], None, adv, wide[2], beta=0.0, loss_type="dr_grpo",
                          normalizer=16.0)
    assert narrow.item() == padded.item() == pytest.approx(7 / 16)    # (−2 + 9) / 16


# ---------------------------------------------------------------------------- RLOO, REINFORCE++
def test_rloo_advantages_hand_computed():
    # group [1, 2, 3]: baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5 → [−1.5, 0, 1.5]
    # group [0, 0, 4]: baselines 2, 2, 0 → [−2, −2, 4]  (= G/(G−1)·(r − mean) = 3/2·[−4/3, −4/3, 8/3])
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], **F64)
    assert_close(rloo_advantages(rewards, 3), torch.tensor([-1.5, 0, 1.5, -2, -2, 4], **F64))
    assert_close(rloo_advantages(rewards, 3), 1.5 * group_advantages(rewards, 3, scale=None))


def test_rloo_baseline_excludes_the_sample_itself():
    # Â_i − r_i = −baseline_i must not move when r_i moves; the others' baselines move by Δ/(G−1)
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0], **F64)
    bumped = rewards.clone()
    bumped[0] += 3.0
    base, base_bumped = rewards - rloo_advantages(rewards, 4), bumped - rloo_advantages(bumped, 4)
    assert_close(base_bumped[0], base[0])
    assert_close(base_bumped[1:], base[1:] + 1.0)            # 3 / (G − 1)
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), 1)


def _reinforce_pp_case():
    # seq 0: 2 tokens, reward 1; seq 1: 3 tokens, reward 0 (one group of G = 2)
    # log π_old − log π_ref: seq 0 [0.2, 0.4], seq 1 [0, −0.2, 0.6]; β = 0.5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref_logps = torch.full((2, 3), -1.0, **F64)
    logps = ref_logps + torch.tensor([[0.2, 0.4, 9.0], [0.0, -0.2, 0.6]], **F64)
    return torch.tensor([1.0, 0.0], **F64), mask, logps, ref_logps


def test_reinforce_pp_advantages_hand_computed():
    rewards, mask, logps, ref_logps = _reinforce_pp_case()
    # token rewards −β·k1 (+ r at the last token): seq 0 [−0.1, −0.2 + 1], seq 1 [0, 0.1, −0.3]
    # returns to go: seq 0 [0.7, 0.8], seq 1 [−0.2, −0.2, −0.3]; mean over 5 tokens 0.16,
    # deviations [0.54, 0.64, −0.36, −0.36, −0.46], unbiased var 1.172/4 = 0.293
    adv = reinforce_pp_advantages(rewards, mask, logps, ref_logps, beta=0.5, eps=0.0)
    s = math.sqrt(0.293)
    assert_close(adv, torch.tensor([[0.54, 0.64, 0], [-0.36, -0.36, -0.46]], **F64) / s)
    # with the group baseline the scores are [0.5, −0.5]: returns seq 0 [0.2, 0.3],
    # seq 1 [−0.7, −0.7, −0.8]; the same deviations (var 0.293), divided without re-centring
    adv = reinforce_pp_advantages(rewards, mask, logps, ref_logps, beta=0.5, group_size=2, eps=0.0)
    assert_close(adv, torch.tensor([[0.2, 0.3, 0], [-0.7, -0.7, -0.8]], **F64) / s)


def test_reinforce_pp_normalises_over_the_batch_not_the_group():
    # REINFORCE++ compares with the batch: a group of 1s beside a group of 0s gets A > 0;
    # its baseline variant compares with the group first, so that group gets exactly 0
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], **F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    plain = reinforce_pp_advantages(rewards, mask)
    assert (plain[:2][mask[:2].bool()] > 0).all() and (plain[2:][mask[2:].bool()] < 0).all()
    assert (reinforce_pp_advantages(rewards, mask, group_size=2) == 0).all()


@pytest.mark.parametrize("estimator", ["group_std", "group_none", "rloo", "reinforce_pp",
                                       "reinforce_pp_baseline"])
def test_constant_rewards_give_zero_advantage_in_every_estimator(estimator):
    rewards = torch.ones(6, **F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]] * 2)
    adv = {"group_std": lambda: group_advantages(rewards, 3),
           "group_none": lambda: group_advantages(rewards, 3, scale=None),
           "rloo": lambda: rloo_advantages(rewards, 3),
           "reinforce_pp": lambda: reinforce_pp_advantages(rewards, mask),
           "reinforce_pp_baseline": lambda: reinforce_pp_advantages(rewards, mask, group_size=3),
           }[estimator]()
    assert torch.isfinite(adv).all() and (adv == 0).all()


def test_token_level_advantages_weigh_each_token():
    # (N, T) advantages: the per-token loss is −Â_{i,t} (ρ = 1); dapo: token mean
    logps, old_logps, mask = _two_sequences()
    adv = torch.tensor([[1.0, 2.0, 7.0, 7.0], [-1.0, 0.0, 4.0, 7.0]], **F64)
    loss, _ = grpo_loss(logps, old_logps, None, adv, mask, beta=0.0, loss_type="dapo")
    assert loss.item() == pytest.approx(-(1 + 2 - 1 + 0 + 4) / 5, rel=1e-12)


# ---------------------------------------------------------------------------- entropy bonus
def test_entropy_bonus_is_minus_c_times_the_aggregated_entropy_and_raises_entropy():
    # dapo: L = −c · Σ m·H / Σ m, so ∂L/∂H = −c/5 on each of the 5 tokens (A = 0: no policy term)
    logps, old_logps, mask = _two_sequences()
    entropy = torch.full((2, 4), 0.5, **F64).requires_grad_(True)
    loss, _ = grpo_loss(logps, old_logps, None, torch.zeros(2, **F64), mask, beta=0.0,
                        loss_type="dapo", entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(-0.05, rel=1e-12)
    (g,) = torch.autograd.grad(loss, entropy)
    assert_close(g, -0.1 / 5 * mask.to(torch.float64))
    # through real logits: one gradient step on the bonus raises every position's entropy
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 4, 5, **F64)).requires_grad_(True)
    loss, _ = grpo_loss(logps, old_logps, None, torch.zeros(2, **F64), mask, beta=0.0,
                        loss_type="grpo", entropy=entropies(logits), entropy_coef=1.0)
    loss.backward()
    with torch.no_grad():
        before, after = entropies(logits), entropies(logits - 0.1 * logits.grad)
    assert (after[mask.bool()] > before[mask.bool()]).all()
