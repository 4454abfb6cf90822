"""train_grpo.py: the step function's invariants (ratio 1, micro-batch = full batch, constant reward
= no gradient, no reference at β = 0) and end-to-end runs with tiny flags (full and LoRA)."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train_grpo
from conftest import warnings_of
from minipost import batches, diagnostics, online, rewards
from minipost.grpo import group_advantages
from minipost.peft import add_peft, load_model
from minipost.tokenizer import load_tokenizer

TINY = dict(max_steps=2, batch_prompts=2, group_size=4, max_new_tokens=12, n_prompts=40,
            micro_batch_size=3, eval_problems=4, pass_k=2, eval_every=1, threads=1, device="cpu",
            max_minutes=0)


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fake_batch(vocab: int, prompt_lens, completion_lens, group_size: int, seed: int = 0):
    """Rows with prompts and completions of the given (unequal) lengths, joined like rollouts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, c in zip(prompt_lens, completion_lens):
        rows.append({"input_ids": torch.randint(4, vocab, (1, p + c), generator=g),
                     "attention_mask": torch.ones(1, p + c, dtype=torch.long),
                     "loss_mask": torch.ones(1, c), "sampler_logps": torch.zeros(1, c),
                     "rewards": torch.rand(1, generator=g).round(), "rewards/correct": torch.zeros(1),
                     "truncated": torch.zeros(1, dtype=torch.bool)})
    batch = batches.cat_rollouts(rows)
    batch["advantages"] = group_advantages(batch["rewards"], group_size)
    return batch


