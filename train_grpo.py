"""Stage 5: GRPO with verifiable rewards (Shao et al. 2024, arXiv 2402.03300), with the DAPO and
Dr. GRPO fixes (Yu et al. 2025, arXiv 2503.14476; Liu et al. 2025, arXiv 2503.20783).

    python train_grpo.py                     # out/sft -> out/grpo
    python train_grpo.py --peft lora --lr 1e-3
    python train_grpo.py --data my.jsonl --reward-fn my_rewards.py:score   # your own task
    torchrun --nproc_per_node 2 train_grpo.py --device cpu --threads 1

Each step samples B prompts × G completions with the KV cache (a group = G consecutive rows),
scores them with the reward functions (rewards.py; by default the task's verifier: 1 for a correct,
well-formed answer; plus `--format-reward` × well formed), turns rewards into group-relative
advantages Â_i = (r_i − mean_g r)/std_g r, and takes μ optimiser steps on that batch with the
clipped surrogate of `minipost.grpo.grpo_loss`. Log-probs are recomputed from logits / T, the
distribution the rollout sampled from (docs/pitfalls.md, "Sampling temperature in log-probs"), so
the first update's ratio is 1 against the policy that sampled. That update takes its π_old from the
recomputation itself, so what is checked at run time is the recomputation: on the first update of
every batch the trainer's log-probs must equal those the sampler recorded, to the rounding of a
KV-cache decode against a full forward (`sampler_tolerance`), or the run stops with an error.
Hence no `--lora-dropout` here: dropout in the training forward is another distribution. With
β = 0 no reference model is built at all.

The recipe behind the defaults (a 1.9M-parameter model on 2 CPU cores): sample at T = 0.7, not 1,
so rollouts look like the greedy answers we are scored on (at T = 1 they slip digits and the reward
stops tracking what greedy decoding does); 16 prompts × 8 samples a step, whose gradient is less
noisy than 8 × 8; lr 5e-5 with a cosine decay to 10% over the 600 steps (a constant LR leaves the
policy random-walking: greedy accuracy swung ±5 points between evaluations; 1e-4 and above
destroy it); β = 0; DAPO's token-level loss and clip-higher; dynamic sampling, which spends the
gradient only on prompts whose group disagrees (reward spread > 0).

The methods that followed GRPO are flags of this script, each a few lines of `minipost/grpo.py`
or `minipost/gspo.py`, so that what differs is only the advantage or the unit of the ratio:

    python train_grpo.py --advantage rloo --loss-type dr_grpo --no-dynamic-sampling   # RLOO
    python train_grpo.py --advantage reinforce_pp --beta 0.01 --no-dynamic-sampling   # REINFORCE++
    python train_grpo.py --advantage reinforce_pp_baseline --beta 0.01                # ... its baseline variant
    python train_grpo.py --loss-type gspo --mu 2 --clip-eps 3e-4 --clip-eps-high 4e-4  # GSPO
    python train_grpo.py --entropy-coef 0.001                                         # entropy bonus

RLOO (Ahmadian et al. 2024, arXiv 2402.14740) takes as each sample's baseline the mean reward of
the other G − 1. REINFORCE++ (Hu et al. 2025, arXiv 2501.03262) moves the KL into the reward
(−β·log π_old/π_ref at every token, so `--beta` is no longer a loss term), takes the return to go
of every token as its advantage, and normalises it over the batch (under torchrun: over each
process's share of it), not within each group. GSPO (Zheng et al. 2025, arXiv 2507.18071) takes
one ratio per sequence, the geometric mean of its token ratios, and clips that; with --mu 1 every
ratio is 1 and GSPO is `--loss-type grpo`. `--entropy-coef c` subtracts c × the policy's token
entropy from the loss. Logged every step: `entropy`, and `policy/logp_adv_cov`, the covariance over
the batch's tokens of log π and the advantage, which Cui et al. 2025 (arXiv 2505.22617) show
drives the entropy down when positive.
"""
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipost import batches, dist, online, rewards
from minipost.cli import (CURVES_HELP, Metrics, check_vocab, difficulty_arg, load_script_tokenizer,
                          peak_rss_mb, require_checkpoint, setup, user_errors, write_results)
