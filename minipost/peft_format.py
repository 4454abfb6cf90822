"""Adapter directories on disk: LoRA in PEFT's format, bottleneck adapters in the same layout.

An adapter directory is `adapter_config.json` + `adapter_model.safetensors`, written atomically
(files.atomic_dir: `path` is replaced as a whole); the layers themselves live in lora.py and
adapters.py, which know no file format.

- LoRA is saved as PEFT saves it: keys `base_model.model.<module path>.lora_A.weight` (PEFT drops
  `.base_layer` and the adapter name), so `peft.PeftModel.from_pretrained` loads it on the matching
  `transformers` model (minipost's parameter names are Hugging Face's). A `modules_to_save` module
  (a reward or value model's scalar head) is stored under PEFT's saved key
  `base_model.model.<path>.<param>` (e.g. `base_model.model.score.weight`).
- Bottleneck adapters are not a PEFT format: PEFT has no bottleneck type, so their
  `adapter_config.json` (peft_type "BOTTLENECK") is read by `load_adapters` only; keys are module
  paths (`model.layers.0.mlp.adapter.up.bias`).
"""
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .adapters import BottleneckAdapter, adapter_params, adapter_state_dict, apply_adapters
from .files import atomic_dir
from .lora import applied_targets, apply_lora, lora_layers, saved_modules

PEFT_PREFIX = "base_model.model."  # PEFT's prefix for a LoraModel wrapping a *ForCausalLM


# ---------------------------------------------------------------- both kinds

def _write(path: str, config: dict, tensors: dict[str, torch.Tensor]):
    """`path` becomes `adapter_config.json` + `adapter_model.safetensors`, atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})


def _read_config(path: str, peft_type: str) -> dict:
    """`path/adapter_config.json`, which must be of `peft_type`."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != peft_type:
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, expected {peft_type!r}")
    return cfg


def _load_strict(params: dict[str, nn.Parameter], path: str):
    """Copy `path/adapter_model.safetensors` into `params`; every key and shape must match."""
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: adapter keys do not match the model; missing: {missing}; "
                         f"unexpected: {unexpected}")
    with torch.no_grad():
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[k])


# ---------------------------------------------------------------- LoRA, PEFT's format

def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """PEFT saved-key → parameter: LoRA A/B (PEFT drops `.base_layer` and the adapter name)."""
    params = {}
    for path, m in lora_layers(model).items():
        params[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
        params[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
    for path, m in saved_modules(model):
        for name, p in m.named_parameters():
            params[f"{PEFT_PREFIX}{path}.{name}"] = p  # PEFT strips `modules_to_save.default.`
    return params


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names (what `get_peft_model_state_dict` gives)."""
    return {k: p.detach() for k, p in _lora_params(model).items()}


def save_lora(model: nn.Module, path: str, base_model_name_or_path: str = "",
              task_type: str = "CAUSAL_LM"):
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's format, atomically.

    task_type: PEFT's task type, "CAUSAL_LM" for a language model, "SEQ_CLS" for a reward model.
    `path` is replaced as a whole. `target_modules` is what `apply_lora` was given, so a load wraps
    exactly these layers: a regex as the string itself (PEFT reads a string as a regex on the full
    path, as `load_lora` does); names as the list of those that matched a layer.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_lora: the model has no LoRA layers")
    settings = {(m.r, m.alpha, getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_lora: LoRA layers differ in (r, alpha, dropout): {settings}")
    (r, alpha, dropout), = settings
    modules_to_save = list(getattr(model, "lora_modules_to_save", ()))
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": applied_targets(model),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": modules_to_save or None, "use_rslora": False, "init_lora_weights": True,
    }
    _write(path, config, lora_state_dict(model))


def load_lora(model: nn.Module, path: str) -> nn.Module:
    """Apply LoRA as `path/adapter_config.json` says and load its weights (strict); returns `model`.

    Reads adapters written by `save_lora` or by PEFT, as long as they use plain LoRA (no rsLoRA, DoRA,
    bias training, per-layer ranks). `target_modules` is read as PEFT reads it: a list of names
    (or dotted path suffixes), or a string, a regex that the full module path must match.
    """
    cfg = _read_config(path, "LORA")
    unsupported = {k: cfg.get(k) for k in ("use_rslora", "use_dora", "fan_in_fan_out",
                                           "rank_pattern", "alpha_pattern") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise ValueError(f"{path}: unsupported LoRA options {unsupported}")
    targets = cfg["target_modules"]
    apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout") or 0.0,
               targets=targets if isinstance(targets, str) else tuple(targets),
               modules_to_save=tuple(cfg.get("modules_to_save") or ()))
    _load_strict(_lora_params(model), path)
    return model


# ---------------------------------------------------------------- bottleneck adapters

def save_adapters(model: nn.Module, path: str, base_model_name_or_path: str = ""):
    """Write `adapter_config.json` + `adapter_model.safetensors`, atomically (`path` is replaced)."""
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    if not adapters:
        raise ValueError("save_adapters: the model has no adapters")
    config = {
        "peft_type": "BOTTLENECK", "adapter_dim": adapters[0].down.out_features,
        "activation": adapters[0].activation, "target_modules": ["self_attn", "mlp"],
        "base_model_name_or_path": base_model_name_or_path,
    }
    _write(path, config, adapter_state_dict(model))


def load_adapters(model: nn.Module, path: str) -> nn.Module:
    """Apply adapters as `path/adapter_config.json` says and load their weights (strict)."""
    cfg = _read_config(path, "BOTTLENECK")
    apply_adapters(model, dim=cfg["adapter_dim"], activation=cfg.get("activation", "gelu"))
    _load_strict(adapter_params(model), path)
    return model
