"""minipost.optim: AdamW's update by hand and against torch.optim.AdamW, its state through a resume
checkpoint, the cosine schedule, and a training process that never imports torch._dynamo."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minipost.checkpoint import load_state, save_state
from minipost.optim import AdamW, CosineSchedule, make_optimizer


def test_one_step_by_hand():
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
def test_matches_torch_adamw_with_two_groups(fused):
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


def test_state_survives_a_resume_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    x = torch.randn(5, 3)

    def train(opt, sched, n):
        for _ in range(n):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = CosineSchedule(opt, 2, 6)
    train(opt, sched, 3)
    save_state(tmp_path / "s", {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr_at_save = sched.get_last_lr()
    train(opt, sched, 3)
    straight = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved)
    state = load_state(tmp_path / "s")
    opt2 = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched2 = CosineSchedule(opt2, 2, 6)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.get_last_lr() == lr_at_save and opt2.param_groups[0]["weight_decay"] == 0.1
    train(opt2, sched2, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_mismatched_state_is_refused():
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1.0)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_cosine_schedule_warms_up_then_decays_to_min_ratio():
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched = CosineSchedule(opt, warmup_steps=2, total_steps=6, min_ratio=0.1)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(7):
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    # warm-up (s+1)/2, then 0.1 + 0.9·(1 + cos(π·(s−2)/4))/2, held at 0.1 after step 6
    expected = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in range(5)] + [0.1]
    assert lrs == pytest.approx(expected)


def test_a_training_step_does_not_import_the_compiler():
    # torch.optim's optimizers import torch._dynamo and sympy (~70 MB of RSS); this one must not.
    code = ("import sys, torch; from minipost.model import GPT, GPTConfig; "
            "from minipost.optim import make_optimizer, CosineSchedule, clip_gradients\n"
            "m = GPT(GPTConfig(vocab_size=32, hidden_size=16, intermediate_size=32, "
            "num_hidden_layers=1, num_attention_heads=2)); o = make_optimizer(m, 1e-3, 0.1)\n"
            "s = CosineSchedule(o, 1, 2); m(torch.randint(0, 32, (2, 5))).sum().backward()\n"
            "clip_gradients(m, 1.0); o.step(); o.zero_grad(); s.step(); o.state_dict()\n"
            "print(sorted(k for k in sys.modules if k.startswith(('torch._dynamo', 'sympy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_cosine_schedule_follows_the_clock_when_the_time_budget_ends_the_run(monkeypatch):
    # 100 steps allowed in 10 minutes; each step takes a minute, so the clock ends the run at
    # step 10 and the cosine must follow the clock: progress = minutes / 10, not steps / 100
    now = [0.0]
    monkeypatch.setattr("minipost.optim.time.time", lambda: now[0])
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched = CosineSchedule(opt, warmup_steps=0, total_steps=100, min_ratio=0.1, max_minutes=10)
    lrs = []
    while not sched.done():
        now[0] += 60.0
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert sched.last_epoch == 10 and sched.stopped_by == "max_minutes"
    # after k minutes: 0.1 + 0.45·(1 + cos(π·k/10)); the last step lands on the floor, 0.1
    assert lrs == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi * k / 10)) for k in range(1, 11)])


def test_cosine_schedule_follows_the_steps_when_they_end_the_run_first(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("minipost.optim.time.time", lambda: now[0])
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched = CosineSchedule(opt, warmup_steps=0, total_steps=4, min_ratio=0.0, max_minutes=60)
    while not sched.done():
        now[0] += 1.0                       # a second a step: the clock is far from its budget
        sched.step()
    assert sched.stopped_by == "max_steps" and sched.get_last_lr()[0] == pytest.approx(0.0)


def test_cosine_schedule_resumes_its_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("minipost.optim.time.time", lambda: now[0])
    opt = AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched = CosineSchedule(opt, warmup_steps=0, total_steps=100, min_ratio=0.1, max_minutes=10)
    for _ in range(4):
        now[0] += 60.0
        sched.step()
    state = sched.state_dict()
    now[0] += 3600.0                        # time between the stop and the resume does not count
    sched2 = CosineSchedule(opt, warmup_steps=0, total_steps=100, min_ratio=0.1, max_minutes=10)
    sched2.load_state_dict(state)
    assert sched2.minutes() == pytest.approx(4.0)
    now[0] += 60.0
    sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
