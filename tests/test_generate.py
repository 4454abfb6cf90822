import pytest
import torch

from minipost.generate import generate, filter_logits, left_pad
from minipost.model import GPT, GPTConfig, token_logprobs

CFGS = {
    "llama": GPTConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "gpt2": GPTConfig.gpt2(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64),
}


def make(name):
    torch.manual_seed(0)
    model = GPT(CFGS[name]).eval()
    with torch.no_grad():  # sharpen the distribution so greedy paths are well separated
        model.lm_head.weight.mul_(20) if not model.config.tie_word_embeddings else None
    return model


def greedy_by_full_forward(model, prompt, n, eos=None):
    ids = list(prompt)
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


@pytest.mark.parametrize("name", list(CFGS))
def test_greedy_with_kv_cache_equals_full_forward_and_batched_equals_single(name):
    model = make(name)
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0, pad_token_id=3)
    for i, p in enumerate(PROMPTS):
        expected = greedy_by_full_forward(model, p, 10)
        got = out.completion_ids[i][out.completion_mask[i]].tolist()
        assert got == expected
        single = generate(model, [p], max_new_tokens=10, temperature=0, pad_token_id=3)
        assert single.completion_ids[0].tolist() == expected


def test_eos_stops_a_row_and_is_inside_the_mask():
    model = make("llama")
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0, pad_token_id=3)
    row0 = free.completion_ids[0].tolist()
    k = next((j for j in range(1, len(row0)) if row0[j] not in row0[:j]), 0)
    eos = row0[k]                         # a token that first appears at position k of row 0
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_token_id=eos,
                   pad_token_id=3)
    row = out.completion_ids[0]
    first = (row == eos).nonzero()[0].item()
    assert first == k
    assert out.completion_mask[0, :first + 1].all() and not out.completion_mask[0, first + 1:].any()
    assert (row[first + 1:] == 3).all()
    assert not out.truncated[0]


def test_outputs_are_ordinary_tensors_a_trainer_can_edit_and_differentiate_through():
    # generate decodes under inference mode; what it returns must not be inference tensors
    model = make("llama")
    out = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, eos_token_id=7,
                   generator=torch.Generator().manual_seed(0))
    fields = [out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, out.logps,
              out.truncated]
    assert not any(t.is_inference() for t in fields)
    out.completion_ids[0, 0] = 1                          # in place, outside inference mode
    w = torch.ones(1, requires_grad=True)
    (w * out.logps).sum().backward()                      # saved for backward
    assert torch.equal(w.grad, out.logps.sum().reshape(1))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7),
                                dict(temperature=0.9, top_k=5), dict(temperature=1.3, top_p=0.8)])
def test_sampled_logps_equal_recomputation_from_logits(kw):
    model = make("llama")
    g = torch.Generator().manual_seed(0)
    out = generate(model, PROMPTS, max_new_tokens=8, generator=g, pad_token_id=3, **kw)
    seq, mask = out.sequences
    logits = model(seq, attention_mask=mask)
    P = out.prompt_ids.shape[1]
    T = kw["temperature"]
    if "top_k" in kw or "top_p" in kw:
        flat = filter_logits(logits.flatten(0, 1), T, kw.get("top_k"), kw.get("top_p"))
        recomputed = token_logprobs(flat.view_as(logits), seq)[:, P - 1:]
    else:
        # docs/pitfalls.md, "Sampling temperature in log-probs"
        recomputed = token_logprobs(logits / T, seq)[:, P - 1:]
    m = out.completion_mask
    torch.testing.assert_close(out.logps[m], recomputed[m], atol=1e-5, rtol=0)
    assert (out.logps[~m] == 0).all()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 1.0, top_k=2)).tolist() == [[True, True, False, False]]
    # top_p=0.7: 0.5 < 0.7 so 0.3 is needed too; 0.8 >= 0.7 so the rest go
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.45)).tolist() == [[True, False, False, False]]


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3]], pad_token_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


def test_sample_draws_from_the_given_distribution():
    """Inverse-CDF sampling: frequencies match the probabilities (chi-square), zero-probability
    tokens never come, and a one-hot row always gives its token."""
    from minipost.generate import sample
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    n = 40_000
    tokens = sample(probs.expand(n, -1), g)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0                   # filtered tokens: never drawn
    expected = n * probs.double()
    keep = expected > 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 16.3                                         # 3 d.o.f., p = 0.001
    one_hot = torch.zeros(4, 6)
    one_hot[torch.arange(4), torch.tensor([0, 5, 2, 3])] = 1.0
    assert sample(one_hot, g).tolist() == [0, 5, 2, 3]
