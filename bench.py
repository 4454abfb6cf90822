"""Benchmark: the performance workloads W0–W5 (docs/speed.md), on minipost's own code paths.

    python bench.py                         # every workload, each in its own process; one table
    python bench.py --workload W1 --json    # one workload, one JSON line
    python bench.py --compare trl           # the same workloads with TRL / transformers, and ratios
    python bench.py --device cuda           # on a GPU, with bf16 autocast
    python bench.py --workload floors       # W1, W2, W4 with only their matmuls and attention (bench_floors.py)

Bench model: Llama-style, vocab 1024, hidden 256, SwiGLU 688, 6 layers, 8 heads, 4 KV heads, tied,
fp32, random init and random token ids (speed, not learning). Per workload (shapes in each docstring
below; W0 ceiling + bare loop, W1 SFT, W2 RM, W3 DPO, W4 generation, W5 GRPO): the median step time
after untimed warm-up, throughput, the peak RSS of its own process (imports included), and MFU
against the W0 matmul ceiling of the same run (the fastest of its W0 runs, either side).
`--compare trl` (bench_trl.py) needs `pip install trl transformers`, never a run-time dependency of
minipost. `--grad-checkpointing` turns activation checkpointing on for both sides (TRL's trainers
default to it; this benchmark sets it explicitly, off unless asked). The bench model, the FLOP
counts and the timing, which both sides and the floors share, are in bench_common.py.
"""
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench_common import (bench_config, flops_per_token, generation_flops, matmul_ceiling,
                          random_ids, row, sync, time_steps)
from minipost.cli import peak_rss_mb, setup, user_errors
from minipost.flags import parse_args
from minipost.dpo import dpo_loss, pair_logps
from minipost.errors import UserError
from minipost.generate import generate
from minipost.grpo import grpo_loss, group_advantages
from minipost.model import GPT, ScoreModel, set_gradient_checkpointing
from minipost.optim import make_optimizer
from minipost.reward import bradley_terry_loss
from minipost.rollout import completion_logps
from minipost.sft import batch_loss_sum

WORKLOADS = ["W0", "W1", "W2", "W3", "W4", "W5"]


# ---------------------------------------------------------------------------- Args
@dataclass
class Args:
    workload: str = "all"           # W0..W5; all (each in its own process, one table); floors (matmuls + attention alone)
    json: bool = False              # print this workload's numbers as one JSON line
    impl: str = "minipost"          # minipost | trl: whose code runs the workload
    compare: str = "none"           # none | trl: also run every workload with TRL, with ratios
    repeats: int = 1                # runs of each workload (and side) in the table; all are shown
    steps: int = 10                 # timed steps per workload (the median is reported)
    warmup: int = 2                 # untimed steps first
    precompute_ref: bool = False    # W3: reference log-probs computed before timing, not live
    tiny: bool = False              # a tiny model (hidden 32, 2 layers), for tests
    compile: bool = False           # torch.compile the model (W0–W3 and W5 training, W4 decoding)
    grad_checkpointing: bool = False  # recompute blocks in the backward, on both sides (TRL's default is on)
    device: str = "cpu"             # auto | cpu | cuda (bf16 autocast on cuda)
    threads: int = 2                # CPU threads (torch.set_num_threads)
    seed: int = 0                   # seed for the init and the random tokens


# ---------------------------------------------------------------------------- workloads
def train_step(model, optimizer, loss_fn, rt, clip=1.0):
    """One optimiser step: forward under autocast, backward, clip, AdamW. No host sync."""
    with rt.autocast():
        loss = loss_fn(model)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def w0(args, cfg, rt, gen) -> list[dict]:
    """Matmul ceiling, and a bare train loop: forward, cross-entropy on all tokens, AdamW."""
    rows = [matmul_ceiling(args, rt)]
    model, optimizer = trained(GPT(cfg), args, rt)
    ids = random_ids(gen, cfg, 16, 256, device=rt.device)

    def loss_fn(net):
        logits = net(ids)                                                  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())

    times = time_steps(lambda: train_step(model, optimizer, loss_fn, rt, clip=0), args, rt.device)
    rows.append(row("bare train loop 16×256", times, ids.numel(), "tok/s",
                    ids.numel() * flops_per_token(cfg, 256)))
    return rows


