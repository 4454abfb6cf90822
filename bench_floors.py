"""The floors of `python bench.py --workload floors`: W1, W2 and W4 with only their matmuls and
attention, the parts no implementation of them can skip.

    python bench.py --workload floors --threads 2

If these alone already take most of the time a goal allows (80% MFU, 3× TRL's generation), no
change around them in eager PyTorch reaches it; docs/speed.md reads them that way.
"""
import statistics

import torch
import torch.nn.functional as F

from bench_common import flops_per_token, generation_flops, matmul_ceiling, row, time_steps
from minipost.model import GPT


def floors(args, cfg, rt, gen) -> list[dict]:
    """Lower bounds from PyTorch's own kernels: what W1, W2 and W4 cost with every other op free.

    A step can be no faster than its matmuls and attention kernel alone. W1 and W2: the linear
    layers' three matmuls each (forward, input gradient, weight gradient) and SDPA's forward and
    backward, at the workload's shapes, against the whole step's time at 80% MFU. W4: the linear
    layers' matmuls of a prefill and 63 decoding steps of 32 rows (43 a step in the bench model),
    to compare with a third of TRL's `generate` time. The ceiling is the faster of two
    measurements, one first and one last (a busy machine only ever slows one down).
    """
    first_ceiling = matmul_ceiling(args, rt)
    model = GPT(cfg).to(rt.device)
    weights = [p.detach() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    head = model.lm_head.weight.detach()
    mm_dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32

    def matmuls(shapes, train):        # shapes: (rows, weight); one callable running all of them
        def operands(rows, w):
            w = w.to(mm_dtype)
            return w, torch.randn(rows, w.shape[1], device=rt.device, dtype=mm_dtype), \
                torch.randn(rows, w.shape[0], device=rt.device, dtype=mm_dtype)
        ops = [operands(rows, w) for rows, w in shapes]

        def run():
            for w, x, dy in ops:
                x @ w.t()
                if train:
                    dy @ w, dy.t() @ x          # input gradient, weight gradient
        flops = sum((6 if train else 2) * rows * w.numel() for rows, w in shapes)
        return run, flops

    def attention(B, T):               # SDPA forward + backward, one layer's shapes
        H, H_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = torch.randn(B, H, T, hd, device=rt.device, dtype=mm_dtype, requires_grad=True)
        k, v = (torch.randn(B, H_kv, T, hd, device=rt.device, dtype=mm_dtype, requires_grad=True)
                for _ in range(2))
        dy = torch.ones_like(q)

        def run():
            for _ in range(cfg.num_hidden_layers):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H_kv != H)
                y.backward(dy)
        return run

    rows = []
    L, d = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    for name, B, T, head_rows, head_size in [("W1", 16, 256, 16 * 129, None), ("W2", 32, 128, 0, 1)]:
        shapes = [(B * T, w) for w in weights]
        if head_rows:                  # W1: the LM head from the first target column on (129 of 256)
            shapes.append((head_rows, head))
        run_mm, mm_flops = matmuls(shapes, train=True)
        t_mm = time_steps(run_mm, args, rt.device)
        t_attn = time_steps(attention(B, T), args, rt.device)
        model_flops = B * T * flops_per_token(cfg, T, head_size=head_size)
        both = statistics.median(t_mm) + statistics.median(t_attn)
        rows += [row(f"{name} linear layers' matmuls, forward + backward", t_mm, mm_flops / 1e9,
                     "GFLOP/s", mm_flops),
                 row(f"{name} attention (SDPA) forward + backward, FLOPs as the MFU formula counts them",
                     t_attn, B * T * 12 * L * d * T / 1e9, "GFLOP/s", B * T * 12 * L * d * T),
                 {"name": f"{name} best MFU with every other op free", "step_s": both,
                  "model_flops": model_flops}]
    decode, _ = matmuls([(32, w) for w in weights] + [(32, head)], train=False)
    prefill, _ = matmuls([(32 * 32, w) for w in weights] + [(32, head)], train=False)

    def generation():
        prefill()
        for _ in range(63):
            decode()
    rows.append(row("W4 matmuls of generate (prefill + 63 steps, 32 rows)",
                    time_steps(generation, args, rt.device), 32 * 64, "new tok/s",
                    generation_flops(cfg, 32, 32, 64)))
    ceiling = max(first_ceiling, matmul_ceiling(args, rt), key=lambda r: r["flops_per_s"])
    for r in rows:
        if "model_flops" in r:
            r["mfu"] = r["model_flops"] / r["step_s"] / ceiling["flops_per_s"]
            r["budget_80_s"] = r["model_flops"] / (0.8 * ceiling["flops_per_s"])
    return [ceiling] + rows


def floors_table(rows) -> str:
    lines = ["| floor | time | throughput |", "|---|---|---|"]
    for r in rows:
        if "mfu" in r:
            what = (f"{r['step_s'] * 1e3:.0f} ms (80% MFU allows {r['budget_80_s'] * 1e3:.0f} ms "
                    f"for the whole step)")
            lines.append(f"| {r['name']} | {what} | **{r['mfu']:.0%}** |")
        else:
            rate = f"{r['throughput']:,.0f} {r['unit']}"
            lines.append(f"| {r['name']} | {r['step_s'] * 1e3:.1f} ms | {rate} |")
    return "\n".join(lines)
