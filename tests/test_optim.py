"""minipost.optim: make_optimizer's groups and its state through a resume checkpoint, with it or any
torch.optim optimizer in its place, and the cosine schedule. (AdamW itself: tests/test_fast.py.)"""
import math

import pytest
import torch

from minipost.fast import AdamW
from minipost.optim import CosineSchedule, make_optimizer
from minipost.resume import load_checkpoint, save_checkpoint


def adamw_groups(model, lr):
    """torch.optim.AdamW over make_optimizer's groups: the one-line swap a fork makes."""
    return torch.optim.AdamW(make_optimizer(model, lr, weight_decay=0.1).param_groups, lr=lr,
                             betas=(0.9, 0.95))


OPTIMIZERS = {
    "make_optimizer": lambda model, lr: make_optimizer(model, lr, weight_decay=0.1),
    "torch.optim.AdamW": adamw_groups,
    "torch.optim.SGD": lambda model, lr: torch.optim.SGD(model.parameters(), lr, momentum=0.9),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_restores_the_optimizer_whichever_it_is(name, tmp_path):
    # a run stopped after 3 of 6 steps and resumed from its checkpoint ends where the straight
    # run does, bit for bit, with make_optimizer's AdamW or a torch.optim optimizer in its place
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    x = torch.randn(5, 3)

    def train(opt, sched, n):
        for _ in range(n):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()

    opt = OPTIMIZERS[name](model, 1e-2)
    sched = CosineSchedule(opt, 2, 6)
    train(opt, sched, 3)
    save_checkpoint(tmp_path, 3, model, opt, sched)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr_at_save = sched.get_last_lr()
    train(opt, sched, 3)
    straight = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model.load_state_dict({k: torch.zeros_like(v) for k, v in saved.items()})
    opt2 = OPTIMIZERS[name](model, 1e-2)
    sched2 = CosineSchedule(opt2, 2, 6)
    assert load_checkpoint(tmp_path, model, opt2, sched2)["step"] == 3
    assert sched2.get_last_lr() == lr_at_save
    assert opt2.param_groups[0]["weight_decay"] == (0.0 if name == "torch.optim.SGD" else 0.1)
    train(opt2, sched2, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


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
