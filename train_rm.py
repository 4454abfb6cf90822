"""Stage 2: a Bradley-Terry reward model on preference pairs, started from the SFT model.

    python train_rm.py                              # out/sft -> out/rm
    python train_rm.py --data prefs.jsonl           # your {"prompt", "chosen", "rejected"} JSONL
    torchrun --nproc_per_node 2 train_rm.py --device cpu --threads 1

The reward model is the SFT decoder with its LM head replaced by a zero-initialised scalar head
(`score`, HF's *ForSequenceClassification with num_labels = 1), read at the <|im_end|> that ends each
completion (docs/pitfalls.md, "Reward-model score position"). The loss is Bradley-Terry (Ouyang
et al. 2022, arXiv 2203.02155):
    L = −mean_b log σ(r(x, y_c) − r(x, y_r) − m_b),
with an optional per-pair margin m_b (Llama 2) read from a `"margin"` field of `--data` rows. The
chosen and rejected sequences of a batch go through the model in ONE forward pass (2B rows).
Two more terms, both on by default, make the difference on the built-in task (held-out accuracy
0.67 without them, 0.93 with them):
  + `--prefix-weight` × the same loss at every position after the first token where chosen and
    rejected part (`reward.prefix_bradley_terry_loss`): the score is told WHERE the flaw is, the
    slipped digit, instead of only that the last token follows one;
  + `--lm-weight` × next-token loss on the chosen completions, through the tied embeddings: the
    decoder keeps (and sharpens) the arithmetic the SFT model knows, which checking a step needs
    (regularising a reward model with an SFT loss: Yang et al. 2024, arXiv 2406.10216).

Built-in data: `tasks.preference_pairs` (chosen = a correct worked solution; rejected = the same
solution with a planted arithmetic slip, or a broken answer format) and `--n-identity` pairs that
prefer the assistant's name. The SFT policy's own answers make held-out pairs too
(`--eval-policy-problems`): it answers each problem `--samples` times, the verifier labels them,
and a problem with a wrong answer gives a (correct answer or worked solution, wrong answer) pair
(`rollout.sampled_pairs`) — the mistakes PPO's samples will make, so `eval_policy/accuracy` is the
number PPO's gain follows. `--policy-problems N` trains on such pairs of N training problems as
well (off by default: in two runs the planted accuracy fell to 0.91 and 0.86; see docs/results.md).
It reports held-out pairwise accuracy on the held-out problems (evaluate.heldout_problems'
problems, with their rejected twins) and saves a checkpoint that
`transformers.AutoModelForSequenceClassification` loads as it is (pad_token_id set), with the
held-out reward mean/std in config.json (PPO may normalise rewards with them; docs/pitfalls.md,
"Masked whitening").
Its chat template ends a chat at the <|im_end|> the score is read at (`tokenizer.score_tokenizer`),
so `apply_chat_template` + AutoModelForSequenceClassification score a chat as minipost does.
With `--peft lora` it saves an adapter of PEFT task type SEQ_CLS with the `score` head in
modules_to_save: `peft.AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1)`
loads it on its base (num_labels, since the base is a language model, whose config has none).
"""
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from minipost import dist, tasks, worlds
from minipost.cli import (CURVES_HELP, Metrics, check_vocab, difficulty_arg, load_script_tokenizer,
                          peak_rss_mb, require_checkpoint, setup, user_errors, write_results)
from minipost.data import collate_preference, encode_preference, load_jsonl
from minipost.errors import UserError
from minipost.flags import StageArgs, parse_args, torch_dtype
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, peft_options, save_peft, trainable_summary
from minipost.resume import Run, due
from minipost.reward import (bradley_terry_loss, last_scores, pair_rewards, prefix_bradley_terry_loss,
                             reward_metrics)
