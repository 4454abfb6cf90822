import pytest
import torch
from torch.testing import assert_close

from minipost.ppo import (adaptive_kl_update, explained_variance, gae, kl_shaped_rewards,
                          logp_advantage_covariance, ppo_policy_loss, ppo_value_loss, whiten)

F64 = dict(dtype=torch.float64)


def _naive_gae(rewards, values, mask, gamma, lam):
    # reference: for each row, a plain python loop over its masked tokens only
    adv, ret = torch.zeros_like(values), torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            next_a = delta + gamma * lam * next_a
            next_v = values[b, t].item()
            adv[b, t], ret[b, t] = next_a, next_a + next_v
    return adv, ret


def _ragged(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):  # prompt of random length, completion of random length, then padding
        start = int(torch.randint(0, T // 2, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = 1
    return torch.randn(B, T, generator=g, **F64), torch.randn(B, T, generator=g, **F64), mask


def test_gae_hand_computed():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], γ = 1, λ = 0.95, V after the last token = 0
    # δ2 = 1 + 0 − 0.7 = 0.3;   A2 = 0.3
    # δ1 = 0 + 0.7 − 0.6 = 0.1; A1 = 0.1 + 0.95·0.3   = 0.385
    # δ0 = 0 + 0.6 − 0.5 = 0.1; A0 = 0.1 + 0.95·0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]; the padded 4th position is 0 in both
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], **F64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], **F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]], **F64))
    assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]], **F64))


def test_gae_lambda_zero_is_td_error():
    rewards, values, mask = _ragged(5, 9, seed=1)
    gamma = 0.9
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(5, 1, **F64)], dim=1)  # 0 after the end
    delta = (rewards + gamma * next_values - values) * mask  # δ_t
    assert_close(adv, delta)


def test_gae_lambda_one_gamma_one_is_return_to_go_minus_value():
    rewards, values, mask = _ragged(5, 9, seed=2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_r = rewards * mask
    return_to_go = masked_r.flip(1).cumsum(1).flip(1)  # Σ_{k≥t} r_k
    assert_close(adv, (return_to_go - values) * mask)
    assert_close(ret, return_to_go * mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_vectorised_equals_naive_per_row_loop_on_ragged_masks(seed):
    rewards, values, mask = _ragged(6, 11, seed)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = _naive_gae(rewards, values, mask, 0.97, 0.9)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


def test_gae_padding_tail_changes_nothing_in_valid_entries():
    rewards, values, mask = _ragged(4, 8, seed=3)
    adv, ret = gae(rewards, values, mask)
    pad = torch.randn(4, 5, **F64) * 100  # garbage rewards and values in the padding
    adv_p, ret_p = gae(torch.cat([rewards, pad], 1), torch.cat([values, pad], 1),
                       torch.cat([mask, torch.zeros(4, 5)], 1))
    assert_close(adv_p[:, :8], adv)
    assert_close(ret_p[:, :8], ret)
    assert (adv_p[:, 8:] == 0).all() and (ret_p[:, 8:] == 0).all()


def test_gae_skips_masked_holes_inside_a_row():
    # a hole at t=1 is skipped: same result as the row without it
    r = torch.tensor([[1.0, 7.0, 2.0]], **F64)
    v = torch.tensor([[0.3, 8.0, 0.4]], **F64)
    adv, _ = gae(r, v, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    adv_ref, _ = gae(r[:, [0, 2]], v[:, [0, 2]], torch.ones(1, 2), gamma=0.9, lam=0.8)
    assert_close(adv[:, [0, 2]], adv_ref)
    assert adv[0, 1] == 0


def test_whiten_has_mean_zero_std_one_over_masked_entries():
    x = torch.randn(4, 10, **F64) * 3 + 5
    _, _, mask = _ragged(4, 10, seed=4)
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-10)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-6)  # unbiased std, as documented
    assert (w[~mask.bool()] == 0).all()
    # shift_mean=False keeps the masked mean: (x − μ)/σ + μ
    w_keep = whiten(x, mask, shift_mean=False)[mask.bool()]
    assert w_keep.mean().item() == pytest.approx(x[mask.bool()].mean().item(), rel=1e-10)
    assert w_keep.std().item() == pytest.approx(1.0, abs=1e-6)


def test_whiten_is_invariant_to_the_amount_of_padding():
    x = torch.randn(3, 6, **F64)
    _, _, mask = _ragged(3, 6, seed=5)
    w = whiten(x, mask)
    w_padded = whiten(torch.cat([x, torch.full((3, 7), 1e3, **F64)], 1), torch.cat([mask, torch.zeros(3, 7)], 1))
    assert_close(w_padded[:, :6], w)


def _policy_case():
    # token: A,  ρ    → max(−Aρ, −A·clip(ρ, 0.8, 1.2))
    #  0:   +1, 1.5  → max(−1.5, −1.2) = −1.2  (clipped: A>0, ρ>1+ε)
    #  1:   −1, 0.5  → max( 0.5,  0.8) =  0.8  (clipped: A<0, ρ<1−ε)
    #  2:   +1, 1.1  → max(−1.1, −1.1) = −1.1
    #  3:   −1, 1.5  → max( 1.5,  1.2) =  1.5  (pessimistic unclipped branch)
    #  4:   +1, 0.5  → max(−0.5, −0.8) = −0.5
    #  5:   masked out (ρ = e^30, garbage)
    # mean over 5 masked tokens = (−1.2 + 0.8 − 1.1 + 1.5 − 0.5)/5 = −0.5/5 = −0.1
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.5, 0.5, 1.0]], **F64)
    logps = ratio.log().clone()
    logps[0, 5] = 30.0
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, 5.0]], **F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logps.requires_grad_(True), torch.zeros(1, 6, **F64), adv, mask