def grads_of(model, batch, args):
    model.zero_grad(set_to_none=True)
    mbs = batches.micro_batches(batch, args.micro_batch_size)
    norm = train_grpo.loss_normalizer(args.loss_type, batch["loss_mask"], args.max_new_tokens)
    stats, old = train_grpo.policy_update(model, mbs, norm, args)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()], stats, mbs, old


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "gspo"])
def test_micro_batches_of_unequal_lengths_give_the_full_batch_gradient(tiny_sft_dir, loss_type):
    torch.manual_seed(0)
    model = load_model(tiny_sft_dir).double()
    batch = fake_batch(model.config.vocab_size, [5, 9, 7, 6, 8, 5, 9, 6], [3, 11, 6, 2, 9, 4, 1, 7],
                       group_size=4)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    batch["rewards"] = torch.tensor([1., 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    batch["advantages"] = group_advantages(batch["rewards"], 4)
    args = train_grpo.Args(loss_type=loss_type, max_new_tokens=12)
    full, _, mbs_full, _ = grads_of(model, batch, replace(args, micro_batch_size=8))
    split, _, mbs, _ = grads_of(model, batch, replace(args, micro_batch_size=3))
    assert len(mbs_full) == 1 and len(mbs) == 3
    assert len({mb["input_ids"].shape[1] for mb in mbs}) > 1    # really unequal widths
    assert any(g.abs().sum() > 0 for g in full)
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("advantage", ["rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_every_advantage_with_an_entropy_bonus_gives_the_full_batch_gradient_in_micro_batches(
        tiny_sft_dir, advantage):
    """compute_advantages hands each micro-batch its rows (and, per token, its columns): split or
    whole, the same gradient, the entropy bonus included."""
    torch.manual_seed(0)
    model = load_model(tiny_sft_dir).double()
    batch = fake_batch(model.config.vocab_size, [5, 9, 7, 6, 8, 5, 9, 6], [3, 11, 6, 2, 9, 4, 1, 7],
                       group_size=4)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    batch["rewards"] = torch.tensor([1., 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    batch["sampler_logps"] = -torch.rand(batch["loss_mask"].shape, dtype=torch.float64)
    args = train_grpo.Args(advantage=advantage, beta=0.1, entropy_coef=0.05, loss_type="dapo",
                           group_size=4, max_new_tokens=12)
    grads = []
    for size in (8, 3):
        model.zero_grad(set_to_none=True)
        mbs = batches.micro_batches(batch, size)
        ref = [mb["sampler_logps"] + 0.2 for mb in mbs]          # a KL in the reward: 0.2 a token
        adv = train_grpo.compute_advantages(batch, mbs, ref, args)
        assert adv.shape == ((8,) if advantage == "rloo" else batch["loss_mask"].shape)
        norm = train_grpo.loss_normalizer("dapo", batch["loss_mask"], 12)
        train_grpo.policy_update(model, mbs, norm, args, ref_logps=ref)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_first_update_ratio_is_one_and_logps_match_the_sampler(tiny_sft_dir):
    torch.manual_seed(0)
    model, tok = load_model(tiny_sft_dir), load_tokenizer(tiny_sft_dir)
    args = train_grpo.Args(group_size=4, max_new_tokens=12, temperature=0.7, micro_batch_size=3)
    problems = [{"prompt": "Mia has 2 apples. She buys 3 more. How many?", "answer": "5"},
                {"prompt": "Leo has 9 coins. He loses 4. How many are left?", "answer": "5"}]
    fns = rewards.load(["correct"], [])
    batch = batches.group_rollout(model, tok, problems, fns, args,
                                  torch.Generator().manual_seed(0))
    batch["advantages"] = torch.randn(len(batch["rewards"]))
    _, stats, _, old = grads_of(model, batch, args)
    assert stats["policy/ratio_max_dev"] < 1e-6           # ρ = 1 on the first update
    assert stats["policy/clipfrac"] == 0.0
    assert stats["sampler_logp_max_diff"] < 1e-4          # KV-cache sampler == full forward at T
    # a second update on the same batch uses these old log-probs: after a step ρ ≠ 1
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    mbs = batches.micro_batches(batch, args.micro_batch_size)
    norm = train_grpo.loss_normalizer(args.loss_type, batch["loss_mask"], args.max_new_tokens)
    stats2, _ = train_grpo.policy_update(model, mbs, norm, args, old_logps=old)
    assert stats2["policy/ratio_max_dev"] > 1e-4


def test_constant_reward_group_gives_no_policy_gradient(tiny_sft_dir):
    model = load_model(tiny_sft_dir).double()
    batch = fake_batch(model.config.vocab_size, [5, 7, 6, 8], [4, 9, 2, 6], group_size=4)
    batch["rewards"] = torch.ones(4)
    batch["advantages"] = group_advantages(batch["rewards"], 4)
    assert torch.equal(batch["advantages"], torch.zeros(4))   # no NaN from std = 0
    grads, stats, _, _ = grads_of(model, batch, train_grpo.Args(beta=0.0))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert all(v == v for v in stats.values())                # finite, no NaN


def test_beta_zero_builds_no_reference_model(tiny_sft_dir):
    model = load_model(tiny_sft_dir)
    assert online.make_reference(model, "none", beta=0.0) is None
    ref = online.make_reference(model, "none", beta=0.04)
    assert ref.kind == "copy" and ref.model is not model and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    lora = add_peft(model, "lora", lora_r=2)
    ref = online.make_reference(lora, "lora", beta=0.04)
    assert ref.kind == "adapters_off" and ref.model is None     # LoRA: the base model, no copy


def read_metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_train_grpo_end_to_end_full(tiny_sft_dir, tmp_path):
    out = tmp_path / "grpo"
    final = train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(out), mu=2,
                                            **{**TINY, "max_steps": 3}))
    assert final["steps"] == 3
    for key in ("accuracy", "accuracy_ci95", "well_formed", "pass@2"):
        assert key in final["before"] and key in final["after"]
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "grpo" and results["minutes"] > 0 and results["peak_rss_mb"] > 0
    lines = read_metrics(out)
    train = [x for x in lines if "reward/mean" in x]
    assert train and all(k in train[0] for k in ("reward/std", "frac_reward_zero_std",
                                                 "policy/clipfrac", "completions/mean_length"))
    for x in train:        # the batch's mean length lies between its correct and wrong means
        lo_hi = [x.get("completions/mean_length_correct"), x.get("completions/mean_length_wrong")]
        if None not in lo_hi:
            assert min(lo_hi) - 1e-3 <= x["completions/mean_length"] <= max(lo_hi) + 1e-3
    assert all("completions/mean_length_correct" in x for x in train)
    assert all("kl" not in x for x in train)                 # β = 0: no reference, no KL
    assert any("eval/accuracy" in x for x in lines[1:-1])    # evaluated at intervals
    model = load_model(out)
    assert model.config.vocab_size == load_tokenizer(out).vocab_size


def test_train_grpo_logs_entropy_the_first_updates_mismatch_pass_at_k_and_warnings(
        tiny_sft_dir, tmp_path, watched, monkeypatch):
    """μ = 2 at a large learning rate: the second update's log-probs are far from the sampler's,
    the first's are not, and the first's is what `sampler_logp_max_diff` reports. (The tiny model
    solves nothing: a reward by the completion's length gives the groups a spread to learn from.)"""
    monkeypatch.setattr(rewards, "verify", lambda text, answer: float(len(text) % 2))  # "correct"
    monkeypatch.setattr(diagnostics, "ENTROPY_WINDOW", 1)          # entropy below 2x its start:
    monkeypatch.setattr(diagnostics, "ENTROPY_COLLAPSE_SHARE", 2.0)  # fires at the first step
    out = tmp_path / "grpo"
    final = train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(out), mu=2, lr=1e-2,
                                            warmup_steps=0, report_to="tensorboard",
                                            **{**TINY, "max_steps": 4}))
    train = [x for x in read_metrics(out) if "reward/mean" in x]
    assert len(train) == 2 and all(x["entropy"] > 0 for x in train)
    assert all(x["sampler_logp_max_diff"] < 1e-3 for x in train)    # sampler_tolerance on a CPU
    assert [w["warning"].split(":")[0] for w in warnings_of(out)] == [
        "entropy collapse", "the loss has stopped moving"]
    assert all(w["step"] == 2 for w in warnings_of(out))
    for res in (final["before"], final["after"]):   # unbiased pass@k, k = 1 … 2, with intervals
        assert len(res["pass@k"]) == len(res["pass@k_ci95"]) == 2
        assert res["pass@k"][0] <= res["pass@k"][1] == res["pass@2"]
    last = read_metrics(out)[-1]
    assert last["eval/pass@k"] == final["after"]["pass@k"] and "eval/pass@k_ci95" in last
    (writer,) = watched
    assert [s for s, _ in writer.scalars["entropy"]] == [2, 4]


def test_train_grpo_end_to_end_lora_with_kl(tiny_sft_dir, tmp_path):
    out = tmp_path / "grpo_lora"
    train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(out), peft="lora", lora_r=2,
                                    beta=0.04, dynamic_sampling=False, mask_truncated=True,
                                    loss_type="grpo", scale_rewards="none", format_reward=0.5,
                                    merge=True,
                                    **TINY))
    assert (out / "adapter_config.json").exists() and (out / "merged" / "config.json").exists()
    train = [x for x in read_metrics(out) if "reward/mean" in x]
    assert all("kl" in x for x in train)
    load_model(out)                                # --init of a LoRA output: base + adapter, merged


