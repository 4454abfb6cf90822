"""train_ppo.py and the PPO rollout pieces it wires together, on tiny models."""
import json
from pathlib import Path

import pytest
import torch

from minipost.checkpoint import save_model
from minipost.generate import generate
from minipost.model import GPT, GPTConfig, ScoreModel
from minipost.peft import add_peft, load_model
from minipost.ppo import gae, kl_shaped_rewards, ppo_policy_loss, whiten
from minipost.reference import Reference
from minipost.rollout import completion_logps, completion_values, sequence_scores

CFG = GPTConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=3)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17, 18, 19]]
T = 0.7


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def sample(policy, n=10, eos=2, seed=0):
    return generate(policy, PROMPTS, n, temperature=T, eos_token_id=eos, pad_token_id=3,
                    generator=torch.Generator().manual_seed(seed))


def test_score_sits_on_the_eos_position():
    torch.manual_seed(0)
    reward_model = ScoreModel(CFG).eval()
    torch.nn.init.normal_(reward_model.score.weight)
    # pick as "EOS" a token that first appears at different places in several rows, so the
    # completions (same seed, same draws until they stop) end at different lengths
    free = sample(tiny_policy(), n=12, eos=None)
    firsts = {}
    for row in free.completion_ids.tolist():
        for tok in set(row):
            firsts.setdefault(tok, set()).add(row.index(tok))
    eos = max(firsts, key=lambda tok: len(firsts[tok]))
    g = sample(tiny_policy(), n=12, eos=eos)
    assert (~g.truncated).any() and g.completion_mask.sum(1).unique().numel() > 1
    seq, attention_mask = g.sequences
    with torch.no_grad():
        scores = sequence_scores(reward_model, seq, attention_mask)
    token_rewards = kl_shaped_rewards(torch.zeros_like(g.logps), torch.zeros_like(g.logps), scores,
                                      g.completion_mask.float(), kl_coef=0.1)
    for i, prompt in enumerate(PROMPTS):
        comp = g.completion_ids[i][g.completion_mask[i]].tolist()
        if g.truncated[i]:
            continue
        eos_at = comp.index(eos)
        assert eos_at == len(comp) - 1                      # the completion ends at its first EOS
        with torch.no_grad():                               # the score of the unpadded sequence
            alone = reward_model(torch.tensor([prompt + comp]))[0, -1]
        torch.testing.assert_close(scores[i], alone, atol=1e-5, rtol=0)
        assert token_rewards[i].nonzero().flatten().tolist() == [eos_at]
        assert token_rewards[i, eos_at] == scores[i]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_first_minibatch_ratio_is_one(peft):
    policy = add_peft(tiny_policy(), peft, lora_r=4, lora_alpha=8)
    if peft == "lora":   # a non-zero LoRA update, so policy != reference
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    g = sample(policy)
    seq, attention_mask = g.sequences
    P = g.prompt_ids.shape[1]
    with torch.no_grad():
        old_logps = completion_logps(policy, seq, attention_mask, P, T)
    j = torch.tensor([3, 1])                                 # a shuffled minibatch of two rows
    logps = completion_logps(policy, seq[j], attention_mask[j], P, T)
    adv = torch.randn(logps.shape)
    _, stats = ppo_policy_loss(logps, old_logps[j], adv, g.completion_mask[j].float())
    assert stats["policy/ratio_max_dev"] < 1e-5
    assert stats["policy/clipfrac"] == 0
    if peft == "lora":   # the reference (adapters off) differs from the policy
        ref_logps = Reference(policy, copy=False).logps(completion_logps, seq, attention_mask, P, T)
        assert (ref_logps - old_logps)[g.completion_mask].abs().max() > 1e-3


