"""Group Relative Policy Optimization (GRPO) and its DAPO / Dr. GRPO loss aggregations.

Sources:
- Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models" (arXiv 2402.03300): group-normalised advantages Â_i = (r_i − mean(r))/std(r), the clipped
  surrogate per token, a per-sequence mean 1/|o_i| Σ_t, and the KL penalty
  D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1 (Schulman's k3 estimator).
- Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
  (arXiv 2503.14476): decoupled clip range (1−ε_low, 1+ε_high) and a token-level mean over all
  tokens of the batch.
- Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO,
  arXiv 2503.20783): no division by std(r), and a constant normaliser instead of 1/|o_i|, removing
  the question-difficulty and length biases (docs/pitfalls.md: "Loss aggregation and gradient
  accumulation", "Zero-variance groups in GRPO").
- Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs" (RLOO, arXiv 2402.14740): each sample's baseline is the mean reward of
  the other G − 1 samples of its prompt.
- Hu et al. 2025, "REINFORCE++" (arXiv 2501.03262): a per-token KL penalty in the reward, the
  return to go as the advantage, normalised over the whole batch instead of within each group;
  its "baseline" variant first subtracts the group's mean reward.

The three advantage estimators (`group_advantages`, `rloo_advantages`, `reinforce_pp_advantages`)
differ only in the baseline and the normalisation; all feed the same `grpo_loss` (or
`gspo.gspo_loss`), which takes one advantage per sequence (N,) or per token (N, T).

Departures: ε = 1e-4 is added to the std (TRL's choice) so a constant-reward group gets zero
advantages instead of NaN; the log-ratio is clamped to ±20 before exp (see `ppo.LOG_RATIO_CLAMP`).
"""

import torch

