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

The reward model itself is `model.ScoreModel`: the decoder plus a scalar head `score` (HF's
`*ForSequenceClassification`, `num_labels = 1`), read at each row's last real token — the
<|im_end|> that ends the completion — whatever the padding side (docs/pitfalls.md, "Reward-model
score position"). The head starts at zero, so every reward is 0 and the first loss is ln 2;
`peft.load_model(path, head="score")` builds one from a language model. `pair_rewards`
scores chosen and rejected in ONE forward pass over a (2B, T) batch from
`data.collate_preference`.

`RewardEnsemble` combines several reward models into one score, the ensembles of Coste et al. 2023
("Reward model ensembles help mitigate overoptimization", arXiv 2310.02743): each member is a
reward model trained alone (here: another seed, hence other pairs and another order); where
their mistakes are independent the mean ranks the policy's own answers better than any member,
and the minimum (their worst-case optimisation) rewards only what every member likes. A mistake
they share (here, from the SFT model they all start from) no ensemble removes.
"""
import torch
import torch.nn.functional as F

from .model import ScoreModel, last_scores, last_token_index


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood that the chosen completion beats the rejected one.

    Bradley & Terry 1952; Ouyang et al. 2022 (arXiv 2203.02155); margin from Touvron et al. 2023
    (Llama 2, arXiv 2307.09288):
        L = (1/B) Σ_b −log σ(r_c,b − r_r,b − m_b)
    computed as −logsigmoid(·), stable for |r_c − r_r| in the hundreds (docs/pitfalls.md,
    "Numerical stability"), in at least fp32 (bf16 inputs are upcast).

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


def prefix_bradley_terry_loss(scores: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry at every prefix where the two completions already differ.

    A chosen and a rejected completion usually share a start and part ways at one token (the
    slipped digit, the first word of a broken answer line). Scoring only the last token gives the
    model one bit per pair about where the flaw was; this loss also asks the score at every position
    k at or after the first differing token d to prefer the chosen prefix:
        L = (1/B) Σ_b mean_{k = d_b .. end_b} −log σ(s_c,b[min(k, e_c)] − s_r,b[min(k, e_r)])
    where s are the per-token scores, e_c and e_r each row's last real token and end_b = max(e_c, e_r)
    (a shorter row stays at its last token). It is the outcome preference applied to prefixes, a
    cheap stand-in for per-step labels (Lightman et al. 2023, arXiv 2305.20050, label every step of
    a solution by hand); the reward model is still read at the last token only.

    Args:
        scores: (2B, T) per-token scores, rows 0..B−1 chosen, B..2B−1 rejected.
        input_ids, attention_mask: (2B, T), RIGHT-padded (`data.collate_preference`), so equal
            prefixes sit at equal positions.

    Returns:
        scalar; reduction: mean over each pair's positions, then over pairs (pairs that never
        differ count as 0).
    """
    s_c, s_r = scores.float().chunk(2)
    ids_c, ids_r = input_ids.chunk(2)
    m_c, m_r = attention_mask.bool().chunk(2)
    differ = ((ids_c != ids_r) & (m_c | m_r)) | (m_c != m_r)                 # (B, T)
    T = differ.shape[1]
    k = torch.arange(T, device=scores.device).expand_as(differ)
    first = torch.where(differ, k, T).min(1, keepdim=True).values           # (B, 1) d_b
    e_c, e_r = last_token_index(m_c)[:, None], last_token_index(m_r)[:, None]
    valid = (k >= first) & (k <= torch.maximum(e_c, e_r))                  # (B, T)
    logits = s_c.gather(1, k.minimum(e_c)) - s_r.gather(1, k.minimum(e_r))
    per_pair = (-F.logsigmoid(logits) * valid).sum(1) / valid.sum(1).clamp(min=1)
    return per_pair.mean()


def pair_rewards(reward_model: ScoreModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected completions, from one forward pass.

    Args:
        reward_model: a `ScoreModel` (or a DDP wrapper of one: only its forward is called).
        input_ids: (2B, T) rows 0..B−1 chosen, B..2B−1 rejected (`data.collate_preference`).
        attention_mask: (2B, T) 1 on real tokens, left or right padding.

    Returns:
        (chosen_rewards, rejected_rewards), each (B,), fp32: the score at each row's last real token.
    """
    return last_scores(reward_model(input_ids, attention_mask), attention_mask).chunk(2)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """TRL's reward-model metrics, as detached 0-d tensors (call `.item()` when logging).

    rewards/chosen, rewards/rejected: mean reward of each side; rewards/margins: mean r_c − r_r;
    rewards/accuracies: share of pairs with r_c > r_r (a tie counts as wrong).
    """
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean()}


def combine_scores(r: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, how: str = "mean"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of M reward models (M, B) -> (their combined score, their disagreement), each (B,).

    Members trained apart do not share a scale or an offset, so each score is first standardised
    with that member's held-out reward mean μ_j and std σ_j (M,), then the standardised scores are
    combined and put back on the members' average scale:

        z_j = (r_j − μ_j) / σ_j,   r = combine_j(z_j) · mean_j σ_j + mean_j μ_j,

    combine = mean, or min (the worst case). One member gives back its own score. The
    disagreement is the std of the z_j over members, on the same scale: it grows where the policy
    leaves the members' common ground.
    """
    z = (r.float() - mu[:, None]) / sigma[:, None]                              # (M, B)
    combined = z.mean(0) if how == "mean" else z.min(0).values
    scale = sigma.mean()
    return combined * scale + mu.mean(), z.std(0, correction=0) * scale


class RewardEnsemble(torch.nn.Module):
    """Several reward models as one, with `score_last` like a `ScoreModel`'s: each member scores
    the rows, `combine_scores` makes one score of theirs. `disagreement` holds the (B,) spread of
    the last call."""

    def __init__(self, members: list[ScoreModel], means: list[float], stds: list[float],
                 combine: str = "mean"):
        super().__init__()
        if combine not in ("mean", "min"):
            raise ValueError(f"combine must be mean or min, got {combine!r}")
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("mu", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.register_buffer("sigma", torch.tensor(stds, dtype=torch.float32), persistent=False)
        self.how = combine
        self.disagreement = None

    def score_last(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) fp32: the combined score at each row's last real token."""
        r = torch.stack([m.score_last(input_ids, attention_mask) for m in self.members])
        combined, spread = combine_scores(r, self.mu, self.sigma, self.how)
        self.disagreement = spread.detach()
        return combined


def reward_members(reward_model) -> list[ScoreModel]:
    """The reward models behind `reward_model`: an ensemble's members, or itself."""
    return list(reward_model.members) if isinstance(reward_model, RewardEnsemble) else [reward_model]
