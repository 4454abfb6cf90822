"""Autograd Functions whose backward is written out, for the model's largest saved activations.

Autograd's graph of a composite op keeps every intermediate its backward may need. Written by hand,
the gradient of RMSNorm needs only x and 1/rms, and that of the SwiGLU gate and down projection only
g and u: at bench.py's W1 shape the activations saved for the backward fall from 504 to 323 MiB
(−36%; tensors counted once per storage), at the same speed. `minipost.model` uses them when a
gradient is wanted (RMSNormFn in fp32/fp64 only); `tests/test_model.py` checks each against finite
differences (`gradcheck`) and counts the bytes they save.
"""
import torch
import torch.nn.functional as F


def _rms_norm(x, w, eps: float):
    """(x·r·w, r) with r = 1/sqrt(mean(x²) + ε), shape (..., 1)."""
    sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()   # no x² buffer
    r = torch.rsqrt(sum_sq / x.shape[-1] + eps)
    return (x * r).mul_(w), r


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x, w, eps: float):
    """RMSNorm through `RMSNormFn` when a gradient is wanted; otherwise (decoding, reference and
    rollout forwards) the same ops without an autograd Function, whose ~5 µs a call is ~2% of a
    decoding step at bench.py's W4 shape. The numbers are the same either way."""
    return RMSNormFn.apply(x, w, eps) if _needs_grad(x, w) else _rms_norm(x, w, eps)[0]


def silu_mul(g, u):
    """silu(g)·u through `SiLUMulFn` when a gradient is wanted, the same ops directly otherwise."""
    return SiLUMulFn.apply(g, u) if _needs_grad(g, u) else F.silu(g).mul_(u)


class RMSNormFn(torch.autograd.Function):
    """y = x̂·w with x̂ = x·r, r = 1/sqrt(mean(x²) + ε), and its gradient written out:

        ∂L/∂w = Σ_rows dy·x̂        ∂L/∂x = r·(g − x̂·mean(g·x̂)),   g = dy·w

    (from ∂r/∂x_j = −r³·x_j / d). The backward keeps x and r only; autograd's graph of the same
    ops would also keep x̂, one more (B, T, d) tensor per norm, and runs more ops.

    In-place ops (`mul_`, `sub_`, here, in `SiLUMulFn` and in model.py's `apply_rope`) write into a buffer
    just made instead of allocating another (B, T, ·) one. Fewer short-lived large buffers leave
    glibc's heap less fragmented: at bench.py's W1 the process's peak RSS fell by ~100 MB and the
    step by ~4% (before, a third of the heap at the peak was free holes between live buffers).
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