from minipost.ppo import LOG_RATIO_CLAMP, kl_shaped_rewards, masked_mean, ratio_stats, whiten


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str | None = "std", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages: each completion's reward against its group's mean.

    Shao et al. 2024 (arXiv 2402.03300):   Â_i = (r_i − mean_g(r)) / (std_g(r) + eps)
    Liu et al. 2025, Dr. GRPO (arXiv 2503.20783), scale=None:   Â_i = r_i − mean_g(r)
    std is the UNBIASED (Bessel-corrected, G−1) std, as torch's default and TRL; minimind uses the
    biased one. The std form is invariant to scaling rewards by c > 0 (up to eps); the Dr. GRPO
    form scales with c.

    Args:
        rewards: (B·G,) one reward per completion; consecutive `group_size` entries are one group
            (the G samples of one prompt).
        group_size: G ≥ 1 (≥ 2 with scale="std").
        scale: "std" or None.
        eps: added to the std.

    Returns:
        (B·G,) advantages, in the rewards' float dtype (at least fp32).
    Raises:
        ValueError: len(rewards) not a multiple of group_size, G < 2 with "std", unknown scale.
    """
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = rewards.to(dtype).view(-1, group_size)                     # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)                # (B, G) r − mean_g
    if scale == "std":
        if group_size < 2:
            raise ValueError("scale='std' needs group_size >= 2 (unbiased std of one sample)")
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale is not None:
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or None")
    return centred.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each reward against the mean of the OTHER samples.

    Ahmadian et al. 2024 (RLOO, arXiv 2402.14740):
        Â_i = r_i − 1/(G−1) · Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean_g(r))
    The baseline leaves the sample itself out, so it is independent of the sample and the
    gradient stays unbiased; no division by a std. A constant-reward group gets exactly 0.

    Args:
        rewards: (B·G,) one reward per completion; consecutive `group_size` entries are one group.
        group_size: G ≥ 2.

    Returns:
        (B·G,) advantages, in the rewards' float dtype (at least fp32).
    Raises:
        ValueError: len(rewards) not a multiple of group_size, or G < 2.
    """
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"RLOO needs groups of >= 2: {rewards.numel()} rewards, group {group_size}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    grouped = rewards.to(dtype).view(-1, group_size)                            # (B, G)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)        # (B, G) Σ_{j≠i} r_j/(G−1)
    return (grouped - others).view(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++ token-level advantages: KL in the reward, return to go, batch normalisation.

    Hu et al. 2025 (arXiv 2501.03262), per token t of completion i (γ = 1):
        r_{i,t} = −β·log(π_old(a_t)/π_ref(a_t)) + 1[t = last]·s_i         (k1 KL in the reward)
        A_{i,t} = Σ_{k≥t} r_{i,k}                                          (return to go)
        REINFORCE++:          s_i = r_i,                Â = (A − mean_batch A) / std_batch A
        REINFORCE++-baseline: s_i = r_i − mean_g(r),    Â = A / std_batch A
    mean and std are over every masked token of the batch (std unbiased, as `ppo.whiten`). The
    k1 penalty is a reward, not differentiated, so its gradient is unbiased (docs/pitfalls.md,
    "KL estimators"). Where implementations differ: after the group baseline some re-centre over
    the batch's tokens too; this code divides by the std only, because the group mean has already
    centred every group, and re-centring over tokens (long completions weigh more) would move a
    constant-reward group off 0.

    Args:
        rewards: (N,) one reward per completion (groups of `group_size` consecutive rows).
        mask: (N, T) 1 on the completion tokens in the loss (including the EOS).
        logps, ref_logps: (N, T) log π_old (the sampler's) and log π_ref of the sampled tokens;
            None for no KL term.
        beta: β, the KL coefficient in the reward.
        group_size: G for the baseline variant; None for plain REINFORCE++.
        eps: added to the variance.

    Returns:
        (N, T) advantages, 0 where mask is 0, in at least fp32.
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    scores = rewards.to(dtype)                                                   # (N,) s_i
    if group_size is not None:
        grouped = scores.view(-1, group_size)                                    # (B, G)
        scores = (grouped - grouped.mean(1, keepdim=True)).view(-1)             # r_i − mean_g r
    m = mask.bool()
    if logps is None or ref_logps is None:
        logps = ref_logps = torch.zeros(m.shape, dtype=dtype, device=m.device)
    token_rewards = kl_shaped_rewards(logps.to(dtype), ref_logps.to(dtype), scores, m, beta)
    returns = token_rewards.flip(1).cumsum(1).flip(1)                            # (N, T) Σ_{k≥t} r_k
    returns = torch.where(m, returns, torch.zeros_like(returns))
    if group_size is None:
        return whiten(returns, m, eps=eps)                                       # (A − μ)/σ
    sq = torch.where(m, (returns - masked_mean(returns, m)) ** 2, torch.zeros_like(returns))
    var = sq.sum() / (m.sum() - 1).clamp(min=1)                                  # unbiased σ²
    return returns * torch.rsqrt(var + eps)                                      # A/σ


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π ‖ π_ref), elementwise, on tokens sampled from π.

        k3 = r − 1 − log r,   r = π_ref/π = exp(ref_logps − logps)
    Unbiased as a value (E_π[r] = 1) and ≥ 0 (since x − 1 ≥ log x). Computed as expm1(d) − d with
    d clamped to ±20, which is exact near d = 0 and finite for any d.
    """
    d = (ref_logps - logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(d) - d


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    normalizer: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped-surrogate loss with a k3 KL penalty, aggregated the GRPO, DAPO or Dr. GRPO way.

    Shao et al. 2024 (arXiv 2402.03300), per token of sequence i (ε_h = DAPO's ε_high, Yu et al. 2025,
    arXiv 2503.14476):
        ρ_{i,t} = exp(log π_θ − log π_old),
        ℓ_{i,t} = −min(ρ_{i,t}·Â_i, clip(ρ_{i,t}, 1−ε, 1+ε_h)·Â_i) + β·k3_{i,t} − c·H_{i,t},
        k3 = π_ref/π_θ − log(π_ref/π_θ) − 1
    Â_i is one advantage per sequence, or Â_{i,t} one per token (REINFORCE++). −c·H_{i,t} is the
    optional entropy bonus (c = `entropy_coef`, H_{i,t} the entropy of π_θ's next-token
    distribution): aggregated like the rest of ℓ, so minimising the loss raises the entropy.
    Aggregation (m = mask, |o_i| = Σ_t m_{i,t}):
        grpo:    L = (1/N) Σ_i (1/|o_i|) Σ_t m·ℓ      (per-sequence mean, then mean over sequences)
        dapo:    L = Σ_{i,t} m·ℓ / Σ_{i,t} m          (token-level mean, Yu et al. 2025)
        dr_grpo: L = Σ_{i,t} m·ℓ / C                  (constant, Liu et al. 2025: `normalizer`)
    k3's value is an unbiased KL estimate, but its gradient in the loss is not the gradient of
    KL(π_θ ‖ π_ref): on-policy it equals the gradient of the forward KL(π_ref ‖ π_θ)
    (docs/pitfalls.md, "KL estimators"; TRL #4967). It is kept because it is what GRPO specifies.

    Dr. GRPO's C must be a constant of the run, N × the completion budget (`--max-new-tokens`), so
    it is required: the batch's padded width T = mask.shape[1], the only constant-looking number in
    reach, changes with the longest completion of each batch, which would bring back the length
    bias Dr. GRPO removes.

    Gradient accumulation: the denominators above are per call, so micro-batches with different
    token counts or padded lengths do not add up to the full-batch loss (docs/pitfalls.md, "Loss
    aggregation and gradient accumulation"). Pass `normalizer` = the full batch's denominator
    (dapo: its total token count; dr_grpo: N_total × the completion budget; grpo: N_total) and
    sum the micro-batch losses; then the accumulated gradient equals the full-batch gradient.

    Args:
        logps: (N, T) log π_θ of the sampled tokens (with grad).
        old_logps: (N, T) log π_old at sampling time (detached).
        ref_logps: (N, T) log π_ref, or None for no KL term (then "kl" is absent from stats).
        advantages: (N,) one advantage per sequence (`group_advantages`, `rloo_advantages`) or
            (N, T) one per token (`reinforce_pp_advantages`).
        mask: (N, T) 1 on completion tokens.
        clip_eps: ε (lower clip, and upper when clip_eps_high is None).
        clip_eps_high: ε_h, DAPO's "clip-higher"; None → ε.
        beta: β, KL coefficient (0 disables the penalty but "kl" is still reported).
        loss_type: "grpo", "dapo" or "dr_grpo".
        normalizer: replaces the denominator (N for grpo, Σ m for dapo); dr_grpo's C, required.
        entropy: (N, T) token entropies of π_θ WITH grad, or None (needed when entropy_coef ≠ 0).
        entropy_coef: c, the entropy bonus's weight (0 = none).

    Returns:
        (loss, stats): scalar loss; detached stats "kl" (token mean of k3, if ref_logps is given),
        "policy/clipfrac" (fraction of tokens whose clipped branch is active), "policy/ratio_max_dev"
        (max |ρ−1| over masked tokens).
    Raises:
        ValueError: unknown `loss_type`; dr_grpo without `normalizer`.
    """
    if loss_type not in ("grpo", "dapo", "dr_grpo"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'grpo', 'dapo' or 'dr_grpo'")
    if loss_type == "dr_grpo" and normalizer is None:
        raise ValueError("loss_type='dr_grpo' needs normalizer = N × the completion budget (max new "
                         "tokens): its denominator is a constant, not the batch's padded width")
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.bool()
    N, T = m.shape
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(logps.dtype)  # Â
    log_ratio = (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)     # (N, T)
    ratio = torch.exp(log_ratio)                                                 # (N, T) ρ
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_high) * adv)  # (N, T)
    stats = {}
    if ref_logps is not None:
        k3 = kl_k3(logps, ref_logps)                                             # (N, T)
        if beta != 0:
            per_token = per_token + beta * k3
        stats["kl"] = masked_mean(k3.detach(), m)
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy                          # − c·H bonus
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))           # padding adds 0
    if loss_type == "grpo":
        per_seq = per_token.sum(1) / m.sum(1).clamp(min=1)                        # (N,) 1/|o_i| Σ_t
        loss = per_seq.sum() / (N if normalizer is None else normalizer)
    elif loss_type == "dapo":
        loss = per_token.sum() / (m.sum().clamp(min=1) if normalizer is None else normalizer)
    else:  # dr_grpo
        loss = per_token.sum() / normalizer
    clipfrac, max_dev = ratio_stats(ratio.detach(), adv.expand(N, T), m, clip_eps, clip_high)
    stats["policy/clipfrac"] = clipfrac
    stats["policy/ratio_max_dev"] = max_dev
    return loss, stats
