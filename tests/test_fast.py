"""minipost.fast: each speed path gives the numbers of the plain computation it replaces.

The model with `use_fast_paths(model, False)` is the textbook model.py; with it on (the default)
the same logits, gradients and cached decoding to fp32's rounding, with fewer saved tensors. The
autograd Functions against finite differences; the decoding attention against SDPA; AdamW against
torch.optim.AdamW, by hand for one step, and without importing the compiler.
"""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minipost import fast
from minipost.fast import AdamW, RMSNormFn, SiLUMulFn, SwiGLUDownFn, decode_attention
from minipost.lora import apply_lora
from minipost.model import GPT, KVCache, use_fast_paths
from test_model import CONFIGS, make, saved_bytes


def fast_and_plain(name, dtype=torch.float32):
    """The same random model twice: speed paths on (as built) and off."""
    on = make(name).to(dtype)
    return on, use_fast_paths(copy.deepcopy(on), False)


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(4, 50, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                   # row 0 left-padded by 4
    return ids, mask


def spy(monkeypatch):
    """Count the calls to each fast path the model makes."""
    calls = {}
    for name in ("rms_norm", "swiglu_down", "attention"):
        original = getattr(fast, name)

        def counted(*a, _name=name, _original=original, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*a, **kw)
        monkeypatch.setattr(fast, name, counted)
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_paths_give_the_plain_models_logits_and_gradients(name, monkeypatch):
    on, off = fast_and_plain(name)
    ids, mask = padded_batch()
    calls = spy(monkeypatch)
    results = []
    for model in (on, off):
        logits = model(ids, attention_mask=mask)
        logits.logsumexp(-1).mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
        # the fast model takes each of its paths (GPT-2 has LayerNorm and no SwiGLU), the plain none
        ran = {"attention"} if name == "gpt2" else {"attention", "rms_norm", "swiglu_down"}
        assert set(calls) == (ran if model is on else set()), calls
        calls.clear()
    (logits_on, grads_on), (logits_off, grads_off) = results
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-5, atol=1e-5)
    for n in grads_on:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cached_decoding_equals_the_full_forward_on_both_paths(name):
    # fp32 on a CPU: the decoding steps take fast.decode_attention when the paths are on
    ids, mask = padded_batch()
    full = fast_and_plain(name)[1](ids, attention_mask=mask)           # the plain model, no cache
    for model in fast_and_plain(name):
        cache = KVCache(model.config, 3, 16, torch.float32, "cpu")
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        steps += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache)
                  for t in range(6, 12)]
        cached = torch.cat(steps, dim=1)
        torch.testing.assert_close(cached[1:], full[1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached[0, 4:], full[0, 4:], rtol=1e-5, atol=1e-5)


def test_swiglu_with_lora_on_the_down_projection_equals_the_plain_path():
    # down_proj is a LoRA layer, not a plain Linear: the fast path falls back to SiLUMulFn
    on, off = fast_and_plain("llama")
    for model in (on, off):
        apply_lora(model, r=4, targets=["down_proj"])
        torch.manual_seed(2)
        for n, p in model.named_parameters():
            if "lora" in n:
                p.data.normal_(0, 0.1)
    ids, mask = padded_batch()
    grads = []
    for model in (on, off):
        model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_written_out_norm_and_gate_keep_one_tensor_less_each():
    # The same loss and gradients as autograd's graph of the plain model, and exactly one (B, T, d)
    # tensor less per RMSNorm (x̂) and two (B, T, intermediate) less per SwiGLU (silu(g), and h,
    # the down projection's input).
    x = torch.randint(0, 50, (3, 24))
    results = []
    for model in fast_and_plain("llama", torch.float64):
        loss, n_saved = saved_bytes(lambda: model(x).logsumexp(-1).mean())
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, n_saved))
    (loss0, g0, saved0), (loss1, g1, saved1) = results
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-10, atol=1e-12, msg=n)
    cfg, tokens = CONFIGS["llama"], x.numel()
    L, d, i = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    assert saved1 - saved0 == 8 * tokens * ((2 * L + 1) * d + 2 * L * i), (saved0, saved1)


def test_no_grad_forward_skips_the_functions_with_the_same_numbers(monkeypatch):
    # Decoding and reference forwards run the ops without the autograd Functions: bit for bit the
    # logits of a forward that records the graph (a PPO/GRPO ratio starts at exactly 1).
    model, x = make("llama"), torch.randint(0, 50, (3, 24))
    with_graph = model(x)
    assert with_graph.grad_fn is not None
    for fn in (RMSNormFn, SiLUMulFn, SwiGLUDownFn):
        monkeypatch.setattr(fn, "apply", lambda *a: pytest.fail("Function used without grad"))
    with torch.inference_mode():
        assert torch.equal(model(x), with_graph.detach())


