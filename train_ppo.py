"""Stage 4: PPO against a learned reward model, the RL step of RLHF (Ouyang et al. 2022, arXiv
2203.02155), with the details of Huang et al. 2024 ("The N+ implementation details of RLHF with
PPO", arXiv 2403.17031).

    python train_ppo.py                      # out/sft (policy) + out/rm (reward) -> out/ppo
    python train_ppo.py --reward gold        # optimise the verifier instead, for comparison
    python train_ppo.py --reward gold --data my.jsonl --reward-fn my_rewards.py:score   # your task
    python train_ppo.py --peft lora --lr 1e-3
    torchrun --nproc_per_node 2 train_ppo.py --device cpu --threads 1

Each iteration samples B completions with the KV cache at temperature T (one per prompt, or B/k
prompts k times each with `--samples-per-prompt k`: the group sampling of VAPO, Yue et al. 2025,
arXiv 2504.05118, which lets the value model see several returns of one prompt), then, with no
grad: old log-probs log π_old(a_t) from one full forward on logits / T (docs/pitfalls.md,
"Sampling temperature in log-probs"), reference log-probs, values V(s_t) and the score r(x, y) of
the reward model at the EOS (docs/pitfalls.md, "EOS and truncation" and "Reward-model score
position"). Per-token rewards are r_t = −β·(log π_old − log π_ref) plus the score on the last token
(Ziegler et al. 2019, arXiv 1909.08593); a completion without EOS loses `--missing-eos-penalty`
(or leaves the loss with `--mask-truncated`). GAE gives advantages and returns (`--value-lam 1`:
the value targets use λ = 1, unbiased Monte-Carlo returns, while the policy keeps `--lam`; VAPO's
decoupled GAE); advantages are whitened over the batch's real tokens. Then K epochs over shuffled
minibatches of the clipped policy loss and the clipped value loss (Schulman et al. 2017, arXiv
1707.06347), gradient clipping, and, with `--target-kl`, the adaptive β of Ziegler et al. The first
minibatch of every update must have ratio 1 (docs/pitfalls.md, "The first ratio is exactly
1"): checked at run time. The models stay in
eval mode (no dropout anywhere, `--lora-dropout` included: the PEFT layers are put in eval mode
once added, not only by the first evaluation, which a resumed run skips), as TRL does for PPO, so
rollout and update compute the same function.

The value model starts from the reward model (Stiennon et al. 2020), or with `--value-init policy`
from the policy's decoder with a zero head (docs/pitfalls.md, "Value-head initialisation").
`--value-warmup N` trains it alone for the first N iterations, so the policy's first advantages
do not come from an untrained value model (the value pre-training of VC-PPO, Yuan et al. 2025,
arXiv 2503.01491); `--lr-schedule cosine` decays the policy's learning rate over the run. The
reference is a frozen copy of the policy; with `--peft` it is the policy with its adapters switched
off, so no copy is made. Under torchrun each process rolls out its share of the prompts and whitens
its own advantages.

`--freeze-value` never trains the value model: V(s_t) stays the reward model's own score of the
prefix y_<t, which train_rm.py's prefix loss teaches to rank prefixes. δ_t = r_t + V(s_{t+1}) −
V(s_t) is then how much token a_t moved the reward model's judgement of the answer so far, so the
token where it drops takes the blame (the shaping terms of Ng et al. 1999, with V as the
potential). With λ = γ = 1 the V terms cancel down to a baseline, A_t = Σ_{k≥t} r_k − V(s_t), and
the gradient stays unbiased; with λ < 1 GAE trusts the prefix scores over the next few tokens:
less variance for some bias (Schulman et al. 2015). No value loss, optimiser or second model: with
one reward model one forward gives the values and the score, and an iteration costs about a third
less.

Several reward models, `--reward-model out/rm,out/rm-1,out/rm-2` (train_rm.py run with other
`--seed`s), score as one ensemble (Coste et al. 2023, arXiv 2310.02743; `reward.RewardEnsemble`):
each member's score standardised with its held-out mean and std, then their mean, or with
`--ensemble min` the worst case; `reward/disagreement` logs how far apart the members are on each
batch. The value model starts from the first.

`--entropy-coef c` adds PPO's entropy bonus, −c × the policy's token entropy, to the policy loss
(Schulman et al. 2017). Logged every iteration: `entropy` of the sampling policy, and
`policy/logp_adv_cov`, the covariance over the batch's tokens of log π_old and the whitened
advantage, which drives the entropy down when positive (Cui et al. 2025, arXiv 2505.22617).
"""
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm import tqdm

