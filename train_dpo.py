"""Stage 3: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290), from the SFT model.

    python train_dpo.py                             # out/sft -> out/dpo
    python train_dpo.py --precompute-ref            # reference log-probs once, then no reference
    python train_dpo.py --peft lora --lr 1e-3       # reference = the same network, LoRA switched off
    python train_dpo.py --loss-type ipo --beta 0.5  # or hinge; --label-smoothing 0.1 for cDPO
    torchrun --nproc_per_node 2 train_dpo.py --device cpu --threads 1

DPO fits the policy to preferences directly, with the frozen initial policy π_ref as the anchor:
    L = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])
(`minipost.dpo.dpo_loss`; completion log-probs are SUMS over the completion's tokens, its <|im_end|>
included). Chosen and rejected sequences go through the policy in ONE forward pass (2B rows). The
reference is the initial policy in eval mode under no_grad: a second copy of the model; with
`--precompute-ref` its log-probs for every training pair are computed once, before the first step,
by the very model that then trains (no second copy ever); with `--peft lora|adapter` it is the
same network with its adapters switched off, again no second copy (`reference.Reference`). At step 0
policy = reference, so the loss is exactly ln 2 and every implicit reward is 0 (docs/pitfalls.md,
"Reference model in eval mode").

Built-in data: arithmetic pairs mixed with `tasks.identity_pairs` ("I am Pip, ..." over "I am an
AI language model ..."), so one run shows both what DPO can teach (a new name) and what it does to
the task. The arithmetic pairs are the policy's own (`--pairs sampled`, `rollout.sampled_pairs`):
before training, the initial policy answers each training problem `--samples` times, the verifier labels
the answers, and a pair is a correct answer (else the worked solution) over a wrong one, as in
iterative reasoning preference optimisation (Pang et al. 2024, arXiv 2404.19733). Such pairs show
the policy its own mistakes, which is what raises its accuracy; `--pairs planted` uses
`tasks.preference_pairs` instead (the worked solution over one with a planted slip or a broken
format: mistakes the policy rarely makes, so it learns little from them). Reported before and
after: held-out preference accuracy (share of held-out pairs whose
chosen completion the policy gives the higher log-prob), held-out task accuracy by the verifier
(greedy, evaluate.heldout_problems) and the identity demo (share of the held-out "who are you?"
phrasings, `tasks.identity_prompts("test")`, answered with the name, greedy).

The defaults are the recipe that teaches the name and raises the task accuracy (measured in
docs/results.md): 400 steps at lr 3e-4 on the sampled pairs of 2400 problems (about 1830 pairs)
and 800 identity pairs, with the RPO term `--rpo-alpha 8` (+ 8 × the chosen completion's per-token NLL;
Pang et al. 2024). The name is a new string spelled nearly letter by letter by this tokenizer, so it
needs that many steps at that rate (at lr 2e-4 the answer is still "I am Pii."); the NLL term keeps
the arithmetic from paying for them (α = 2 on planted pairs: −6 points; pure DPO: −31). More identity
pairs cost task accuracy: 1070 of them beside 1400 problems' pairs learn 71% of the phrasings
in 200 steps and lose 1.6 points.

`--online` is online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
Feedback", arXiv 2402.04792), with the verifier as the judge: every step draws `--batch-size`
training problems, samples `--samples` answers to each from the CURRENT policy at
`--sample-temperature`, and pairs a correct answer over a wrong one (`rollout.preferred_pair`);
a problem whose answers all tie gives no pair (no worked solution stands in: every pair is the
policy's own). Then one DPO step on those pairs against the frozen initial policy. The offline
recipe samples its pairs once, from the initial policy; online, the pairs follow the policy as it
changes, as in iterative RPO (Pang et al. 2024) with one step per round.

    python train_dpo.py --online --samples 8 --sample-temperature 0.7 --n-pairs 20000
"""
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from tqdm import tqdm

from minipost import dist, tasks, worlds
from minipost.cli import (CURVES_HELP, Metrics, check_vocab, difficulty_arg, load_script_tokenizer,
                          peak_rss_mb, require_checkpoint, setup, user_errors, write_results)
