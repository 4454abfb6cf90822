"""Stage 1: supervised fine-tuning (SFT) on chats, full or parameter-efficient (LoRA, adapters).

    python train_sft.py                                  # out/base -> out/sft, built-in chats
    python train_sft.py --peft lora --lr 5e-3 --out-dir out/sft-lora
    python train_sft.py --peft adapter --lr 1e-2 --out-dir out/sft-adapter
    python train_sft.py --data my_chats.jsonl --init some/hf-checkpoint --max-steps 1000
    torchrun --nproc_per_node 2 train_sft.py --device cpu --threads 1

Maximum likelihood on demonstrations (Ouyang et al. 2022, arXiv 2203.02155), with the loss on the
assistant's tokens and the <|im_end|> ending each assistant turn (`--loss-on all`: every token).
Gradient accumulation is token-weighted: each micro-batch's summed loss is divided by the number
of target tokens of the whole step, so `--grad-accum` never changes the gradient (docs/pitfalls.md,
"Loss aggregation and gradient accumulation"). `--packing` concatenates chats into rows with
restarting positions and block-diagonal attention, so each chat computes what it computes alone
(docs/pitfalls.md, "Packing without cross-contamination"). At the start and the end it prints the
held-out task accuracy (greedy, verifier) and the share of well-formed answers.

Data: `--data file.jsonl` ({"messages": [...]} or {"prompt", "completion"}), else `--n-train`
built-in chats of `--difficulty`. PEFT outputs hold the adapter alone (PEFT's format) + tokenizer;
later stages can `--init` from a LoRA output (merged on load), not from a bottleneck-adapter one.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minipost import dist, worlds
from minipost.cli import (CURVES_HELP, Metrics, check_vocab, difficulty_arg, load_script_tokenizer,
                          peak_rss_mb, require_checkpoint, setup, user_errors, write_results)
from minipost.data import (collate_packed, load_jsonl, pack_sequences, pad_batch, record_lines,
                           truncate)
from minipost.errors import UserError
from minipost.evaluate import evaluate_task, heldout_problems
from minipost.flags import StageArgs, parse_args, torch_dtype
from minipost.lora import count_trainable
from minipost.model import set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.peft import add_peft, load_model, peft_options, save_peft, trainable_summary
from minipost.resume import Run, due
from minipost.sft import batch_loss_sum


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(StageArgs):
    init: str = "out/base"          # checkpoint directory to start from (minipost or HF format)
    out_dir: str = "out/sft"        # where the model (or adapter), tokenizer and metrics.jsonl go
    data: str = ""                  # SFT JSONL (messages or prompt/completion); "" = built-in chats
    difficulty: str = ""            # built-in task: operands x digits, then operators ("" = --task's default)
    n_train: int = 20000            # built-in training chats
    loss_on: Literal["assistant", "all"] = "assistant"  # assistant (assistant tokens + <|im_end|>) | all (every token)
    max_length: int = 256           # tokens per chat; longer chats are truncated (and counted)
    truncation: bool = True         # cut longer chats (--no-truncation: stop, naming file:line)
    packing: bool = False           # pack chats into --max-length rows (no attention across chats)
    batch_size: int = 32            # sequences (rows, with --packing) per optimiser step, all ranks
    grad_accum: int = 1             # micro-batches per step (token-weighted: same gradient)
    epochs: float = 0.0             # passes over the data; 0 = use --max-steps
    max_steps: int = 600            # optimiser steps (when --epochs is 0)
    lr: float = 1e-3                # peak learning rate (LoRA r=8: 5e-3; 1e-2 is already unstable here)
    min_lr_ratio: float = 0.1       # final LR as a fraction of the peak (cosine decay)
    warmup_steps: int = 30          # linear warm-up steps
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    eval_every: int = 200           # held-out loss + quick accuracy every N steps (0 = never: start/end only)
    eval_chats: int = 200           # held-out chats for the held-out loss
    eval_quick: int = 64            # held-out problems for the quick accuracy during training
    eval_problems: int = 500        # held-out problems for the start/end accuracy (0 = skip)


def check_flags(args: Args, world_size: int) -> int:
    """This script's flags that their types do not limit (flags.check_args did the rest). Returns
    the micro-batch size: sequences per forward on each rank."""
    micro = args.batch_size // (world_size * max(args.grad_accum, 1))
    if micro < 1 or micro * world_size * args.grad_accum != args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by {world_size} "
                        f"processes x --grad-accum {args.grad_accum}")
    return micro


# ---------------------------------------------------------------------------- data
def load_chats(difficulty, args: Args) -> tuple[list, list]:
    """(training chats, held-out chats): `--data` (its last 10%, at most --eval-chats, held out),
    or the built-in chats of `--difficulty`."""
    if args.data:   # validated before anything is loaded or written
        chats = load_jsonl(args.data, "sft")
        n_held = min(args.eval_chats, len(chats) // 10)      # the last 10% (at most) held out
        return chats[:len(chats) - n_held], chats[len(chats) - n_held:]
    world = worlds.world(args.task)
    return (world.sft_chats(args.n_train, "train", difficulty, seed=args.seed),
            world.sft_chats(args.eval_chats, "test", difficulty, seed=args.seed))


def tokenize(tokenizer, messages, loss_on: str, max_length: int):
    """(ids, loss_mask, truncated) of one chat: ChatML ids, 1 on the tokens the loss counts."""
    ids, mask = tokenizer.format_chat(messages)
    if loss_on == "all":
        mask = [1] * len(ids)
    return truncate(ids, mask, max_length)


def training_units(tokenizer, chats, args: Args) -> tuple[list, list]:
    """(tokenized chats: (ids, loss_mask, truncated) each, the units a batch draws from: the chats'
    (ids, loss_mask), or with --packing the packed rows). --no-truncation: a chat longer than
    --max-length stops the run, naming its file:line."""
    train = [tokenize(tokenizer, c["messages"], args.loss_on, args.max_length) for c in chats]
    if not args.truncation and any(t[2] for t in train):
        i = next(i for i, t in enumerate(train) if t[2])
        where = f"{args.data}:{record_lines(args.data)[i]}" if args.data else f"built-in chat {i}"
        raise UserError(f"{where}: the chat is {len(tokenizer.format_chat(chats[i]['messages'])[0])}"
                        f" tokens, longer than --max-length {args.max_length} (--no-truncation)")
    if args.packing:   # units are packed rows, packed once in a seeded shuffled order
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        units = pack_sequences([train[i][0] for i in perm], [train[i][1] for i in perm],
                               args.max_length)
    else:
        units = [t[:2] for t in train]
    if len(units) < args.batch_size:
        raise UserError(f"{len(units)} training {'rows' if args.packing else 'chats'} < "
                        f"--batch-size {args.batch_size}")
    return train, units


def collate(units, pad_id: int, device=None) -> dict:
    """(ids, loss_mask) pairs, or packed rows (ids, loss_mask, position_ids, segment_ids), ->
    right-padded tensors (B, T): input_ids, loss_mask (+ position_ids, segment_ids when packed)."""
    if len(units[0]) == 4:
        batch = collate_packed(units, pad_id)
    else:
        input_ids, _, loss_mask = pad_batch([u[0] for u in units], pad_id, "right",
                                            [u[1] for u in units])
        batch = {"input_ids": input_ids, "loss_mask": loss_mask}
    batch.pop("attention_mask", None)   # right padding: causal attention already hides the pad
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------- loss
def accumulate(net, micro_batches: list[dict], autocast=nullcontext) -> torch.Tensor:
    """Backward over a step's micro-batches; returns the step's mean loss (detached).

    Token-weighted (docs/pitfalls.md, "Loss aggregation and gradient accumulation"): every
    micro-batch's sum is divided by N, the target tokens of the whole step over all micro-batches
    and ranks, so Σ_i S_i / N is the one-big-batch loss and its gradient. DDP averages gradients
    over ranks, so the loss is multiplied by the world size.
    """
    n_total = dist.all_reduce_sum(sum(b["loss_mask"][:, 1:].sum() for b in micro_batches).float())
    n_total = n_total.clamp(min=1.0)
    total = torch.zeros(())
    for i, b in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last or not isinstance(net, DDP) else net.no_sync():
            loss_sum, _ = batch_loss_sum(net, b, autocast)
            (loss_sum * dist.world_size() / n_total).backward()
        total += loss_sum.detach().cpu()
    return dist.all_reduce_sum(total) / n_total.cpu()


# ---------------------------------------------------------------------------- eval
@torch.no_grad()
def held_out_loss(model, held, pad_id: int, rt) -> float:
    """Mean next-token loss per target token on the held-out chats (all ranks)."""
    model.eval()
    mine, total = dist.shard(held), torch.zeros(2, dtype=torch.float64)
    with dist.gathered(model):                       # FSDP: shards of `held` may be uneven
        for i in range(0, len(mine), 64):
            loss_sum, n = batch_loss_sum(model, collate(mine[i:i + 64], pad_id, rt.device),
                                         rt.autocast)
            total += torch.tensor([loss_sum.item(), n.item()], dtype=torch.float64)
    model.train()
    total = dist.all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def evaluate(model, tokenizer, problems, args: Args, rt) -> dict:
    """Greedy accuracy and well-formed share on held-out `problems`, by the verifier."""
    res = evaluate_task(model, tokenizer, problems, autocast=rt.autocast, seed=args.seed,
                        task=args.task)
    return {"eval/accuracy": res["accuracy"], "eval/accuracy_ci95": res["accuracy_ci95"],
            "eval/well_formed": res["well_formed"], "eval/n": res["n"]}


def main(args: Args):
    rt = setup(args)
    micro = check_flags(args, rt.world_size)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("sft")   # diagnostics.py: a failure signature is said once
    difficulty = difficulty_arg(args.difficulty, args.task)
    require_checkpoint(args.init, "python pretrain.py")

    # ------------------------------------------------------------------------ data
    chats, held_chats = load_chats(difficulty, args)
    tokenizer = load_script_tokenizer(args.init, args.chat_template)   # pads with EOS if no pad
    pad_id = tokenizer.pad_token_id
    train, units = training_units(tokenizer, chats, args)
    held = [tokenize(tokenizer, c["messages"], args.loss_on, args.max_length)[:2]
            for c in held_chats]
    n_truncated = sum(t[2] for t in train)
    n_targets = sum(sum(t[1][1:]) for t in train)
    steps = (math.ceil(args.epochs * len(units) / args.batch_size) if args.epochs > 0
             else args.max_steps)
    if rt.is_main:
        print(f"data: {len(train)} chats ({n_truncated} truncated to {args.max_length} tokens), "
              f"{n_targets:,} target tokens, loss on {args.loss_on}"
              + (f", packed into {len(units)} rows" if args.packing else "")
              + f"; {steps} steps of {args.batch_size} ({steps * args.batch_size / len(units):.2f} "
              "epochs)")
    problems = heldout_problems(str(difficulty), max(args.eval_problems, args.eval_quick),
                                args.task)

    # ------------------------------------------------------------------------ model
    model = load_model(args.init, dtype=torch_dtype(args.dtype), device=rt.device)
    check_vocab(tokenizer, model, args.init)
    model = add_peft(model, **peft_options(args))
    trainable, total = count_trainable(model)
    if rt.is_main:
        print(f"model: {args.init} ({model.num_params(non_embedding=False):,} parameters), "
              f"peft={args.peft}; {trainable_summary(model)}")
    set_gradient_checkpointing(model, args.grad_checkpointing)
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = CosineSchedule(optimizer, args.warmup_steps, steps, args.min_lr_ratio)

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)   # the same data order on every rank
    order = torch.randperm(len(units), generator=gen)
    pos, tokens_seen = 0, 0
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is None:
        start_eval = {"step": 0, "eval/loss": held_out_loss(model, held, pad_id, rt)}
        if args.eval_problems:
            start_eval.update(evaluate(model, tokenizer, problems[:args.eval_problems], args, rt))
        metrics.log(start_eval, echo=True)
    else:
        start_eval, order, pos = state["extra"]["start_eval"], state["data"]["order"], \
            state["data"]["pos"]
        gen.set_state(state["data"]["generator"])
    start = time.time()
    bar = tqdm(range(run.start_step, steps), disable=not rt.is_main, desc=f"sft ({args.peft})",
               initial=run.start_step, total=steps)
    for step in bar:
        if pos + args.batch_size > len(units):            # a new epoch, a new order
            order, pos = torch.randperm(len(units), generator=gen), 0
        idx = order[pos:pos + args.batch_size].tolist()
        pos += args.batch_size
        mine = idx[rt.rank * micro * args.grad_accum:(rt.rank + 1) * micro * args.grad_accum]
        micro_batches = [collate([units[i] for i in mine[j:j + micro]], pad_id, rt.device)
                         for j in range(0, len(mine), micro)]
        tokens_seen += sum(b["input_ids"].numel() for b in micro_batches) * rt.world_size
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(train_model, micro_batches, rt.autocast)
        gnorm = clip_gradients(model, args.grad_clip)
        if run.finite(step, loss, gnorm):               # else --skip-nonfinite: a skipped step
            optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            metrics.log({"step": step + 1, "loss": loss.item(), "grad_norm": float(gnorm),
                          "lr": scheduler.get_last_lr()[0], "skipped": run.skipped})
        if due(args.eval_every, step, step + 1) and step + 1 < steps:
            record = {"step": step + 1, "eval/loss": held_out_loss(model, held, pad_id, rt)}
            if args.eval_quick:
                # with its interval and n: the quick ones are fewer problems than start and end's
                record.update(evaluate(model, tokenizer, problems[:args.eval_quick], args, rt))
            metrics.log(record, echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order,
                                              "pos": pos}, lambda: {"start_eval": start_eval}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start

    # ------------------------------------------------------------------------ eval
    final = {"step": steps, "eval/loss": held_out_loss(model, held, pad_id, rt),
             "train_minutes": train_time / 60,
             "tokens_per_s": tokens_seen / max(train_time, 1e-9), "truncated": n_truncated,
             "peft": args.peft, "trainable_share": trainable / total}
    if args.eval_problems:
        final.update(evaluate(model, tokenizer, problems[:args.eval_problems], args, rt))
        final.update({"start/accuracy": start_eval["eval/accuracy"],
                      "start/well_formed": start_eval["eval/well_formed"]})
    final["peak_rss_mb"] = peak_rss_mb()
    metrics.log(final, echo=True)
    if rt.is_main and args.eval_problems:
        print(f"held-out accuracy ({final['eval/n']} problems, greedy): "
              f"{final['start/accuracy']:.3f} -> {final['eval/accuracy']:.3f} "
              f"± {final['eval/accuracy_ci95']:.3f}; well-formed {final['start/well_formed']:.3f} "
              f"-> {final['eval/well_formed']:.3f}; {final['train_minutes']:.1f} min of training")

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "sft", final)
        save_peft(to_save, args.out_dir, args.peft, args.merge, tokenizer,
                  base_model_name_or_path=args.init,
                  extra_config={"minipost": {"stage": "sft", "args": asdict(args),
                                             "results": final}})
        print(f"saved {'the model' if args.peft == 'none' else 'the ' + args.peft + ' adapter'} "
              f"to {args.out_dir}" + (f" (merged model in {args.out_dir}/merged)" if args.merge
                                      else ""))
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