from minipost.rollout import sampled_pairs
from minipost.sft import sft_loss_sum
from minipost.tokenizer import score_tokenizer


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs):
    init: str = "out/sft"           # model to start from (the SFT model), any HF-format directory
    out_dir: str = "out/rm"         # where the reward model, metrics.jsonl and results.json go
    data: str = ""                  # preference JSONL ("" = the built-in pairs)
    eval_data: str = ""             # held-out preference JSONL ("" = built-in, or 10% of --data)
    difficulty: str = ""            # task of the built-in pairs ("" = --task's default)
    n_pairs: int = 20000            # built-in training pairs (arithmetic)
    n_identity: int = 200           # built-in identity pairs ("I am Pip" over a generic answer)
    policy_problems: int = 0        # built-in data: + the --init policy's own answers to N problems
    samples: int = 4                # answers sampled per problem for those pairs
    sample_temperature: float = 1.0  # temperature of those answers
    max_new_tokens: int = 64        # answer budget of those samples
    eval_policy_problems: int = 200  # held-out problems whose policy answers are held-out pairs
    prefix_weight: float = 4.0      # + w × Bradley-Terry at each position after the two completions part
    lm_weight: float = 1.0          # + w × next-token loss on the chosen completions (0 = off)
    max_length: int = 256           # tokens per sequence (longer ones lose prompt tokens first)
    batch_size: int = 32            # pairs per optimiser step (global, over all ranks)
    max_steps: int = 1200           # optimiser steps
    lr: float = 3e-4                # peak learning rate
    min_lr_ratio: float = 0.1       # final LR as a fraction of the peak (cosine decay)
    warmup_steps: int = 20          # linear warm-up steps
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    eval_every: int = 100           # held-out pairwise accuracy every N steps (0 = never: before/after only)
    eval_problems: int = 500        # held-out problems, each as a (correct, flawed) pair


def check_flags(args: Args, world_size: int):
    """This script's flags that their types do not limit (flags.check_args did the rest)."""
    if args.batch_size <= 0 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not a positive multiple of the "
                        f"{world_size} processes")
    if min(args.policy_problems, args.eval_policy_problems) < 0 or args.samples < 1 or \
            args.sample_temperature <= 0:
        raise UserError(f"--policy-problems and --eval-policy-problems must be >= 0, --samples >= 1 "
                        f"and --sample-temperature > 0, got {args.policy_problems}, "
                        f"{args.eval_policy_problems}, {args.samples} and {args.sample_temperature}")
    if args.prefix_weight < 0 or args.lm_weight < 0:
        raise UserError(f"--prefix-weight and --lm-weight must be >= 0, got {args.prefix_weight} "
                        f"and {args.lm_weight}")


# ---------------------------------------------------------------------------- data
def policy_pairs(args, rt, tokenizer, difficulty) -> tuple[list[dict], list[dict]]:
    """(correct, wrong) pairs of the --init policy's own answers, labelled by the verifier, for
    training (--policy-problems training problems) and held out (--eval-policy-problems of the
    held-out problems): the comparisons are collected where PPO will sample, as InstructGPT
    collects them on the policy's outputs. Every rank samples the same pairs (the same seed)."""
    if not args.policy_problems and not args.eval_policy_problems:
        return [], []
    t0 = time.time()
    policy = load_model(args.init, dtype=torch_dtype(args.dtype), device=rt.device).eval()

    def sample(problems):
        return sampled_pairs(policy, tokenizer, problems, args.samples, args.sample_temperature,
                             args.max_new_tokens, args.seed, rt.autocast, show_progress=rt.is_main,
                             task=args.task)

    world = worlds.world(args.task)
    train = sample(world.make_problems(args.policy_problems, "train", difficulty, seed=args.seed + 2))
    # seed 0: the first of evaluate.heldout_problems' problems
    held_out = sample(world.make_problems(args.eval_policy_problems, "test", difficulty, seed=0))
    if rt.is_main:
        print(f"policy pairs: {len(train)} of {args.policy_problems} training problems and "
              f"{len(held_out)} of {args.eval_policy_problems} held-out ones have a wrong answer "
              f"among {args.samples} samples of {args.init} ({time.time() - t0:.0f}s)")
    return train, held_out