def test_one_ppo_iteration_on_fixed_rollouts_lowers_the_surrogate_loss():
    policy = tiny_policy()
    g = sample(policy, n=12, eos=None)
    seq, attention_mask = g.sequences
    P = g.prompt_ids.shape[1]
    mask = g.completion_mask.float()
    with torch.no_grad():
        old_logps = completion_logps(policy, seq, attention_mask, P, T)
    scores = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rewards = kl_shaped_rewards(old_logps, old_logps, scores, mask, 0.05)
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 0.95)
    advantages = whiten(advantages, mask)

    def surrogate():
        return ppo_policy_loss(completion_logps(policy, seq, attention_mask, P, T), old_logps,
                               advantages, mask)[0]

    with torch.no_grad():
        before = surrogate().item()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(4):                                       # K = 4 epochs of 2 minibatches
        for j in torch.randperm(4).split(2):
            loss, _ = ppo_policy_loss(completion_logps(policy, seq[j], attention_mask[j], P, T),
                                      old_logps[j], advantages[j], mask[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = surrogate().item()
    assert before == pytest.approx(0.0, abs=1e-6)            # whitened advantages, ratio 1
    assert after < before - 1e-3


def test_value_model_initialised_from_the_reward_model_outputs_its_values(tmp_path):
    torch.manual_seed(0)
    rm = ScoreModel(CFG).eval()
    torch.nn.init.normal_(rm.score.weight)
    save_model(rm, tmp_path / "rm")
    value_model = load_model(tmp_path / "rm", head="score").eval()
    g = sample(tiny_policy())
    seq, attention_mask = g.sequences
    P = g.prompt_ids.shape[1]
    with torch.no_grad():
        values = completion_values(value_model, seq, attention_mask, P)
        expected = rm(seq, attention_mask)[:, P - 1:-1]
        fresh = completion_values(ScoreModel.from_lm(tiny_policy()), seq, attention_mask, P)
    m = g.completion_mask
    torch.testing.assert_close(values[m], expected[m], atol=0, rtol=0)
    assert values[m].abs().min() > 0 and (fresh == 0).all()     # --value-init policy: zero head


# ---------------------------------------------------------------------------- end to end
def tiny_args(tiny_sft_dir, tiny_rm_dir, out, **kw):
    import train_ppo
    base = dict(init=tiny_sft_dir, reward_model=tiny_rm_dir, out_dir=str(out), n_prompts=40,
                batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=8, max_steps=2,
                eval_every=1, eval_problems=4, eval_rm_problems=4, threads=1, device="cpu",
                max_minutes=0.0)   # no clock in the schedule: the LR is exact
    return train_ppo.Args(**{**base, **kw})


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_train_ppo_end_to_end(tiny_sft_dir, tiny_rm_dir, tmp_path, peft):
    import train_ppo
    out = tmp_path / "ppo"
    # LoRA also recomputes activations in the backward; full fine-tuning samples 2 per prompt
    # and fits the value model to Monte-Carlo returns (decoupled GAE)
    extra = dict(grad_checkpointing=True) if peft == "lora" else dict(samples_per_prompt=2, value_lam=1.0)
    res = train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, peft=peft, target_kl=0.1,
                                   lr_schedule="cosine", warmup_steps=1, lr=1e-3, **extra))
    assert res["iterations"] == 2 and 0 <= res["accuracy"] <= 1
    assert res["kl_coef"] != 0.05                            # the adaptive controller moved β
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in logs if "policy/clipfrac" in r]
    assert len(it) == 2
    for key in ("reward/mean", "gold/mean", "kl", "entropy", "policy/approx_kl",
                "value/clipfrac", "value/explained_variance", "completion_length", "no_eos"):
        assert key in it[0]
    assert it[0]["policy/ratio_first_max_dev"] < 1e-4
    assert [r["lr"] for r in it] == pytest.approx([1e-3, 1e-4])   # cosine to 10% by the end
    assert [r["step"] for r in logs if "eval/accuracy" in r] == [0, 1, 2]
    assert json.loads((out / "results.json").read_text())["stage"] == "ppo"
    if peft == "none":
        policy = load_model(out)
        assert policy.config.vocab_size > 0
    else:
        assert (out / "adapter_config.json").exists()
        load_model(out)                                      # a LoRA output loads, merged


def test_train_ppo_logs_the_policys_grad_norm_warns_and_reports_to_tensorboard(
        tiny_sft_dir, tiny_rm_dir, tmp_path, watched, monkeypatch):
    """A value warm-up iteration moves no policy, so it logs no grad_norm; the exploding-gradient
    watcher, made to fire at any norm above 0 × the previous one, fires at the second norm."""
    import train_ppo
    from conftest import warnings_of
    from minipost import diagnostics
    monkeypatch.setattr(diagnostics, "GRAD_WINDOW", 1)
    monkeypatch.setattr(diagnostics, "GRAD_EXPLODE_FACTOR", 0.0)
    out = tmp_path / "ppo"
    train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, max_steps=3, value_warmup=1,
                             eval_every=0, report_to="tensorboard"))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in logs if "policy/clipfrac" in r]
    assert "grad_norm" not in it[0] and all(r["grad_norm"] > 0 for r in it[1:])
    assert [(w["step"], w["warning"].split(":")[0]) for w in warnings_of(out)] == [
        (1, "the loss has stopped moving"), (3, "exploding gradient")]
    (writer,) = watched
    assert [s for s, _ in writer.scalars["grad_norm"]] == [2, 3]


