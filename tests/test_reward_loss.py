import math

import pytest
import torch
from torch.testing import assert_close

from minipost.reward import bradley_terry_loss


def test_bradley_terry_loss_hand_computed():
    # diffs r_c − r_r = [2 − 1, 0 − 1] = [1, −1]
    # −log σ(1) = log(1 + e^−1) = 0.313262, −log σ(−1) = log(1 + e) = 1.313262, mean = 0.813262
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(0.8132617, rel=1e-6)
    # equal rewards → ln 2
    assert bradley_terry_loss(chosen, chosen).item() == pytest.approx(math.log(2), rel=1e-12)


def test_bradley_terry_loss_with_margin():
    # margin [1, 0.5]: arguments [1 − 1, −1 − 0.5] = [0, −1.5]
    # −log σ(0) = ln 2 = 0.693147, −log σ(−1.5) = log(1 + e^1.5) = 1.701413, mean = 1.197280
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    margin = torch.tensor([1.0, 0.5], dtype=torch.float64)
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(1.1972800, rel=1e-6)
    # a float margin applies to every pair: args [0, −2] → (ln 2 + log(1 + e²)) / 2
    expected = (math.log(2) + math.log1p(math.exp(2))) / 2
    assert bradley_terry_loss(chosen, rejected, 1.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bradley_terry_loss_finite_and_correct_at_large_margins(dtype):
    # diffs ±400: −log σ(400) ≈ 0, −log σ(−400) = 400 (exactly, to fp precision); mean = 200
    chosen = torch.tensor([200.0, -200.0], requires_grad=True)
    rejected = torch.tensor([-200.0, 200.0])
    loss = bradley_terry_loss(chosen.to(dtype), rejected.to(dtype))
    ref = bradley_terry_loss(chosen.detach().double(), rejected.double())
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(chosen.grad).all()
    assert_close(chosen.grad, torch.tensor([0.0, -0.5]), atol=1e-6, rtol=0)


def test_prefix_bradley_terry_loss_hand_computed():
    """Positions from the first differing token to the longer row's end; a shorter row stays at
    its last token; positions before the parting and padding do not count."""
    from minipost.reward import prefix_bradley_terry_loss
    # pair 0: chosen [5 6 7 8], rejected [5 6 9 8 4]: part at k=2; k=4 compares chosen's last (k=3)
    # pair 1: identical rows: no positions, contributes 0
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 0, 0, 0], [5, 6, 9, 8, 4], [5, 6, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    scores = torch.tensor([[0.0, 1, 2, 3, 99], [7, 7, 7, 7, 7],
                           [0.0, 1, -1, 0.5, 1], [-7, -7, -7, -7, -7]], requires_grad=True)
    loss = prefix_bradley_terry_loss(scores, ids, mask)
    nll = [math.log1p(math.exp(-x)) for x in (2 - (-1), 3 - 0.5, 3 - 1)]
    assert loss.item() == pytest.approx(sum(nll) / 3 / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[0, :2].abs().sum() == 0 and scores.grad[0, 4] == 0   # shared prefix, pad
    assert scores.grad[1].abs().sum() == 0 and scores.grad[3].abs().sum() == 0


def test_prefix_bradley_terry_loss_is_ln2_at_equal_scores():
    from minipost.reward import prefix_bradley_terry_loss
    ids = torch.tensor([[1, 2, 3], [1, 4, 5]])
    mask = torch.ones(2, 3, dtype=torch.long)
    loss = prefix_bradley_terry_loss(torch.zeros(2, 3), ids, mask)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
