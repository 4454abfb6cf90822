import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minipost.sft import sft_loss, sft_loss_sum


def test_sft_loss_hand_computed_three_token_vocab():
    # tokens [0, 2, 1], targets are tokens[1] and tokens[2] (loss_mask aligned with tokens).
    # logits[0] = [0, 0, 0]      predicts tokens[1]=2: p = 1/3          → CE = ln 3
    # logits[1] = [0, ln 2, 0]   predicts tokens[2]=1: p = 2/(1+2+1)=½ → CE = ln 2
    # logits[2] predicts nothing (there is no tokens[3]), so its value must not matter.
    # mean = (ln 3 + ln 2) / 2 = ln 6 / 2
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [9.0, -9.0, 3.0]]], dtype=torch.float64)
    tokens = torch.tensor([[0, 2, 1]])
    assert sft_loss(logits, tokens, torch.tensor([[0, 1, 1]])).item() == pytest.approx(math.log(6) / 2, rel=1e-6)
    # only the last token as target → ln 2 (an off-by-one would give ln 3 or use logits[2])
    assert sft_loss(logits, tokens, torch.tensor([[0, 0, 1]])).item() == pytest.approx(math.log(2), rel=1e-6)


def test_sft_loss_matches_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    tokens = torch.randint(0, V, (B, T))
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    loss_mask[0, 3:] = True
    loss_mask[1, 2:5] = True
    loss_mask[2, 6:] = True
    labels = tokens.masked_fill(~loss_mask, -100)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(sft_loss(logits, tokens, loss_mask), ref)
    ref_sum = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                              ignore_index=-100, reduction="sum")
    loss_sum, n = sft_loss_sum(logits, tokens, loss_mask)
    assert_close(loss_sum, ref_sum)
    assert n.item() == 4 + 3 + 1


def test_sft_loss_is_fp32_for_bf16_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5)
    loss = sft_loss(logits, tokens, mask)
    assert loss.dtype == torch.float32
    assert_close(loss, sft_loss(logits.float(), tokens, mask))


def test_sft_loss_sum_accumulates_unequal_micro_batches_to_the_full_batch_gradient():
    torch.manual_seed(0)
    V = 5
    logits = torch.randn(4, 6, V, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (4, 6))
    mask = torch.zeros(4, 6)
    mask[0, 1:] = 1  # 5 targets
    mask[1, 5:] = 1  # 1 target
    mask[2, 2:4] = 1
    mask[3, 3:] = 1
    full = sft_loss(logits, tokens, mask)
    (g_full,) = torch.autograd.grad(full, logits)
    n_total = sft_loss_sum(logits, tokens, mask)[1]
    acc = 0
    for rows in (slice(0, 1), slice(1, 4)):  # micro-batches of unequal size and token count
        s, _ = sft_loss_sum(logits[rows], tokens[rows], mask[rows])
        acc = acc + s / n_total
    (g_acc,) = torch.autograd.grad(acc, logits)
    assert_close(g_acc, g_full)
    assert_close(acc, full)


def test_sft_loss_empty_mask_is_zero_not_nan():
    logits = torch.randn(1, 4, 3)
    loss = sft_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4))
    assert loss.item() == 0.0