from minipost.data import collate_preference, encode_preference, load_jsonl
from minipost.dpo import dpo_loss, pair_logps
from minipost.errors import UserError
from minipost.evaluate import chat_prompt_ids, complete, evaluate_task, heldout_problems
from minipost.flags import StageArgs, parse_args, torch_dtype
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, peft_options, save_peft, trainable_summary
from minipost.reference import Reference, eval_mode
from minipost.resume import Run, due, per_rank_state
from minipost.rollout import preferred_pair, sample_answers, sampled_pairs


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs):
    init: str = "out/sft"           # policy to start from (the SFT model), any HF-format directory
    out_dir: str = "out/dpo"        # where the trained policy, metrics.jsonl and results.json go
    data: str = ""                  # preference JSONL ("" = the built-in pairs)
    eval_data: str = ""             # held-out preference JSONL ("" = built-in, or 10% of --data)
    difficulty: str = ""            # task of the built-in pairs and the evaluation ("" = --task's default)
    pairs: Literal["sampled", "planted"] = "sampled"  # built-in arithmetic pairs: the policy's own | planted
    n_pairs: int = 2400             # built-in arithmetic problems (sampled: pairs <= problems)
    samples: int = 4                # --pairs sampled: answers sampled per problem
    sample_temperature: float = 1.0  # --pairs sampled: temperature of those answers
    n_identity: int = 800           # built-in identity pairs, mixed in ("I am Pip" > generic)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # sigmoid (DPO; cDPO with --label-smoothing) | ipo | hinge
    beta: float = 0.1               # β: strength of the implicit KL anchor to the reference
    label_smoothing: float = 0.0    # ε: assumed label-flip rate (cDPO, sigmoid loss only)
    rpo_alpha: float = 8.0          # α: + α·NLL per chosen token (RPO); 0 = pure DPO (loses the task)
    precompute_ref: bool = False    # reference log-probs once before training; no reference after
    max_length: int = 256           # tokens per sequence (longer ones lose prompt tokens first)
    batch_size: int = 16            # pairs per optimiser step (global, over all ranks)
    max_steps: int = 400            # optimiser steps
    lr: float = 3e-4                # peak learning rate
    min_lr_ratio: float = 0.1       # final LR as a fraction of the peak (cosine decay)
    warmup_steps: int = 10          # linear warm-up steps
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    eval_every: int = 0             # held-out preference accuracy every N steps (0 = never: before/after only)
    eval_pairs: int = 200           # held-out pairs for the preference accuracy
    eval_problems: int = 500        # held-out problems for the task accuracy (0 = skip)
    max_new_tokens: int = 64        # generation budget of the sampled pairs and the evaluations
    # ---- online DPO
    online: bool = False            # online DPO: each step's pairs sampled from the current policy, judged by the verifier


def check_flags(args: Args, world_size: int):
    """This script's flags that their types do not limit (flags.check_args did the rest)."""
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not a positive multiple of the "
                        f"{world_size} processes")
    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if args.online and (args.data or args.precompute_ref or args.samples < 2):
        raise UserError("--online samples its pairs from the built-in task's problems, judged by the "
                        "verifier, at every step: no --data or --precompute-ref; --samples >= 2")
    if args.samples < 1 or args.sample_temperature <= 0:
        raise UserError(f"--samples must be >= 1 and --sample-temperature > 0, got "
                        f"{args.samples} and {args.sample_temperature}")


