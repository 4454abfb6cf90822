"""Supervised fine-tuning loss: next-token cross-entropy on the assistant (target) tokens only.

Source: the SFT stage of Ouyang et al. 2022, "Training language models to follow instructions with
human feedback" (arXiv 2203.02155), which is plain maximum likelihood on demonstrations:
    L(θ) = −(1/|M|) Σ_{(b,t)∈M} log π_θ(x_{b,t} | x_{b,<t})
where M is the set of target positions (`loss_mask` = 1).

Alignment (docs/pitfalls.md, "Log-prob alignment"): the log-prob of token t comes from the logits
at t−1, so the code scores `tokens[:, 1:]` against `logits[:, :-1]` (`token_logprobs`, without
copying the logits) and uses `loss_mask[:, 1:]`. `loss_mask` is aligned with `tokens`:
`loss_mask[:, t] = 1` marks `tokens[:, t]` as a target. `loss_mask[:, 0]` is never used (nothing
predicts the first token).

Gradient accumulation (docs/pitfalls.md, "Loss aggregation and gradient accumulation"): the mean
over a micro-batch's tokens is not the mean over the full batch when micro-batches hold different
numbers of target tokens ((x₁/n₁ + x₂/n₂)/2 ≠ (x₁+x₂)/(n₁+n₂)). `sft_loss_sum` returns the sum
and the count, so a training loop can divide each micro-batch's sum by the global token count.
"""

from contextlib import nullcontext

import torch

from .model import first_logit_column, token_logprobs


def sft_loss_sum(
    logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, and the number of target tokens.

    Ouyang et al. 2022 (arXiv 2203.02155), SFT by maximum likelihood:
        S = Σ_{b,t≥1} m_{b,t} · (−log softmax(z_{b,t−1})[x_{b,t}]),   n = Σ_{b,t≥1} m_{b,t}

    Args:
        logits: (B, T, V) model outputs; any float dtype, cross-entropy is computed in fp32.
        tokens: (B, T) token ids.
        loss_mask: (B, T) 1/True where `tokens[:, t]` is a target (assistant tokens incl. EOS),
            aligned with `tokens` (not with the shifted logits).

    Returns:
        (loss_sum, n_tokens): fp32 scalar sum of per-token CE over targets (reduction: SUM over
        all target tokens of the batch), and the fp32 scalar count of target tokens.
        Divide the sum by the count of the whole (accumulated) batch.
    """
    ce = -token_logprobs(logits, tokens)                       # (B, T−1) −log p(x_t | x_<t), fp32
    mask = loss_mask[:, 1:].bool()                              # (B, T−1) shifted with the targets
    # summed in float64, so the fp32 result does not depend on which columns the batch holds
    loss_sum = torch.where(mask, ce.double(), 0.0).sum().float()
    return loss_sum, mask.sum().float()


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of the batch.

    Ouyang et al. 2022 (arXiv 2203.02155), SFT by maximum likelihood:
        L = (1/n) Σ_{b,t≥1} m_{b,t} · (−log softmax(z_{b,t−1})[x_{b,t}]),   n = Σ m_{b,t}

    Args:
        logits: (B, T, V) model outputs (CE computed in fp32).
        tokens: (B, T) token ids.
        loss_mask: (B, T) 1/True on target tokens, aligned with `tokens`.

    Returns:
        fp32 scalar; reduction: MEAN over all target tokens of the batch (a token-level mean,
        so long completions weigh more than short ones). 0 if the batch has no target token.
        For gradient accumulation over unequal micro-batches use `sft_loss_sum`.
    """
    loss_sum, n_tokens = sft_loss_sum(logits, tokens, loss_mask)
    return loss_sum / n_tokens.clamp(min=1.0)


def batch_loss_sum(model, batch: dict, autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """`sft_loss_sum` of `model` on a batch {"input_ids", "loss_mask", and "position_ids",
    "segment_ids" when packed}. Right padding needs no attention mask (causal attention already
    hides the pad after each row); packed rows pass their restarting positions and segment ids,
    which keep documents apart. The LM head runs from the column before the first target token
    of any row (`logits_to_keep`): a prompt's logits are never read."""
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    start = first_logit_column(loss_mask)
    with autocast():
        logits = model(ids, position_ids=batch.get("position_ids"),
                       segment_ids=batch.get("segment_ids"),
                       logits_to_keep=ids.shape[1] - start)                  # (B, T − start, V)
    return sft_loss_sum(logits, ids[:, start:], loss_mask[:, start:])
