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
same network with its adapters switched off (`peft.reference_off`), again no second copy. At step 0
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
"""
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm import tqdm

from minipost import dist, tasks
from minipost.cli import (Metrics, StageArgs, check_vocab, difficulty_arg, load_script_tokenizer,
                          parse_args, peak_rss_mb, require_checkpoint, setup, torch_dtype,
                          user_errors, write_results)
from minipost.data import collate_preference, encode_preference, load_jsonl
from minipost.dpo import dpo_loss, pair_logps
from minipost.errors import UserError
from minipost.evaluate import chat_prompt_ids, complete, evaluate_task, heldout_problems
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, reference_off, save_peft, trainable_summary
from minipost.resume import Run, due
from minipost.rollout import sampled_pairs


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs):
    init: str = "out/sft"           # policy to start from (the SFT model), any HF-format directory
    out_dir: str = "out/dpo"        # where the trained policy, metrics.jsonl and results.json go
    data: str = ""                  # preference JSONL ("" = the built-in pairs)
    eval_data: str = ""             # held-out preference JSONL ("" = built-in, or 10% of --data)
    difficulty: str = tasks.DEFAULT_DIFFICULTY  # task of the built-in pairs and the evaluation
    pairs: Literal["sampled", "planted"] = "sampled"  # built-in arithmetic pairs: sampled (the policy's own) | planted
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


def main(args: Args):
    rt = setup(args)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume))
    require_checkpoint(args.init, "python train_sft.py")
    if args.batch_size <= 0 or args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not a positive multiple of the "
                        f"{rt.world_size} processes")
    if args.beta <= 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if args.samples < 1 or args.sample_temperature <= 0:
        raise UserError(f"--samples must be >= 1 and --sample-temperature > 0, got "
                        f"{args.samples} and {args.sample_temperature}")
    difficulty = difficulty_arg(args.difficulty)
    tokenizer = load_script_tokenizer(args.init, args.chat_template)
    dtype = torch_dtype(args.dtype)
    model = load_model(args.init, dtype=dtype, device=rt.device)
    check_vocab(tokenizer, model, args.init)

    # ------------------------------------------------------------------------ data
    if args.data:
        train_rows = load_jsonl(args.data, "preference")
        if args.eval_data:
            eval_rows = load_jsonl(args.eval_data, "preference")
        else:  # the last 10% of the file is held out
            n_eval = max(1, len(train_rows) // 10)
            train_rows, eval_rows = train_rows[:-n_eval], train_rows[-n_eval:]
    else:
        if args.pairs == "planted":
            arithmetic = tasks.preference_pairs(args.n_pairs, "train", difficulty, seed=args.seed + 1)
        else:
            t0 = time.time()
            arithmetic = sampled_pairs(model, tokenizer, tasks.make_problems(
                args.n_pairs, "train", difficulty, seed=args.seed + 1), args.samples,
                args.sample_temperature, args.max_new_tokens, args.seed, rt.autocast,
                show_progress=rt.is_main)
            if rt.is_main:
                print(f"sampled pairs: {len(arithmetic)} of {args.n_pairs} problems have a wrong "
                      f"answer among {args.samples} samples ({time.time() - t0:.0f}s)")
        train_rows = arithmetic + tasks.identity_pairs(args.n_identity, "train", seed=args.seed)
        eval_rows = (tasks.preference_pairs(args.eval_pairs, "test", difficulty, seed=0)
                     + tasks.identity_pairs(min(args.n_identity, args.eval_pairs // 4), "test", 1))
    if not train_rows:
        raise UserError("no training pairs (--n-pairs and --n-identity are both 0)")
    train = [encode_preference(tokenizer, r, args.max_length) for r in train_rows]
    held_out = [encode_preference(tokenizer, r, args.max_length) for r in eval_rows]
    if not held_out:
        raise UserError("no held-out pairs: --eval-pairs must be >= 1")
    if rt.is_main:
        print(f"data: {len(train)} training pairs ({sum(e[4] for e in train)} truncated to "
              f"{args.max_length} tokens), {len(held_out)} held-out pairs")

    def batch_of(encoded, idx):
        batch = collate_preference([encoded[i] for i in idx], tokenizer.pad_token_id)
        return {k: v.to(rt.device) for k, v in batch.items()}

    # ------------------------------------------------------------------------ models
    ref_model = None

    @torch.no_grad()
    def all_logps(net, encoded, batch_size=64):
        """(chosen, rejected) summed log-probs of every pair of `encoded` (each rank computes all)."""
        was_training = net.training
        net.eval()
        with dist.gathered(net):                         # FSDP: one all-gather, not one a batch
            out = [pair_logps(net, batch_of(encoded, range(s, min(s + batch_size, len(encoded)))),
                              rt.autocast) for s in range(0, len(encoded), batch_size)]
        net.train(was_training)
        return torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])

    precomputed = None
    if args.precompute_ref:  # the model about to train IS the reference: score the data with it
        t0 = time.time()
        precomputed = all_logps(model, train)
        if rt.is_main:
            print(f"reference log-probs of {len(train)} pairs precomputed in {time.time() - t0:.1f}s")
    model = add_peft(model, args)
    if args.peft == "none" and not args.precompute_ref:
        ref_model = load_model(args.init, dtype=dtype, device=rt.device).eval()  # frozen copy
        ref_model.requires_grad_(False)
    if rt.is_main:
        ref = ("precomputed" if precomputed is not None else
               "a frozen copy" if ref_model is not None else "the policy with its adapters off")
        print(f"policy from {args.init}: {trainable_summary(model)}; reference: {ref}")
    set_gradient_checkpointing(model, args.grad_checkpointing)
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = CosineSchedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)

    @torch.no_grad()
    def reference_logps(idx, batch):
        if precomputed is not None:
            return precomputed[0][idx].to(rt.device), precomputed[1][idx].to(rt.device)
        if ref_model is not None:
            return pair_logps(ref_model, batch, rt.autocast)
        with reference_off(model):
            was_training = model.training
            model.eval()
            logps = pair_logps(model, batch, rt.autocast)
            model.train(was_training)
            return logps

    # ------------------------------------------------------------------------ eval
    identity_prompts = tasks.identity_prompts("test")

    def evaluate(ref_held_out=None, tasks_too=True):
        """Held-out preference accuracy (and implicit-reward accuracy vs the reference's log-probs),
        task accuracy and the identity demo."""
        chosen, rejected = all_logps(model, held_out)
        res = {"eval/preference_accuracy": (chosen > rejected).float().mean().item()}
        if ref_held_out is not None:
            res["eval/rewards/accuracies"] = ((chosen - ref_held_out[0]) >
                                              (rejected - ref_held_out[1])).float().mean().item()
        if tasks_too and args.eval_problems:
            task = evaluate_task(model, tokenizer, heldout_problems(args.difficulty,
                                                                    args.eval_problems),
                                 max_new_tokens=args.max_new_tokens, autocast=rt.autocast)
            res.update({"eval/accuracy": task["accuracy"], "eval/accuracy_ci95": task["accuracy_ci95"],
                        "eval/well_formed": task["well_formed"], "eval/n": task["n"]})
        if tasks_too:
            answers = complete(model, tokenizer, [chat_prompt_ids(tokenizer, p)
                                                  for p in identity_prompts],
                               max_new_tokens=args.max_new_tokens, autocast=rt.autocast)
            res["eval/identity"] = sum(map(tasks.says_name, answers)) / len(answers)
            res["eval/identity_example"] = f"{identity_prompts[0]!r} -> {answers[0]!r}"
        return (chosen, rejected), res

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)   # the same data order on every rank
    order = torch.randperm(len(train), generator=gen)
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is None:
        t0 = time.time()
        ref_held_out, before = evaluate()             # policy = reference: its log-probs ARE π_ref's
        before = {k.replace("eval/", "before/"): v for k, v in before.items()}
        metrics.log({"step": 0, **before, "eval_seconds": time.time() - t0}, echo=True)
        first = None
    else:
        ref_held_out, before, first = (state["extra"][k] for k in ("ref_held_out", "before", "first"))
        order = state["data"]["order"]
        gen.set_state(state["data"]["generator"])
    per_rank = args.batch_size // rt.world_size
    start = time.time()
    bar = tqdm(range(run.start_step, args.max_steps), disable=not rt.is_main, desc="dpo",
               initial=run.start_step, total=args.max_steps)
    for step in bar:
        pos = (step * args.batch_size) % len(train)
        if pos + args.batch_size > len(train):         # a new epoch, a new order
            order = torch.randperm(len(train), generator=gen)
        idx = order[pos:pos + args.batch_size][rt.rank * per_rank:(rt.rank + 1) * per_rank]
        batch = batch_of(train, idx)
        ref_chosen_logps, ref_rejected_logps = reference_logps(idx, batch)
        chosen_logps, rejected_logps = pair_logps(train_model, batch, rt.autocast)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type)
        loss = losses.mean()
        if args.rpo_alpha:  # RPO (Pang et al. 2024, arXiv 2404.19733): L_DPO + α·NLL(chosen)/|y_w|
            n_chosen = batch["loss_mask"][:, 1:].sum(1).chunk(2)[0].clamp(min=1)     # (B,)
            loss = loss + args.rpo_alpha * (-chosen_logps / n_chosen).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_gradients(model, args.grad_clip)
        if run.finite(step, losses, gnorm):             # else --skip-nonfinite: a skipped step
            optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == args.max_steps - 1:
            m = dist.all_reduce_mean({
                "loss": loss.item(), "loss/dpo": losses.mean().item(),     # loss = dpo + α·NLL
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                "logps/chosen": chosen_logps.mean().item(),
                "logps/rejected": rejected_logps.mean().item(),
                # drift of the chosen completions' log-prob from the initial policy's
                "logps/chosen_drift": (chosen_logps - ref_chosen_logps).mean().item()})
            first = first or m
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}",
                            margin=f"{m['rewards/margins']:.2f}")
            metrics.log({"step": step, **m, "grad_norm": float(gnorm),
                         "lr": scheduler.get_last_lr()[0], "skipped": run.skipped})
        if due(args.eval_every, step, step + 1) and step + 1 < args.max_steps:
            metrics.log({"step": step + 1, **evaluate(ref_held_out, tasks_too=False)[1]}, echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order},
                           lambda: {"ref_held_out": ref_held_out, "before": before, "first": first}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start

    # ------------------------------------------------------------------------ eval
    first = first or {}                  # --max-steps 0: the loop that sets it never ran
    final = {"step": args.max_steps, **before, **evaluate(ref_held_out)[1],
             "loss_step0": first.get("loss/dpo"),
             "rewards/margins_step0": first.get("rewards/margins"),
             "train_minutes": train_time / 60,
             "pairs_per_s": (args.max_steps - run.start_step) * args.batch_size
             / max(train_time, 1e-9),
             "reference": "precomputed" if args.precompute_ref else
                          "adapters_off" if args.peft != "none" else "copy",
             "peak_rss_mb": peak_rss_mb()}
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
        main(parse_args(Args, description=__doc__))
