"""Direct Preference Optimization (DPO) and two of its variants, as one loss on sequence log-probs.

Sources:
- Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
  Model" (arXiv 2305.18290): L = −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]).
- Conservative DPO (cDPO), Mitchell 2023, "A note on DPO with noisy preferences & relationship to
  IPO" (eric-mitchell.github.io/direct-preference-optimization/cdpo.pdf): labels flipped with
  probability ε ⇒ L = −(1−ε)·log σ(βh) − ε·log σ(−βh).
- IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (arXiv 2310.12036): L = (h − 1/(2β))².
- Hinge (SLiC), Zhao et al. 2023, "SLiC-HF" (arXiv 2305.10425): L = max(0, 1 − βh).

Inputs are SUMS of token log-probs over each completion, as in the DPO paper and its reference code
(docs/pitfalls.md, "Sum or mean of token log-probs in DPO"). TRL length-normalises for IPO; to do
that, pass `sequence_logps(..., mean=True)` instead — an explicit choice by the caller.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .model import first_logit_column, token_entropy, token_logprobs


def sequence_logps(
    token_logps: torch.Tensor, loss_mask: torch.Tensor, mean: bool = False
) -> torch.Tensor:
    """SUM (or, with `mean=True`, per-token MEAN) of token log-probs over each completion.

    log π(y | x) = Σ_{t≥1} m_t · log π(x_t | x_<t)            (mean=False, the DPO paper's quantity)
    (1/Σ m_t) Σ_{t≥1} m_t · log π(x_t | x_<t)                  (mean=True, length-normalised)

    Args:
        token_logps: (B, T−1) output of `model.token_logprobs(logits, tokens)`, i.e.
            token_logps[:, t] = log p(tokens[:, t+1] | tokens[:, ≤t]).
        loss_mask: (B, T) 1/True on completion tokens, aligned with `tokens`; shifted here
            (`loss_mask[:, 1:]`) to line up with `token_logps` (docs/pitfalls.md, "Log-prob
            alignment").
        mean: False → sum over completion tokens (default, the DPO paper's quantity);
            True → divide by the number of completion tokens.

    Returns:
        (B,) per-sequence log-prob; masked-out positions never contribute (even if non-finite).
    """
    mask = loss_mask[:, 1:].bool()                                          # (B, T−1)
    # summed in float64: the fp32 result then does not depend on where the completion sits in
    # the row (a float32 sum's rounding does), so a pair scores the same in any batch
    summed = torch.where(mask, token_logps.double(), 0.0).sum(-1).to(token_logps.dtype)  # (B,)
    if mean:
        return summed / mask.sum(-1).clamp(min=1).to(summed.dtype)
    return summed


def pair_logps(model, batch, autocast=nullcontext, with_entropy: bool = False):
    """Summed completion log-probs of chosen and rejected, from one forward pass: two (B,).

    The batch is right-padded (`data.collate_preference`), so causal attention alone keeps every
    real token from seeing padding; no attention mask is needed (and the fast causal path is used).
    The LM head runs only from the column before the first token any row scores (`logits_to_keep`):
    the prompts' logits are never read. `with_entropy`: also the policy's mean token entropy on the
    chosen completions (model.token_entropy, detached), a third output (a 0-d tensor).
    """
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    start = first_logit_column(loss_mask)
    with autocast():
        logits = model(ids, logits_to_keep=ids.shape[1] - start)               # (2B, T−start, V)
    token_logps = token_logprobs(logits, ids[:, start:])                       # fp32
    chosen, rejected = sequence_logps(token_logps, loss_mask[:, start:]).chunk(2)  # SUM, not mean
    if not with_entropy:
        return chosen, rejected
    B = len(chosen)
    with torch.no_grad():                       # the chosen rows: the first B
        entropy = token_entropy(logits[:B], loss_mask[:B, start + 1:])
    return chosen, rejected, entropy


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (sigmoid / cDPO, IPO or hinge) and the implicit rewards.

    Rafailov et al. 2023 (arXiv 2305.18290), with
        h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        sigmoid: L = −(1−ε)·log σ(βh) − ε·log σ(−βh)     (ε = label_smoothing; ε=0 is DPO,
                                                          ε>0 is cDPO, Mitchell 2023)
        ipo:     L = (h − 1/(2β))²                        (Azar et al. 2023, arXiv 2310.12036)
        hinge:   L = max(0, 1 − βh)                       (Zhao et al. 2023, arXiv 2305.10425)
        implicit reward r̂(y) = β·(log π(y) − log π_ref(y)), detached.
    At π = π_ref: h = 0 and the sigmoid loss is ln 2 for every ε.

    Args:
        policy_chosen_logps: (B,) SUMMED log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) same for the rejected completions.
        ref_chosen_logps: (B,) chosen completions under the frozen reference model.
        ref_rejected_logps: (B,) rejected completions under the reference model.
        beta: β, strength of the implicit KL constraint (temperature of the implicit reward).
        label_smoothing: ε ∈ [0, 0.5), assumed label-flip probability (sigmoid loss only).
        loss_type: "sigmoid", "ipo" or "hinge".

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); losses are per pair (the caller
        takes `.mean()`); computed in at least fp32.
    Raises:
        ValueError: unknown `loss_type`.
    """
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen_logratios = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)        # (B,)
    rejected_logratios = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)  # (B,)
    h = chosen_logratios - rejected_logratios                                            # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid', 'ipo' or 'hinge'")
    chosen_rewards = beta * chosen_logratios.detach()       # (B,) implicit reward of y_c
    rejected_rewards = beta * rejected_logratios.detach()   # (B,) implicit reward of y_r
    return losses, chosen_rewards, rejected_rewards
