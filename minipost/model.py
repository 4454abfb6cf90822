"""A GPT-style decoder that covers the Llama family (Llama, SmolLM2, Qwen2/2.5, Qwen3) and GPT-2.

One `GPTConfig` with Hugging Face field names, one `GPT` module whose parameter names are Hugging
Face's Llama/Qwen3 names (`model.layers.0.self_attn.q_proj.weight`, ...), so a Llama/Qwen checkpoint
loads with no renaming. GPT-2 differs only by switches: LayerNorm, learned positions, a GELU MLP
without a gate, biases. (Importing GPT-2's own parameter names is `minipost/hf.py`'s job.)

Sources: Vaswani et al. 2017 (arXiv 1706.03762); Radford et al. 2019 (GPT-2); Touvron et al. 2023
(Llama, arXiv 2302.13971): RMSNorm (Zhang & Sennrich 2019), RoPE (Su et al. 2021, arXiv 2104.09864),
SwiGLU (Shazeer 2020, arXiv 2002.05202); grouped-query attention (Ainslie et al. 2023, arXiv
2305.13245); Qwen3's per-head q/k RMSNorm.

Speed: each layer below is the plain computation. `use_fast_paths`, switched on for every model
this module builds, sends RMSNorm, the SwiGLU MLP and attention through `minipost/fast.py`: the same
numbers (tested), with less memory kept for the backward and faster CPU decoding.

Padding: batches may be left-padded (generation) or right-padded (training). Positions come from the
attention mask (`cumsum(mask) - 1`), so each row sees the positions it would see alone; this matters
for learned positions (GPT-2) and is harmless for RoPE (docs/pitfalls.md, "Padding and position
ids").

Per-token quantities of the logits that every loss and log reads: `token_logprobs` and, aligned
with it, `token_entropy` (the `entropy` the RL and preference scripts log).
"""
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import fast


@dataclass
class GPTConfig:
    model_type: str = "llama"          # "llama" | "qwen2" | "qwen3" | "gpt2"
    vocab_size: int = 512
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None        # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False       # q/k/v bias (Qwen2) — and o/MLP bias too for GPT-2
    qk_norm: bool = False              # per-head RMSNorm on q and k (Qwen3)
    hidden_act: str = "silu"           # "silu" (SwiGLU) | "gelu_new" (GPT-2 MLP)
    norm_type: str = "rmsnorm"         # "rmsnorm" | "layernorm"
    position_embedding: str = "rope"   # "rope" | "learned"
    initializer_range: float = 0.02    # std of the normal init of every weight matrix
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3
    extra: dict = field(default_factory=dict)  # unmapped config fields, kept for export

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def gpt2(cls, **kw):
        """The GPT-2 switches: LayerNorm, learned positions, GELU MLP, biases everywhere."""
        base = dict(model_type="gpt2", norm_type="layernorm", position_embedding="learned",
                    hidden_act="gelu_new", attention_bias=True, rms_norm_eps=1e-5,
                    intermediate_size=4 * kw.get("hidden_size", 192))
        return cls(**{**base, **kw})

    def to_dict(self):
        return asdict(self)