def preference_rows(tokenizer, difficulty, args: Args, rt) -> tuple[list, list, list, list]:
    """(training rows, held-out rows, held-out identity rows, held-out rows of the policy's own
    answers): `--data` (its last 10% held out without `--eval-data`), or the built-in pairs."""
    if args.data:
        train_rows = load_jsonl(args.data, "preference")
        if args.eval_data:
            return train_rows, load_jsonl(args.eval_data, "preference"), [], []
        n_eval = max(1, len(train_rows) // 10)             # the last 10% of the file is held out
        return train_rows[:-n_eval], train_rows[-n_eval:], [], []
    policy_train_rows, policy_eval_rows = policy_pairs(args, rt, tokenizer, difficulty)
    world = worlds.world(args.task)
    train_rows = (world.preference_pairs(args.n_pairs, "train", difficulty, seed=args.seed + 1)
                  + tasks.identity_pairs(args.n_identity, "train", seed=args.seed)
                  + policy_train_rows)
    # seed 0: the very problems of evaluate.heldout_problems, each with a flawed twin
    eval_rows = world.preference_pairs(args.eval_problems, "test", difficulty, seed=0)
    id_eval_rows = tasks.identity_pairs(min(args.n_identity, 100), "test", seed=1)
    return train_rows, eval_rows, id_eval_rows, policy_eval_rows


def batch_of(encoded, idx, pad_id: int, device) -> dict:
    """Pairs `idx` of `encoded` as one right-padded batch: chosen rows, then rejected rows."""
    batch = collate_preference([encoded[i] for i in idx], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------- loss
def compute_loss(model, batch, margins, args: Args, rt):
    """Bradley-Terry at the last token, + w_p × at every prefix after the parting token,
    + w_lm × next-token loss on the chosen completions. Returns the loss and detached stats,
    each part of the loss as loss/*."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0] // 2
    with rt.autocast():
        if args.lm_weight:   # rows 0..B−1 are the chosen completions: their logits only
            scores, logits = model(ids, mask, lm_rows=B)          # (2B, T), (B, T, V)
        else:
            scores = model(ids, mask)                             # (2B, T)
    chosen_rewards, rejected_rewards = last_scores(scores, mask).chunk(2)
    parts = {"loss/bt": bradley_terry_loss(chosen_rewards, rejected_rewards, margins)}
    loss = parts["loss/bt"]
    if args.prefix_weight:
        parts["loss/prefix"] = prefix_bradley_terry_loss(scores, ids, mask)
        loss = loss + args.prefix_weight * parts["loss/prefix"]
    if args.lm_weight:
        nll_sum, n = sft_loss_sum(logits, ids[:B], batch["loss_mask"][:B])
        # a mean over the chosen tokens of ALL ranks (DDP then averages over ranks), so that
        # N processes take the step of one; ranks hold different numbers of tokens
        n_all = dist.all_reduce_sum(n.detach().clone()).clamp(min=1.0)
        parts["loss/lm"] = nll_sum * rt.world_size / n_all
        loss = loss + args.lm_weight * parts["loss/lm"]
    stats = reward_metrics(chosen_rewards, rejected_rewards)
    return loss, {**stats, **{k: v.detach() for k, v in parts.items()}}


# ---------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, encoded, pad_id: int, rt, prefix: str = "eval") -> dict:
    """Pairwise accuracy, mean margin and reward mean/std on held-out pairs (all ranks)."""
    model.eval()
    chosen, rejected = [], []
    mine = dist.shard(list(range(len(encoded))))
    with dist.gathered(model):                       # FSDP: the shards may be uneven
        for s in range(0, len(mine), 64):
            batch = batch_of(encoded, mine[s:s + 64], pad_id, rt.device)
            with rt.autocast():
                c, r = pair_rewards(model, batch["input_ids"], batch["attention_mask"])
            chosen.append(c.float())
            rejected.append(r.float())
    model.train()
    c, r = (torch.cat(x) if x else torch.zeros(0) for x in (chosen, rejected))
    both = torch.cat([c, r]).double().cpu()
    totals = dist.all_reduce_sum(torch.stack([
        (c > r).sum().double().cpu(), (c - r).sum().double().cpu(), both.sum(),
        both.pow(2).sum(), torch.tensor(float(len(c)), dtype=torch.float64)]))
    n = max(totals[4].item(), 1.0)
    mean = totals[2].item() / (2 * n)
    return {f"{prefix}/accuracy": totals[0].item() / n, f"{prefix}/margin": totals[1].item() / n,
            f"{prefix}/reward_mean": mean,
            f"{prefix}/reward_std": math.sqrt(max(totals[3].item() / (2 * n) - mean ** 2, 0.0)),
            f"{prefix}/n": int(totals[4].item())}


def main(args: Args):
    rt = setup(args)
    check_flags(args, rt.world_size)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("rm")   # diagnostics.py: a failure signature is said once
    require_checkpoint(args.init, "python train_sft.py")
    difficulty = difficulty_arg(args.difficulty, args.task)
    tokenizer = load_script_tokenizer(args.init, args.chat_template)
    pad_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------------ data
    train_rows, eval_rows, id_eval_rows, policy_eval_rows = preference_rows(tokenizer, difficulty,
                                                                            args, rt)
    if not train_rows:
        raise UserError("no training pairs (--n-pairs and --n-identity are both 0)")
    train, held_out, id_held_out, policy_held_out = (
        [encode_preference(tokenizer, r, args.max_length) for r in rows]
        for rows in (train_rows, eval_rows, id_eval_rows, policy_eval_rows))
    margins = torch.tensor([float(r.get("margin", 0.0)) for r in train_rows])
    if rt.is_main:
        n_cut = sum(e[4] for e in train)
        print(f"data: {len(train)} training pairs ({n_cut} truncated to {args.max_length} tokens), "
              f"{len(held_out)} held-out pairs" + (f" + {len(id_held_out)} identity pairs"
                                                  if id_held_out else ""))

    # ------------------------------------------------------------------------ model
    model = load_model(args.init, dtype=torch_dtype(args.dtype), device=rt.device, head="score")
    check_vocab(tokenizer, model, args.init)          # (a zero head on the SFT model's decoder)
    model.config.pad_token_id = tokenizer.pad_token_id  # HF reads the score before the first pad
    model = add_peft(model, **peft_options(args), modules_to_save=("score",))
    if rt.is_main:
        print(f"reward model from {args.init}: {trainable_summary(model)}")
    set_gradient_checkpointing(model, args.grad_checkpointing)
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = CosineSchedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)   # the same data order on every rank
    order = torch.randperm(len(train), generator=gen)
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is None:
        before = {**evaluate(model, held_out, pad_id, rt),
                  **(evaluate(model, policy_held_out, pad_id, rt, "eval_policy")
                     if policy_held_out else {})}
        metrics.log({"step": 0, **before}, echo=True)
    else:
        before, order = state["extra"]["before"], state["data"]["order"]
        gen.set_state(state["data"]["generator"])
    per_rank = args.batch_size // rt.world_size
    start = time.time()
    bar = tqdm(range(run.start_step, args.max_steps), disable=not rt.is_main, desc="rm",
               initial=run.start_step, total=args.max_steps)
    for step in bar:
        pos = (step * args.batch_size) % len(train)
        if pos + args.batch_size > len(train):          # a new epoch, a new order
            order = torch.randperm(len(train), generator=gen)
        idx = order[pos:pos + args.batch_size][rt.rank * per_rank:(rt.rank + 1) * per_rank]
        loss, stats = compute_loss(train_model, batch_of(train, idx, pad_id, rt.device),
                                   margins[idx].to(rt.device), args, rt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_gradients(model, args.grad_clip)
        if run.finite(step, loss, gnorm):               # else --skip-nonfinite: a skipped step
            optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == args.max_steps - 1:
            m = dist.all_reduce_mean({"loss": loss.item(), **{k: v.item() for k, v in stats.items()}})
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['rewards/accuracies']:.2f}",
                            margin=f"{m['rewards/margins']:.2f}")
            metrics.log({"step": step + 1, **m, "grad_norm": float(gnorm),
                         "lr": scheduler.get_last_lr()[0], "skipped": run.skipped})
        if due(args.eval_every, step, step + 1) and step + 1 < args.max_steps:
            metrics.log({"step": step + 1, **evaluate(model, held_out, pad_id, rt)}, echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order},
                           lambda: {"before": before}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start

    # ------------------------------------------------------------------------ eval
    final = {"step": args.max_steps, **evaluate(model, held_out, pad_id, rt),
             "eval/accuracy_before": before["eval/accuracy"]}
    if id_held_out:
        final.update(evaluate(model, id_held_out, pad_id, rt, "eval_identity"))
    if policy_held_out:   # the policy's own (correct, wrong) answers: what PPO's reward ranks
        final.update({**evaluate(model, policy_held_out, pad_id, rt, "eval_policy"),
                      "eval_policy/accuracy_before": before["eval_policy/accuracy"]})
    final.update({"train_minutes": train_time / 60,
                  "pairs_per_s": (args.max_steps - run.start_step) * args.batch_size
                  / max(train_time, 1e-9),
                  "peak_rss_mb": peak_rss_mb()})
    metrics.log(final, echo=True)

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "rm", final)
        # its chat template ends a chat at the <|im_end|> scored, for transformers' readers too
        save_peft(to_save, args.out_dir, args.peft, args.merge, score_tokenizer(tokenizer),
                  base_model_name_or_path=args.init,
                  extra_config={"minipost": {"stage": "rm", "args": asdict(args), "results": final,
                                             "reward_mean": final["eval/reward_mean"],
                                             "reward_std": final["eval/reward_std"]}})
        print(f"saved the reward model to {args.out_dir}")
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
