"""Watchers that speak up when a run shows a known failure signature, once each.

A watcher is fed the metrics record of every training step (`update(step, metrics)`), reads the
names the scripts log to `metrics.jsonl` (a record without them, such as an evaluation line, or
with a NaN there, is skipped) and returns one plain sentence the first time it sees its failure,
never again. `for_script(name)` gives the watchers of a script; `check(watchers, step, metrics)`
feeds them all and returns the new warnings.

GRPO: ZeroRewardSpread, EntropyCollapse, SamplerMismatch. PPO: RewardOverOptimisation (Gao et al.
2022, arXiv 2210.10760), KLRunaway, NegativeExplainedVariance (and entropy and mismatch). DPO:
Squeezing (Ren and Sutherland 2024, arXiv 2407.10490). Every script: LossPlateau, GradExplosion.
Every threshold is a named constant below, with the reason for its value.
"""
import math
import statistics
from collections import deque

# GRPO: a group whose G rewards are all equal has zero advantage for every completion and adds no
# gradient. A few such batches happen by chance; nine groups in ten for 20 steps in a row is a run
# that has stopped learning (the task is too hard or too easy for the policy).
ZERO_SPREAD_FRAC = 0.9
ZERO_SPREAD_STEPS = 20
# A policy whose token entropy falls to a tenth of its starting value samples nearly the same
# completion every time: groups lose their reward spread and exploration stops (DAPO, Yu et al.
# 2025, arXiv 2503.14476). Means over 10 steps, at the start and now, so one batch cannot fire it.
ENTROPY_COLLAPSE_SHARE = 0.1
ENTROPY_WINDOW = 10
# The largest per-token gap between the sampler's and the trainer's log-probs of the same tokens.
# Rounding alone reaches 0.4 nats in bf16 on a healthy 6-layer model (online.sampler_tolerance; fp32
# on a CPU stays below 1e-4, and GRPO stops outright above 1e-3 there), so 0.5 nats: a ratio of
# e^0.5 ≈ 1.65, far outside the clip range [0.8, 1.2], where the clip acts on the mismatch, not on
# learning; GRPO's hard stop in bf16 is 1 nat. 3 steps in a row, so one rounding outlier cannot fire it.
SAMPLER_MISMATCH_NATS = 0.5
SAMPLER_MISMATCH_STEPS = 3
# PPO over-optimisation: 20-iteration means of the verifier's reward (a 0/1 mean over the batch,
# standard error ≈ 0.02 over 20 iterations of 32 samples) falling 0.1 below their best, five
# standard errors, while the reward model's score is higher than it was at that best.
OVEROPT_WINDOW = 20
OVEROPT_GOLD_DROP = 0.1
# The KL per completion (nats, summed over its tokens): healthy PPO runs here end below 1 nat;
# the over-optimised run of docs/results.md passed 4 nats by iteration 25 and 20 by iteration 50.
KL_RUNAWAY_NATS = 5.0
KL_RUNAWAY_STEPS = 5
# Explained variance below 0 means the value model predicts returns worse than a constant would,
# so its advantages add noise. Mean over 20 iterations, after 20 in which the value model fits.
EV_WINDOW = 20
EV_GRACE_STEPS = 20
# DPO squeezing: the chosen completions' log-prob drift from the reference (`logps/chosen_drift`,
# nats per sequence) 5 nats down, the chosen answers e^5 ≈ 150 times less likely than at the start,
# still falling (10-step means) while the margin has grown.
SQUEEZE_DROP_NATS = 5.0
SQUEEZE_WINDOW = 10
# A loss whose 20 last values agree to 6 significant digits is not noisy, it is stuck: a zero
# learning rate, frozen parameters, or every advantage zero. A converged loss still moves with its
# batches, so this never fires on convergence.
LOSS_FLAT_STEPS = 20
LOSS_FLAT_REL = 1e-6
# A gradient norm (before clipping) 10 times the median of the previous 20 steps is a spike that
# clipping hides from the update's size but not from Adam's moments; spikes precede divergence.
GRAD_EXPLODE_FACTOR = 10.0
GRAD_WINDOW = 20


class Watcher:
    """One failure signature. Subclasses set `metrics` (the names read) and `check`."""

    metrics: tuple = ()

    def __init__(self):
        self.fired = False

    def update(self, step: int, metrics: dict) -> list[str]:
        """[the warning] if this record shows the failure for the first time, else []."""
        if self.fired:
            return []
        values = [_number(metrics.get(k)) for k in self.metrics]
        if None in values:
            return []
        message = self.check(step, *values)
        self.fired = message is not None
        return [message] if message else []

    def check(self, step: int, *values: float) -> str | None:
        raise NotImplementedError


