"""rollout.py: the shifted completion columns of log-probs, values and scores, and entropies."""
import math

import pytest
import torch

from minipost import tasks
from minipost.generate import generate
from minipost.model import GPT, GPTConfig, ScoreModel, token_entropy
from minipost.rollout import (completion_logps, completion_values, gold_rewards, sequence_scores,
                              values_and_scores)
from minipost.tokenizer import train_tokenizer

CFG = GPTConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=3)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def models():
    torch.manual_seed(0)
    policy = GPT(CFG).eval()
    value = ScoreModel(CFG).eval()
    torch.nn.init.normal_(value.score.weight)   # a non-zero head, so the values differ per column
    return policy, value


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_the_samplers_logps(temperature):
    policy, _ = models()
    g = generate(policy, PROMPTS, 12, temperature=temperature, eos_token_id=2, pad_token_id=3,
                 generator=torch.Generator().manual_seed(0))
    seq, mask = g.sequences
    with torch.no_grad():
        logps, entropy = completion_logps(policy, seq, mask, g.prompt_ids.shape[1], temperature,
                                          with_entropy=True)
    m = g.completion_mask
    assert logps.shape == g.logps.shape == entropy.shape
    torch.testing.assert_close(logps[m], g.logps[m], atol=1e-5, rtol=0)
    assert (entropy[m] > 0).all()


def test_values_and_scores_sit_on_the_shifted_columns():
    policy, value = models()
    g = generate(policy, PROMPTS, 8, temperature=1.0, eos_token_id=None, pad_token_id=3,
                 generator=torch.Generator().manual_seed(1))
    # cut row 1 after its 5th completion token: right padding after the "EOS"
    g.completion_mask[1, 5:] = False
    seq, mask = g.sequences
    P = g.prompt_ids.shape[1]
    with torch.no_grad():
        values = completion_values(value, seq, mask, P)
        scores = sequence_scores(value, seq, mask)
        both = values_and_scores(value, seq, mask, P)       # one forward for the two
        torch.testing.assert_close(both[0], values, atol=0, rtol=0)
        torch.testing.assert_close(both[1], scores, atol=0, rtol=0)
        for i, prompt in enumerate(PROMPTS):
            comp = g.completion_ids[i][g.completion_mask[i]].tolist()
            alone = torch.tensor([prompt + comp])
            v_alone = value(alone)[0]
            # V(s_t) is read at the token before a_t; the score at the last real token
            torch.testing.assert_close(values[i, :len(comp)], v_alone[len(prompt) - 1:-1],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(scores[i], v_alone[-1], atol=1e-5, rtol=0)


def test_gold_rewards_use_the_verifier_on_the_masked_tokens():
    tok = train_tokenizer(tasks.pretrain_corpus(200, seed=0), vocab_size=300)
    texts = ["1 + 2 = 3\n#### 3", "1 + 2 = 4\n#### 4", "#### 3"]
    ids = [tok.encode(t) + [tok.eos_token_id] for t in texts]
    N = max(map(len, ids)) + 2
    completion_ids = torch.full((3, N), tok.pad_token_id)
    completion_mask = torch.zeros(3, N, dtype=torch.bool)
    for i, row in enumerate(ids):
        completion_ids[i, :len(row)] = torch.tensor(row)
        completion_mask[i, :len(row)] = True
    rewards = gold_rewards(tok, completion_ids, completion_mask, ["3", "3", "3"])
    assert rewards.tolist() == [1.0, 0.0, 1.0]


def test_token_entropy_is_the_mean_of_completion_logps_entropy_over_the_completion():
    policy, _ = models()
    g = generate(policy, PROMPTS, 5, temperature=1.0, eos_token_id=2, pad_token_id=3,
                 generator=torch.Generator().manual_seed(0))
    seq, att = g.sequences
    P = seq.shape[1] - g.completion_ids.shape[1]
    _, entropy = completion_logps(policy, seq, att, P, with_entropy=True)        # (B, N)
    m = g.completion_mask.float()
    with torch.no_grad():
        logits = policy(seq, attention_mask=att)                                 # (B, P + N, V)
    # completion token t sits at column P + t; token_entropy's mask covers columns 1 … end
    mask = torch.cat([torch.zeros(len(seq), P - 1), m], 1)
    assert float(token_entropy(logits, mask)) == pytest.approx(float((entropy * m).sum() / m.sum()),
                                                               rel=1e-5)
