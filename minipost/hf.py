"""Parameter-name conversion between minipost and Hugging Face checkpoints.

minipost's parameter names already are HF's Llama/Qwen2/Qwen3 names, so those need no renaming.
GPT-2 uses other names and `Conv1D` layers (weights stored as (in, out), the transpose of
nn.Linear), with q, k and v fused into one `c_attn`; these functions translate both ways.
"""
import torch


def _gpt2_pairs(cfg):
    """(minipost name, HF GPT-2 name, is a Conv1D weight) for every unfused parameter."""
    pairs = [("model.embed_tokens.weight", "transformer.wte.weight", False),
             ("model.embed_positions.weight", "transformer.wpe.weight", False),
             ("model.norm.weight", "transformer.ln_f.weight", False),
             ("model.norm.bias", "transformer.ln_f.bias", False)]
    for i in range(cfg.num_hidden_layers):
        m, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for a, b in [("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")]:
            pairs += [(m + a + ".weight", h + b + ".weight", False), (m + a + ".bias", h + b + ".bias", False)]
        for a, b in [("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                     ("mlp.down_proj", "mlp.c_proj")]:
            pairs += [(m + a + ".weight", h + b + ".weight", True), (m + a + ".bias", h + b + ".bias", False)]
    return pairs


def export_state_dict(cfg, sd: dict) -> dict:
    """minipost state dict -> the HF state dict of the same family."""
    if cfg.model_type != "gpt2":
        return sd
    sd = dict(sd)
    out = {}
    for ours, theirs, conv in _gpt2_pairs(cfg):
        if ours in sd:
            w = sd.pop(ours)
            out[theirs] = w.t().contiguous() if conv else w
    for i in range(cfg.num_hidden_layers):
        m = f"model.layers.{i}.self_attn."
        q, k, v = (sd.pop(m + f"{x}_proj.weight") for x in "qkv")
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, v], 0).t().contiguous()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
            [sd.pop(m + f"{x}_proj.bias") for x in "qkv"], 0)
    out.update({k: v for k, v in sd.items() if not k.startswith("model.")})  # lm_head / score
    return out


def import_state_dict(cfg, sd: dict) -> dict:
    """HF state dict -> minipost names (identity for Llama/Qwen)."""
    if cfg.model_type != "gpt2":
        return sd
    sd = {k.removeprefix("transformer.") if k.startswith("transformer.transformer.") else k: v
          for k, v in sd.items()}
    if not any(k.startswith("transformer.") for k in sd):   # a bare GPT2Model: add the prefix
        sd = {("transformer." + k if not k.startswith(("lm_head", "score")) else k): v
              for k, v in sd.items()}
    out = {}
    for ours, theirs, conv in _gpt2_pairs(cfg):
        if theirs in sd:
            w = sd.pop(theirs)
            out[ours] = w.t().contiguous() if conv else w
    d = cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        h = f"transformer.h.{i}.attn."
        w = sd.pop(h + "c_attn.weight").t()                    # (3d, d)
        b = sd.pop(h + "c_attn.bias")
        for j, x in enumerate("qkv"):
            out[f"model.layers.{i}.self_attn.{x}_proj.weight"] = w[j * d:(j + 1) * d].contiguous()
            out[f"model.layers.{i}.self_attn.{x}_proj.bias"] = b[j * d:(j + 1) * d].contiguous()
        sd.pop(h + "bias", None)
        sd.pop(h + "masked_bias", None)                         # old causal-mask buffers
    out.update({k: v for k, v in sd.items() if not k.startswith("transformer.")})
    return out
