"""Speed paths: the same numbers as the plain computation, with less memory or time.

`minipost.model` writes each layer as the textbook computation; `use_fast_paths(model)` (in
model.py, on for every model built there) makes RMSNorm, the SwiGLU MLP and attention call the
functions below instead, and `optim.make_optimizer` builds the `AdamW` below. Each is tested equal
to its plain counterpart (tests/test_fast.py):

- `RMSNormFn`, `SiLUMulFn`, `SwiGLUDownFn`: autograd Functions whose backward is written out, so
  they keep fewer activations than autograd's graph of the same ops: at bench.py's W1 shape the
  saved activations fall from 504 to 323 MiB (−36%; tensors counted once per storage), at the same
  speed. Without a gradient (decoding, reference and rollout forwards) the same ops run directly,
  so a forward gives the same logits bit for bit with or without a graph.
- `attention`: SDPA, except a CPU decoding step in full precision, whose attention is two matmuls.
- `AdamW`: `torch.optim.AdamW(fused=True)`'s update and state without importing the compiler.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------- RMSNorm and SwiGLU
def _rms_norm(x, w, eps: float):
    """(x·r·w, r) with r = 1/sqrt(mean(x²) + ε), shape (..., 1)."""
    sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()   # no x² buffer
    r = torch.rsqrt(sum_sq / x.shape[-1] + eps)
    return (x * r).mul_(w), r


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def full_precision(x, w) -> bool:
    """True when x and w share one dtype, fp32 or fp64: where `rms_norm` applies."""
    return x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64)


def rms_norm(x, w, eps: float):
    """RMSNorm through `RMSNormFn` when a gradient is wanted; otherwise the same ops without an
    autograd Function, whose ~5 µs a call is ~2% of a decoding step at bench.py's W4 shape."""
    return RMSNormFn.apply(x, w, eps) if _needs_grad(x, w) else _rms_norm(x, w, eps)[0]


def silu_mul(g, u):
    """silu(g)·u through `SiLUMulFn` when a gradient is wanted, the same ops directly otherwise."""
    return SiLUMulFn.apply(g, u) if _needs_grad(g, u) else F.silu(g).mul_(u)


def swiglu_down(g, u, down: nn.Linear):
    """down(silu(g)·u): through `SwiGLUDownFn` when a gradient is wanted and `down` is a plain
    bias-free Linear of g's dtype; otherwise (LoRA on down_proj, autocast, decoding) through
    `silu_mul` and `down` itself."""
    if torch.is_grad_enabled() and type(down) is nn.Linear and down.bias is None \
            and g.dtype == down.weight.dtype:
        return SwiGLUDownFn.apply(g, u, down.weight)
    return down(silu_mul(g, u))


class RMSNormFn(torch.autograd.Function):
    """y = x̂·w with x̂ = x·r, r = 1/sqrt(mean(x²) + ε), and its gradient written out:

        ∂L/∂w = Σ_rows dy·x̂        ∂L/∂x = r·(g − x̂·mean(g·x̂)),   g = dy·w

    (from ∂r/∂x_j = −r³·x_j / d). The backward keeps x and r only; autograd's graph of the same
    ops would also keep x̂, one more (B, T, d) tensor per norm, and runs more ops.

    In-place ops (`mul_`, `sub_`, here, in `SiLUMulFn` and in model.py's `apply_rope`) write into a
    buffer just made instead of allocating another (B, T, ·) one. Fewer short-lived large buffers
    leave glibc's heap less fragmented: at bench.py's W1 the process's peak RSS fell by ~100 MB and
    the step by ~4% (before, a third of the heap at the peak was free holes between live buffers).
    """

    @staticmethod
    def forward(ctx, x, w, eps: float):
        y, r = _rms_norm(x, w, eps)
        ctx.save_for_backward(x, r, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, r, w = ctx.saved_tensors
        x_hat = x * r
        dw = (dy * x_hat).flatten(0, -2).sum(0)
        g = dy * w
        dot = (g * x_hat).mean(-1, keepdim=True)
        dx = g.sub_(x_hat.mul_(dot)).mul_(r)          # in place: no further (B, T, d) buffers
        return dx, dw, None


class SiLUMulFn(torch.autograd.Function):
    """h = silu(g)·u, the SwiGLU gate, keeping only g and u for the backward:

        ∂L/∂u = dh·silu(g)        ∂L/∂g = dh·u·silu′(g),   silu′(g) = σ(g)·(1 + g·(1 − σ(g)))

    Autograd's graph of `F.silu(g) * u` also keeps silu(g), a fourth (B, T, intermediate) tensor
    beside g, u and h (which down_proj keeps): the largest saved activation of a block. The
    backward recomputes silu(g) instead, and takes silu′ from aten's fused `silu_backward`, the
    kernel autograd itself runs for F.silu: no slower than autograd's graph.
    """

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return torch.ops.aten.silu_backward(dh * u, g), F.silu(g).mul_(dh)


class SwiGLUDownFn(torch.autograd.Function):
    """y = h·Wᵀ with h = silu(g)·u: the SwiGLU gate and the down projection in one Function that
    keeps g and u only. Autograd would also keep h, the down projection's input, one more
    (B, T, intermediate) tensor per block; the backward rebuilds it instead (one product):

        ∂L/∂W = Σ_rows dyᵀ·h        ∂L/∂h = dy·W,   then ∂L/∂g and ∂L/∂u as in `SiLUMulFn`
    """

    @staticmethod
    def forward(ctx, g, u, w):
        ctx.save_for_backward(g, u, w)
        return F.linear(F.silu(g).mul_(u), w)

    @staticmethod
    def backward(ctx, dy):
        g, u, w = ctx.saved_tensors
        s = F.silu(g)
        dh = dy @ w                                                   # (..., intermediate)
        dw = None
        if ctx.needs_input_grad[2]:         # a frozen W (LoRA elsewhere) needs no h
            dw = dy.flatten(0, -2).t() @ (s * u).flatten(0, -2)
        return torch.ops.aten.silu_backward(dh * u, g), dh.mul_(s), dw


# ---------------------------------------------------------------------------- attention
def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """`F.scaled_dot_product_attention`, except one query per row on a CPU in fp32/fp64 (a decoding
    step), which goes to `decode_attention`."""
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        return decode_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=enable_gqa)