from minipost import batches, dist, online
from minipost.cli import (CURVES_HELP, Metrics, check_vocab, difficulty_arg, load_script_tokenizer,
                          peak_rss_mb, require_checkpoint, setup, user_errors, write_results)
from minipost.errors import UserError
from minipost.flags import RewardArgs, StageArgs, parse_args, torch_dtype
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, peft_options, save_peft, trainable_summary
from minipost.ppo import (adaptive_kl_update, explained_variance, gae, kl_shaped_rewards,
                          logp_advantage_covariance, ppo_policy_loss, ppo_value_loss, whiten)
from minipost.resume import Run, due
from minipost.rollout import completion_logps, completion_values


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs, RewardArgs):   # RewardArgs: --data, --reward-fn, ... (flags.py)
    init: str = "out/sft"           # policy to start from (the SFT model), any HF-format directory
    out_dir: str = "out/ppo"        # where the trained policy, metrics.jsonl and results.json go
    difficulty: str = ""            # built-in task of the prompts and the evaluation ("" = --task's default)
    n_prompts: int = 20000          # built-in training prompts in the pool
    batch_size: int = 32            # B: completions per iteration, all ranks
    samples_per_prompt: int = 1     # k: completions per prompt (B / k prompts; VAPO's group sampling)
    temperature: float = 0.7        # rollout sampling temperature (log-probs use logits / T)
    max_new_tokens: int = 64        # completion budget; no EOS by then = truncated
    missing_eos_penalty: float = 1.0  # subtracted from the score of a completion without EOS
    mask_truncated: bool = False    # leave completions without EOS out of the loss instead
    reward: Literal["model", "gold"] = "model"  # the reward model's score | the reward functions' (gold: logged beside)
    reward_model: str = "out/rm"    # reward model directory; several, comma-separated: an ensemble
    ensemble: Literal["mean", "min"] = "mean"  # several reward models: of their standardised scores
    value_init: Literal["reward", "policy"] = "reward"  # value model: the reward model | zero head
    freeze_value: bool = False      # value model = the reward model, untrained (V = its prefix scores)
    value_warmup: int = 0           # first iterations train only the value model (policy fixed)
    gamma: float = 1.0              # γ: discount
    lam: float = 0.95               # λ: GAE of the policy's advantages
    value_lam: float | None = None  # λ of the value targets (VAPO's decoupled GAE: 1); none = --lam
    clip_eps: float = 0.2           # ε: policy ratio clipped to [1 − ε, 1 + ε]
    clip_eps_value: float = 0.2     # value predictions clipped to V_old ± ε
    kl_coef: float = 0.05           # β: per-token KL penalty −β·(log π − log π_ref)
    target_kl: float = 0.0          # adaptive β towards this KL per completion (0 = fixed β)
    kl_horizon: int = 10000         # time constant of the adaptive β controller, in completions
    ppo_epochs: int = 2             # K: passes over each rollout batch
    mini_batch_size: int = 16       # completions per optimiser step (all ranks)
    max_steps: int = 300            # iterations (rollout + K epochs of updates)
    max_minutes: float = 13.0       # stop after this many minutes; the LR schedule follows it (0 = no limit)
    lr: float = 5e-6                # policy learning rate (peak)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to --min-lr-ratio at the end
    warmup_steps: int = 0           # linear warm-up of the policy LR, in iterations
    min_lr_ratio: float = 0.1       # final policy LR as a fraction of the peak (cosine)
    value_lr: float = 1e-4          # value model learning rate (constant)
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max gradient norm, per model (0 = off)
    eval_every: int = 50            # held-out greedy accuracy every N iterations (0 = never: before/after only)
    eval_problems: int = 500        # held-out problems (evaluate.heldout_problems)
    eval_rm_problems: int = 128     # held-out problems whose greedy answers the RM scores
    save_every: int = 50            # write a resume checkpoint every N iterations (0 = only on stop)
    # ---- entropy control
    entropy_coef: float = 0.0       # c: entropy bonus, −c·H of the policy in the policy loss (0 = none)