def test_train_ppo_with_a_reward_model_ensemble(tiny_sft_dir, tiny_rm_dir, tmp_path):
    import train_ppo
    torch.manual_seed(1)                     # a second member: another head, its own scale
    rm = load_model(tiny_rm_dir, head="score")
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    second = tmp_path / "rm2"
    save_model(rm, second, extra_config={"minipost": {"reward_mean": 0.5, "reward_std": 3.0}})
    out = tmp_path / "ppo"
    # the value model: the first member, frozen (its own forward beside the ensemble's)
    res = train_ppo.main(tiny_args(tiny_sft_dir, f"{tiny_rm_dir},{second}", out, ensemble="min",
                                   eval_every=0, freeze_value=True))
    assert res["iterations"] == 2
    it = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in it if "policy/clipfrac" in r]
    assert all(r["reward/disagreement"] > 0 for r in it)   # two different heads disagree


def test_rank_scores_each_reward_model_and_their_ensembles(tiny_sft_dir, tiny_rm_dir, tmp_path):
    from minipost import rank
    res = rank.main(rank.Args(policy=tiny_sft_dir, reward_model=f"{tiny_rm_dir},{tiny_rm_dir}",
                              problems=6, samples=2, max_new_tokens=8, threads=1, device="cpu"))
    # an untrained policy answers nothing right: no pairs, so the accuracies are NaN (the
    # counting itself is test_reward_model.py's hand-computed case)
    names = [tiny_rm_dir, "mean of 2", "min of 2"]
    assert set(res) == {"sampled_accuracy", *names, *(f"{n} / slip {k}" for n in names
                                                     for k in ("-1", "+1", "-10", "+10", "other"))}
    assert res["sampled_accuracy"] == 0.0


def test_reward_model_with_another_tokenizer_of_the_same_size_is_refused(tiny_sft_dir, tiny_rm_dir,
                                                                        tmp_path):
    import shutil
    import train_ppo
    from minipost.cli import UserError
    other = tmp_path / "rm_other_ids"
    shutil.copytree(tiny_rm_dir, other)
    tok = json.loads((Path(tiny_sft_dir) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]        # the same tokens, two ids swapped
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="not the policy's"):
        train_ppo.main(tiny_args(tiny_sft_dir, str(other), tmp_path / "ppo"))
    shutil.copy(Path(tiny_sft_dir) / "tokenizer.json", other / "tokenizer.json")   # the same: runs
    assert train_ppo.main(tiny_args(tiny_sft_dir, str(other), tmp_path / "ppo", max_steps=1,
                                    eval_every=0))["iterations"] == 1


def test_train_ppo_gold_reward_needs_no_reward_model(tiny_sft_dir, tmp_path):
    import train_ppo
    res = train_ppo.main(tiny_args(tiny_sft_dir, str(tmp_path / "none"), tmp_path / "ppo",
                                   reward="gold", value_init="policy", max_steps=1,
                                   mask_truncated=True, eval_every=0))
    assert res["iterations"] == 1 and res["reward"] is None


def test_held_out_accuracy_uses_the_runs_completion_budget(tiny_sft_dir, tmp_path, monkeypatch):
    import train_ppo
    from minipost import online
    budgets = []

    def fake_task(model, tokenizer, held_out, max_new_tokens, **kw):
        budgets.append(max_new_tokens)
        return {"accuracy": 0.0, "accuracy_ci95": 0.0, "well_formed": 1.0, "n": len(held_out)}

    monkeypatch.setattr(online, "evaluate_task", fake_task)
    train_ppo.main(tiny_args(tiny_sft_dir, str(tmp_path / "none"), tmp_path / "ppo", reward="gold",
                             value_init="policy", max_steps=1, eval_every=0, max_new_tokens=5))
    assert budgets and set(budgets) == {5}


def test_train_ppo_entropy_bonus_end_to_end_logs_the_logp_advantage_covariance(tiny_sft_dir,
                                                                                tmp_path):
    import math
    import train_ppo
    out = tmp_path / "ppo"
    res = train_ppo.main(tiny_args(tiny_sft_dir, str(tmp_path / "none"), out, reward="gold",
                                   value_init="policy", entropy_coef=0.01, eval_every=0))
    assert res["iterations"] == 2
    it = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in it if "policy/clipfrac" in r]
    assert all(math.isfinite(r["policy/logp_adv_cov"]) and r["entropy"] > 0 for r in it)
    assert it[0]["policy/ratio_first_max_dev"] < 1e-4       # the bonus leaves the ratio alone


