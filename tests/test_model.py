import math

import pytest
import torch
import torch.nn.functional as F

from minipost.model import (GPT, GPTConfig, KVCache, last_token_index, token_entropy,
                            token_logprobs)

CONFIGS = {
    "llama": GPTConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen3": GPTConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, qk_norm=True, tie_word_embeddings=False),
    "qwen2": GPTConfig(model_type="qwen2", vocab_size=50, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                       attention_bias=True),
    "gpt2": GPTConfig.gpt2(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    model = GPT(CONFIGS[name]).double().eval()
    # random biases and norms so no switch hides behind an init of zeros/ones
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_shape_and_causality(name):
    model = make(name)
    x = torch.randint(0, 50, (2, 10))
    logits = model(x)
    assert logits.shape == (2, 10, 50)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 50      # changing the future ...
    torch.testing.assert_close(model(y)[:, :6], logits[:, :6])  # ... leaves the past unchanged


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_equals_each_row_alone(name):
    model = make(name)
    rows = [torch.randint(4, 50, (n,)) for n in (7, 3, 5)]
    T = max(len(r) for r in rows)
    ids = torch.full((3, T), 3)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batched = model(ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, r in enumerate(rows):
        alone = model(r[None])
        torch.testing.assert_close(batched[i, T - len(r):], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_right_padded_batch_needs_no_mask(name):
    # With right padding, causal attention alone keeps real tokens from seeing the pad.
    model = make(name)
    r = torch.randint(4, 50, (4,))
    ids = torch.cat([r, torch.full((3,), 3)])[None]
    torch.testing.assert_close(model(ids)[0, :4], model(r[None])[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_prefill_and_decode_equal_full_forward(name):
    model = make(name)
    ids = torch.randint(4, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                    # row 1 left-padded by 3
    full = model(ids, attention_mask=mask)
    cache = KVCache(model.config, 2, 16, torch.float64, "cpu")
    steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache)]
    for t in range(5, 9):
        steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[0], full[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(cached[1, 3:], full[1, 3:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_without_mask_equals_full_forward(name):
    # no padding: causal prefill and mask-free decode steps (the fast path generate takes)
    model = make(name)
    ids = torch.randint(4, 50, (2, 9))
    full = model(ids)
    cache = KVCache(model.config, 2, 16, torch.float64, "cpu")
    steps = [model(ids[:, :5], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=0)
    # several new tokens after a cache still get a causal mask among themselves
    cache = KVCache(model.config, 2, 16, torch.float64, "cpu")
    cached = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-6, rtol=0)


def test_packed_documents_do_not_see_each_other():
    model = make("llama")
    a, b = torch.randint(4, 50, (5,)), torch.randint(4, 50, (4,))
    ids = torch.cat([a, b])[None]
    seg = torch.tensor([[1] * 5 + [2] * 4])
    pos = torch.tensor([list(range(5)) + list(range(4))])
    packed = model(ids, position_ids=pos, segment_ids=seg)
    torch.testing.assert_close(packed[0, :5], model(a[None])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(packed[0, 5:], model(b[None])[0], atol=1e-6, rtol=0)


def test_token_logprobs_match_log_softmax_and_hand_value():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 5))
    expected = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, tokens), expected.float())
    # summed over a mask == -cross_entropy(sum) with ignore_index
    # (docs/pitfalls.md, "Log-prob alignment")
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = tokens.masked_fill(mask == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1),
                         ignore_index=-100, reduction="sum")
    got = (token_logprobs(logits, tokens).double() * mask[:, 1:]).sum()
    torch.testing.assert_close(got, -ce)
    # 3-token vocab by hand: logits (0, ln 2, ln 5) -> p = (1, 2, 5) / 8; next token is 2: ln(5/8)
    hand = torch.tensor([[[0.0, 0.6931471805599453, 1.6094379124341003], [0.0, 0.0, 0.0]]])
    assert token_logprobs(hand, torch.tensor([[0, 2]])).item() == pytest.approx(-0.4700036, abs=1e-6)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


def test_gqa_matches_repeated_kv_heads():
    # GQA with 2 KV heads equals full MHA with each KV head repeated for its query group.
    torch.manual_seed(0)
    gqa = GPT(CONFIGS["llama"]).double().eval()
    cfg = GPTConfig(**{**CONFIGS["llama"].to_dict(), "num_key_value_heads": 4})
    mha = GPT(cfg).double().eval()
    sd = gqa.state_dict()
    hd = cfg.head_dim
    for k, v in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = v.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    x = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(gqa(x), mha(x))


def saved_bytes(fn):
    """Bytes autograd keeps for the backward while `fn()` builds its graph (what checkpointing cuts)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_logits_to_keep_gives_the_last_positions_logits():
    model, x = make("llama"), torch.randint(0, 50, (3, 24))
    mask = torch.ones_like(x)
    mask[0, :5] = 0                                   # left padding in one row
    full = model(x, attention_mask=mask)
    for n in (1, 7, 24):
        torch.testing.assert_close(model(x, attention_mask=mask, logits_to_keep=n), full[:, -n:],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_tensors(name):
    from minipost.model import ScoreModel, set_gradient_checkpointing
    x = torch.randint(0, 50, (3, 24))
    mask = torch.ones_like(x)
    mask[0, :5] = 0                                         # a left-padded row: the mask path too
    results = []
    for on in (False, True):
        model = make(name)
        rm = ScoreModel.from_lm(make(name, seed=1)).double()
        set_gradient_checkpointing(model, on)
        set_gradient_checkpointing(rm, on)
        (loss, n_saved) = saved_bytes(lambda: model(x, mask).logsumexp(-1).mean()
                                      + rm.score_last(x, mask).sum())
        loss.backward()
        grads = {n: p.grad for n, p in [*model.named_parameters(), *rm.named_parameters()]}
        results.append((loss.detach(), grads, n_saved))
    (loss0, g0, saved0), (loss1, g1, saved1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=n)
    assert saved1 < 0.5 * saved0, (saved1, saved0)          # only each block's input is kept
    with torch.no_grad():                                   # no grad, no cache: a plain forward
        torch.testing.assert_close(model(x, mask), make(name)(x, mask))


def test_token_entropy_by_hand_uniform_is_log_v_and_one_hot_is_zero():
    # row 0: uniform over V=4 at every position, H = ln 4; row 1: one logit +inf-like, H ≈ 0
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)
    logits[1, :, 0] = 100.0
    mask = torch.ones(2, 2)                     # (B, T − 1): the distributions of tokens 1 and 2
    # token mean over 4 masked tokens: (2 · ln 4 + 2 · 0) / 4
    assert float(token_entropy(logits, mask)) == pytest.approx(math.log(4) / 2)
    row_0 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(token_entropy(logits, row_0)) == pytest.approx(math.log(4))
    assert math.isnan(float(token_entropy(logits, torch.zeros(2, 2))))


def test_token_entropy_reads_the_logits_that_predict_the_masked_tokens():
    # the last position's logits predict no token: they never count, whatever they hold
    logits = torch.zeros(1, 3, 4)
    logits[0, 2] = torch.tensor([50.0, 0, 0, 0])
    assert float(token_entropy(logits, torch.ones(1, 2))) == pytest.approx(math.log(4))
    # masking the token at column 1 leaves the distribution at column 1 (which predicts token 2)
    logits[0, 1] = torch.tensor([50.0, 0, 0, 0])
    assert float(token_entropy(logits, torch.tensor([[1.0, 0.0]]))) == pytest.approx(math.log(4))
    assert float(token_entropy(logits, torch.tensor([[0.0, 1.0]]))) == pytest.approx(0, abs=1e-6)


def test_initializer_range_is_the_std_of_every_weight_matrix_and_survives_export():
    from minipost.checkpoint import config_from_hf, config_to_hf
    torch.manual_seed(0)
    cfg = GPTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, initializer_range=0.06)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() - 0.06) < 0.006, name
    assert config_from_hf(config_to_hf(cfg)).initializer_range == 0.06