def _norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, eps=cfg.rms_norm_eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · w, computed in fp32 (Zhang & Sennrich 2019)."""
    fast_path = False   # use_fast_paths: fast.rms_norm (keeps x and 1/rms, not x/rms as well)

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.fast_path and fast.full_precision(x, self.weight):
            return fast.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 (fp64 stays fp64), round to x's dtype, then scale (as Hugging Face does)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * F.rms_norm(xf, (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin tables for RoPE at the given positions: (B, T) -> two (B, T, 1, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / head_dim))
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)            # (B, T, head_dim): HF's half-split layout
    return emb.cos()[:, :, None].to(dtype), emb.sin()[:, :, None].to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle (Su et al. 2021, eq. 34, HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1).mul_(sin).addcmul_(x, cos)   # x·cos + rotate(x)·sin


class KVCache:
    """A preallocated key/value cache: one (B, H_kv, T_max, head_dim) buffer per layer.

    Generation writes each step's keys and values in place at `self.length`, so decoding does no
    concatenation and no reallocation.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_length: int, dtype, device):
        shape = (batch_size, cfg.num_key_value_heads, max_length, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens already written

    def update(self, layer: int, k, v):
        """Write new keys/values (B, H_kv, T_new, hd) and return all of them so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """softmax(q·kᵀ/√d + mask)·v over H query heads; each H / H_kv of them share a key/value head."""
    fast_path = False   # use_fast_paths: fast.attention (a CPU decoding step in two matmuls)

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, hkv * hd, bias=cfg.attention_bias)
        # Llama/Qwen have no output bias; GPT-2 has one.
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.model_type == "gpt2")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, rope, attn_mask, cache: KVCache | None):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # (B, H, T, hd) views of (B, T, H, hd) memory: SDPA returns its output in the same layout,
        # so o_proj's input below is a view of it, not a copy (one (B, T, d) tensor less to keep)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                      # (B, H_kv, T_past+T, hd)
        attend = fast.attention if self.fast_path else F.scaled_dot_product_attention
        # No mask is SDPA's fast path: causal for a fresh sequence (training), and for one new
        # token after a cache (decoding) nothing to hide, as it may see every cached key.
        y = attend(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                   enable_gqa=cfg.num_key_value_heads != cfg.num_attention_heads)   # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)) for Llama/Qwen; GPT-2: down(gelu(up(x)))."""
    fast_path = False   # use_fast_paths: fast.swiglu_down (keeps g and u, not silu(g)·u too)

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.hidden_act == "silu"
        bias = cfg.model_type == "gpt2"
        if self.gated:
            self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x):
        if not self.gated:
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        g, u = self.gate_proj(x), self.up_proj(x)           # (B, T, intermediate) each
        if self.fast_path:
            return fast.swiglu_down(g, u, self.down_proj)
        return self.down_proj(F.silu(g) * u)               # down(silu(g) ⊙ u)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, attn_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, blocks and final norm: HF's `model.*` submodule, shared by the LM and score heads."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position_embedding == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg, cfg.hidden_size)
        self.gradient_checkpointing = False   # set_gradient_checkpointing: recompute in backward
        use_fast_paths(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                cache: KVCache | None = None):
        """Final-norm hidden states (B, T, D).

        input_ids: (B, T) new tokens. attention_mask: (B, T_past + T), 1 on real tokens, covering the
        cached tokens too when `cache` is given; a right-padded training batch may pass None, since
        causal attention already keeps real tokens from seeing the padding after them, and so may
        a batch without padding (then SDPA runs its causal fast path, and decoding needs no mask).
        position_ids: (B, T), default from the mask. segment_ids: (B, T) document number within a
        packed row (pass restarting position_ids with them).
        """
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
            else:  # left padding: a row's first real token is position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        attn_mask = None  # none needed without padding or packing, unless several new tokens follow a cache
        if attention_mask is not None or segment_ids is not None or (past > 0 and T > 1):
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
            attn_mask = build_attn_mask(attention_mask, segment_ids, T, past + T)
        x = self.embed_tokens(input_ids)
        rope = None
        if cfg.position_embedding == "learned":
            x = x + self.embed_positions(position_ids)
        else:
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if recompute:   # keep only the block's input; its backward reruns its forward
                x = checkpoint(layer, x, rope, attn_mask, None, use_reentrant=False)
            else:
                x = layer(x, rope, attn_mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)


def set_gradient_checkpointing(model: nn.Module, on: bool = True) -> nn.Module:
    """Activation checkpointing (Chen et al. 2016, arXiv 1604.06174) for every decoder in `model`.

    A training forward then keeps only each block's input; the backward reruns the block's forward
    to rebuild what it needs. The saved activations shrink from every intermediate of every block
    (the SwiGLU's four (B, T, intermediate) tensors dominate) to one (B, T, d) tensor per block plus
    one block's intermediates at a time, for about a third more compute (a second forward). Works
    through DDP, FSDP and PEFT wrappers, which all keep the Decoder as a submodule.
    """
    for m in model.modules():
        if isinstance(m, Decoder):
            m.gradient_checkpointing = on
    return model


def use_fast_paths(model: nn.Module, on: bool = True) -> nn.Module:
    """Send every RMSNorm, attention and SwiGLU MLP in `model` through `minipost/fast.py` (on, as
    every Decoder starts), or back to the plain computation written in this module (off). The
    same numbers either way, to fp32's rounding (tests/test_fast.py)."""
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, MLP)):
            m.fast_path = on
    return model


def build_attn_mask(attention_mask, segment_ids, T_new: int, T_total: int):
    """Boolean SDPA mask (B, 1, T_new, T_total): causal, no padded keys, no keys of other documents.

    Queries are the last T_new of T_total positions. Every query may always see itself, so a padded
    query row is never fully masked (SDPA would return NaN); its output is garbage nobody reads.
    """
    device = attention_mask.device
    q_pos = torch.arange(T_total - T_new, T_total, device=device)[:, None]
    k_pos = torch.arange(T_total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]                           # (1, 1, T_new, T_total) causal
    mask = mask & attention_mask[:, None, None, :].bool()         # padded keys
    if segment_ids is not None:                                   # packing: documents stay apart
        mask = mask & (segment_ids[:, None, -T_new:, None] == segment_ids[:, None, None, :])
    return mask | (k_pos == q_pos)[None, None]