def test_ppo_policy_loss_hand_computed_in_both_clipped_regions():
    logps, old_logps, adv, mask = _policy_case()
    loss, stats = ppo_policy_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.1, abs=1e-12)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["policy/ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    assert stats["policy/ratio_max_dev"].item() == pytest.approx(0.5)
    # k3 = (ρ−1) − log ρ averaged over masked tokens
    ratio = torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5], **F64)
    assert stats["policy/approx_kl"].item() == pytest.approx((ratio - 1 - ratio.log()).mean().item())
    assert all(not v.requires_grad for v in stats.values())


def test_ppo_policy_loss_has_zero_gradient_in_the_clipped_region():
    logps, old_logps, adv, mask = _policy_case()
    loss, _ = ppo_policy_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    loss.backward()
    # d/dlogπ of −Aρ/5 is −Aρ/5 on unclipped tokens, 0 on clipped and masked ones
    expected = torch.tensor([[0.0, 0.0, -1.1 / 5, 1.5 / 5, -0.5 / 5, 0.0]], **F64)
    assert_close(logps.grad, expected)


def test_ppo_policy_loss_is_finite_for_huge_log_ratios():
    logps = torch.tensor([[500.0, -500.0]], requires_grad=True)
    loss, stats = ppo_policy_loss(logps, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_ppo_value_loss_hand_computed_including_clipped():
    # ε = 0.2, per token (v, v_old, R): unclipped (v−R)², clipped v_c = v_old + clip(v−v_old, ±0.2)
    #  (1.0,  0.5, 0.0): 1.0,    v_c = 0.7: 0.49   → 1.0
    #  (1.0,  0.5, 2.0): 1.0,    v_c = 0.7: 1.69   → 1.69 (clipped branch wins)
    #  (0.45, 0.5, 0.0): 0.2025, v_c = 0.45: 0.2025 → 0.2025
    # loss = ½ · (1.0 + 1.69 + 0.2025)/3 = 0.48208333…, clipfrac = 1/3
    values = torch.tensor([[1.0, 1.0, 0.45, 3.0]], **F64, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.0]], **F64)
    returns = torch.tensor([[0.0, 2.0, 0.0, 0.0]], **F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.8925 / 3, rel=1e-12)
    assert stats["value/clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # gradient: ½·2(v−R)/3 on unclipped tokens, 0 on the clipped one and the masked one
    assert_close(values.grad, torch.tensor([[1.0 / 3, 0.0, 0.45 / 3, 0.0]], **F64))


def test_kl_shaped_rewards_puts_the_score_at_the_last_real_token():
    # kl_coef 0.1, log π − log π_ref = 1 everywhere → −0.1 per masked token; score on the last masked token
    logps = torch.ones(3, 5, **F64)
    ref_logps = torch.zeros(3, 5, **F64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 7.0], **F64)
    r = kl_shaped_rewards(logps, ref_logps, scores, mask, kl_coef=0.1)
    expected = torch.tensor([[0, -0.1, 1.9, 0, 0], [-0.1, -0.1, -0.1, -0.1, -1.1], [0, 0, 0, 0, 0]], **F64)
    assert_close(r, expected)


def test_explained_variance():
    returns = torch.randn(2, 6, **F64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    const = torch.full_like(returns, 3.0)  # a constant predictor explains nothing
    assert explained_variance(const, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isnan(explained_variance(const, const, mask))


def test_adaptive_kl_update_hand_computed():
    # error = clip(KL/target − 1, ±0.2); β·(1 + error·n/horizon)
    assert adaptive_kl_update(0.1, 6.0, 5.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_update(0.1, 50.0, 5.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))   # clipped
    assert adaptive_kl_update(0.1, 0.0, 5.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_update(0.1, 5.0, 5.0, 100, 1000) == pytest.approx(0.1)


def test_ppo_policy_loss_entropy_bonus_gradient_sign():
    # L = mean(policy term) − c·mean(H): ∂L/∂H_t = −c/n on the n masked tokens
    logps, old_logps, adv, mask = _policy_case()
    entropy = torch.full((1, 6), 1.5, **F64).requires_grad_(True)
    base, _ = ppo_policy_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    loss, _ = ppo_policy_loss(logps, old_logps, adv, mask, clip_eps=0.2, entropy=entropy,
                              entropy_coef=0.01)
    assert loss.item() == pytest.approx(base.item() - 0.01 * 1.5, rel=1e-12)
    (g,) = torch.autograd.grad(loss, entropy)
    assert_close(g, -0.01 / 5 * mask.to(torch.float64))


def test_logp_advantage_covariance_hand_computed():
    # tokens (log π, A): (−1, 1), (−2, 1), (−3, −1); the padded 4th is left out
    # means −2 and 1/3: Σ (x − x̄)(a − ā) = 1·(2/3) + 0 + (−1)(−4/3) = 2, over 3 tokens
    logps = torch.tensor([[-1.0, -2.0], [-3.0, 50.0]], **F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    cov = logp_advantage_covariance(logps, torch.tensor([1.0, -1.0], **F64), mask)
    assert cov.item() == pytest.approx(2 / 3, rel=1e-12)
    per_token = torch.tensor([[1.0, 1.0], [-1.0, 9.0]], **F64)
    assert logp_advantage_covariance(logps, per_token, mask).item() == pytest.approx(2 / 3)
    # a constant advantage (a constant-reward group) has no covariance
    assert logp_advantage_covariance(logps, torch.zeros(2, **F64), mask).item() == 0.0