def _number(value) -> float | None:
    """A finite float from a number or a one-element tensor; None for anything else or NaN."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return x if math.isfinite(x) else None


def _mean(xs) -> float:
    return sum(xs) / len(xs)


class ZeroRewardSpread(Watcher):
    """Most GRPO groups with equal rewards (`frac_reward_zero_std`) for many steps in a row."""

    metrics = ("frac_reward_zero_std",)

    def __init__(self):
        super().__init__()
        self.streak = 0

    def check(self, step, frac):
        self.streak = self.streak + 1 if frac >= ZERO_SPREAD_FRAC else 0
        if self.streak >= ZERO_SPREAD_STEPS:
            return (f"no learning signal: for {self.streak} steps at least "
                    f"{ZERO_SPREAD_FRAC:.0%} of the groups had the same reward for every "
                    "completion (frac_reward_zero_std), so their advantages are zero; the task is "
                    "too hard or too easy for the policy (try another --train-difficulty, a larger "
                    "--group-size or a higher --temperature)")
        return None


class EntropyCollapse(Watcher):
    """The policy's token entropy (`entropy`) falling to a small share of its start."""

    metrics = ("entropy",)

    def __init__(self):
        super().__init__()
        self.first, self.last = [], deque(maxlen=ENTROPY_WINDOW)

    def check(self, step, entropy):
        if len(self.first) < ENTROPY_WINDOW:
            self.first.append(entropy)
        self.last.append(entropy)
        if len(self.first) < ENTROPY_WINDOW or len(self.last) < ENTROPY_WINDOW:
            return None
        start, now = _mean(self.first), _mean(self.last)
        if now < ENTROPY_COLLAPSE_SHARE * start:
            return (f"entropy collapse: the policy's token entropy fell from {start:.3g} to "
                    f"{now:.3g} nats, below {ENTROPY_COLLAPSE_SHARE:.0%} of its start; it samples "
                    "nearly the same completion every time and stops exploring (lower the "
                    "learning rate; in GRPO, raise --clip-eps-high, DAPO's clip-higher)")
        return None


class SamplerMismatch(Watcher):
    """The sampler's and the trainer's log-probs of the same tokens disagreeing."""

    def __init__(self, metric: str = "sampler_logp_max_diff"):
        super().__init__()
        self.metrics, self.streak = (metric,), 0

    def check(self, step, diff):
        self.streak = self.streak + 1 if diff > SAMPLER_MISMATCH_NATS else 0
        if self.streak >= SAMPLER_MISMATCH_STEPS:
            return (f"sampler/trainer mismatch: the trainer's log-probs of the sampled tokens "
                    f"differ from the sampler's by up to {diff:.3g} nats ({self.metrics[0]}) for "
                    f"{self.streak} steps; the importance ratios measure that gap, not learning "
                    "(check dtype, temperature and dropout of the two forwards)")
        return None


class RewardOverOptimisation(Watcher):
    """The reward model's score (`reward/mean`) rising while the verifier's (`gold/mean`) falls."""

    metrics = ("reward/mean", "gold/mean")

    def __init__(self):
        super().__init__()
        self.rm, self.gold = deque(maxlen=OVEROPT_WINDOW), deque(maxlen=OVEROPT_WINDOW)
        self.best_gold, self.rm_at_best = -math.inf, math.nan

    def check(self, step, rm, gold):
        self.rm.append(rm)
        self.gold.append(gold)
        if len(self.gold) < OVEROPT_WINDOW:
            return None
        rm_now, gold_now = _mean(self.rm), _mean(self.gold)
        if gold_now > self.best_gold:
            self.best_gold, self.rm_at_best = gold_now, rm_now
        if gold_now <= self.best_gold - OVEROPT_GOLD_DROP and rm_now > self.rm_at_best:
            return (f"reward over-optimisation: the reward model's score rose "
                    f"{self.rm_at_best:.3g} -> {rm_now:.3g} while the verifier's reward fell "
                    f"{self.best_gold:.3g} -> {gold_now:.3g} ({OVEROPT_WINDOW}-step means); the "
                    "policy is exploiting the reward model (raise --kl-coef, lower the learning "
                    "rate, or stop earlier)")
        return None


class KLRunaway(Watcher):
    """The KL per completion (`kl`) staying above a limit."""

    metrics = ("kl",)

    def __init__(self, limit: float = KL_RUNAWAY_NATS):
        super().__init__()
        self.limit, self.streak = limit, 0

    def check(self, step, kl):
        self.streak = self.streak + 1 if kl > self.limit else 0
        if self.streak >= KL_RUNAWAY_STEPS:
            return (f"KL runaway: the KL to the reference has been above {self.limit:g} nats per "
                    f"completion for {self.streak} steps (now {kl:.3g}); the policy has left the "
                    "reference far behind (raise --kl-coef, set --target-kl, or lower the "
                    "learning rate)")
        return None


