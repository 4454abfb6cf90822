"""Checkpoint directories that Hugging Face `transformers` loads as they are, and training state.

A model checkpoint is `config.json` + `model.safetensors` (HF parameter names) + the tokenizer
files + `generation_config.json`. A score model (reward or value) is saved as
`*ForSequenceClassification` with `score.weight` and `num_labels: 1`. Training state for resume
(optimizer, scheduler, step, RNG states, data position) is `state.safetensors` (every tensor) +
`state.json` (everything else). No pickle is written or read.

Every model is written through `files.atomic_dir` (a temporary sibling directory renamed into
place), so an interrupted save leaves the previous checkpoint as it was.
"""
import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import atomic_dir
from .model import GPT, GPTConfig, ScoreModel

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT2"}


# ---------------------------------------------------------------- config.json <-> GPTConfig

def config_to_hf(cfg: GPTConfig, head: str = "lm", dtype: str = "float32") -> dict:
    """The HF `config.json` dict for a minipost config; head is "lm" or "score".

    dtype: the weights' dtype, written as `dtype` (transformers 5) and `torch_dtype` (4).
    """
    family = FAMILIES[cfg.model_type]
    arch = f"{family}ForSequenceClassification" if head == "score" else (
        "GPT2LMHeadModel" if cfg.model_type == "gpt2" else f"{family}ForCausalLM")
    out = {"architectures": [arch], "model_type": cfg.model_type, "dtype": dtype,
           "torch_dtype": dtype,
           "vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
           "tie_word_embeddings": cfg.tie_word_embeddings,
           "initializer_range": cfg.initializer_range}
    if cfg.model_type == "gpt2":
        out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
                   n_head=cfg.num_attention_heads, n_positions=cfg.max_position_embeddings,
                   n_inner=cfg.intermediate_size, layer_norm_epsilon=cfg.rms_norm_eps,
                   activation_function=cfg.hidden_act)
    else:
        out.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                   num_hidden_layers=cfg.num_hidden_layers,
                   num_attention_heads=cfg.num_attention_heads,
                   num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                   max_position_embeddings=cfg.max_position_embeddings,
                   rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                   hidden_act=cfg.hidden_act, attention_bias=cfg.attention_bias,
                   mlp_bias=False, attention_dropout=0.0, use_cache=True)
    if head == "score":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return {**cfg.extra, **out}


def config_from_hf(d: dict) -> GPTConfig:
    """A minipost config from an HF `config.json` dict (Llama, Qwen2, Qwen3, GPT-2)."""
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise CheckpointError(f"unsupported model_type {mt!r}; supported: {', '.join(FAMILIES)}")
    _check_supported(d)
    # an absent tie_word_embeddings means transformers' class default: tied for GPT-2 only
    common = dict(vocab_size=d["vocab_size"], bos_token_id=d.get("bos_token_id"),
                  eos_token_id=_first(d.get("eos_token_id")), pad_token_id=d.get("pad_token_id"),
                  tie_word_embeddings=d.get("tie_word_embeddings", mt == "gpt2"),
                  initializer_range=d.get("initializer_range", 0.02))
    if mt == "gpt2":
        n = d["n_embd"]
        return GPTConfig.gpt2(hidden_size=n, num_hidden_layers=d["n_layer"],
                              num_attention_heads=d["n_head"],
                              max_position_embeddings=d["n_positions"],
                              intermediate_size=d.get("n_inner") or 4 * n,
                              rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                              hidden_act=d.get("activation_function", "gelu_new"), **common)
    rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return GPTConfig(
        model_type=mt, hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rope_theta=rope_theta, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        hidden_act=d.get("hidden_act", "silu"),
        attention_bias=True if mt == "qwen2" else d.get("attention_bias", False),
        qk_norm=mt == "qwen3", **common)


def _first(x):
    return x[0] if isinstance(x, list) else x


def _check_supported(d: dict):
    """Refuse, by name, the config features minipost's decoder does not implement."""
    mt = d["model_type"]

    def refuse(what):
        raise CheckpointError(f"{mt} config with {what} is not supported by minipost's decoder")
    if mt == "gpt2":
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse(f"activation_function {d['activation_function']!r} (supported: gelu_new)")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                     "add_cross_attention"):
            if d.get(flag):
                refuse(f"{flag}=true")
        return
    # rope_scaling (transformers 4) or rope_parameters (5); "default" is plain RoPE
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        refuse(f"rope_type {rope_type!r} (supported: default)")
    if d.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {d['hidden_act']!r} (supported: silu)")
    if d.get("mlp_bias"):
        refuse("mlp_bias=true")
    if mt != "qwen2" and d.get("attention_bias"):   # Llama/Qwen3 would also bias o_proj
        refuse("attention_bias=true")
    if d.get("use_sliding_window"):
        refuse("use_sliding_window=true (sliding-window attention)")


