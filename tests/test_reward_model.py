"""reward model: the score is read at the last real token whatever the padding, one forward scores
both sides of a pair, metrics by hand, and a saved reward model is what transformers loads."""
import json
import math

import pytest
import torch
from torch.testing import assert_close

from minipost.checkpoint import load_model, reward_stats, save_model
from minipost.data import pad_batch
from minipost.model import GPT, GPTConfig, ScoreModel
from minipost.reward import RewardEnsemble, bradley_terry_loss, pair_rewards, reward_metrics

CFG = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           pad_token_id=3, eos_token_id=2, bos_token_id=0)
SEQS = [[5, 9, 11, 7, 2], [6, 8, 2], [12, 13, 14, 15, 16, 17, 2]]  # each ends with EOS = 2


def reward_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**CFG, **kw}) if "model_type" not in kw else GPTConfig.gpt2(**{**CFG, **kw})
    model = ScoreModel(cfg)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a trained head, not the zero init
    return model.to(dtype).eval()


@pytest.mark.parametrize("family", [{}, {"model_type": "gpt2"}])   # RoPE and learned positions
def test_score_is_the_same_whatever_the_amount_and_side_of_padding(family):
    model = reward_model(**family)
    alone = torch.stack([model.score_last(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                         for s in SEQS])                                   # (3,) unpadded
    for side in ("right", "left"):
        for extra in (0, 5):
            ids, mask, _ = pad_batch(SEQS, pad_id=3, side=side)
            if extra:  # more padding on the padded side
                pad = torch.full((len(SEQS), extra), 3)
                zeros = torch.zeros(len(SEQS), extra, dtype=torch.long)
                ids = torch.cat([ids, pad], 1) if side == "right" else torch.cat([pad, ids], 1)
                mask = torch.cat([mask, zeros], 1) if side == "right" else torch.cat([zeros, mask], 1)
            assert_close(model.score_last(ids, mask), alone, atol=1e-10, rtol=0)


def test_pair_rewards_scores_both_sides_in_one_forward():
    model = reward_model()
    ids, mask, _ = pad_batch(SEQS[:2] + [SEQS[2], SEQS[0]], pad_id=3)      # chosen 0,1; rejected 2,0
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    chosen, rejected = pair_rewards(model, ids, mask)
    assert calls == [(4, ids.shape[1])]                                   # one pass over 2B rows
    expected = model.score_last(ids, mask)
    assert_close(chosen, expected[:2])
    assert_close(rejected, expected[2:])
    assert_close(rejected[1], chosen[0])                                  # the same sequence


def test_reward_metrics_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0])
    rejected = torch.tensor([1.0, 1.0, 1.0])
    m = reward_metrics(chosen, rejected)
    assert m["rewards/chosen"].item() == pytest.approx(1.0)
    assert m["rewards/rejected"].item() == pytest.approx(1.0)
    assert m["rewards/margins"].item() == pytest.approx(0.0)              # (1 − 1 + 0) / 3
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)         # a tie is not a win


def test_score_head_on_a_language_model_starts_at_zero(tmp_path):
    torch.manual_seed(0)
    save_model(GPT(GPTConfig(**CFG)), tmp_path / "lm")
    model = load_model(tmp_path / "lm", head="score")
    ids, mask, _ = pad_batch(SEQS, pad_id=3)
    chosen, rejected = pair_rewards(model, ids[:2], mask[:2])
    assert (chosen == 0).all() and (rejected == 0).all()
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log(2), abs=1e-7)


