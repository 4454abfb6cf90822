"""online.py: what train_grpo.py and train_ppo.py share: the prompts and held-out rows, PPO's
prompt order, the models beside the policy, the first-update check and the held-out evaluation."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from minipost import online, rewards
from minipost.cli import difficulty_arg
from minipost.errors import UserError
from minipost.evaluate import heldout_problems, prompt_ids
from minipost.generate import generate
from minipost.model import ScoreModel
from minipost.peft import load_model
from minipost.reward import RewardEnsemble
from minipost.rollout import sequence_scores
from minipost.tokenizer import load_tokenizer

CPU = SimpleNamespace(device=torch.device("cpu"), is_main=False, world_size=1)


def ppo_args(**kw):
    import train_ppo
    return train_ppo.Args(**kw)


def test_sampler_tolerance_is_rounding_in_fp32_on_a_cpu_and_looser_otherwise():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert online.sampler_tolerance(torch.float32, cpu) == 1e-3
    assert online.sampler_tolerance(torch.bfloat16, cpu) == online.sampler_tolerance(
        torch.float32, gpu) == 1.0
    assert online.sampler_tolerance(torch.float32, cpu, ratio=True) == 1e-4
    assert online.sampler_tolerance(torch.bfloat16, gpu, ratio=True) == 5e-2


def test_check_sampler_match_passes_rounding_and_stops_a_mismatch():
    online.check_sampler_match(4e-6, 1e-3)
    online.check_sampler_match(torch.tensor(2e-6), 1e-4, ratio=True)      # a tensor, as PPO's
    with pytest.raises(RuntimeError, match="differ from the sampler's log-probs by up to 1.5 >= "
                                           "0.001.*GRPO would be optimising noise"):
        online.check_sampler_match(1.5, 1e-3)
    with pytest.raises(RuntimeError, match=r"first PPO minibatch: max \|ratio - 1\| = 0.2 >= "
                                           r"0.0001.*PPO would be optimising noise"):
        online.check_sampler_match(torch.tensor(0.2), 1e-4, ratio=True)
    with pytest.raises(RuntimeError):                        # NaN is no match either
        online.check_sampler_match(float("nan"), 1e-3)


def test_draw_prompts_takes_distinct_prompts_k_times_and_shares_them_over_ranks():
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=gen)
    idx, same, pos = online.draw_prompts(order, 0, gen, batch_size=6, k=2)
    assert same is order and pos == 3
    assert idx == [int(order[i]) for i in (0, 0, 1, 1, 2, 2)]
    shares = [online.draw_prompts(order, 3, gen, 6, 2, rank, 2)[0] for rank in (0, 1)]
    assert shares[0] + shares[1] == online.draw_prompts(order, 3, gen, 6, 2)[0]
    assert len(shares[0]) == 3
    idx, new, pos = online.draw_prompts(order, 8, gen, 6, 2)     # 2 left, 3 needed: a new order
    assert new is not order and sorted(new.tolist()) == list(range(10)) and pos == 3
    assert idx == [int(new[i]) for i in (0, 0, 1, 1, 2, 2)]


def test_mean_stats_averages_the_minibatches_and_keeps_the_first_ratio_deviation():
    upd = [{"loss": torch.tensor(1.0), "policy/ratio_max_dev": torch.tensor(0.0)},
           {"loss": torch.tensor(3.0), "policy/ratio_max_dev": torch.tensor(0.5)}]
    out = online.mean_stats(upd)
    assert set(out) == {"loss", "policy/ratio_first_max_dev"}
    assert float(out["loss"]) == 2.0 and float(out["policy/ratio_first_max_dev"]) == 0.0


def test_before_and_after_names_the_results_keys():
    before = {"step": 0, "eval/accuracy": 0.1, "eval/reward": -1.0, "eval/correct/mean": 0.2}
    after = {"step": 5, "eval/accuracy": 0.3, "eval/accuracy_ci95": 0.05, "eval/well_formed": 0.9,
             "eval/reward": 0.5, "eval/correct/mean": 0.4, "eval/correct/ci95": 0.1}
    assert online.before_and_after(before, after) == {
        "accuracy_before": 0.1, "accuracy": 0.3, "accuracy_ci95": 0.05, "well_formed": 0.9,
        "reward_before": -1.0, "reward": 0.5, "correct/mean_before": 0.2, "correct/mean": 0.4,
        "correct/ci95": 0.1}


def test_load_task_and_load_prompts_take_the_built_in_task_and_its_held_out_rows(tiny_sft_dir):
    args = ppo_args(n_prompts=8, eval_problems=3, batch_size=8, samples_per_prompt=2)
    d = difficulty_arg("", "arithmetic")
    rows, held_out, fns = online.load_task(args, d, d, log=None)
    assert len(rows) == 8 and held_out == heldout_problems(str(d), 3)
    assert [f.name for f in fns] == ["correct"]
    tok = load_tokenizer(tiny_sft_dir)
    prompts, rows2, held_out2, _ = online.load_prompts(tok, d, args, log=None)
    assert rows2 == rows and held_out2 == held_out and len(prompts) == 8
    assert all(isinstance(p, list) and p for p in prompts)
    with pytest.raises(UserError, match="fewer than the 8 distinct ones a batch takes"):
        online.load_prompts(tok, d, ppo_args(n_prompts=6, batch_size=8), log=None)


def test_ppo_models_beside_the_policy(tiny_sft_dir, tiny_rm_dir, tmp_path):
    policy = load_model(tiny_sft_dir)
    assert online.make_reference(policy, "none").kind == "copy"      # no β given: always one
    rm = online.load_reward_model(policy, ppo_args(reward_model=tiny_rm_dir), CPU)
    assert isinstance(rm, ScoreModel) and not rm.training
    assert not any(p.requires_grad for p in rm.parameters())
    two = online.load_reward_model(policy, ppo_args(reward_model=f"{tiny_rm_dir},{tiny_rm_dir}"),
                                   CPU)
    assert isinstance(two, RewardEnsemble)
    missing = str(tmp_path / "none")
    assert online.load_reward_model(policy, ppo_args(reward_model=missing, reward="gold",
                                                     value_init="policy"), CPU) is None
    with pytest.raises(UserError, match="train_rm.py"):
        online.load_reward_model(policy, ppo_args(reward_model=missing), CPU)

    frozen = online.make_value_model(policy, rm, ppo_args(freeze_value=True), CPU)
    assert frozen is rm
    copy = online.make_value_model(policy, rm, ppo_args(reward_model=tiny_rm_dir), CPU)
    assert copy is not rm and not copy.training
    assert torch.equal(copy.score.weight, rm.score.weight)          # Stiennon et al.: the RM
    zero = online.make_value_model(policy, rm, ppo_args(value_init="policy"), CPU)
    assert not zero.training and (zero.score.weight == 0).all()


def test_evaluate_greedy_accuracy_pass_at_k_and_reward_means(tiny_sft_dir, tiny_rm_dir):
    torch.manual_seed(0)
    model, tok = load_model(tiny_sft_dir), load_tokenizer(tiny_sft_dir)
    held_out = heldout_problems("", 3)
    args = SimpleNamespace(eval_data="", task="arithmetic", string_prompts="chat",
                           temperature=0.7, seed=0)
    fns = rewards.load(["correct"], [])
    nothing = contextlib.nullcontext
    out = online.evaluate(model, tok, held_out, fns, args, nothing, 6)
    assert set(out) == {"accuracy", "accuracy_ci95", "well_formed", "n"} and out["n"] == 3
    out = online.evaluate(model, tok, held_out, fns, args, nothing, 6, pass_k=2)
    assert {"pass@2", "pass@k", "pass@k_ci95", "sampled_accuracy"} <= set(out)
    assert len(out["pass@k"]) == 2
    args.eval_data = "rows.jsonl"                               # the reward functions' means
    out = online.evaluate(model, tok, held_out, fns, args, nothing, 6, pass_k=2)
    assert {"correct/mean", "correct/ci95", "correct/pass@k", "n"} <= set(out)

    rm = load_model(tiny_rm_dir, head="score").eval()
    score = online.reward_model_score(model, rm, tok, held_out, 6, "chat", nothing)
    g = generate(model, [prompt_ids(tok, p["prompt"]) for p in held_out], 6, temperature=0.0,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        assert score == pytest.approx(float(sequence_scores(rm, *g.sequences).mean()))