def read_config(path) -> tuple[GPTConfig, str]:
    """(config, head) of a checkpoint directory; head is "lm" or "score"."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (it does not exist)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    try:
        cfg = config_from_hf(d)
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: missing field {e}") from None
    archs = d.get("architectures") or []
    head = "score" if any(a.endswith("ForSequenceClassification") for a in archs) else "lm"
    return cfg, head


# ---------------------------------------------------------------- weights

def read_weights(path) -> dict:
    """All tensors of a checkpoint directory, from one or several (sharded) safetensors files."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (nor a sharded index); "
                              "pytorch_model.bin is not read, since it is a pickle")
    sd = {}
    for f in files:
        if not (path / f).exists():
            raise CheckpointError(f"{path}: missing shard {f} (listed in model.safetensors.index.json)")
        try:
            sd.update(load_file(str(path / f)))
        except Exception as e:  # safetensors' own error type varies by version
            raise CheckpointError(f"{path / f}: not a readable safetensors file ({e})") from None
    return sd


def save_model(model, path, tokenizer=None, extra_config: dict | None = None):
    """Write `model` (GPT or ScoreModel) as an HF checkpoint directory, atomically.

    extra_config: more fields for config.json (e.g. the run's arguments under "minipost").
    """
    from . import hf  # GPT-2 renames its parameters; Llama/Qwen need no renaming
    head = "score" if isinstance(model, ScoreModel) else "lm"
    cfg = model.config
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)      # safetensors refuses shared storage; HF re-ties it
    sd = hf.export_state_dict(cfg, sd)
    with atomic_dir(path) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps({**config_to_hf(cfg, head, dtype),
                                                     **(extra_config or {})}, indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
               "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)


def load_model(path, dtype=None, device=None, head: str = "lm"):
    """Load a minipost or supported HF checkpoint directory as a GPT (head="lm") or ScoreModel.

    A checkpoint directory only: `peft.load_model` also takes an adapter output directory (what
    every `--init` may be given).
    """
    from . import hf
    cfg, saved_head = read_config(path)
    if head == "lm" and saved_head == "score":
        raise CheckpointError(f"{path}: this is a reward/score model (ForSequenceClassification), "
                              "not a language model; pass a policy checkpoint")
    sd = hf.import_state_dict(cfg, read_weights(path))
    model = (ScoreModel if head == "score" else GPT)(cfg)
    if head == "score" and saved_head == "lm":  # a fresh zero head on a language model's decoder
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
        sd["score.weight"] = model.score.weight.detach().clone()
    if cfg.tie_word_embeddings and head == "lm":
        sd.setdefault("lm_head.weight", sd.get("model.embed_tokens.weight"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(expected) if "rotary_emb" not in k)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(f"{path}: weight {k} has shape {tuple(sd[k].shape)}, "
                                  f"config.json implies {tuple(v.shape)}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=True)
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- training state

def _flatten(obj, tensors: dict, prefix: str):
    """Nested dicts/lists with tensors -> JSON-able structure; tensors moved into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):  # (NumPy's RNG key is uint32: stored widened to int64)
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64))
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors, f"{prefix}.k{i}"), _flatten(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path, state: dict):
    """Write any nest of dicts/lists/tensors/numbers as `state.safetensors` + `state.json`."""
    tensors = {}
    tree = _flatten(state, tensors, "s")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "state.safetensors"))
    (path / "state.json").write_text(json.dumps(tree))


def load_state(path) -> dict:
    path = Path(path)
    tensors = load_file(str(path / "state.safetensors"))
    return _unflatten(json.loads((path / "state.json").read_text()), tensors)


# ---------------------------------------------------------------- reward models

def reward_stats(path) -> tuple[float, float]:
    """(μ, σ) of a reward model's scores on its held-out pairs, which train_rm.py writes into its
    config.json ("minipost": reward_mean, reward_std); (0, 1) for a reward model from elsewhere."""
    meta = json.loads(Path(path, "config.json").read_text()).get("minipost", {})
    return float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0)) or 1.0