def test_rms_norm_and_swiglu_backward_formulas_match_finite_differences():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-5), (x, w))
    torch.testing.assert_close(RMSNormFn.apply(x, w, 1e-5), F.rms_norm(x, (5,), w, 1e-5))
    g, u = (torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(SiLUMulFn.apply, (g, u))
    torch.testing.assert_close(SiLUMulFn.apply(g, u), F.silu(g) * u)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDownFn.apply, (g, u, w))
    assert torch.autograd.gradcheck(SwiGLUDownFn.apply, (g, u, w.detach()))   # frozen W
    torch.testing.assert_close(SwiGLUDownFn.apply(g, u, w), F.linear(F.silu(g) * u, w))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    # One query per row against T cached keys: the written-out attention of a CPU decoding step
    # gives SDPA's numbers, with and without a mask hiding some keys (left padding).
    torch.manual_seed(0)
    B, T, hd = 3, 7, 8
    q = torch.randn(B, heads, 1, hd, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, T, hd, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[0, ..., :3] = False
    mask[2, ..., :1] = False
    for m in (None, mask):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=kv_heads != heads)
        torch.testing.assert_close(decode_attention(q, k, v, m), want)


# ---------------------------------------------------------------------------- AdamW
def test_adamw_is_a_torch_optimizer():
    opt = AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)


def test_adamw_one_step_by_hand():
    # θ = 1, g = 0.5, lr 0.1, β = (0.9, 0.999), λ = 0.1: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25,
    # θ ← 1·(1 − 0.01) − 0.1·0.5/(0.5 + ε) = 0.89
    for fused in (True, False):
        p = torch.nn.Parameter(torch.tensor([1.0]))
        p.grad = torch.tensor([0.5])
        opt = AdamW([{"params": [p]}], lr=0.1, weight_decay=0.1, fused=fused)
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor([0.89]))
        state = opt.state[p]
        assert state["step"].item() == 1
        torch.testing.assert_close(state["exp_avg"], torch.tensor([0.05]))
        torch.testing.assert_close(state["exp_avg_sq"], torch.tensor([0.00025]))


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_adamw_with_two_groups(fused):
    torch.manual_seed(0)
    mine = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1},
                         {"params": [ps[1]], "weight_decay": 0.0}]
    opt = AdamW(groups(mine), lr=1e-2, betas=(0.9, 0.95), fused=fused)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(5):
        grads = [torch.randn_like(p) for p in mine]
        for ps in (mine, ref):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for k in ("exp_avg", "exp_avg_sq"):   # the same state layout as torch.optim's
        torch.testing.assert_close(opt.state_dict()["state"][0][k], ref_opt.state_dict()["state"][0][k])


def test_adamw_state_loads_into_torch_adamw_and_back():
    # a resume may switch between fast.AdamW and torch.optim.AdamW: the state of either, loaded
    # into the other, continues as the first would
    x = torch.randn(5, 3)

    def train(model, opt, n=3):
        for _ in range(n):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    ours = lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1)
    torchs = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    for first, second in ((ours, torchs), (torchs, ours)):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 4)
        opt = first(model.parameters())
        train(model, opt)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        resumed = []
        for make_opt in (first, second):
            model = torch.nn.Linear(3, 4)
            model.load_state_dict(saved[0])
            opt = make_opt(model.parameters())
            opt.load_state_dict(copy.deepcopy(saved[1]))
            train(model, opt)
            resumed.append(model)
        for a, b in zip(*(m.parameters() for m in resumed)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_refuses_mismatched_state():
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1.0)
    with pytest.raises(ValueError, match="parameter group"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_a_training_step_does_not_import_the_compiler():
    # torch.optim.Optimizer's methods import torch._dynamo and sympy (~70 MB of RSS) on first use;
    # fast.AdamW, a subclass, must not.
    code = ("import sys, torch; from minipost.model import GPT, GPTConfig; "
            "from minipost.optim import make_optimizer, CosineSchedule, clip_gradients\n"
            "m = GPT(GPTConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
            "num_hidden_layers=1, num_attention_heads=2)); o = make_optimizer(m, 1e-3, 0.1)\n"
            "s = CosineSchedule(o, 1, 2); m(torch.randint(0, 32, (2, 5))).sum().backward()\n"
            "clip_gradients(m, 1.0); o.step(); o.zero_grad(); s.step()\n"
            "o.load_state_dict(o.state_dict())\n"
            "print(sorted(k for k in sys.modules if k.startswith(('torch._dynamo', 'sympy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"
