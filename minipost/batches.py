"""The online-RL scripts' batches, made from the policy's own samples.

GRPO (train_grpo.py): G completions sampled for each prompt and scored (`group_rollout`; a group
is G consecutive rows), DAPO's dynamic sampling (`sample_batch`), rollouts of different lengths
joined (`cat_rollouts`), and micro-batches cut to their own lengths (`micro_batches`). Such a batch
is a dict of row-aligned tensors: `input_ids` and `attention_mask` (N, P + C), the prompts
left-padded to a width P and the completions right-padded to a width C; `loss_mask` and
`sampler_logps` (N, C); `rewards` (N,), the reward functions' total, and each one's
`rewards/<name>`; `truncated` (N,), the completions that hit the token budget.

PPO (train_ppo.py): one completion a prompt row, and every no-grad quantity of its update: old
and reference log-probs, values, the scores (`ppo_rollout`).
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from . import dist, rewards
from .evaluate import prompt_ids
from .generate import generate
from .ppo import masked_mean
from .reward import RewardEnsemble
from .rollout import completion_logps, completion_values, sequence_scores, values_and_scores


@torch.no_grad()
def group_rollout(model, tokenizer, problems, fns, args, generator,
                  autocast=contextlib.nullcontext):
    """Sample G completions for each problem (a data row) and score them with the reward
    functions `fns` (rewards.score). Returns a dict of (N = len·G) rows: the total in
    "rewards", each function's in "rewards/<name>" (NaN where it returned None). From `args`:
    --group-size, --max-new-tokens, --temperature, --string-prompts."""
    G = args.group_size
    rows = [p for p in problems for _ in range(G)]
    prompts = [prompt_ids(tokenizer, p["prompt"], args.string_prompts) for p in rows]
    model.eval()
    with autocast():
        g = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     generator=generator)
    model.train()
    texts = [tokenizer.decode(ids[m]) for ids, m in zip(g.completion_ids, g.completion_mask)]
    total, per_fn = rewards.score(fns, [p["prompt"] for p in rows], texts, rows)
    ids, attention_mask = g.sequences
    return {"input_ids": ids, "attention_mask": attention_mask,
            "loss_mask": g.completion_mask.float(), "sampler_logps": g.logps, "rewards": total,
            **{f"rewards/{k}": v for k, v in per_fn.items()}, "truncated": g.truncated.cpu()}


def sample_batch(model, tokenizer, pool, fns, n_groups: int, args, generator, autocast):
    """`n_groups` groups of this rank's batch; with dynamic sampling (DAPO) only groups whose
    rewards differ, refilled up to `--max-refills` times (then zero-spread groups fill the rest).
    Returns the batch (`cat_rollouts`), every rollout sampled (for honest reward metrics) and the
    number of zero-spread groups among them. From `args`: --dynamic-sampling, --max-refills, and
    `group_rollout`'s."""
    keep, dropped, sampled, n_zero = [], [], [], 0
    with dist.gathered(model):   # FSDP: ranks may refill a different number of times
        for _ in range(1 + (args.max_refills if args.dynamic_sampling else 0)):
            idx = torch.randint(len(pool), (n_groups,), generator=generator).tolist()
            r = group_rollout(model, tokenizer, [pool[i] for i in idx], fns, args, generator,
                              autocast)
            spread = r["rewards"].view(-1, args.group_size).std(1) > 0          # (B,)
            sampled.append(r)
            n_zero += int((~spread).sum())
            for gi in range(len(spread)):
                sl = slice(gi * args.group_size, (gi + 1) * args.group_size)
                group = {k: v[sl] for k, v in r.items()}
                (keep if spread[gi] or not args.dynamic_sampling else dropped).append(group)
            if len(keep) >= n_groups:
                break
    return cat_rollouts((keep + dropped)[:n_groups]), sampled, n_zero