@pytest.mark.parametrize("variant", [
    dict(advantage="rloo", loss_type="gspo", mu=2, entropy_coef=0.01),
    dict(advantage="reinforce_pp", beta=0.04, dynamic_sampling=False, entropy_coef=0.01),
    dict(advantage="reinforce_pp_baseline", loss_type="dr_grpo")])
def test_train_grpo_end_to_end_rloo_reinforce_pp_gspo_and_entropy_bonus(tiny_sft_dir, tmp_path,
                                                                       variant):
    out = tmp_path / "grpo"
    final = train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(out), **variant,
                                            **{**TINY, "eval_every": 0, "pass_k": 0}))
    assert final["steps"] == 2 and (out / "model.safetensors").exists()
    train = [x for x in read_metrics(out) if "reward/mean" in x]
    assert train and all(math.isfinite(x["loss"]) and math.isfinite(x["policy/logp_adv_cov"])
                         and x["entropy"] > 0 for x in train)
    assert all(("kl" in x) == ("beta" in variant) for x in train)   # REINFORCE++: KL in reward
    assert json.loads((out / "results.json").read_text())["stage"] == "grpo"


def test_gspo_with_per_token_advantages_is_a_user_error(tmp_path):
    from minipost.cli import UserError
    with pytest.raises(UserError, match="gspo"):
        train_grpo.main(train_grpo.Args(init=str(tmp_path), out_dir=str(tmp_path / "o"),
                                        loss_type="gspo", advantage="reinforce_pp", device="cpu",
                                        threads=1))