def decode_attention(q, k, v, attn_mask=None):
    """softmax(q·kᵀ/√d)·v for one query per row (a decoding step), written out in matmuls.

    q: (B, H, 1, hd); k, v: (B, H_kv, T, hd); attn_mask: None or boolean (B, 1, 1, T), True where a
    key may be seen. Each key/value head serves the G = H / H_kv query heads beside it (grouped-query
    attention), so the queries are viewed as (B, H_kv, G, hd) against their own keys: no copy of the
    keys per query head. The same numbers as SDPA, whose CPU kernel tiles for blocks of many
    queries: 3% (32 rows) to 6% (64 rows) faster decoding in bench.py's W4 model. For fp32 and
    fp64 only: in bf16 SDPA keeps the scores in fp32, these matmuls would round them to bf16.
    """
    B, H, _, hd = q.shape
    H_kv = k.shape[1]
    scores = q.view(B, H_kv, H // H_kv, hd) @ k.transpose(-1, -2) * hd ** -0.5   # (B, H_kv, G, T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return (scores.softmax(-1) @ v).view(B, H, 1, hd)


# ---------------------------------------------------------------------------- AdamW
def _without_compiler(name: str):
    """torch.optim.Optimizer's method `name` as written, without the `torch._disable_dynamo`
    wrapper around it, whose first call imports torch._dynamo and sympy: ~70 MB of every training
    process and a second or two of start-up, for a compiler none of the scripts runs by default."""
    method = getattr(torch.optim.Optimizer, name)
    return getattr(method, "__wrapped__", method)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, arXiv 1711.05101, Algorithm 2).
    For each parameter θ with gradient g, at step t = 1, 2, ...:

        m ← β₁·m + (1 − β₁)·g               v ← β₂·v + (1 − β₂)·g²
        θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε),   m̂ = m / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)

    `torch.optim.AdamW(fused=True)`'s numbers and state dict (a checkpoint of either loads into
    the other). On CPU and CUDA the update runs as aten's fused kernel (`torch._fused_adamw_`, the
    one torch's calls): one pass over each parameter's memory for all five lines. On other devices,
    or with `fused=False`, the same lines run as the tensor ops of `_adamw_ops`.
    """

    add_param_group = _without_compiler("add_param_group")
    zero_grad = _without_compiler("zero_grad")
    state_dict = _without_compiler("state_dict")

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool | None = None):
        # fused: None = aten's kernel wherever it has one (CPU, CUDA); a group setting, as in torch
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:          # torch.optim's contract: re-evaluate the loss first
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2,
                         weight_decay=group["weight_decay"], eps=group["eps"])
            by_kind = {}     # one kernel call per device and dtype, as the fused kernel requires
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), params in by_kind.items():
                fused = group.get("fused")
                fused = device.type in ("cpu", "cuda") if fused is None else fused
                states = [self._state(p) for p in params]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                # a sharded (FSDP) parameter updates its own shard: the local tensors
                tensors = [[_local(t) for t in ts] for ts in (
                    params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states])]
                if fused:
                    torch._fused_adamw_(*tensors, [], steps, amsgrad=False, maximize=False, **hyper)
                else:
                    _adamw_ops(*tensors, steps, **hyper)
        return loss

    def _state(self, p):
        if not self.state[p]:
            self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        return self.state[p]

    def load_state_dict(self, state_dict: dict):
        """torch.optim's, then each step count moved to its parameter's device as float32 (the
        fused kernel reads it there)."""
        _without_compiler("load_state_dict")(self, state_dict)
        for p, s in self.state.items():
            s["step"] = s["step"].to(device=p.device, dtype=torch.float32)


def _adamw_ops(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps):
    """AdamW's update as plain tensor ops (the docstring's lines, in order), one parameter at a time."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = step.item()
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)                                  # β₁·m + (1 − β₁)·g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def _local(t):
    """A DTensor's local shard (in place updates land in the DTensor), any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