def trained(model, args, rt):
    """The model on the device and its AdamW (fused where available)."""
    model = set_gradient_checkpointing(model.to(rt.device), args.grad_checkpointing)
    optimizer = make_optimizer(model, lr=1e-4)
    if args.compile:
        model.compile()        # in place, so methods such as score_last call the compiled forward
    return model, optimizer


def w1(args, cfg, rt, gen) -> list[dict]:
    """SFT: 16 × (128 prompt + 128 completion), loss on the completion tokens."""
    model, optimizer = trained(GPT(cfg), args, rt)
    ids = random_ids(gen, cfg, 16, 256, device=rt.device)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 128:] = 1                                                 # completion tokens
    batch = {"input_ids": ids, "loss_mask": loss_mask}

    def loss_fn(net):            # as train_sft.py: the LM head from the first target column
        loss_sum, n = batch_loss_sum(net, batch, rt.autocast)
        return loss_sum / n

    times = time_steps(lambda: train_step(model, optimizer, loss_fn, rt), args, rt.device)
    return [row("SFT 16×256", times, ids.numel(), "tok/s", ids.numel() * flops_per_token(cfg, 256))]


def w2(args, cfg, rt, gen) -> list[dict]:
    """Reward model: 16 pairs of 128 tokens, chosen and rejected stacked into one forward."""
    model, optimizer = trained(ScoreModel(cfg), args, rt)
    ids = random_ids(gen, cfg, 32, 128, device=rt.device)                  # (2B, T): chosen; rejected
    attention_mask = torch.ones_like(ids)

    def loss_fn(net):
        rewards = net.score_last(ids, attention_mask)                      # (2B,)
        return bradley_terry_loss(rewards[:16], rewards[16:])

    times = time_steps(lambda: train_step(model, optimizer, loss_fn, rt), args, rt.device)
    return [row("RM 16 pairs × 128", times, 16, "pairs/s",
                ids.numel() * flops_per_token(cfg, 128, head_size=1))]


def w3(args, cfg, rt, gen) -> list[dict]:
    """DPO: 16 pairs, prompt 64 + completion 64 a side, both sides in one forward."""
    policy = GPT(cfg)
    ref_model = GPT(cfg).to(rt.device).eval().requires_grad_(False)
    ref_model.load_state_dict(policy.state_dict())
    model, optimizer = trained(policy, args, rt)
    prompts = random_ids(gen, cfg, 16, 64, device=rt.device)
    completions = random_ids(gen, cfg, 32, 64, device=rt.device)          # chosen; rejected
    ids = torch.cat([prompts.repeat(2, 1), completions], 1)                # (2B, 128)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 64:] = 1

    batch = {"input_ids": ids, "loss_mask": loss_mask}

    def ref_logps():            # as train_dpo.py: pair_logps, the LM head on completions only
        with torch.no_grad():
            return torch.cat(pair_logps(ref_model, batch, rt.autocast))             # (2B,)

    precomputed = ref_logps() if args.precompute_ref else None

    def loss_fn(net):
        ref = precomputed if precomputed is not None else ref_logps()
        logps = torch.cat(pair_logps(net, batch, rt.autocast))                   # (2B,)
        losses, _, _ = dpo_loss(logps[:16], logps[16:], ref[:16], ref[16:], beta=0.1)
        return losses.mean()

    times = time_steps(lambda: train_step(model, optimizer, loss_fn, rt), args, rt.device)
    live_ref_flops = flops_per_token(cfg, 128, train=False) if precomputed is None else 0
    flops = ids.numel() * (flops_per_token(cfg, 128) + live_ref_flops)
    name = "DPO 16 pairs, " + ("precomputed ref" if precomputed is not None else "live ref")
    return [row(name, times, 16, "pairs/s", flops)]