def check_flags(args: Args, world_size: int):
    """This script's flags that their types do not limit (flags.check_args did the rest)."""
    if args.value_lam is not None and not 0 <= args.value_lam <= 1:
        raise UserError(f"--value-lam must be in [0, 1] (none: --lam), got {args.value_lam}")
    W = world_size
    if args.mini_batch_size <= 0 or args.batch_size % args.mini_batch_size or \
            args.mini_batch_size % W:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --mini-batch-size "
                        f"{args.mini_batch_size}, itself a multiple of the {W} processes")
    k = args.samples_per_prompt
    if k <= 0 or args.batch_size % k:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of "
                        f"--samples-per-prompt {k}")
    if args.entropy_coef < 0:
        raise UserError(f"--entropy-coef must be >= 0, got {args.entropy_coef}")
    if args.freeze_value and (args.value_init != "reward" or args.value_warmup):
        raise UserError("--freeze-value keeps the reward model as the value model: it needs "
                        "--value-init reward and no --value-warmup")


# ---------------------------------------------------------------------------- advantages
def compute_advantages(batch, kl_coef: float, args: Args):
    """Per-token rewards r_t = −β·(log π_old − log π_ref) + the score at the last token, then GAE:
    (advantages whitened over the batch's real tokens, returns, stats)."""
    loss_mask, values = batch["loss_mask"], batch["values"]
    token_rewards = kl_shaped_rewards(batch["old_logps"], batch["ref_logps"], batch["scores"],
                                      loss_mask, kl_coef)
    advantages, returns = gae(token_rewards, values, loss_mask, args.gamma, args.lam)
    if args.value_lam is not None and args.value_lam != args.lam:   # decoupled: own targets
        returns = gae(token_rewards, values, loss_mask, args.gamma, args.value_lam)[1]
    advantages = whiten(advantages, loss_mask)
    kl = ((batch["old_logps"] - batch["ref_logps"]) * batch["completion_mask"]).sum(1)  # (B,)
    stats = {"kl": kl.mean(), "rlhf_reward": (batch["scores"] - kl_coef * kl).mean(),
             "value/explained_variance": explained_variance(values, returns, loss_mask),
             # > 0: confident tokens get the positive advantages, and entropy falls
             "policy/logp_adv_cov": logp_advantage_covariance(batch["old_logps"], advantages,
                                                              loss_mask)}
    return advantages, returns, stats


# ---------------------------------------------------------------------------- loss
def policy_update(train_model, train_value, batch, rows, P: int, args: Args, autocast,
                  policy_moves: bool = True):
    """Clipped policy loss + clipped value loss (no value loss when `train_value` is None, with
    --freeze-value) on the rows `rows` of a rollout batch, and its backward (no optimiser step).
    `policy_moves` False (the value warm-up): the policy's ratio stats only, no graph. With
    `--entropy-coef`, the policy loss has the entropy bonus. Returns the loss (detached) and the
    stats."""
    bonus = args.entropy_coef > 0
    with autocast():
        with torch.set_grad_enabled(policy_moves):
            out = completion_logps(train_model, batch["seq"][rows], batch["attention_mask"][rows],
                                   P, args.temperature, with_entropy=bonus, entropy_grad=bonus)
            logps, entropy = out if bonus else (out, None)
        if train_value is not None:
            values = completion_values(train_value, batch["seq"][rows],
                                       batch["attention_mask"][rows], P)
    mask = batch["loss_mask"][rows]
    pg_loss, stats = ppo_policy_loss(logps, batch["old_logps"][rows], batch["advantages"][rows],
                                     mask, args.clip_eps, entropy, args.entropy_coef)
    stats["loss/policy"] = pg_loss.detach()
    loss = pg_loss if policy_moves else 0
    if train_value is not None:       # two separate models: each loss reaches only its own
        vf_loss, vf_stats = ppo_value_loss(values, batch["values"][rows], batch["returns"][rows],
                                           mask, args.clip_eps_value)
        loss = loss + vf_loss
        stats.update(vf_stats, **{"loss/value": vf_loss.detach()})
    loss.backward()
    return loss.detach(), stats