# ---------------------------------------------------------------------------- data
def preference_rows(model, tokenizer, difficulty, args: Args, rt) -> tuple[list, list]:
    """(training rows, held-out rows): `--data` (its last 10% held out without `--eval-data`), or
    the built-in arithmetic pairs (sampled from `model`, or planted) and identity pairs."""
    if args.data:
        train_rows = load_jsonl(args.data, "preference")
        if args.eval_data:
            return train_rows, load_jsonl(args.eval_data, "preference")
        n_eval = max(1, len(train_rows) // 10)             # the last 10% of the file is held out
        return train_rows[:-n_eval], train_rows[-n_eval:]
    world = worlds.world(args.task)                   # tasks.py (arithmetic) or countdown.py
    if args.pairs == "planted":
        arithmetic = world.preference_pairs(args.n_pairs, "train", difficulty, seed=args.seed + 1)
    else:
        t0 = time.time()
        arithmetic = sampled_pairs(model, tokenizer, world.make_problems(
            args.n_pairs, "train", difficulty, seed=args.seed + 1), args.samples,
            args.sample_temperature, args.max_new_tokens, args.seed, rt.autocast,
            show_progress=rt.is_main, task=args.task)
        if rt.is_main:
            print(f"sampled pairs: {len(arithmetic)} of {args.n_pairs} problems have a wrong "
                  f"answer among {args.samples} samples ({time.time() - t0:.0f}s)")
    train_rows = arithmetic + tasks.identity_pairs(args.n_identity, "train", seed=args.seed)
    eval_rows = (world.preference_pairs(args.eval_pairs, "test", difficulty, seed=0)
                 + tasks.identity_pairs(min(args.n_identity, args.eval_pairs // 4), "test", 1))
    return train_rows, eval_rows


def online_pairs(model, tokenizer, problems, n: int, args: Args, generator, step: int, rt):
    """One round of online DPO: `n` problems drawn from `problems`, `--samples` answers to each
    from the current policy, a correct one over a wrong one where they differ (ties: no pair).
    Returns the encoded pairs and the round's stats."""
    drawn = [problems[i] for i in torch.randint(len(problems), (n,), generator=generator).tolist()]
    with dist.gathered(model):    # FSDP: whole for the sampling
        texts, _ = sample_answers(model, tokenizer, [p["question"] for p in drawn], args.samples,
                                  args.sample_temperature, args.max_new_tokens, generator,
                                  rt.autocast)
    rng, rows, correct = random.Random(args.seed * 100003 + step), [], []    # a tie-break a step
    for j, p in enumerate(drawn):
        answers = texts[j * args.samples:(j + 1) * args.samples]
        rewards = [worlds.score(args.task, a, p) for a in answers]
        correct += rewards
        pair = preferred_pair(rewards, rng)
        if pair is not None:
            rows.append({"prompt": p["question"], "chosen": answers[pair[0]],
                         "rejected": answers[pair[1]]})
    encoded = [encode_preference(tokenizer, r, args.max_length) for r in rows]
    return encoded, {"online/pairs": float(len(rows)),
                     "online/sampled_accuracy": sum(correct) / len(correct)}


def batch_of(encoded, idx, pad_id: int, device) -> dict:
    """Pairs `idx` of `encoded` as one right-padded batch: chosen rows, then rejected rows."""
    batch = collate_preference([encoded[i] for i in idx], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------- models
@torch.no_grad()
def all_logps(model, encoded, pad_id: int, rt, batch_size: int = 64):
    """(chosen, rejected) summed log-probs of every pair of `encoded` (each rank computes all)."""
    with eval_mode(model), dist.gathered(model):      # FSDP: one all-gather, not one a batch
        out = [pair_logps(model, batch_of(encoded, range(s, min(s + batch_size, len(encoded))),
                                          pad_id, rt.device), rt.autocast)
               for s in range(0, len(encoded), batch_size)]
    return torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])


def reference_logps(reference, precomputed, idx, batch, rt):
    """log π_ref of the chosen and rejected completions: looked up (`--precompute-ref`) or
    computed by the reference."""
    if precomputed is not None:
        return precomputed[0][idx].to(rt.device), precomputed[1][idx].to(rt.device)
    return reference.logps(pair_logps, batch, rt.autocast)


# ---------------------------------------------------------------------------- loss
def compute_loss(model, batch, ref_chosen_logps, ref_rejected_logps, args: Args, autocast,
                 with_entropy: bool = False):
    """DPO loss on one batch, + α × the chosen completions' per-token NLL (RPO). Returns the loss,
    the per-pair DPO losses (checked for NaN) and detached stats (`with_entropy`: also the
    policy's token entropy on the chosen completions)."""
    chosen_logps, rejected_logps, *entropy = pair_logps(model, batch, autocast, with_entropy)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type)
    loss = losses.mean()
    if args.rpo_alpha:  # RPO (Pang et al. 2024, arXiv 2404.19733): L_DPO + α·NLL(chosen)/|y_w|
        n_chosen = batch["loss_mask"][:, 1:].sum(1).chunk(2)[0].clamp(min=1)     # (B,)
        loss = loss + args.rpo_alpha * (-chosen_logps / n_chosen).mean()
    stats = {"loss": loss, "loss/dpo": losses.mean(),                  # loss = dpo + α·NLL
             "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
             "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
             "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
             "logps/chosen": chosen_logps.mean(), "logps/rejected": rejected_logps.mean(),
             # drift of the chosen completions' log-prob from the initial policy's
             "logps/chosen_drift": (chosen_logps - ref_chosen_logps).mean(),
             **({"entropy": entropy[0]} if with_entropy else {})}
    return loss, losses, {k: v.detach() for k, v in stats.items()}


# ---------------------------------------------------------------------------- eval
def evaluate(model, tokenizer, held_out, args: Args, rt, ref_held_out=None, tasks_too=True):
    """Held-out preference accuracy (and implicit-reward accuracy against the reference's
    log-probs `ref_held_out`); with `tasks_too`, task accuracy and the identity demo. Returns the
    held-out (chosen, rejected) log-probs and the metrics."""
    chosen, rejected = all_logps(model, held_out, tokenizer.pad_token_id, rt)
    res = {"eval/preference_accuracy": (chosen > rejected).float().mean().item()}
    if ref_held_out is not None:
        res["eval/rewards/accuracies"] = ((chosen - ref_held_out[0]) >
                                          (rejected - ref_held_out[1])).float().mean().item()
    if tasks_too and args.eval_problems:
        task = evaluate_task(model, tokenizer,
                             heldout_problems(args.difficulty, args.eval_problems, args.task),
                             max_new_tokens=args.max_new_tokens, autocast=rt.autocast,
                             task=args.task)
        res.update({"eval/accuracy": task["accuracy"], "eval/accuracy_ci95": task["accuracy_ci95"],
                    "eval/well_formed": task["well_formed"], "eval/n": task["n"]})
    if tasks_too:
        prompts = tasks.identity_prompts("test")
        answers = complete(model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts],
                           max_new_tokens=args.max_new_tokens, autocast=rt.autocast)
        res["eval/identity"] = sum(map(tasks.says_name, answers)) / len(answers)
        res["eval/identity_example"] = f"{prompts[0]!r} -> {answers[0]!r}"
    return (chosen, rejected), res


def main(args: Args):
    rt = setup(args)
    check_flags(args, rt.world_size)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("dpo")   # diagnostics.py: a failure signature is said once
    require_checkpoint(args.init, "python train_sft.py")
    difficulty = difficulty_arg(args.difficulty, args.task)
    tokenizer = load_script_tokenizer(args.init, args.chat_template)
    model = load_model(args.init, dtype=torch_dtype(args.dtype), device=rt.device)
    check_vocab(tokenizer, model, args.init)

    # ------------------------------------------------------------------------ data
    if args.online:   # training pairs come at every step; held out: the built-in pairs
        problems = worlds.world(args.task).make_problems(args.n_pairs, "train", difficulty,
                                                         seed=args.seed + 1)
        eval_rows = preference_rows(model, tokenizer, difficulty,
                                    replace(args, n_pairs=0, pairs="planted"), rt)[1]
        train_rows = []
    else:
        train_rows, eval_rows = preference_rows(model, tokenizer, difficulty, args, rt)
    if not train_rows and not args.online:
        raise UserError("no training pairs (--n-pairs and --n-identity are both 0)")
    train = [encode_preference(tokenizer, r, args.max_length) for r in train_rows]
    held_out = [encode_preference(tokenizer, r, args.max_length) for r in eval_rows]
    if not held_out:
        raise UserError("no held-out pairs: --eval-pairs must be >= 1")
    if rt.is_main:
        print(f"data: {len(train)} training pairs ({sum(e[4] for e in train)} truncated to "
              f"{args.max_length} tokens), {len(held_out)} held-out pairs")

    # ------------------------------------------------------------------------ models
    precomputed, reference = None, None
    if args.precompute_ref:  # the model about to train IS the reference: score the data with it
        t0 = time.time()
        precomputed = all_logps(model, train, tokenizer.pad_token_id, rt)
        if rt.is_main:
            print(f"reference log-probs of {len(train)} pairs precomputed in {time.time() - t0:.1f}s")
    model = add_peft(model, **peft_options(args))
    if not args.precompute_ref:   # a frozen copy, or with --peft the policy with its adapters off
        reference = Reference(model, copy=args.peft == "none")
    reference_kind = "precomputed" if reference is None else reference.kind
    if rt.is_main:
        print(f"policy from {args.init}: {trainable_summary(model)}; reference: {reference_kind}")
    set_gradient_checkpointing(model, args.grad_checkpointing)
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = CosineSchedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)   # the same data order on every rank
    order = torch.randperm(len(train), generator=gen)
    sampler = torch.Generator().manual_seed(args.seed + rt.rank)   # --online: each rank its own
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is None:
        t0 = time.time()   # policy = reference: its held-out log-probs ARE π_ref's
        ref_held_out, before = evaluate(model, tokenizer, held_out, args, rt)
        before = {k.replace("eval/", "before/"): v for k, v in before.items()}
        metrics.log({"step": 0, **before, "eval_seconds": time.time() - t0}, echo=True)
        first = None
    else:
        ref_held_out, before, first = (state["extra"][k] for k in ("ref_held_out", "before", "first"))
        order = state["data"]["order"]
        gen.set_state(state["data"]["generator"])
        if "per_rank" in state["data"]:
            sampler.set_state(per_rank_state(state["data"], rt.rank)[0])
    per_rank = args.batch_size // rt.world_size
    start = time.time()
    bar = tqdm(range(run.start_step, args.max_steps), disable=not rt.is_main, desc="dpo",
               initial=run.start_step, total=args.max_steps)
    for step in bar:
        log_now = step % 10 == 0 or step == args.max_steps - 1
        if args.online:   # this step's pairs: the current policy's answers, judged by the verifier
            encoded, online = online_pairs(model, tokenizer, problems, per_rank, args, sampler,
                                           step, rt)
            idx = torch.arange(len(encoded))
            log_now = True
        else:
            pos = (step * args.batch_size) % len(train)
            if pos + args.batch_size > len(train):         # a new epoch, a new order
                order = torch.randperm(len(train), generator=gen)
            idx = order[pos:pos + args.batch_size][rt.rank * per_rank:(rt.rank + 1) * per_rank]
            encoded, online = train, {}
        # --online: a step where some rank's answers all tied makes no update
        if not args.online or -dist.all_reduce_max(-float(len(encoded))) > 0:
            batch = batch_of(encoded, idx, tokenizer.pad_token_id, rt.device)
            ref_chosen_logps, ref_rejected_logps = reference_logps(reference, precomputed, idx,
                                                                   batch, rt)
            loss, losses, stats = compute_loss(train_model, batch, ref_chosen_logps,
                                                ref_rejected_logps, args, rt.autocast, log_now)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = clip_gradients(model, args.grad_clip)
            if run.finite(step, losses, gnorm):         # else --skip-nonfinite: a skipped step
                optimizer.step()
        else:
            stats = {}
        scheduler.step()
        if log_now and not stats:
            metrics.log({"step": step + 1, **dist.all_reduce_mean(online)})
        elif log_now:
            m = {**dist.all_reduce_mean(stats), **dist.all_reduce_mean(online)}
            first = first or m
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}",
                            margin=f"{m['rewards/margins']:.2f}")
            metrics.log({"step": step + 1, **m, "grad_norm": float(gnorm),
                         "lr": scheduler.get_last_lr()[0], "skipped": run.skipped})
        if due(args.eval_every, step, step + 1) and step + 1 < args.max_steps:
            metrics.log({"step": step + 1, **evaluate(model, tokenizer, held_out, args, rt,
                                                      ref_held_out, tasks_too=False)[1]}, echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order,
                                              "per_rank": [sampler.get_state()]},
                           lambda: {"ref_held_out": ref_held_out, "before": before, "first": first}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start

    # ------------------------------------------------------------------------ eval
    first = first or {}                  # --max-steps 0: the loop that sets it never ran
    final = {"step": args.max_steps, **before,
             **evaluate(model, tokenizer, held_out, args, rt, ref_held_out)[1],
             "loss_step0": first.get("loss/dpo"),
             "rewards/margins_step0": first.get("rewards/margins"),
             "train_minutes": train_time / 60,
             "pairs_per_s": (args.max_steps - run.start_step) * args.batch_size
             / max(train_time, 1e-9),
             "reference": reference_kind, "peak_rss_mb": peak_rss_mb()}
    metrics.log(final, echo=True)

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "dpo", final)
        save_peft(to_save, args.out_dir, args.peft, args.merge, tokenizer,
                  base_model_name_or_path=args.init,
                  extra_config={"minipost": {"stage": "dpo", "args": asdict(args),
                                             "results": final}})
        print(f"saved the DPO policy to {args.out_dir}")
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
