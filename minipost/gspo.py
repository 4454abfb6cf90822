"""Group Sequence Policy Optimization (GSPO): GRPO with the importance ratio taken per sequence.

Source: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv 2507.18071). GRPO weighs
every token by its own ratio π_θ(y_t)/π_old(y_t), while the reward belongs to the whole sequence;
GSPO takes one ratio per sequence, the geometric mean of its token ratios (the sequence likelihood
ratio, length-normalised so that long and short completions sit on one scale), and clips that.

Same advantages as GRPO (group-normalised, `grpo.group_advantages`). With μ = 1 (one optimiser
step per batch) every ratio is 1 and nothing is clipped, so the gradient is GRPO's with the
per-sequence mean (`grpo_loss(loss_type="grpo")`): the two differ only from the second update on
a batch, where GSPO clips whole sequences. The paper's clip range is far narrower than GRPO's
(ε_low = 3e-4, ε_high = 4e-4 in its experiments), since a mean log-ratio moves much less than a
token's.

Departures: the mean log-ratio is clamped to ±20 before exp (`ppo.LOG_RATIO_CLAMP`); an optional
k3 KL penalty and entropy bonus (per-sequence token means, as GRPO aggregates them), which the
paper does not use.
"""
import torch

from minipost.grpo import kl_k3
from minipost.ppo import LOG_RATIO_CLAMP


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    beta: float = 0.0,
    normalizer: float | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO clipped surrogate with the sequence-level, length-normalised importance ratio.

    Zheng et al. 2025 (arXiv 2507.18071), for sequence i with |y_i| = Σ_t m_{i,t} tokens:
        s_i = (π_θ(y_i|x)/π_old(y_i|x))^{1/|y_i|} = exp((1/|y_i|) Σ_t m·(log π_θ − log π_old))
        ℓ_i = −min(s_i·Â_i, clip(s_i, 1−ε, 1+ε_h)·Â_i)
              + β·(1/|y_i|) Σ_t m·k3 − c·(1/|y_i|) Σ_t m·H            (optional, not in the paper)
        L = (1/N) Σ_i ℓ_i
    ∇s_i = s_i·(1/|y_i|)·Σ_t ∇log π_θ(y_{i,t}): every token of a sequence gets the same weight.

    Args:
        logps: (N, T) log π_θ of the sampled tokens (with grad).
        old_logps: (N, T) log π_old at sampling time (detached).
        ref_logps: (N, T) log π_ref, or None for no KL term (then "kl" is absent from stats).
        advantages: (N,) one advantage per sequence.
        mask: (N, T) 1 on completion tokens.
        clip_eps: ε (lower clip, and upper when clip_eps_high is None).
        clip_eps_high: ε_h; None → ε.
        beta: β, weight of the k3 penalty.
        normalizer: replaces N in the mean over sequences (the full batch's N, for gradient
            accumulation over micro-batches).
        entropy: (N, T) token entropies of π_θ WITH grad, or None (needed when entropy_coef ≠ 0).
        entropy_coef: c, the entropy bonus's weight (0 = none).

    Returns:
        (loss, stats): scalar loss, a mean over sequences; detached stats "kl" (token mean of k3,
        if ref_logps is given), "policy/clipfrac" (fraction of SEQUENCES whose clipped branch is
        active), "policy/ratio_max_dev" (max |s_i − 1|).
    """
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.bool()
    zeros = torch.zeros_like(logps)
    n_tokens = m.sum(1).clamp(min=1)                                          # (N,) |y_i|
    N = m.shape[0]
    adv = advantages.to(logps.dtype)                                          # (N,) Â_i
    mean_log_ratio = torch.where(m, logps - old_logps, zeros).sum(1) / n_tokens  # (N,) log s_i
    ratio = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (N,) s_i
    per_seq = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_high) * adv)
    stats = {}
    if ref_logps is not None:
        k3 = torch.where(m, kl_k3(logps, ref_logps), zeros)                    # (N, T)
        if beta != 0:
            per_seq = per_seq + beta * k3.sum(1) / n_tokens
        stats["kl"] = (k3.detach().sum() / m.sum().clamp(min=1))
    if entropy_coef:
        per_seq = per_seq - entropy_coef * torch.where(m, entropy, zeros).sum(1) / n_tokens  # −c·H
    loss = per_seq.sum() / (N if normalizer is None else normalizer)
    r = ratio.detach()
    clipped = ((adv > 0) & (r > 1 + clip_high)) | ((adv < 0) & (r < 1 - clip_eps))
    stats["policy/clipfrac"] = clipped.to(logps.dtype).mean()                # of sequences
    stats["policy/ratio_max_dev"] = (r - 1).abs().max()
    return loss, stats