def ppo_epochs(train_model, train_value, trained: dict, optimizers: dict, batch, P: int, step: int,
               policy_moves: bool, tol: float, run, args: Args, rt) -> list[dict]:
    """K epochs over shuffled minibatches of one rollout batch (the value model alone during its
    warm-up); each minibatch's statistics."""
    B, mb = args.batch_size // rt.world_size, args.mini_batch_size // rt.world_size  # this rank's
    upd = []
    for epoch in range(args.ppo_epochs):
        perm = torch.randperm(B, device=rt.device)
        for s in range(0, B, mb):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            loss, stats = policy_update(train_model, train_value, batch, perm[s:s + mb], P,
                                        args, rt.autocast, policy_moves)
            if not upd:             # π_θ is still the sampling policy: every ratio is 1
                online.check_sampler_match(stats["policy/ratio_max_dev"], tol, ratio=True)
            norms = [clip_gradients(m, args.grad_clip) for m in trained.values()]
            if policy_moves:        # the policy's norm before clipping (none in the warm-up)
                stats["grad_norm"] = norms[0]
            upd.append(stats)
            if run.finite(step, loss, sum(norms)):     # else --skip-nonfinite: a skipped step
                for name, opt in optimizers.items():
                    if name == "value" or policy_moves:
                        opt.step()
    return upd


# ---------------------------------------------------------------------------- eval
def evaluate(model, reward_model, tokenizer, held_out, fns, step: int, args: Args, rt) -> dict:
    """Held-out greedy accuracy, and the reward model's mean score of the greedy answers. With
    --eval-data: each reward function's greedy mean instead of the accuracy (online.evaluate)."""
    res = online.evaluate(model, tokenizer, held_out, fns, args, rt.autocast, args.max_new_tokens)
    out = {"step": step, **{f"eval/{k}": v for k, v in res.items()}}
    # RM score of greedy answers, on a multiple of the world size (every rank gets some)
    n_rm = min(args.eval_rm_problems, len(held_out)) // rt.world_size * rt.world_size
    if reward_model is not None and n_rm:
        out["eval/reward"] = online.reward_model_score(model, reward_model, tokenizer,
                                                       held_out[:n_rm], args.max_new_tokens,
                                                       args.string_prompts, rt.autocast)
    return out


