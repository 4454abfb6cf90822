"""minipost.diagnostics: each watcher fires once on a synthetic stream showing its failure and
stays silent on a healthy one (seeded noise at the scale of real runs)."""
import math
import random

import pytest
import torch

from minipost import diagnostics as d


def feed(watchers, records):
    """[(step, warning)] of a stream of records (step numbers from 1)."""
    watchers = watchers if isinstance(watchers, list) else [watchers]
    return [(step, w) for step, rec in enumerate(records, 1) for w in d.check(watchers, step, rec)]


def noisy(values, sd, seed=0):
    rng = random.Random(seed)
    return [v + rng.gauss(0, sd) for v in values]


def ramp(a, b, n):
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def test_a_watcher_fires_once_and_skips_records_without_its_metric_or_with_nan():
    w = d.LossPlateau()
    skipped = [{"eval/accuracy": 0.5}, {"loss": math.nan}]
    records = [{"loss": 0.0}] * 5 + skipped + [{"loss": 0.0}] * 50
    fired = feed(w, records)
    # 20 losses counted (5 + 15 after the skipped lines): fires at the 22nd record, then never again
    assert [s for s, _ in fired] == [d.LOSS_FLAT_STEPS + 2]
    assert "loss has stopped moving" in fired[0][1]


def test_a_watcher_reads_one_element_tensors_as_numbers():
    fired = feed(d.LossPlateau(), [{"loss": torch.tensor(0.0)}] * 30)
    assert [s for s, _ in fired] == [d.LOSS_FLAT_STEPS]


def test_zero_reward_spread():
    # most groups without spread for 20 steps in a row: no learning signal
    fired = feed(d.ZeroRewardSpread(), [{"frac_reward_zero_std": 0.95}] * 40)
    assert [s for s, _ in fired] == [d.ZERO_SPREAD_STEPS] and "no learning signal" in fired[0][1]
    # healthy: a third to two thirds of groups without spread
    rng = random.Random(0)
    assert feed(d.ZeroRewardSpread(), [{"frac_reward_zero_std": rng.uniform(0.3, 0.7)}
                                       for _ in range(300)]) == []
    # mostly zero spread, but broken every 10 steps: never 20 in a row
    broken = [{"frac_reward_zero_std": 0.5 if i % 10 == 0 else 1.0} for i in range(200)]
    assert feed(d.ZeroRewardSpread(), broken) == []


def test_entropy_collapse():
    # 1.0 -> 0.02 nats over 100 steps: the 10-step mean passes a tenth of the start's on the way
    fired = feed(d.EntropyCollapse(), [{"entropy": e} for e in noisy(ramp(1.0, 0.02, 100), 0.01)])
    assert len(fired) == 1 and "entropy collapse" in fired[0][1]
    # healthy: entropy halves over the run
    healthy = noisy(ramp(1.0, 0.5, 300), 0.05)
    assert feed(d.EntropyCollapse(), [{"entropy": e} for e in healthy]) == []


def test_sampler_mismatch_on_either_scripts_name():
    # bf16 rounding on a healthy model reaches 0.4 nats (online.sampler_tolerance): silent
    fired = feed(d.SamplerMismatch(), [{"sampler_logp_max_diff": 1e-3}] * 5
                 + [{"sampler_logp_max_diff": 0.4}] * 5 + [{"sampler_logp_max_diff": 0.8}] * 5)
    assert [s for s, _ in fired] == [10 + d.SAMPLER_MISMATCH_STEPS]
    assert "sampler_logp_max_diff" in fired[0][1]
    # PPO's name; one rounding outlier among small gaps is no mismatch
    stream = [{"rollout/logp_mismatch": 0.9 if i == 50 else 1e-3} for i in range(100)]
    assert feed(d.SamplerMismatch("rollout/logp_mismatch"), stream) == []


def test_reward_over_optimisation():
    # docs/results.md's plain Bradley-Terry RM: its score 2.5 -> 4.2 while the verifier's 0.5 -> 0
    rm, gold = noisy(ramp(2.5, 4.2, 100), 0.1, 1), noisy(ramp(0.5, 0.0, 100), 0.05, 2)
    fired = feed(d.RewardOverOptimisation(), [{"reward/mean": r, "gold/mean": g}
                                              for r, g in zip(rm, gold)])
    assert len(fired) == 1 and "over-optimisation" in fired[0][1] and fired[0][0] < 60
    # healthy: both rise, the verifier's reward with the noise of a 0/1 mean over 32 samples
    rm, gold = noisy(ramp(2.2, 2.7, 400), 0.1, 3), noisy(ramp(0.57, 0.62, 400), 0.088, 4)
    assert feed(d.RewardOverOptimisation(), [{"reward/mean": r, "gold/mean": g}
                                             for r, g in zip(rm, gold)]) == []
    # the verifier's reward falls but so does the RM's score: a worse policy, not over-optimisation
    rm, gold = ramp(3.0, 2.0, 100), ramp(0.6, 0.2, 100)
    assert feed(d.RewardOverOptimisation(), [{"reward/mean": r, "gold/mean": g}
                                             for r, g in zip(rm, gold)]) == []


def test_kl_runaway():
    # docs/results.md: KL 4 nats at iteration 25, 21.6 at 50
    kl = ramp(0.1, 4.0, 25) + ramp(4.0, 21.6, 25)
    fired = feed(d.KLRunaway(), [{"kl": k} for k in kl])
    assert len(fired) == 1 and "KL runaway" in fired[0][1]
    # healthy default run: 0.10 -> 0.45 nats; one spike over the limit is not a runaway
    kl = noisy(ramp(0.1, 0.45, 300), 0.05)
    kl[100] = 8.0
    assert feed(d.KLRunaway(), [{"kl": k} for k in kl]) == []


