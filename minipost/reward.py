"""Reward modelling: the Bradley-Terry pairwise preference loss.

Sources:
- Bradley & Terry 1952, "Rank analysis of incomplete block designs: I. The method of paired
  comparisons" (Biometrika 39): P(y_c ≻ y_r) = σ(r_c − r_r).
- Ouyang et al. 2022, InstructGPT (arXiv 2203.02155): the reward-model loss
  loss(θ) = −E_{(x,y_c,y_r)} [log σ(r_θ(x, y_c) − r_θ(x, y_r))].
- Touvron et al. 2023, Llama 2 (arXiv 2307.09288): a margin m(r) that grows with how strongly the
  annotator preferred y_c: loss = −log σ(r_c − r_r − m(r)).

Departure from InstructGPT: it groups all K(K−1)/2 comparisons of one prompt in one batch element;
here each pair is one element and the loss is the mean over pairs.
"""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood that the chosen completion beats the rejected one.

    Bradley & Terry 1952; Ouyang et al. 2022 (arXiv 2203.02155); margin from Touvron et al. 2023
    (Llama 2, arXiv 2307.09288):
        L = (1/B) Σ_b −log σ(r_c,b − r_r,b − m_b)
    computed as −logsigmoid(·) (stable for |r_c − r_r| in the hundreds, PITFALLS item 12), in at
    least fp32 (bf16 inputs are upcast).

    Args:
        chosen_rewards: (B,) scalar rewards of the chosen completions.
        rejected_rewards: (B,) scalar rewards of the rejected completions.
        margin: None (no margin), a float, or (B,) per-pair margins m_b ≥ 0.

    Returns:
        scalar; reduction: MEAN over the B pairs.
    """
    dtype = torch.promote_types(chosen_rewards.dtype, torch.float32)
    logits = chosen_rewards.to(dtype) - rejected_rewards.to(dtype)   # (B,) r_c − r_r
    if margin is not None:
        logits = logits - torch.as_tensor(margin, dtype=dtype, device=logits.device)
    return -F.logsigmoid(logits).mean()