class GPT(nn.Module):
    """Decoder + LM head. `forward` returns logits; `hidden_states` returns the final-norm states."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                      cache: KVCache | None = None):
        """Final-norm hidden states (B, T, D); see `Decoder.forward` for the arguments."""
        return self.model(input_ids, attention_mask, position_ids, segment_ids, cache)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                cache: KVCache | None = None, logits_to_keep: int = 0):
        """Logits (B, T, V). A left-padded batch gives each row's real tokens the logits it gets alone.
        `logits_to_keep` = n > 0: only the last n positions' logits (B, n, V), as in Hugging Face:
        a prefill needs the last one, a completion's log-probs the last N + 1."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, cache)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non-embedding excludes token/position embeddings and a tied head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if self.config.position_embedding == "learned":
                n -= self.model.embed_positions.weight.numel()
        return n


def token_logprobs(logits, tokens):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: (B, T, V), (B, T) -> (B, T-1).

    The log-prob of token t comes from the logits at t-1 (docs/pitfalls.md, "Log-prob alignment").
    Computed in fp32 as -cross_entropy, which never materialises the full log-softmax in the
    caller's dtype. The targets are shifted rather than the logits: slicing `logits[:, :-1]` would
    copy all of them (and again in the backward pass); the last column, scored against a
    wrapped-around token, is dropped instead.
    """
    targets = tokens.roll(-1, dims=1)                             # (B, T) the next token
    logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return logps.view(tokens.shape)[:, :-1]                       # (B, T-1)


def entropies(logits):
    """H = −Σ_v p_v log p_v of softmax(logits) at every position, fp32: (..., V) -> (...)."""
    logp_all = logits.float().log_softmax(-1)
    return -(logp_all.exp() * logp_all).sum(-1)


def token_entropy(logits, mask):
    """Mean entropy (nats) of the policy's next-token distributions at the scored tokens.

    H_t = −Σ_v π(v | x_<t) log π(v | x_<t), from the logits that predict token t, aligned as
    `token_logprobs` aligns log-probs: logits (B, T, V) give T − 1 distributions, for the
    tokens 1 … T−1. A policy whose entropy falls towards 0 samples the same completion every time
    (a collapsed group has no reward spread to learn from). Differentiable; call it under
    `torch.no_grad()` when it is only logged.

    Args:
        logits: (B, T, V) model outputs, any float dtype (computed in fp32).
        mask: (B, T − 1) 1 on the scored tokens, the mask applied to token_logprobs' output.

    Returns the mean over masked tokens (every token weighs the same, not every sequence); NaN
    when the mask is empty.
    """
    m = mask.float()
    entropy = entropies(logits[:, :-1])                                            # (B, T−1)
    return (entropy * m).sum() / m.sum()


def first_logit_column(loss_mask) -> int:
    """The first column whose logits a loss over `loss_mask` (B, T) reads: the one before the
    first target token of any row (one host sync). `logits_to_keep=T − it` skips the prompt's."""
    return max(int(loss_mask.any(0).int().argmax()) - 1, 0)


def last_token_index(attention_mask):
    """Index of each row's last real token, for left or right padding: (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def last_scores(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token scores (N, T) -> each row's score at its last real token (N,)."""
    return scores.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


class ScoreModel(nn.Module):
    """Decoder + a scalar head: HF's `*ForSequenceClassification` with `num_labels = 1`.

    A reward model reads the score at each row's last real token; a PPO value model reads one value
    per token. The head is zero-initialised, so a fresh value model predicts 0 (docs/pitfalls.md,
    "Value-head initialisation").
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.model.apply(lambda m: GPT._init_weights(self, m))
        nn.init.zeros_(self.score.weight)

    @classmethod
    def from_lm(cls, lm: GPT) -> "ScoreModel":
        """A score model sharing nothing with `lm`: its decoder weights copied, a zero head."""
        sm = cls(lm.config).to(next(lm.parameters()).device)
        sm.model.load_state_dict(lm.model.state_dict())
        return sm

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                lm_rows: int = 0):
        """Per-token scores (B, T), in fp32; with `lm_rows` = n > 0, also the next-token logits
        (n, T, V) of the first n rows, through the tied embedding matrix, which the decoder still
        holds (a reward model may keep training its language modelling beside the score; only the
        rows it trains on pay for the (T, V) logits)."""
        hidden = self.model(input_ids, attention_mask, position_ids, segment_ids)
        scores = self.score(hidden).squeeze(-1).float()
        if not lm_rows:
            return scores
        if not self.config.tie_word_embeddings:
            raise ValueError("lm_rows needs tied embeddings: a score model keeps no LM head")
        return scores, F.linear(hidden[:lm_rows], self.model.embed_tokens.weight)

    def score_last(self, input_ids, attention_mask):
        """Score at each row's last real token (B,): the reward, whatever the padding side."""
        return last_scores(self(input_ids, attention_mask), attention_mask)