def w4(args, cfg, rt, gen) -> list[dict]:
    """Generation: 32 prompts × 32 tokens, 64 new tokens, no EOS, sampled and greedy."""
    model = GPT(cfg).to(rt.device).eval()
    if args.compile:       # the cache grows a token a step: dynamic shapes, one compilation
        model.compile(dynamic=True)
    prompts = random_ids(gen, cfg, 32, 32, device=rt.device)
    prompt_mask = torch.ones_like(prompts)
    flops = generation_flops(cfg, 32, 32, 64)
    rows = []
    for temperature, name in [(1.0, "generate T=1, 32×64 new"), (0.0, "generate greedy, 32×64 new")]:
        def step():
            with rt.autocast():
                generate(model, (prompts, prompt_mask), 64, temperature=temperature,
                         eos_token_id=None, generator=gen if rt.device.type == "cpu" else None)
        rows.append(row(name, time_steps(step, args, rt.device), 32 * 64, "new tok/s", flops))
    return rows


def w5(args, cfg, rt, gen) -> list[dict]:
    """GRPO: 8 prompts × 8 samples of exactly 64 tokens, reference KL (β=0.04), one AdamW step."""
    G, P, C = 8, 32, 64
    policy = GPT(cfg)
    ref_model = GPT(cfg).to(rt.device).eval().requires_grad_(False)
    ref_model.load_state_dict(policy.state_dict())
    model, optimizer = trained(policy, args, rt)
    prompts = random_ids(gen, cfg, 8, P, device=rt.device).repeat_interleave(G, 0)  # (N, P)
    prompt_mask = torch.ones_like(prompts)
    phases = {"generate": [], "score": [], "train": []}

    def step():
        t0 = time.perf_counter()
        with rt.autocast():        # rollout: old log-probs are the sampler's own (one step per batch)
            rollout = generate(policy, (prompts, prompt_mask), C, temperature=1.0, eos_token_id=None,
                               generator=gen if rt.device.type == "cpu" else None)
        ids, _ = rollout.sequences                                         # (N, P + C)
        rewards = (rollout.completion_ids % 2 == 0).float().mean(1)        # (N,) stand-in reward
        advantages = group_advantages(rewards, G)
        sync(rt.device)
        t1 = time.perf_counter()
        with torch.no_grad(), rt.autocast():    # as train_grpo.py: completion_logps
            ref_logps = completion_logps(ref_model, ids, None, P)         # (N, C)
        sync(rt.device)
        t2 = time.perf_counter()

        def loss_fn(net):
            logps = completion_logps(net, ids, None, P)                    # (N, C)
            loss, _ = grpo_loss(logps, rollout.logps, ref_logps, advantages,
                                rollout.completion_mask, beta=0.04)
            return loss

        train_step(model, optimizer, loss_fn, rt)
        sync(rt.device)
        for k, dt in zip(phases, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            phases[k].append(dt)

    times = time_steps(step, args, rt.device)
    N, T = 8 * G, P + C     # rollout, reference forward, training step
    flops = generation_flops(cfg, N, P, C) + N * T * (flops_per_token(cfg, T, train=False)
                                                      + flops_per_token(cfg, T))
    return [row("GRPO 8×8, 32+64", times, 1, "steps/s", flops,
                phases_s={k: statistics.median(v[args.warmup:]) for k, v in phases.items()})]


# ---------------------------------------------------------------------------- run one workload
def run_workload(args) -> dict:
    if args.impl == "trl":
        import bench_trl
        return bench_trl.run_workload(args)
    rt = setup(args)
    cfg = bench_config(args.tiny)
    gen = torch.Generator().manual_seed(args.seed)
    if args.workload == "floors":
        from bench_floors import floors as fn
    else:
        fn = {"W0": w0, "W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5}[args.workload]
    rows = fn(args, cfg, rt, gen)
    return {"workload": args.workload, "impl": "minipost", "device": str(rt.device),
            "rows": rows, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------- the table
def subprocess_run(args, workload, impl, extra=()) -> dict:
    """One workload in a fresh process, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--workload", workload, "--json", "--impl", impl,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), *extra]
    cmd += ["--tiny"] * args.tiny + ["--compile"] * args.compile
    cmd += ["--grad-checkpointing"] * args.grad_checkpointing
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, impls: list[str]) -> str:
    """Markdown table; `results[(job, impl)]` is a list of runs (repeats), each a workload's JSON."""
    # the ceiling is the fastest matmul of the run, on either side: a slower one was the machine busy
    w0_runs = [r for impl in impls for r in results.get((("W0",), impl), [])]
    ceiling = max(r["rows"][0]["flops_per_s"] for r in w0_runs) if w0_runs else None
    cols = ["workload", "what"] + [f"{i} {c}" for i in impls for c in ("step", "throughput",
                                                                        "MFU", "peak RSS")]
    if len(impls) == 2:
        cols.append("minipost / trl")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    jobs = dict.fromkeys(job for job, _ in results)
    for job in jobs:
        n_rows = len(results[(job, "minipost")][0]["rows"])
        for k in range(n_rows):
            first = results[(job, "minipost")][0]["rows"][k]
            cells = [job[0], first["name"] + "".join(
                f", {phase} {t:.2f} s" for phase, t in first.get("phases_s", {}).items())]
            tput = {}
            for impl in impls:
                runs = [r for r in results.get((job, impl), []) if k < len(r["rows"])]
                rows = [r["rows"][k] for r in runs]
                if not rows:
                    cells += ["—"] * 4
                    continue
                tput[impl] = [r["throughput"] for r in rows]
                mfu = not rows[0].get("ceiling") and ceiling
                cells += [" / ".join(f"{r['step_s'] * 1e3:.1f} ms" if r["step_s"] < 1
                                     else f"{r['step_s']:.2f} s" for r in rows),
                          " / ".join(f"{t:,.0f}" if t >= 100 else f"{t:.3g}" for t in tput[impl])
                          + f" {rows[0]['unit']}",
                          " / ".join(f"{r['flops_per_s'] / ceiling:.0%}" for r in rows) if mfu else "—",
                          " / ".join(f"{r['peak_rss_mb']:.0f} MB" for r in runs)]
            if len(impls) == 2:
                cells.append(" / ".join(f"{a / b:.2f}×" for a, b in zip(tput["minipost"], tput["trl"]))
                             if len(tput) == 2 else "—")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.workload != "all":
        if args.workload not in WORKLOADS + ["floors"]:
            raise UserError(f"--workload {args.workload}: expected W0..W5, floors or all")
        if args.workload == "floors" and args.impl != "minipost":
            raise UserError("--workload floors times PyTorch's kernels alone: no --impl trl side")
        result = run_workload(args)
        if args.workload == "floors" and not args.json:
            from bench_floors import floors_table
            print(floors_table(result["rows"]))
        else:
            print(json.dumps(result) if args.json else json.dumps(result, indent=2))
        return result
    impls = ["minipost"]
    if args.compare == "trl":
        try:
            import transformers, trl  # noqa: F401,E401
        except ImportError:
            print("--compare trl needs TRL and transformers, which minipost itself never imports:\n"
                  "    pip install trl transformers")
            return {}
        impls.append("trl")
    jobs = [(w,) for w in WORKLOADS]
    jobs.insert(4, ("W3", "--precompute-ref"))
    results = {}
    for job in jobs:
        for _ in range(args.repeats):
            for impl in impls:     # sides interleaved, so both see the same machine load
                if impl == "trl" and job[1:] == ("--precompute-ref",):
                    continue
                print(f"running {job[0]} {' '.join(job[1:])} ({impl})", file=sys.stderr, flush=True)
                results.setdefault((job, impl), []).append(subprocess_run(args, job[0], impl, job[1:]))
    device = results[(jobs[0], "minipost")][0]["device"]
    if device == "cpu":   # the CPU's name, for the README
        device = platform.processor() or "cpu"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            device = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), device)
    print(f"\n`python bench.py{' --compare trl' if len(impls) == 2 else ''}` on {device}, "
          f"{args.threads} threads, torch {torch.__version__}; {args.steps} timed steps after "
          f"{args.warmup} warm-up, median; activation checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'} for both; runs separated by ' / '.\n")
    print(table(results, impls))
    return {f"{job[0]}{''.join(job[1:])}:{impl}": runs for (job, impl), runs in results.items()}


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__))
