"""Stage 0: pretrain a small base model from scratch on the built-in task's corpus (--task).

    python pretrain.py                      # ~1.9M-parameter Llama-style model -> out/base
    torchrun --nproc_per_node 2 pretrain.py --device cpu --threads 1

The corpus is plain text ("Question: ...\\nAnswer: 23 + 45 = 68\\n...\\n#### 56"), documents joined
by <|endoftext|>, cut into fixed windows. The byte-level BPE tokenizer is trained on the same corpus
first. At the end it reports the held-out loss and the greedy accuracy of completing held-out
problems in the corpus format: the starting line every post-training stage is measured from.

At every evaluation it also probes the arithmetic alone on held-out bare equations ("52 + 14 ="),
scoring the last digit apart from the leading ones. That probe is what tells a base model that will
do well after SFT from one that will not: the units digit is a lookup ((a + b) mod 10 of the two
operands' last digits) that forms abruptly after a plateau, while the leading digits, carry
included, come early. The plateau's length is the seed's, and the init's scale sets it: at
`--init-std 0.02` one seed in three never left it; at 0.06 (the default) every seed starts learning
the units digit by step 750, and the 1200 steps let every seed finish it, so that base models of
different seeds agree (docs/results.md, Stage 0, has the runs and what else was tried).
"""
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minipost import dist, worlds
from minipost.checkpoint import save_model
from minipost.cli import (CURVES_HELP, Metrics, difficulty_arg, peak_rss_mb, setup, user_errors,
                          write_results)
from minipost.errors import UserError
from minipost.evaluate import evaluate_base, evaluate_equations
from minipost.flags import RunArgs, parse_args
from minipost.model import GPT, GPTConfig, set_gradient_checkpointing
from minipost.optim import CosineSchedule, clip_gradients, make_optimizer
from minipost.resume import Run, due
from minipost.tokenizer import train_tokenizer


# ---------------------------------------------------------------------------- Args
@dataclass
class Args(RunArgs):
    out_dir: str = "out/base"       # where the base model (HF format) and metrics.jsonl go
    difficulty: str = ""            # task: operands x digits, then operators ("" = --task's default)
    n_docs: int = 60000             # documents in the generated training corpus
    drill_frac: float = 0.2         # share of documents that are drills of 8 bare equations
    drill_digits: str = "max"       # drills' operand digits: max (the task's) | mixed (1 up to it)
    vocab_size: int = 512           # BPE vocabulary size (including the 4 special tokens)
    hidden_size: int = 192          # model width
    num_layers: int = 4             # transformer blocks
    num_heads: int = 6              # attention heads
    num_kv_heads: int = 6           # key/value heads (fewer than num_heads = grouped-query attention)
    intermediate_size: int = 512    # SwiGLU hidden width
    init_std: float = 0.06          # std of the normal init of the weight matrices (0.02: seed decides)
    seq_len: int = 256              # tokens per training window
    batch_size: int = 16            # windows per optimiser step (global, over all ranks)
    max_steps: int = 1200           # optimiser steps (900 ends some seeds mid-way up the units digit)
    lr: float = 2e-3                # peak learning rate (3e-3 stalls: no copying of operands)
    min_lr_ratio: float = 0.1       # final LR as a fraction of the peak (cosine decay)
    warmup_steps: int = 30          # linear warm-up steps
    weight_decay: float = 0.1       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    eval_every: int = 150           # held-out loss every N steps (0 = never: only the final one)
    eval_windows: int = 64          # held-out windows for the loss
    eval_problems: int = 500        # held-out problems for the final greedy accuracy
    eval_equations: int = 200       # held-out bare equations at each evaluation (0 = skip)
    compile: bool = False           # torch.compile the model