def test_negative_explained_variance():
    fired = feed(d.NegativeExplainedVariance(),
                 [{"value/explained_variance": v} for v in noisy([-0.2] * 100, 0.1)])
    assert [s for s, _ in fired] == [d.EV_GRACE_STEPS + d.EV_WINDOW]
    # healthy: negative while the value model fits, then 0.3-0.6
    ev = noisy([-0.5] * 15 + ramp(0.0, 0.6, 285), 0.05)
    assert feed(d.NegativeExplainedVariance(), [{"value/explained_variance": v} for v in ev]) == []


def test_squeezing():
    # pure DPO: the chosen log-prob drifts 0 -> −20 nats while the margin grows 0 -> 10
    drift, margins = noisy(ramp(0, -20, 100), 0.5, 1), noisy(ramp(0, 10, 100), 0.3, 2)
    fired = feed(d.Squeezing(), [{"logps/chosen_drift": a, "rewards/margins": m}
                                 for a, m in zip(drift, margins)])
    assert len(fired) == 1 and "squeezing" in fired[0][1]
    # with RPO's NLL term the chosen answers get likelier while the margin grows
    drift = noisy(ramp(0, 3, 200), 0.5, 3)
    assert feed(d.Squeezing(), [{"logps/chosen_drift": a, "rewards/margins": m}
                                for a, m in zip(drift, margins + margins)]) == []
    # the chosen log-prob falls but the margin does not grow: no squeezing, DPO is not winning
    drift = ramp(0, -20, 100)
    assert feed(d.Squeezing(), [{"logps/chosen_drift": a, "rewards/margins": m}
                                for a, m in zip(drift, ramp(0, -1, 100))]) == []
    # 8 nats down from the first step on, but no longer falling
    assert feed(d.Squeezing(), [{"logps/chosen_drift": -8.0, "rewards/margins": m}
                                for m in margins]) == []


@pytest.mark.parametrize("value", [0.0, 2.302585])
def test_loss_plateau_fires_on_a_stuck_loss(value):
    # GRPO with every advantage zero has loss exactly 0; a frozen model repeats its loss
    assert len(feed(d.LossPlateau(), [{"loss": value}] * 30)) == 1


def test_loss_plateau_is_silent_on_a_converged_loss_and_on_grpo_noise_around_zero():
    assert feed(d.LossPlateau(), [{"loss": x} for x in noisy([1.0] * 300, 0.01)]) == []
    assert feed(d.LossPlateau(), [{"loss": x} for x in noisy([0.0] * 300, 1e-3)]) == []
    assert feed(d.LossPlateau("loss/policy"), [{"loss/policy": x}
                                               for x in noisy([0.0] * 300, 1e-3)]) == []


def test_grad_explosion():
    rng = random.Random(0)
    norms = [math.exp(rng.gauss(0, 0.3)) for _ in range(100)]          # healthy: about 1, ±30%
    assert feed(d.GradExplosion(), [{"grad_norm": g} for g in norms]) == []
    norms[60] = 50.0
    fired = feed(d.GradExplosion(), [{"grad_norm": g} for g in norms])
    assert [s for s, _ in fired] == [61] and "exploding gradient" in fired[0][1]
    # a large norm before 20 steps of history is the start of training, not a spike
    assert feed(d.GradExplosion(), [{"grad_norm": g} for g in [50.0, 1.0, 1.0]]) == []
    # a GRPO run without signal: zero gradients, then one group that disagrees (it crashed here
    # once, dividing by the median 0); the missing signal is ZeroRewardSpread's to report
    assert feed(d.GradExplosion(), [{"grad_norm": g} for g in [0.0] * 25 + [0.15, 0.0]]) == []


def test_for_script_gives_each_method_its_watchers_and_fresh_ones_each_call():
    names = {s: [type(w).__name__ for w in d.for_script(s)]
             for s in ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")}
    assert names["sft"] == names["pretrain"] == names["rm"] == ["LossPlateau", "GradExplosion"]
    assert "Squeezing" in names["dpo"]
    assert {"ZeroRewardSpread", "EntropyCollapse", "SamplerMismatch"} <= set(names["grpo"])
    assert {"RewardOverOptimisation", "KLRunaway", "NegativeExplainedVariance"} <= set(names["ppo"])
    same = [type(w) for w in d.for_script("grpo")]
    assert [type(w) for w in d.for_script("train_grpo.py")] == same
    a, b = d.for_script("ppo"), d.for_script("ppo")
    assert all(x is not y for x, y in zip(a, b))
    # PPO reads its own names for the policy loss and the log-prob mismatch
    read = {m for w in a for m in w.metrics}
    assert {"loss/policy", "rollout/logp_mismatch"} <= read and "loss" not in read
    with pytest.raises(ValueError):
        d.for_script("kto")


def test_a_healthy_run_of_every_script_stays_silent():
    rng = random.Random(0)

    def record(i):
        return {"loss": 1.0 / (1 + i / 50) + rng.gauss(0, 0.01), "grad_norm": 1 + rng.gauss(0, 0.1),
                "frac_reward_zero_std": 0.4, "entropy": 0.8 - i / 1000,
                "sampler_logp_max_diff": 1e-3, "rollout/logp_mismatch": 1e-3,
                "reward/mean": 2 + i / 200, "gold/mean": 0.6 + rng.gauss(0, 0.05), "kl": i / 500,
                "value/explained_variance": 0.5, "loss/policy": rng.gauss(0, 0.01),
                "logps/chosen_drift": i / 100, "rewards/margins": i / 50}

    stream = [record(i) for i in range(300)]
    for script in ("pretrain", "sft", "rm", "dpo", "grpo", "ppo"):
        assert feed(d.for_script(script), stream) == [], script