def main(args: Args):
    rt = setup(args)
    check_flags(args, rt.world_size)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("ppo")   # diagnostics.py: a failure signature is said once

    # ------------------------------------------------------------------------ data
    difficulty = difficulty_arg(args.difficulty, args.task)
    require_checkpoint(args.init, "python train_sft.py")
    tokenizer = load_script_tokenizer(args.init, args.chat_template)   # pads with EOS if no pad
    prompts, rows, held_out, fns = online.load_prompts(tokenizer, difficulty, args,
                                                       log=print if rt.is_main else None)

    # ------------------------------------------------------------------------ models
    dtype = torch_dtype(args.dtype)
    model = load_model(args.init, dtype=dtype, device=rt.device)
    check_vocab(tokenizer, model, args.init)
    reward_model = online.load_reward_model(model, args, rt)  # --reward gold too: its score logged
    value_model = online.make_value_model(model, reward_model, args, rt)
    trained = {"policy": model} if args.freeze_value else {"policy": model, "value": value_model}
    for name, m in trained.items():   # eval mode: new PEFT layers (LoRA dropout too) start in train
        add_peft(m, **peft_options(args), modules_to_save=("score",) if name == "value" else ())
        m.eval()
        set_gradient_checkpointing(m, args.grad_checkpointing)
    reference = online.make_reference(model, args.peft)
    if rt.is_main:
        print(f"policy {args.init} (peft={args.peft}, {trainable_summary(model)}); reference: "
              f"{reference.kind}; value model: " + ("the reward model, frozen" if args.freeze_value
                                                   else trainable_summary(value_model)))
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    train_value = None if args.freeze_value else dist.wrap(value_model, args.fsdp)
    optimizers = {name: make_optimizer(m, args.lr if name == "policy" else args.value_lr,
                                       args.weight_decay) for name, m in trained.items()}
    # over the policy's iterations; it follows whichever of --max-steps, --max-minutes ends the run
    scheduler = CosineSchedule(optimizers["policy"], args.warmup_steps,
                               args.max_steps - args.value_warmup,
                               args.min_lr_ratio if args.lr_schedule == "cosine" else 1.0,
                               max_minutes=args.max_minutes)
    tol = online.sampler_tolerance(dtype, rt.device, ratio=True)   # two full forwards: rounding

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)    # the same prompt order on every rank
    order, pos = torch.randperm(len(prompts), generator=gen), 0
    kl_coef, start = args.kl_coef, time.time()
    run = Run(args, rt, metrics, torch.nn.ModuleDict(trained), optimizers, scheduler)
    state = run.restore()                             # --resume: everything as it was
    done, kl = run.start_step, 0.0    # for the results: a finished run resumed skips the loop
    if state is None:
        before = evaluate(model, reward_model, tokenizer, held_out, fns, 0, args, rt)
        metrics.log(before, echo=True)
    else:                                             # the prompt sampler and the adaptive β too
        before, kl_coef = state["extra"]["before"], state["extra"]["kl_coef"]
        kl = state["extra"].get("kl", math.nan)       # (not saved by older checkpoints)
        order, pos = state["data"]["order"], state["data"]["pos"]
        gen.set_state(state["data"]["generator"])
    bar = tqdm(range(run.start_step, args.max_steps), disable=not rt.is_main, desc="ppo",
               initial=run.start_step, total=args.max_steps)
    for step in bar:
        policy_moves = step >= args.value_warmup   # during the warm-up only the value model learns
        if policy_moves and scheduler.done():      # the clock may end it before the steps
            break
        idx, order, pos = online.draw_prompts(order, pos, gen, args.batch_size,
                                              args.samples_per_prompt, rt.rank, rt.world_size)
        batch, P, roll_stats = batches.ppo_rollout(model, value_model, reward_model, reference,
                                                   tokenizer, [prompts[i] for i in idx],
                                                   [rows[i] for i in idx], fns, args, rt.autocast)
        batch["advantages"], batch["returns"], adv_stats = compute_advantages(batch, kl_coef, args)

        upd = ppo_epochs(train_model, train_value, trained, optimizers, batch, P, step,
                         policy_moves, tol, run, args, rt)
        if policy_moves:
            scheduler.step()

        m = dist.all_reduce_mean({**roll_stats, **adv_stats, **online.mean_stats(upd)})
        if args.target_kl > 0:
            kl_coef = adaptive_kl_update(kl_coef, m["kl"], args.target_kl, args.batch_size,
                                         args.kl_horizon)
        metrics.log({"step": step + 1, **m, "kl_coef": kl_coef, "lr": scheduler.get_last_lr()[0],
                     "skipped": run.skipped})
        done, kl = step + 1, m["kl"]
        bar.set_postfix(rm=f"{m['reward/mean']:.2f}", gold=f"{m['gold/mean']:.2f}",
                        kl=f"{m['kl']:.2f}", clip=f"{m['policy/clipfrac']:.2f}",
                        ev=f"{m['value/explained_variance']:.2f}")
        if due(args.eval_every, step, step + 1) and step + 1 < args.max_steps:
            metrics.log(evaluate(model, reward_model, tokenizer, held_out, fns, step + 1, args, rt),
                        echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order,
                                              "pos": pos},
                           lambda: {"before": before, "kl_coef": kl_coef, "kl": kl}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start
    if rt.is_main:
        print(f"stopped by {scheduler.stopped_by or 'max_steps'}: {done} iterations in "
              f"{scheduler.minutes():.1f} min")

    # ------------------------------------------------------------------------ eval
    after = evaluate(model, reward_model, tokenizer, held_out, fns, done, args, rt)
    metrics.log(after, echo=True)
    final = {"iterations": done, "stopped_by": scheduler.stopped_by or "max_steps",
             "train_minutes": train_time / 60,
             "seconds_per_iteration": train_time / max(done - run.start_step, 1),
             **online.before_and_after(before, after), "kl": kl, "kl_coef": kl_coef,
             "peak_rss_mb": peak_rss_mb()}
    metrics.log(final, echo=True)

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "ppo", final)
        save_peft(to_save, args.out_dir, args.peft, args.merge, tokenizer,
                  base_model_name_or_path=args.init,
                  extra_config={"minipost": {"stage": "ppo", "args": asdict(args),
                                             "results": final}})
        print(f"saved the PPO policy to {args.out_dir}")
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