def test_missing_init_names_the_command(tmp_path):
    from minipost.cli import UserError
    with pytest.raises(UserError, match="train_sft.py"):
        train_grpo.main(train_grpo.Args(init=str(tmp_path / "nope"), out_dir=str(tmp_path / "o"),
                                        device="cpu", threads=1))


@pytest.mark.slow
@pytest.mark.parametrize("sharding,port", [("ddp", 29541), ("fsdp", 29542)])
def test_train_grpo_under_torchrun_two_processes(sharding, port, tiny_sft_dir, tmp_path):
    """With --fsdp, dynamic sampling lets the ranks refill a different number of times: the
    sharded model must not wait on collectives the other rank never starts."""
    import os
    import subprocess
    import sys
    flags = ["--fsdp", "--dynamic-sampling", "--max-refills", "3"] if sharding == "fsdp" else []
    for k, v in {**TINY, "beta": 0.04, "mu": 2}.items():
        flags += ["--" + k.replace("_", "-"), str(v)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "train_grpo.py", *flags, "--init", tiny_sft_dir,
                        "--out-dir", str(tmp_path / "ddp")],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ddp" / "model.safetensors").exists()
    load_model(tmp_path / "ddp")                  # gathered whole on rank 0 (FSDP), loadable
    lines = read_metrics(tmp_path / "ddp")
    assert len([x for x in lines if x["step"] == 0]) == 1      # only rank 0 writes


def test_lr_schedules(tiny_sft_dir, tmp_path):
    """cosine: warm-up, then down to min_lr_ratio · lr at --max-steps; constant: flat after warm-up."""
    lrs = {}
    for schedule in ("cosine", "constant"):
        train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / schedule),
                                        lr=1e-3, warmup_steps=1, lr_schedule=schedule,
                                        **{**TINY, "max_steps": 4, "eval_problems": 0,
                                           "pass_k": 0}))
        lrs[schedule] = [x["lr"] for x in read_metrics(tmp_path / schedule) if "lr" in x]
    assert lrs["constant"] == pytest.approx([1e-3] * 4)
    # the LR logged after step s: one warm-up step, then (s-1)/3 of the cosine, ending at 0.1·lr
    assert lrs["cosine"] == pytest.approx(
        [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3))) for s in (1, 2, 3, 4)])
    assert lrs["cosine"][-1] == pytest.approx(1e-4)


def test_bad_lr_schedule_is_a_user_error(tmp_path):
    from minipost.cli import UserError
    with pytest.raises(UserError, match="--lr-schedule"):
        train_grpo.main(train_grpo.Args(init=str(tmp_path), out_dir=str(tmp_path / "o"),
                                        lr_schedule="linear", device="cpu", threads=1))


def test_trainer_log_probs_that_do_not_match_the_sampler_stop_the_run(tiny_sft_dir, tmp_path,
                                                                    monkeypatch):
    """The first update of a batch recomputes the log-probs the sampler recorded: a trainer that
    scores another distribution (here T = 1 against the sampler's 0.7) is a bug, not noise."""
    real = train_grpo.completion_logps
    monkeypatch.setattr(train_grpo, "completion_logps",
                        lambda model, ids, mask, P, temperature, **kw: real(model, ids, mask, P,
                                                                             1.0, **kw))
    with pytest.raises(RuntimeError, match="sampler's log-probs"):
        train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "o"),
                                        temperature=0.7, **{**TINY, "eval_problems": 0,
                                                            "pass_k": 0}))
    assert not (tmp_path / "o" / "model.safetensors").exists()