from minipost.errors import UserError
from minipost.flags import RewardArgs, StageArgs, parse_args, torch_dtype
from minipost.grpo import group_advantages, grpo_loss, reinforce_pp_advantages, rloo_advantages
from minipost.gspo import gspo_loss
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, peft_options, save_peft, trainable_summary
from minipost.ppo import logp_advantage_covariance
from minipost.resume import Run, due, per_rank_state
from minipost.rollout import completion_logps


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs, RewardArgs):   # RewardArgs: --data, --reward-fn, ... (flags.py)
    init: str = "out/sft"           # policy to start from (the SFT model), any HF-format directory
    out_dir: str = "out/grpo"       # where the trained policy, metrics.jsonl and results.json go
    difficulty: str = ""            # built-in task of the held-out evaluation ("" = --task's default)
    train_difficulty: str = ""      # task of the training prompts ("" = --difficulty)
    n_prompts: int = 20000          # training prompts in the pool
    batch_prompts: int = 16         # B: prompts per step (global, over all ranks)
    group_size: int = 8             # G: completions sampled per prompt
    temperature: float = 0.7        # rollout sampling temperature (log-probs use logits / T)
    max_new_tokens: int = 64        # completion budget; no EOS by then = truncated
    mask_truncated: bool = False    # leave completions that hit --max-new-tokens out of the loss
    format_reward: float = 0.0      # weight of the task's well-formed reward added to the reward functions
    dynamic_sampling: bool = True   # DAPO: drop groups with zero reward spread and refill
    max_refills: int = 3            # extra sampling rounds per step when filling dynamic batches
    scale_rewards: Literal["std", "none"] = "std"  # std (GRPO) | none (Dr. GRPO: Â = r − mean)
    loss_type: Literal["grpo", "dapo", "dr_grpo", "gspo"] = "dapo"  # per-sequence | token mean | Dr. GRPO | GSPO's sequence ratio
    clip_eps: float = 0.2           # ε: ratio clipped to [1 − ε, 1 + ε_high]
    clip_eps_high: float | None = 0.28  # ε_high, DAPO's clip-higher (none = ε)
    beta: float = 0.0               # β: k3 KL penalty to the frozen reference (0 = no reference)
    mu: int = 1                     # μ: optimiser steps on each sampled batch
    micro_batch_size: int = 32      # rows per forward/backward (gradient accumulation)
    max_steps: int = 600            # optimiser steps (each of μ updates counts once per batch)
    max_minutes: float = 15.0       # stop after this many minutes; the LR schedule follows it (0 = no limit)
    lr: float = 5e-5                # peak learning rate (1e-4 constant loses 16 points in 100 steps)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine: to --min-lr-ratio at the end
    warmup_steps: int = 5           # linear warm-up steps
    min_lr_ratio: float = 0.1       # final LR as a fraction of the peak (cosine)
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    eval_every: int = 100           # held-out greedy pass@1 every N steps (0 = never: before/after only)
    eval_problems: int = 500        # held-out problems (evaluate.heldout_problems)
    pass_k: int = 8                 # k of held-out pass@k, sampled at --temperature (0 = skip)
    save_every: int = 50            # write a resume checkpoint every N steps (0 = only on stop)
    # ---- the advantage estimator and entropy control (RLOO, REINFORCE++, entropy bonus)
    advantage: Literal["group", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "group"  # group: GRPO's (--scale-rewards) | rloo | REINFORCE++, KL in the reward (--beta)
    entropy_coef: float = 0.0       # c: entropy bonus, −c·H of the policy in the loss (0 = none)


def check_flags(args: Args, world_size: int):
    """This script's flags that their types do not limit (flags.check_args did the rest)."""
    if args.clip_eps_high is not None and args.clip_eps_high <= 0:
        raise UserError(f"--clip-eps-high must be > 0 (none: the same as --clip-eps), got "
                        f"{args.clip_eps_high}")
    if args.batch_prompts <= 0 or args.batch_prompts % world_size:
        raise UserError(f"--batch-prompts {args.batch_prompts} is not divisible by the "
                        f"{world_size} processes")
    if args.temperature <= 0 or args.group_size < 2:
        raise UserError("GRPO needs --temperature > 0 and --group-size >= 2")
    if args.loss_type == "gspo" and args.advantage.startswith("reinforce_pp"):
        raise UserError("--loss-type gspo takes one advantage per sequence; REINFORCE++'s are per "
                        "token (use --advantage group or rloo)")
    if args.entropy_coef < 0:
        raise UserError(f"--entropy-coef must be >= 0, got {args.entropy_coef}")
    if args.micro_batch_size <= 0 or args.mu < 1:
        raise UserError("--micro-batch-size and --mu must be >= 1")
    if args.peft == "lora" and args.lora_dropout:   # online.check_sampler_match would stop the run
        raise UserError(f"--lora-dropout {args.lora_dropout}: GRPO needs 0; dropout in the training "
                        "forward would not reproduce the log-probs the sampler recorded")


# ---------------------------------------------------------------------------- advantages
@torch.no_grad()
def reference_logps(reference, mbs, args: Args):
    """log π_ref on each micro-batch, at the sampling temperature, like the policy's (None
    without a reference)."""
    if reference is None:
        return None
    return [reference.logps(completion_logps, mb["input_ids"], mb["attention_mask"],
                            batches.prompt_len(mb), args.temperature) for mb in mbs]


def compute_advantages(batch, mbs, ref_logps, args: Args) -> torch.Tensor:
    """The batch's advantages by `--advantage`, also put into each micro-batch (its rows, and with
    per-token advantages its columns). Returns them: (N,) one per completion, or (N, C) one per
    token (REINFORCE++).

    group: Â_i = (r_i − mean_g r)/std_g r, or with `--scale-rewards none` (Dr. GRPO) r_i − mean_g r;
    rloo: r_i − the mean of the other G − 1; reinforce_pp(_baseline): the return to go of
    −β·log(π_old/π_ref) per token + the reward (minus its group's mean) at the last, normalised
    over the batch's tokens, π_old being the sampler's log-probs."""
    rewards = batch["rewards"]
    if args.advantage == "group":
        adv = group_advantages(rewards, args.group_size,
                               None if args.scale_rewards == "none" else "std")
    elif args.advantage == "rloo":
        adv = rloo_advantages(rewards, args.group_size)
    else:
        C = batch["loss_mask"].shape[1]
        ref = (None if ref_logps is None else
               torch.cat([F.pad(r, (0, C - r.shape[1])) for r in ref_logps]))    # (N, C)
        adv = reinforce_pp_advantages(
            rewards, batch["loss_mask"], batch["sampler_logps"], ref, beta=args.beta,
            group_size=args.group_size if args.advantage == "reinforce_pp_baseline" else None)
    start = 0
    for mb in mbs:
        n, c = mb["loss_mask"].shape
        mb["advantages"] = adv[start:start + n] if adv.dim() == 1 else adv[start:start + n, :c]
        start += n
    return adv


# ---------------------------------------------------------------------------- loss
def loss_normalizer(loss_type: str, loss_mask, max_new_tokens: int) -> float:
    """The whole batch's denominator, so accumulated micro-batch losses equal the full-batch loss
    (docs/pitfalls.md, "Loss aggregation and gradient accumulation"): tokens (dapo), sequences
    (grpo, gspo), sequences × token budget (dr_grpo)."""
    N = loss_mask.shape[0]
    return {"dapo": max(float(loss_mask.sum()), 1.0), "grpo": float(N), "gspo": float(N),
            "dr_grpo": float(N * max_new_tokens)}[loss_type]


def policy_update(train_model, mbs, normalizer: float, args, old_logps=None, ref_logps=None):
    """One accumulated backward over all micro-batches (no optimiser step). Returns stats and the
    detached log-probs, which are the old log-probs of later updates on the same batch.

    old_logps None: this is the first update on the batch; the detached current log-probs are the
    old ones, so ρ = 1 exactly (μ = 1 is then the on-policy GRPO gradient). That they are the
    sampler's is reported as `sampler_logp_max_diff`, for `online.check_sampler_match`; the policy
    that sampled is also measured: `entropy`, its mean token entropy on the completions.

    `--loss-type gspo` takes `gspo.gspo_loss`, the others `grpo.grpo_loss`. REINFORCE++ has its KL
    in the advantages already: no k3 term in the loss then (its value is still logged as "kl").
    """
    sums, new_old, total_loss = {}, [], 0.0
    sync = getattr(train_model, "no_sync", None)
    first = old_logps is None
    bonus = args.entropy_coef > 0
    kw = dict(clip_eps=args.clip_eps, clip_eps_high=args.clip_eps_high, normalizer=normalizer,
              beta=0.0 if args.advantage.startswith("reinforce_pp") else args.beta,
              entropy_coef=args.entropy_coef)
    for i, mb in enumerate(mbs):
        ctx = sync() if sync is not None and i < len(mbs) - 1 else contextlib.nullcontext()
        with ctx:
            out = completion_logps(train_model, mb["input_ids"], mb["attention_mask"],
                                   batches.prompt_len(mb), args.temperature,
                                   with_entropy=first or bonus, entropy_grad=bonus)
            logps, entropy = out if first or bonus else (out, None)          # (n, C)
            old = logps.detach() if old_logps is None else old_logps[i]
            ref = None if ref_logps is None else ref_logps[i]
            if args.loss_type == "gspo":
                loss, stats = gspo_loss(logps, old, ref, mb["advantages"], mb["loss_mask"],
                                        entropy=entropy, **kw)
            else:
                loss, stats = grpo_loss(logps, old, ref, mb["advantages"], mb["loss_mask"],
                                        loss_type=args.loss_type, entropy=entropy, **kw)
            loss.backward()
        new_old.append(old)
        m = mb["loss_mask"].bool()
        if first:                      # a token mean, as the stats below are
            stats["entropy"] = (entropy.detach() * m).sum() / m.sum().clamp(min=1)
        # the sampler's KV-cache log-probs against this full forward: ~1e-6
        # (docs/pitfalls.md, "KV-cache decoding equals the full forward")
        stats["sampler_logp_max_diff"] = ((logps.detach() - mb["sampler_logps"]).abs() * m).max()
        for k, v in stats.items():     # token-weighted means, or maxima
            if "max" in k:
                sums[k] = v if k not in sums else torch.maximum(sums[k], v)
            else:
                sums[k] = sums.get(k, 0) + v * m.sum()
        total_loss += loss.detach()    # micro-batch losses share one normaliser: they add up
    n = sum(mb["loss_mask"].sum() for mb in mbs).clamp(min=1)
    out = {k: float(v) if "max" in k else float(v / n) for k, v in sums.items()}
    out["loss"] = float(total_loss)
    return out, new_old


# ---------------------------------------------------------------------------- eval
def evaluate(model, tokenizer, held_out, fns, tag: str, args: Args, rt) -> dict:
    """Held-out greedy accuracy (or with --eval-data each reward function's greedy mean); before
    and after training ("before", "after") also the pass@k of --pass-k samples a problem at
    --temperature and the accuracy of one sample (online.evaluate)."""
    return online.evaluate(model, tokenizer, held_out, fns, args, rt.autocast, args.max_new_tokens,
                           pass_k=args.pass_k if tag in ("before", "after") else 0)


def main(args: Args):
    rt = setup(args)
    check_flags(args, rt.world_size)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("grpo")   # diagnostics.py: a failure signature is said once
    per_rank = args.batch_prompts // rt.world_size                      # this rank's groups

    # ------------------------------------------------------------------------ data
    difficulty = difficulty_arg(args.difficulty, args.task)
    train_difficulty = difficulty_arg(args.train_difficulty or args.difficulty, args.task)
    require_checkpoint(args.init, "python train_sft.py")
    tokenizer = load_script_tokenizer(args.init, args.chat_template)   # pads with EOS if no pad
    # --data rows or the built-in task's, the reward functions, each row checked and each
    # function probed before anything is written (rewards.rl_task), and the held-out rows
    pool, held_out, fns = online.load_task(args, train_difficulty, difficulty, args.format_reward,
                                           log=print if rt.is_main else None)

    # ------------------------------------------------------------------------ models
    dtype = torch_dtype(args.dtype)
    model = load_model(args.init, dtype=dtype, device=rt.device)
    check_vocab(tokenizer, model, args.init)
    model = add_peft(model, **peft_options(args))
    set_gradient_checkpointing(model, args.grad_checkpointing)
    reference = online.make_reference(model, args.peft, args.beta)   # None at β = 0
    if rt.is_main:
        print(f"policy {args.init} (peft={args.peft}, {trainable_summary(model)}); reference: "
              f"{'none (beta=0)' if reference is None else reference.kind}; {len(pool)} train prompts")
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    # constant: a cosine that ends where it starts; it follows whichever of --max-steps,
    # --max-minutes ends the run
    scheduler = CosineSchedule(optimizer, args.warmup_steps, args.max_steps,
                               args.min_lr_ratio if args.lr_schedule == "cosine" else 1.0,
                               max_minutes=args.max_minutes)
    tol = online.sampler_tolerance(dtype, rt.device)   # KV-cache decode vs full forward: rounding

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed + rt.rank)   # each rank its own prompts/samples
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is None:
        before = (evaluate(model, tokenizer, held_out, fns, "before", args, rt)
                  if args.eval_problems else {})
        metrics.log({"step": 0, **{f"eval/{k}": v for k, v in before.items()}}, echo=True)
    else:
        before = state["extra"]["before"]
        gen.set_state(per_rank_state(state["data"], rt.rank)[0])   # this rank's prompts/samples
    start, step, train_time = time.time(), run.start_step, 0.0
    bar = tqdm(total=args.max_steps, initial=step, disable=not rt.is_main, desc="grpo")
    while not scheduler.done():
        t0, step_before = time.time(), step
        batch, sampled, n_zero = batches.sample_batch(model, tokenizer, pool, fns, per_rank, args,
                                                     gen, rt.autocast)
        lengths = batch["loss_mask"].sum(1)                                    # (B·G,)
        if args.mask_truncated:
            batch["loss_mask"] = batch["loss_mask"] * (~batch["truncated"]).float()[:, None]
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        mbs = batches.micro_batches(batch, args.micro_batch_size)
        # the global denominator over ranks, divided by the world size that DDP's mean divides by
        normalizer = dist.all_reduce_sum(torch.tensor(loss_normalizer(
            args.loss_type, batch["loss_mask"], args.max_new_tokens), dtype=torch.float64))
        normalizer = float(normalizer) / rt.world_size
        ref_logps = reference_logps(reference, mbs, args)
        batch["advantages"] = compute_advantages(batch, mbs, ref_logps, args)
        # > 0: confident tokens get the positive advantages, and entropy falls (Cui et al. 2025)
        cov = logp_advantage_covariance(batch["sampler_logps"], batch["advantages"],
                                        batch["loss_mask"])
        gen_time = time.time() - t0

        old_logps = None                           # μ optimiser steps on the same batch
        for it in range(args.mu):
            if scheduler.done():
                break
            optimizer.zero_grad(set_to_none=True)
            stats, old_logps = policy_update(train_model, mbs, normalizer, args, old_logps,
                                             ref_logps)
            if it == 0:                 # π_θ is still the sampling policy: it must score as one
                online.check_sampler_match(stats["sampler_logp_max_diff"], tol)
                sampler = {k: stats[k] for k in ("sampler_logp_max_diff", "entropy")}
            gnorm = clip_gradients(model, args.grad_clip)
            if run.finite(step, stats["loss"], gnorm):  # else --skip-nonfinite: a skipped step
                optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
        train_time += time.time() - t0

        total = torch.cat([r["rewards"] for r in sampled])     # every sampled completion
        n_groups = len(total) // args.group_size
        per_fn = {f.name: torch.cat([r[f"rewards/{f.name}"] for r in sampled]) for f in fns}
        m = dist.all_reduce_mean({
            "reward/mean": total.mean(), "reward/std": total.std(),
            **rewards.log_stats(per_fn),         # rewards/<name>/mean, /std
            "frac_reward_zero_std": n_zero / n_groups, "groups_sampled": n_groups,
            "completions/mean_length": lengths.mean(),
            # Dr. GRPO's length bias shows as these two drifting apart (reward > 0 = correct)
            "completions/mean_length_correct": lengths[batch["rewards"].cpu() > 0].float().mean(),
            "completions/mean_length_wrong": lengths[batch["rewards"].cpu() <= 0].float().mean(),
            "completions/clipped_ratio": batch["truncated"].float().mean(),
            "grad_norm": float(gnorm), "policy/logp_adv_cov": cov,
            **stats, **sampler})                               # the sampling policy's: update 1
        metrics.log({"step": step, **m, "lr": scheduler.get_last_lr()[0], "skipped": run.skipped,
                     "gen_seconds": gen_time, "step_seconds": time.time() - t0})
        bar.set_postfix(reward=f"{m['reward/mean']:.2f}",
                        **{fns[0].name: f"{m[f'rewards/{fns[0].name}/mean']:.2f}"},
                        zero_std=f"{m['frac_reward_zero_std']:.2f}", len=f"{lengths.mean():.0f}")
        if due(args.eval_every, step_before, step) and step < args.max_steps:   # μ steps a batch
            metrics.log({"step": step, **{f"eval/{k}": v for k, v in
                                          evaluate(model, tokenizer, held_out, fns, "mid",
                                                   args, rt).items()}}, echo=True)
        if run.end_of_step(step, lambda: {"per_rank": [gen.get_state()]},
                           lambda: {"before": before}):
            dist.cleanup()
            return {"stopped_at": step}
    bar.close()
    run.close()
    if rt.is_main:
        print(f"stopped by {scheduler.stopped_by}: {step} steps in {scheduler.minutes():.1f} min")

    # ------------------------------------------------------------------------ eval
    after = evaluate(model, tokenizer, held_out, fns, "after", args, rt) if args.eval_problems else {}
    final = {"before": before, "after": after, "steps": step, "stopped_by": scheduler.stopped_by,
             "minutes": (time.time() - start) / 60, "train_minutes": train_time / 60,
             "seconds_per_step": train_time / max(step, 1), "peak_rss_mb": peak_rss_mb()}
    metrics.log({"step": step, **{f"eval/{k}": v for k, v in after.items()},
                 **{k: v for k, v in final.items() if k not in ("before", "after")}}, echo=True)

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "grpo", final)
        save_peft(to_save, args.out_dir, args.peft, args.merge, tokenizer,
                  base_model_name_or_path=args.init,
                  extra_config={"minipost": {"stage": "grpo", "args": asdict(args),
                                             "results": final}})
        print(f"saved the GRPO policy to {args.out_dir}")
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