class NegativeExplainedVariance(Watcher):
    """The value model's explained variance below 0 over a window."""

    metrics = ("value/explained_variance",)

    def __init__(self):
        super().__init__()
        self.seen, self.last = 0, deque(maxlen=EV_WINDOW)

    def check(self, step, ev):
        self.seen += 1
        if self.seen <= EV_GRACE_STEPS:
            return None
        self.last.append(ev)
        if len(self.last) == EV_WINDOW and _mean(self.last) < 0:
            return (f"the value model explains less than a constant would: explained variance "
                    f"{_mean(self.last):.3g} over the last {EV_WINDOW} steps, so its advantages "
                    "are mostly noise (try --value-warmup, or a lower --value-lr)")
        return None


class Squeezing(Watcher):
    """DPO's chosen log-prob drift falling steadily while the margin grows."""

    metrics = ("logps/chosen_drift", "rewards/margins")

    def __init__(self):
        super().__init__()
        self.first_margins = []
        self.drift = deque(maxlen=2 * SQUEEZE_WINDOW)
        self.margins = deque(maxlen=SQUEEZE_WINDOW)

    def check(self, step, drift, margin):
        if len(self.first_margins) < SQUEEZE_WINDOW:
            self.first_margins.append(margin)
        self.drift.append(drift)
        self.margins.append(margin)
        if len(self.drift) < 2 * SQUEEZE_WINDOW:
            return None
        drift = list(self.drift)
        before, now = _mean(drift[:SQUEEZE_WINDOW]), _mean(drift[SQUEEZE_WINDOW:])  # two windows
        margin_start, margin_now = _mean(self.first_margins), _mean(self.margins)
        if now < -SQUEEZE_DROP_NATS and now < before and margin_now > margin_start:
            return (f"squeezing: the chosen answers' log-prob has fallen {-now:.3g} nats below the "
                    f"reference and is still falling, while the margin grew {margin_start:.3g} -> "
                    f"{margin_now:.3g}; DPO is pushing both answers down, the rejected one faster "
                    "(raise --rpo-alpha, or lower the learning rate or --beta)")
        return None


class LossPlateau(Watcher):
    """A loss that has not changed at all for many steps."""

    def __init__(self, metric: str = "loss"):
        super().__init__()
        self.metrics, self.last = (metric,), deque(maxlen=LOSS_FLAT_STEPS)

    def check(self, step, loss):
        self.last.append(loss)
        if len(self.last) < LOSS_FLAT_STEPS:
            return None
        if max(self.last) - min(self.last) <= LOSS_FLAT_REL * abs(_mean(self.last)):
            return (f"the loss has stopped moving: {self.metrics[0]} = {loss:.6g} for "
                    f"{LOSS_FLAT_STEPS} steps; nothing is learning (a zero learning rate, frozen "
                    "parameters, or no signal in the batch)")
        return None


class GradExplosion(Watcher):
    """A gradient norm far above its recent median."""

    metrics = ("grad_norm",)

    def __init__(self):
        super().__init__()
        self.last = deque(maxlen=GRAD_WINDOW)

    def check(self, step, gnorm):
        typical = statistics.median(self.last) if len(self.last) == GRAD_WINDOW else None
        self.last.append(gnorm)
        # a median of 0: most recent steps had no gradient at all (a GRPO batch whose groups all
        # agree); the next one with a gradient is a signal, not an explosion (ZeroRewardSpread)
        if typical and gnorm > GRAD_EXPLODE_FACTOR * typical:
            return (f"exploding gradient: grad_norm {gnorm:.3g} is {gnorm / typical:.0f} times the "
                    f"median of the previous {GRAD_WINDOW} steps ({typical:.3g}); lower the "
                    "learning rate or check the batch for a bad example")
        return None


def for_script(name: str) -> list[Watcher]:
    """Fresh watchers for a script: "pretrain", "sft", "rm", "dpo", "grpo" or "ppo" (also as
    "train_grpo" or "train_grpo.py")."""
    key = name.removesuffix(".py").removeprefix("train_")
    common = [GradExplosion()]
    if key in ("pretrain", "sft", "rm"):
        return [LossPlateau(), *common]
    if key == "dpo":
        return [Squeezing(), LossPlateau(), *common]
    if key == "grpo":
        return [ZeroRewardSpread(), EntropyCollapse(), SamplerMismatch("sampler_logp_max_diff"),
                LossPlateau(), *common]
    if key == "ppo":   # PPO logs its policy loss as loss/policy and the mismatch under rollout/
        return [RewardOverOptimisation(), KLRunaway(), NegativeExplainedVariance(),
                EntropyCollapse(), SamplerMismatch("rollout/logp_mismatch"),
                LossPlateau("loss/policy"), *common]
    raise ValueError(f"for_script: unknown script {name!r}; expected pretrain, sft, rm, dpo, "
                     "grpo or ppo")


def check(watchers: list[Watcher], step: int, metrics: dict) -> list[str]:
    """Feed one step's record to every watcher; the warnings that fired now, in order."""
    return [w for watcher in watchers for w in watcher.update(step, metrics)]
