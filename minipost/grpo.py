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

Departures: ε = 1e-4 is added to the std (TRL's choice) so a constant-reward group gets zero
advantages instead of NaN; the log-ratio is clamped to ±20 before exp (see `ppo.LOG_RATIO_CLAMP`).
"""

import torch

from minipost.ppo import LOG_RATIO_CLAMP, masked_mean, ratio_stats


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped-surrogate loss with a k3 KL penalty, aggregated the GRPO, DAPO or Dr. GRPO way.

    Shao et al. 2024 (arXiv 2402.03300), per token of sequence i (ε_h = DAPO's ε_high, Yu et al. 2025,
    arXiv 2503.14476):
        ρ_{i,t} = exp(log π_θ − log π_old),
        ℓ_{i,t} = −min(ρ_{i,t}·Â_i, clip(ρ_{i,t}, 1−ε, 1+ε_h)·Â_i) + β·k3_{i,t},
        k3 = π_ref/π_θ − log(π_ref/π_θ) − 1
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
        advantages: (N,) one advantage per sequence, from `group_advantages`.
        mask: (N, T) 1 on completion tokens.
        clip_eps: ε (lower clip, and upper when clip_eps_high is None).
        clip_eps_high: ε_h, DAPO's "clip-higher"; None → ε.
        beta: β, KL coefficient (0 disables the penalty but "kl" is still reported).
        loss_type: "grpo", "dapo" or "dr_grpo".
        normalizer: replaces the denominator (N for grpo, Σ m for dapo); dr_grpo's C, required.

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
    adv = advantages[:, None].to(logps.dtype)                                     # (N, 1) Â_i
    log_ratio = (logps - old_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)     # (N, T)
    ratio = torch.exp(log_ratio)                                                 # (N, T) ρ
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_high) * adv)  # (N, T)
    stats = {}
    if ref_logps is not None:
        k3 = kl_k3(logps, ref_logps)                                             # (N, T)
        if beta != 0:
            per_token = per_token + beta * k3
        stats["kl"] = masked_mean(k3.detach(), m)
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