def test_value_warmup_moves_only_the_value_model(tiny_sft_dir, tiny_rm_dir, tmp_path):
    import train_ppo
    out = tmp_path / "ppo"
    train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, value_warmup=2, eval_every=0, lr=1e-3))
    before, after = load_model(tiny_sft_dir).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)    # the policy did not move


def test_frozen_value_model_is_the_reward_model(tiny_sft_dir, tiny_rm_dir, tmp_path):
    """--freeze-value: no value loss or optimiser; the resume checkpoint holds the policy alone, and
    a run resumed from it goes on."""
    import train_ppo
    from safetensors.torch import load_file

    from minipost.resume import latest_checkpoint
    out = tmp_path / "ppo"
    res = train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, freeze_value=True, lr=1e-3,
                                   eval_every=0, save_every=1))
    assert res["iterations"] == 2
    it = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    it = [r for r in it if "policy/clipfrac" in r]
    assert all("loss/value" not in r and "value/clipfrac" not in r for r in it)
    assert "value/explained_variance" in it[0] and it[0]["policy/ratio_first_max_dev"] < 1e-4
    ckpt = latest_checkpoint(out)
    assert {k.split(".")[0] for k in load_file(str(ckpt / "model.safetensors"))} == {"policy"}
    before, after = load_model(tiny_sft_dir).state_dict(), load_model(out).state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)   # the policy moved
    res = train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, freeze_value=True, lr=1e-3,
                                   eval_every=0, max_steps=3, resume=str(out)))
    assert res["iterations"] == 3


def test_missing_reward_model_names_the_command(tiny_sft_dir, tmp_path):
    import train_ppo
    from minipost.cli import UserError
    with pytest.raises(UserError, match="train_rm.py"):
        train_ppo.main(tiny_args(tiny_sft_dir, str(tmp_path / "no_rm"), tmp_path / "ppo"))


@pytest.mark.slow
@pytest.mark.parametrize("sharding,peft,port,value", [
    ("ddp", "lora", 29531, "warmup"), ("fsdp", "lora", 29532, "warmup"),
    ("fsdp", "none", 29533, "warmup"), ("fsdp", "none", 29534, "frozen")])
def test_train_ppo_under_torchrun_two_processes(sharding, peft, port, value, tiny_sft_dir,
                                                tiny_rm_dir, tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = tiny_args(tiny_sft_dir, tiny_rm_dir, tmp_path / "ddp", peft=peft)
    flags = ["--fsdp"] if sharding == "fsdp" else []
    # the value model trained after one iteration alone, or never (the reward model, unsharded)
    flags += ["--value-warmup", "1"] if value == "warmup" else ["--freeze-value"]
    for k in ("init", "reward_model", "out_dir", "n_prompts", "batch_size", "mini_batch_size",
              "max_new_tokens", "max_steps", "eval_problems", "eval_rm_problems", "peft"):
        flags += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "train_ppo.py", "--device", "cpu",
                        "--threads", "1", *flags], cwd=root, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    saved = "adapter_model.safetensors" if peft == "lora" else "model.safetensors"
    assert (tmp_path / "ddp" / saved).exists()
    load_model(tmp_path / "ddp")                  # gathered whole on rank 0 (FSDP), loadable
    logs = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in logs if '"policy/clipfrac"' in x]) == 2   # only rank 0 writes


def test_lora_dropout_is_off_in_every_rollout_and_update_forward(tiny_sft_dir, tiny_rm_dir,
                                                                 tmp_path, monkeypatch):
    """The LoRA dropout modules are created after the models' .eval(): sampling, scoring, old
    log-probs and updates must still see every module in eval mode, fresh and after --resume."""
    import train_ppo

    def eval_only(fn):
        def checked(model, *a, **k):
            on = sorted({type(m).__name__ for m in model.modules() if m.training})
            assert not on, f"{fn.__name__}: modules in training mode: {on}"
            return fn(model, *a, **k)
        return checked

    from minipost import batches, online
    for module in (train_ppo, batches, online):   # the updates, the rollout, the RM's eval score
        for name in ("generate", "completion_logps", "completion_values", "sequence_scores"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, eval_only(getattr(module, name)))
    out = tmp_path / "ppo"
    kw = dict(peft="lora", lora_dropout=0.5, eval_every=0, save_every=1)
    res = train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, max_steps=1, **kw))
    assert res["iterations"] == 1
    res = train_ppo.main(tiny_args(tiny_sft_dir, tiny_rm_dir, out, max_steps=2, resume=str(out),
                                   **kw))
    assert res["iterations"] == 2