# ---------------------------------------------------------------------------- steps
def windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents joined by <|endoftext|> and cut into (N, seq_len + 1) windows of token ids."""
    sep = tokenizer.bos_token_id
    ids = [t for doc in tokenizer.encode_batch(texts) for t in doc + [sep]]
    n = len(ids) // (seq_len + 1)
    return torch.tensor(ids[:n * (seq_len + 1)]).view(n, seq_len + 1)


def model_config(args: Args, tokenizer) -> GPTConfig:
    return GPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden_size,
                     intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
                     num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                     max_position_embeddings=max(512, args.seq_len + 1),
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, initializer_range=args.init_std)


def lm_loss(net, batch, rt) -> torch.Tensor:
    """Next-token cross-entropy, −mean_t log p(x_t | x_<t), over a (B, T+1) batch of windows."""
    batch = batch.to(rt.device)
    with rt.autocast():
        logits = net(batch[:, :-1])                                           # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model, held_out, rt) -> float:
    model.eval()
    with dist.gathered(model):                           # FSDP: one all-gather, not one a batch
        losses = [lm_loss(model, held_out[i:i + 16], rt) for i in range(0, len(held_out), 16)]
    model.train()
    return torch.stack(losses).mean().item()


def equations(model, tokenizer, probes, rt) -> dict:
    """The arithmetic alone, digit by digit: the units digit is the skill that decides how well
    this base will do after SFT (see evaluate.evaluate_equations). {} without probes."""
    if not probes:
        return {}
    res = evaluate_equations(model, tokenizer, probes, autocast=rt.autocast)
    return {f"eval/equations_{k}": v for k, v in res.items() if k != "n"}


# ---------------------------------------------------------------------------- main
def main(args: Args):
    rt = setup(args)
    metrics = Metrics(args.out_dir, rt.is_main, append=bool(args.resume),
                      report_to=args.report_to)
    metrics.watch("pretrain")   # diagnostics.py: a failure signature is said once
    if args.batch_size % rt.world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the "
                        f"{rt.world_size} processes")
    difficulty = difficulty_arg(args.difficulty, args.task)
    world = worlds.world(args.task)                   # tasks.py (arithmetic) or countdown.py

    # ------------------------------------------------------------------------ data
    docs = world.pretrain_corpus(args.n_docs, difficulty, seed=args.seed, drill_frac=args.drill_frac,
                                 drill_digits=args.drill_digits)
    tokenizer = train_tokenizer(docs, vocab_size=args.vocab_size)

    train = windows(tokenizer, docs, args.seq_len)
    held_out = windows(tokenizer, [p["question"] and f"Question: {p['question']}\nAnswer: "
                                   f"{p['solution']}" for p in world.make_problems(
                                       2000, "test", difficulty, seed=0)], args.seq_len)
    held_out = held_out[:args.eval_windows]
    if rt.is_main:
        print(f"corpus: {len(docs)} documents, {train.numel():,} tokens in {len(train)} windows "
              f"of {args.seq_len}; vocabulary {tokenizer.vocab_size}")

    # ------------------------------------------------------------------------ model
    model = GPT(model_config(args, tokenizer)).to(rt.device)
    if rt.is_main:
        print(f"model: {model.num_params(non_embedding=False):,} parameters "
              f"({model.num_params():,} non-embedding)")
    set_gradient_checkpointing(model, args.grad_checkpointing)
    train_model = dist.wrap(model, args.fsdp)     # DDP, FSDP (shards `model` in place) or itself
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scheduler = CosineSchedule(optimizer, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    if args.compile:
        train_model = torch.compile(train_model)

    probes = world.equation_probes(args.eval_equations, difficulty)

    def evaluation():    # the held-out loss, and the arithmetic probe (when --eval-equations > 0)
        return {"eval/loss": held_out_loss(model, held_out, rt),
                **equations(model, tokenizer, probes, rt)}

    # ------------------------------------------------------------------------ loop
    gen = torch.Generator().manual_seed(args.seed)   # the same data order on every rank
    order = torch.randperm(len(train), generator=gen)
    run = Run(args, rt, metrics, model, optimizer, scheduler)
    state = run.restore()                             # --resume: everything as it was
    if state is not None:
        gen.set_state(state["data"]["generator"])
        order = state["data"]["order"]
    per_rank = args.batch_size // rt.world_size
    start = time.time()
    bar = tqdm(range(run.start_step, args.max_steps), disable=not rt.is_main, desc="pretrain",
               initial=run.start_step, total=args.max_steps)
    for step in bar:
        pos = (step * args.batch_size) % len(train)
        if pos + args.batch_size > len(train):         # a new epoch, a new order
            order = torch.randperm(len(train), generator=gen)
        idx = order[pos:pos + args.batch_size][rt.rank * per_rank:(rt.rank + 1) * per_rank]
        loss = lm_loss(train_model, train[idx], rt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_gradients(model, args.grad_clip)
        if run.finite(step, loss, gnorm):               # else --skip-nonfinite: a skipped step
            optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == args.max_steps - 1:
            m = dist.all_reduce_mean({"loss": loss.item()})
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            metrics.log({"step": step + 1, "loss": m["loss"], "grad_norm": float(gnorm),
                         "lr": scheduler.get_last_lr()[0], "skipped": run.skipped})
        if due(args.eval_every, step, step + 1) and step + 1 < args.max_steps:
            metrics.log({"step": step + 1, **evaluation()}, echo=True)
        if run.end_of_step(step + 1, lambda: {"generator": gen.get_state(), "order": order}):
            dist.cleanup()
            return {"stopped_at": step + 1}
    run.close()
    train_time = time.time() - start
    tokens_per_s = ((args.max_steps - run.start_step) * args.batch_size * args.seq_len
                    / max(train_time, 1e-9))   # a resumed run that had finished: no steps, ~0 s

    # ------------------------------------------------------------------------ eval
    final = {"step": args.max_steps, **evaluation(),
             "train_minutes": train_time / 60, "tokens_per_s": tokens_per_s}
    # the same held-out problems for every seed (seed 0), as every later stage is scored on
    prompts = world.pretrain_eval_prompts(args.eval_problems, difficulty, seed=0)
    if args.eval_problems:
        res = evaluate_base(model, tokenizer, prompts, autocast=rt.autocast, task=args.task)
        final.update({"eval/accuracy": res["accuracy"], "eval/accuracy_ci95": res["accuracy_ci95"],
                      "eval/well_formed": res["well_formed"], "eval/n": res["n"]})
    final["peak_rss_mb"] = peak_rss_mb()
    metrics.log(final, echo=True)

    # ------------------------------------------------------------------------ save
    to_save = dist.full_model(model)                     # FSDP: gathered on rank 0
    if rt.is_main:
        write_results(args.out_dir, "base", final)
        save_model(to_save, args.out_dir, tokenizer,
                   extra_config={"minipost": {"stage": "base", "args": asdict(args),
                                              "results": final}})
        print(f"saved the base model to {args.out_dir}")
    dist.cleanup()
    return final


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__, epilog=CURVES_HELP))
