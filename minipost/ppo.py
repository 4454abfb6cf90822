"""PPO for language models: GAE, whitening, clipped policy and value losses, KL-shaped rewards.

Sources:
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv 1707.06347): the clipped
  surrogate L^CLIP = E_t[min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)].
- Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (arXiv 1506.02438): A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593):
  per-token reward −β·log(π/π_ref) plus the reward-model score, and the adaptive β controller.
- Huang et al. 2022, "The N Implementation Details of RLHF with PPO" (HF blog), for the value
  clipping, whitening and the TRL conventions followed here.

One episode = one completion; time steps are its tokens (the tokens where `mask` is 1). All
functions are pure; callers pass detached rollout tensors where the paper treats them as constants
(old log-probs, old values, rewards, advantages, returns).
"""

import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ≈ 5e8: larger log-ratios would overflow bf16/fp16 or give inf·0 = NaN


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over entries where mask is 1: Σ m·x / Σ m (0 where Σ m = 0).

    Args: x and mask of the same shape; dim None reduces over everything.
    Masked-out entries never contribute, even if they are non-finite.
    """
    m = mask.bool()
    total = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / m.sum().clamp(min=1)
    return total.sum(dim) / m.sum(dim).clamp(min=1)


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # unbiased (Bessel-corrected) variance over masked entries: Σ m·(x − μ)² / (n − 1)
    m = mask.bool()
    mean = masked_mean(x, m)
    sq = torch.where(m, (x - mean) ** 2, torch.zeros_like(x))
    return sq.sum() / (m.sum() - 1).clamp(min=1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens of each row, and the value targets.

    Schulman et al. 2015 (arXiv 1506.02438):
        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t
    with V = 0 and A = 0 after the last masked token (the episode ends at EOS). Positions with
    mask 0 are skipped: a masked position inside a row (a hole) passes V_{t+1} and A_{t+1} of the
    next masked token through unchanged, so the recursion runs over each row's masked tokens only.
    λ = 0 gives A_t = δ_t; λ = γ = 1 gives A_t = Σ_{k≥t} r_k − V_t.

    Args:
        rewards: (B, T) per-token rewards (e.g. `kl_shaped_rewards`).
        values: (B, T) value estimates V(s_t), detached.
        mask: (B, T) 1 on completion tokens; rows may start and end at different positions.
        gamma: discount γ.  lam: GAE λ.

    Returns:
        (advantages, returns), each (B, T), 0 where mask is 0. `returns` use the raw (unwhitened)
        advantages. A reverse loop over T, vectorised over B.
    """
    m = mask.bool()
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(B)   # (B,) V_{t+1}; 0 after the last masked token
    next_adv = values.new_zeros(B)     # (B,) A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]     # (B,) δ_t
        adv_t = delta + gamma * lam * next_adv                        # (B,) A_t
        advantages[:, t] = torch.where(m[:, t], adv_t, torch.zeros_like(adv_t))
        next_adv = torch.where(m[:, t], adv_t, next_adv)
        next_value = torch.where(m[:, t], values[:, t], next_value)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Masked whitening: (x − μ)/√(σ² + eps) with μ, σ² over the masked entries only.

    As TRL's `masked_whiten` (Huang et al. 2022, "N implementation details"): σ² is the UNBIASED
    (Bessel-corrected, n−1) variance over all masked entries of the batch; with shift_mean=False
    the mean is added back, x ↦ (x − μ)/σ + μ (TRL does this for rewards; docs/pitfalls.md,
    "Masked whitening").

    Args:
        x: (B, T) values, e.g. advantages.  mask: (B, T) 1 where x counts.
        shift_mean: True → masked mean 0; False → masked mean kept.
        eps: added to the variance.

    Returns:
        (B, T) whitened x, 0 where mask is 0 (so the result does not depend on the padding).
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    whitened = (x - mean) * torch.rsqrt(_masked_var(x, m) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


def ratio_stats(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip fraction and max |ρ − 1| over masked tokens (detached scalars); all inputs (B, T).

    The clipped branch is active, and the token's gradient zero, where A > 0 and ρ > 1+ε_high or
    A < 0 and ρ < 1−ε_low (TRL's `pg_clipfrac`). Max |ρ − 1| should be ~0 on the first minibatch
    of an update (docs/pitfalls.md, "The first ratio is exactly 1").
    """
    clipped = ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))
    dev = torch.where(mask.bool(), (ratio - 1).abs(), torch.zeros_like(ratio))
    return masked_mean(clipped.to(ratio.dtype), mask).detach(), dev.max().detach()


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped-surrogate policy loss, averaged over the masked tokens of the batch.

    Schulman et al. 2017 (arXiv 1707.06347), L^CLIP as a loss to minimise, with the paper's
    optional entropy bonus c·H[π_θ](s_t) (its L^{CLIP+VF+S}, here without the value term):
        ρ_t = exp(log π_θ(a_t) − log π_old(a_t)),
        ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)) − c·H_t,   L = Σ m_t ℓ_t / Σ m_t
    The log-ratio is clamped to ±20 before exp (LOG_RATIO_CLAMP): beyond that the token is far
    outside the trust region anyway, and exp would overflow in low precision (docs/pitfalls.md,
    "Numerical stability").

    Args:
        logps: (B, T) log π_θ of the sampled tokens (with grad).
        old_logps: (B, T) log π_old from the rollout (detached).
        advantages: (B, T) per-token advantages (detached; usually whitened).
        mask: (B, T) 1 on completion tokens.
        clip_eps: ε.
        entropy: (B, T) token entropies of π_θ WITH grad, or None (needed when entropy_coef ≠ 0).
        entropy_coef: c (0 = no bonus).

    Returns:
        (loss, stats): loss is a scalar MEAN over all masked tokens of the batch (token-level).
        stats (detached scalars): "policy/clipfrac" fraction of tokens whose clipped branch is
        active; "policy/approx_kl" = mean of k3 = (ρ−1) − log ρ, an unbiased, non-negative
        estimate of KL(π_old ‖ π_θ) on tokens sampled from π_old (Schulman, "Approximating KL
        divergence", 2020); "policy/ratio_mean"; "policy/ratio_max_dev" = max |ρ−1|.
    """
    log_ratio = (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)   # (B, T)
    ratio = torch.exp(log_ratio)                                              # (B, T) ρ
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy                      # − c·H bonus
    loss = masked_mean(per_token, mask)
    clipfrac, max_dev = ratio_stats(ratio.detach(), advantages, mask, clip_eps, clip_eps)
    stats = {
        "policy/clipfrac": clipfrac,
        "policy/approx_kl": masked_mean((ratio - 1 - log_ratio).detach(), mask),
        "policy/ratio_mean": masked_mean(ratio.detach(), mask),
        "policy/ratio_max_dev": max_dev,
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, as in OpenAI's lm-human-preferences and TRL (Huang et al. 2022).

        v_clip = v_old + clip(v − v_old, −ε, ε)
        L = ½ · Σ m_t · max((v_t − R_t)², (v_clip,t − R_t)²) / Σ m_t

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) values from the rollout (detached).
        returns: (B, T) value targets R = A + V_old from `gae`.
        mask: (B, T) 1 on completion tokens.
        clip_eps: ε, in the units of the value.

    Returns:
        (loss, stats): scalar, ½ × MEAN over masked tokens; stats "value/clipfrac" (detached) is
        the fraction of tokens where the clipped error is the larger one (its gradient is zero).
    """
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)   # (B, T)
    err_unclipped = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err_unclipped).to(values.dtype), mask).detach()
    return loss, {"value/clipfrac": clipfrac}


def kl_shaped_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token rewards: a KL penalty at every token plus the sequence score at the last token.

    Ziegler et al. 2019 (arXiv 1909.08593): R(x, y) = r(x, y) − β·log(π(y|x)/π_ref(y|x)), spread
    over tokens as
        r_t = −β·(log π(a_t) − log π_ref(a_t)) + 1[t = last masked token]·score
    The per-token penalty is the k1 estimator, whose expectation is the exact KL and which, used
    as a reward (not differentiated), gives an unbiased policy gradient (docs/pitfalls.md, "KL
    estimators"). The score goes on the LAST masked token of each row, i.e. the EOS, not on the
    first padding token after it (docs/pitfalls.md, "EOS and truncation").

    Args:
        logps: (B, T) log π of the sampled tokens at rollout (detached).
        ref_logps: (B, T) log π_ref of the same tokens.
        scores: (B,) reward-model / verifier score per completion.
        mask: (B, T) 1 on completion tokens (including EOS).
        kl_coef: β.

    Returns:
        (B, T) token_rewards, 0 where mask is 0; a row with no masked token gets no score.
    """
    m = mask.bool()
    B, T = m.shape
    token_rewards = torch.where(m, -kl_coef * (logps - ref_logps), torch.zeros_like(logps))  # (B, T)
    positions = torch.arange(T, device=m.device).expand(B, T)
    last = torch.where(m, positions, -1).max(dim=1).values                                    # (B,)
    at_last = (positions == last[:, None]) & m                                                # (B, T)
    return token_rewards + at_last.to(token_rewards.dtype) * scores[:, None].to(token_rewards.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the value predictions: 1 − Var[R − V] / Var[R], over masked tokens.

    1 = perfect value function, 0 = no better than a constant, < 0 = worse. Unbiased variances as
    in `whiten`. Returns NaN when Var[R] = 0 (undefined), as cleanrl and Stable-Baselines3 do.

    Args: values, returns, mask: (B, T). Returns: a detached scalar.
    """
    var_returns = _masked_var(returns, mask)
    ev = 1 - _masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan"))).detach()


def logp_advantage_covariance(logps: torch.Tensor, advantages: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """Covariance over the batch's tokens between log π(a_t) and the advantage A_t.

    Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models" (arXiv 2505.22617): under a policy-gradient step the entropy changes by about
    −η·Cov(log π(a|s), π(a|s)·A(s, a)) per state (−η·Cov(log π, A) for natural policy gradient),
    so a positive covariance — confident tokens with positive advantages — means entropy is
    falling. As in their Clip-Cov/KL-Cov, the covariance is taken over all scored tokens of the
    batch, with the batch means (plug-in, n in the denominator):
        Cov = (1/n) Σ_t m_t·(log π_t − mean log π)·(A_t − mean A)

    Args:
        logps: (B, T) log-probs of the sampled tokens.
        advantages: (B,) one per sequence (broadcast over its tokens) or (B, T) one per token.
        mask: (B, T) 1 on the scored tokens.

    Returns a detached scalar (0 for an empty mask).
    """
    m = mask.bool()
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).expand_as(logps)
    x = logps.detach() - masked_mean(logps.detach(), m)                        # (B, T)
    a = adv.detach().to(x.dtype) - masked_mean(adv.detach().to(x.dtype), m)   # (B, T)
    return masked_mean(x * a, m)


def adaptive_kl_update(
    kl_coef: float, current_kl: float, target_kl: float, n_steps: int, horizon: int
) -> float:
    """One step of the adaptive KL controller; returns the new β.

    Ziegler et al. 2019 (arXiv 1909.08593), a proportional controller on log β:
        e = clip(KL/KL_target − 1, −0.2, 0.2),   β ← β·(1 + e·n_steps/horizon)
    (the paper's K_β = 0.1 corresponds to n_steps/horizon = 0.1; TRL's `AdaptiveKLController`
    uses n_steps = batch size, horizon = 10000).

    Args:
        kl_coef: current β.  current_kl: measured KL(π ‖ π_ref) per sequence.
        target_kl: KL_target.  n_steps: samples since the last update.  horizon: time constant.
    """
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