def cat_rollouts(parts):
    """Concatenate rollouts of different lengths: prompts left-padded, completions right-padded."""
    P = max(r["input_ids"].shape[1] - r["loss_mask"].shape[1] for r in parts)
    C = max(r["loss_mask"].shape[1] for r in parts)
    out = {k: [] for k in parts[0]}
    for r in parts:
        c = r["loss_mask"].shape[1]
        p = r["input_ids"].shape[1] - c
        for k, v in r.items():
            if k in ("input_ids", "attention_mask"):
                pad = 3 if k == "input_ids" else 0   # any id: padded positions are masked out
                v = F.pad(v, (P - p, C - c), value=pad)
            elif k in ("loss_mask", "sampler_logps"):
                v = F.pad(v, (0, C - c))
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def prompt_len(mb) -> int:
    """Width of the left-padded prompt block of a (micro-)batch."""
    return mb["input_ids"].shape[1] - mb["loss_mask"].shape[1]


def micro_batches(batch, size: int):
    """Split rows into micro-batches, each trimmed to its own longest prompt and completion."""
    C = batch["loss_mask"].shape[1]
    out = []
    for s in range(0, len(batch["rewards"]), size):
        mb = {k: v[s:s + size] for k, v in batch.items()}
        c = max(int(mb["loss_mask"].sum(1).max()), 1)
        first = int(mb["attention_mask"].any(0).nonzero()[0])     # drop all-padding prompt columns
        end = mb["input_ids"].shape[1] - (C - c)
        for k in ("input_ids", "attention_mask"):
            mb[k] = mb[k][:, first:end]
        for k in ("loss_mask", "sampler_logps"):
            mb[k] = mb[k][:, :c]
        out.append(mb)
    return out


# ---------------------------------------------------------------------------- PPO
@torch.no_grad()
def ppo_rollout(model, value_model, reward_model, reference, tokenizer, prompts, rows, fns, args,
                autocast):
    """Sample one completion per prompt and compute every no-grad quantity of one batch: old and
    reference log-probs, values, the scores (the reward model's, or the reward functions' with
    --reward gold, less --missing-eos-penalty without EOS). Returns the batch (rows of (B, ·)
    tensors), the prompt width P and the rollout's stats. From `args` also: --max-new-tokens,
    --temperature, --mask-truncated."""
    with autocast(), dist.gathered(model), dist.gathered(value_model):   # FSDP: whole
        g = generate(model, prompts, args.max_new_tokens, temperature=args.temperature,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        seq, attention_mask = g.sequences                                   # (B, P + N)
        P = g.prompt_ids.shape[1]
        old_logps, entropy = completion_logps(model, seq, attention_mask, P, args.temperature,
                                              with_entropy=True)
        # log π_ref of the completions, at the sampling temperature, like the policy's
        ref_logps = reference.logps(completion_logps, seq, attention_mask, P, args.temperature)
        if value_model is reward_model:    # --freeze-value, one reward model: one forward
            values, rm_scores = values_and_scores(reward_model, seq, attention_mask, P)
        else:
            values = completion_values(value_model, seq, attention_mask, P)    # (B, N)
            rm_scores = (sequence_scores(reward_model, seq, attention_mask)
                         if reward_model is not None else None)                  # (B,) at EOS
    texts = [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
             for ids, m in zip(g.completion_ids, g.completion_mask)]
    gold, per_fn = rewards.score(fns, [r["prompt"] for r in rows], texts, rows)   # (B,)
    gold = gold.to(g.completion_ids.device)
    loss_mask = g.completion_mask.float()                                       # (B, N)
    truncated = g.truncated.float()
    scores = (rm_scores if args.reward == "model" else gold) - args.missing_eos_penalty * truncated
    if args.mask_truncated:
        loss_mask = loss_mask * (1 - truncated)[:, None]
    m = g.completion_mask
    stats = {"reward/mean": rm_scores.mean() if rm_scores is not None else torch.tensor(math.nan),
             "gold/mean": gold.mean(), **rewards.log_stats(per_fn),
             "entropy": masked_mean(entropy, m),
             "completion_length": m.float().sum(1).mean(), "no_eos": truncated.mean(),
             "rollout/logp_mismatch": ((old_logps - g.logps).abs() * m).max()}
    if isinstance(reward_model, RewardEnsemble):    # the members' spread on these samples
        stats["reward/disagreement"] = reward_model.disagreement.mean()
    batch = dict(seq=seq, attention_mask=attention_mask, completion_mask=m, old_logps=old_logps,
                 ref_logps=ref_logps, values=values, scores=scores, loss_mask=loss_mask)
    return batch, P, stats