def test_lm_logits_of_a_score_model_are_its_language_models_logits(tmp_path):
    """A reward model made from an LM still computes that LM's next-token logits through the tied
    embeddings (train_rm's --lm-weight), beside the scores it returns alone."""
    torch.manual_seed(0)
    lm = GPT(GPTConfig(**CFG)).double().eval()
    save_model(lm, tmp_path / "lm")
    model = load_model(tmp_path / "lm", head="score").double().eval()
    ids, mask, _ = pad_batch(SEQS, pad_id=3)
    scores, logits = model(ids, mask, lm_rows=len(SEQS))
    assert_close(scores, model(ids, mask))
    assert_close(logits, lm(ids, mask))
    _, first_two = model(ids, mask, lm_rows=2)                 # only the rows asked for
    assert_close(first_two, lm(ids, mask)[:2])
    with pytest.raises(ValueError, match="tied"):
        ScoreModel(GPTConfig(**CFG, tie_word_embeddings=False))(ids, mask, lm_rows=1)


def test_saved_reward_model_loads_in_transformers_with_the_same_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = reward_model(dtype=torch.float32)
    save_model(model, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == 3
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 9, 11, 7, 2], [6, 8, 12, 13, 2]])             # unpadded
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.score_last(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        # right padding: transformers reads the token before the first pad, as we do
        ids, mask, _ = pad_batch(SEQS, pad_id=3)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert_close(theirs, model.score_last(ids, mask), atol=1e-5, rtol=1e-5)


class _Fixed(torch.nn.Module):
    """A stand-in reward model whose scores are given."""
    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def score_last(self, input_ids, attention_mask):
        return self.scores


def test_reward_ensemble_by_hand():
    # member A: scores 1, 3 with μ 1, σ 2 -> z = 0, 1; member B: 10, 4 with μ 4, σ 4 -> z = 1.5, 0
    members = [_Fixed([1.0, 3.0]), _Fixed([10.0, 4.0])]
    ids = torch.zeros(2, 3, dtype=torch.long)
    mean = RewardEnsemble(members, [1.0, 4.0], [2.0, 4.0], "mean")
    # back on the members' average scale: z · 3 + 2.5
    assert_close(mean.score_last(ids, ids), torch.tensor([0.75 * 3 + 2.5, 0.5 * 3 + 2.5]))
    assert_close(mean.disagreement, torch.tensor([0.75 * 3, 0.5 * 3]))  # |z_A − z_B| / 2 · 3
    worst = RewardEnsemble(members, [1.0, 4.0], [2.0, 4.0], "min")
    assert_close(worst.score_last(ids, ids), torch.tensor([2.5, 2.5]))  # min z = 0, 0
    one = RewardEnsemble(members[1:], [4.0], [4.0], "mean")
    assert_close(one.score_last(ids, ids), torch.tensor([10.0, 4.0]))    # one member: its score
    with pytest.raises(ValueError, match="mean or min"):
        RewardEnsemble(members, [0.0, 0.0], [1.0, 1.0], "max")


def test_reward_stats_come_from_the_reward_models_config(tmp_path):
    torch.manual_seed(0)
    model = ScoreModel(GPTConfig(**CFG))
    save_model(model, tmp_path / "a", extra_config={"minipost": {"reward_mean": -0.4,
                                                                 "reward_std": 5.2}})
    save_model(model, tmp_path / "b")                                    # not from train_rm.py
    assert reward_stats(tmp_path / "a") == (-0.4, 5.2)
    assert reward_stats(tmp_path / "b") == (0.0, 1.0)


def test_pairwise_accuracy_counts_pairs_within_a_problem_by_hand():
    from minipost.rank import pairwise_accuracy
    # problem 0: right answers score 3 and 1, wrong ones 2 -> pairs (3>2) yes, (1>2) no
    # problem 1: right 5, wrong 5 and 4 -> (5>5) a tie, wrong; (5>4) yes; problem 2: all right
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 4.0, 9.0])
    correct = torch.tensor([True, True, False, True, False, False, True])
    problem = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    assert pairwise_accuracy(scores, correct, problem) == (0.5, 4)
    # the 9 was alone in its problem and beat nothing; moved into problem 0 it beats the 2
    assert pairwise_accuracy(scores, correct, torch.tensor([0, 0, 0, 1, 1, 1, 0])) == (0.6, 5)
