"""What bench.py, bench_trl.py and bench_floors.py share: the bench model, FLOP counts, timing.

Each workload, on either side, reports rows built the same way: `time_steps` times a step after
its warm-up, `row` turns the times into a median, a throughput and achieved FLOP/s, and the FLOPs
are counted by `flops_per_token` / `generation_flops` for the bench model (`bench_config`), with
`matmul_ceiling` as the 100% of MFU.
"""
import dataclasses
import statistics
import time

import torch

from minipost.model import Block, GPTConfig


# ---------------------------------------------------------------------------- the bench model
def bench_config(tiny: bool = False) -> GPTConfig:
    size = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2) if tiny else \
        dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4)
    return GPTConfig(**size, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     max_position_embeddings=512)


# ---------------------------------------------------------------------------- FLOPs
def non_embedding_params(cfg: GPTConfig) -> int:
    """N: parameters of the blocks and the final norm (no token/position embeddings, no head)."""
    # One real block (a few MB, freed at once), not a whole model on the meta device: initialising
    # meta tensors imports torch._dynamo and sympy, ~70 MB of every workload's peak RSS.
    block = Block(cfg, layer_idx=0)
    return cfg.num_hidden_layers * sum(p.numel() for p in block.parameters()) + cfg.hidden_size


def flops_per_token(cfg: GPTConfig, T: int, train: bool = True, head_size: int | None = None) -> int:
    """Model FLOPs for one token of a length-T sequence (Kaplan et al. 2020; PaLM, Chowdhery et
    al. 2022, appendix B), counting a multiply-add as 2 FLOPs and the backward pass as twice the
    forward:

        train:   6·N  +  12·L·d·T  +  6·V·d
        forward: 2·N  +   4·L·d·T  +  2·V·d      (a third of the above)

    N = non-embedding parameters (blocks + final norm; the embedding lookup is free), L layers,
    d = heads·head_dim (the attention width), T the sequence length — attention over all T keys, as
    PaLM counts it, although a causal mask needs only half —, V·d the LM head (`head_size` = 1 for a
    reward model's score head). Norms and activations are in N's count or ignored; they are small.
    """
    N = non_embedding_params(cfg)
    L, d = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    V = cfg.vocab_size if head_size is None else head_size
    train_flops = 6 * N + 12 * L * d * T + 6 * V * cfg.hidden_size
    return train_flops if train else train_flops // 3


def generation_flops(cfg: GPTConfig, B: int, P: int, new: int) -> int:
    """Forward FLOPs of a prefill of P tokens and `new` decode steps, each over its own context."""
    prefill = B * P * flops_per_token(cfg, P, train=False)
    return prefill + sum(B * flops_per_token(cfg, P + t + 1, train=False) for t in range(new - 1))


# ---------------------------------------------------------------------------- timing
def sync(device):  # wait for the GPU, so a step's time is its own
    torch.cuda.synchronize(device) if device.type == "cuda" else None


def time_steps(step, args, device) -> list[float]:
    """Seconds of each of `args.steps` calls of `step()`, after `args.warmup` untimed ones."""
    for _ in range(args.warmup):
        step()
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def row(name, times, work, unit, flops, **extra) -> dict:
    """A table row: median step time, `work` units per step -> throughput, achieved FLOP/s."""
    t = statistics.median(times)
    return {"name": name, "step_s": t, "throughput": work / t, "unit": unit,
            "flops_per_s": flops / t, **extra}


# ---------------------------------------------------------------------------- inputs and the ceiling
def random_ids(gen, cfg, *shape, device):  # ids below 4 are the tokenizer's special tokens
    return torch.randint(4, cfg.vocab_size, shape, generator=gen).to(device)


def matmul_ceiling(args, rt, n=1024) -> dict:
    """GFLOP/s of an n³ matmul: fp32 on the CPU, bf16 on a GPU (the dtype its workloads run in)."""
    mm_dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    a, b = torch.randn(2, n, n, device=rt.device, dtype=mm_dtype)
    times = time_steps(lambda: a @ b, dataclasses.replace(args, steps=max(args.steps, 20)), rt.device)
    return row(f"matmul {n}³ {str(mm_dtype)[6:]}", times, 2 * n ** 3 / 1e9, "GFLOP/s", 2 * n ** 3,
               ceiling=True)
