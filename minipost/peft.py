"""Parameter-efficient fine-tuning for every stage script: one switch, `--peft none|lora|adapter`.

The methods live in `lora.py` (Hu et al. 2021, arXiv 2106.09685: W₀x + (α/r)·B·A·x) and
`adapters.py` (Houlsby et al. 2019, arXiv 1902.00751: u + W_up·σ(W_down·u)), their files in
`peft_format.py`; this module only dispatches, saves and loads, so a script needs three lines:

    model = add_peft(model, **peft_options(args))
    print(trainable_summary(model))
    save_peft(model, args.out_dir, args.peft, args.merge, tokenizer, base_model_name_or_path=args.init)

What a PEFT output directory holds, and how a later stage starts from it:
- LoRA: `adapter_config.json` + `adapter_model.safetensors` in PEFT's format, plus the tokenizer;
  task_type "SEQ_CLS" for a score (reward) model, so PEFT's AutoPeftModelForSequenceClassification
  takes it, else "CAUSAL_LM".
  `load_model(dir)` here (what every `--init`, every reward model and rank.py load with) loads the
  base named by `base_model_name_or_path` with `checkpoint.load_model`, applies the adapter and
  merges it: later stages can `--init` from a LoRA output directly. `merge=True` also writes the
  merged full checkpoint to `dir/merged` (an ordinary HF checkpoint, for tools outside minipost).
- Adapters: the same two files (peft_type "BOTTLENECK", which only minipost reads). A bottleneck has
  a nonlinearity, so it cannot be merged into the base weights and has no place in an HF
  checkpoint; later stages cannot `--init` from it (load it with `load_peft` for evaluation).
"""
import copy
import json
from pathlib import Path

import torch.nn as nn

from . import checkpoint
from .adapters import apply_adapters
from .errors import CheckpointError
from .lora import DEFAULT_TARGETS, apply_lora, count_trainable, merge_lora
from .model import ScoreModel
from .peft_format import load_adapters, load_lora, save_adapters, save_lora
from .reward import RewardEnsemble

KINDS = ("none", "lora", "adapter")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
               "generation_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "minipost.json")


def parse_targets(targets):
    """"q_proj,v_proj" -> ("q_proj", "v_proj"); any other string is a regex on the full module
    path (as in PEFT); a tuple or list is returned as a tuple."""
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if all(n.isidentifier() for n in names):
            return tuple(names)
        return targets
    return tuple(targets)


def peft_options(args) -> dict:
    """The add_peft keyword arguments from a script's Args (the shared flag names)."""
    return dict(kind=args.peft, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
                adapter_dim=args.adapter_dim)


def add_peft(model: nn.Module, kind="none", lora_r: int = 8, lora_alpha: float = 16,
             lora_dropout: float = 0.0, lora_targets=DEFAULT_TARGETS, adapter_dim: int = 16,
             modules_to_save=()) -> nn.Module:
    """Make `model` parameter-efficient in place and return it.

    kind: "none" (unchanged, every parameter trains), "lora" (LoRA on `lora_targets`, base frozen),
        "adapter" (bottleneck adapters of width `adapter_dim` after attention and MLP, base frozen).
        A script passes its flags with `**peft_options(args)`.
    modules_to_save: modules that stay fully trainable beside LoRA (a reward model's `score` head);
        with adapters they are unfrozen too.
    """
    if kind not in KINDS:
        raise ValueError(f"peft must be one of {KINDS}, got {kind!r}")
    if kind == "lora":
        return apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                          targets=parse_targets(lora_targets), modules_to_save=modules_to_save)
    if kind == "adapter":
        apply_adapters(model, dim=adapter_dim)
        for name in modules_to_save:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> str:
    """"trainable parameters: 12,345 of 1,900,000 (0.65%)" (a tied matrix counts once)."""
    trainable, total = count_trainable(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def _remove(path: Path, names):
    for name in names:
        if (path / name).exists():
            (path / name).unlink()


def save_peft(model: nn.Module, out_dir, kind: str, merge: bool = False, tokenizer=None,
              base_model_name_or_path: str = "", extra_config: dict | None = None):
    """Save a stage's output: the full model (kind "none") or the adapter alone, plus the tokenizer.

    extra_config: the run's record (`{"minipost": {...}}`); it goes into config.json for a full
    model and into `minipost.json` beside an adapter (PEFT's adapter_config.json stays PEFT's).
    merge: LoRA only; also write the merged full checkpoint to `out_dir/merged`.
    A LoRA adapter of a ScoreModel is saved with PEFT's task_type "SEQ_CLS" (PEFT's
    AutoPeftModelForSequenceClassification refuses "CAUSAL_LM"), any other with "CAUSAL_LM".
    Files of the other kind left by an earlier run in `out_dir` are removed, so the directory is
    never both a model and an adapter.
    """
    out = Path(out_dir)
    if kind not in KINDS:
        raise ValueError(f"peft must be one of {KINDS}, got {kind!r}")
    if merge and kind != "lora":
        raise ValueError("merge: only LoRA can be merged into the base weights "
                         f"(got peft={kind!r}; a bottleneck adapter adds layers)")
    if kind == "none":
        checkpoint.save_model(model, out, tokenizer, extra_config=extra_config)
        _remove(out, ADAPTER_FILES)
        return
    if kind == "lora":   # PEFT picks its model class (and its head) by the task type
        save_lora(model, str(out), base_model_name_or_path=str(base_model_name_or_path),
                  task_type="SEQ_CLS" if isinstance(model, ScoreModel) else "CAUSAL_LM")
    else:
        save_adapters(model, str(out), base_model_name_or_path=str(base_model_name_or_path))
    _remove(out, MODEL_FILES)
    if tokenizer is not None:
        tokenizer.save(str(out))
    if extra_config:
        (out / "minipost.json").write_text(json.dumps(extra_config, indent=2))
    if merge:
        merged = merge_lora(copy.deepcopy(model), unload=True)
        for p in merged.parameters():
            p.requires_grad_(True)
        checkpoint.save_model(merged, out / "merged", tokenizer, extra_config=extra_config)


def is_adapter_dir(path) -> bool:
    """True when `path` holds an adapter (adapter_config.json) and no full model (config.json)."""
    path = Path(path)
    return (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def adapter_base(path) -> str:
    """The base checkpoint an adapter directory names (`base_model_name_or_path`), resolved:
    as written (relative to the working directory) or else relative to the adapter's directory."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path") or ""
    for candidate in (Path(base), Path(path) / base):
        if base and (candidate / "config.json").exists():
            return str(candidate)
    raise CheckpointError(f"{path}: the adapter's base model {base!r} (base_model_name_or_path in "
                          "adapter_config.json) is not a checkpoint directory here")


def load_peft(model: nn.Module, path) -> nn.Module:
    """Apply the adapter saved in `path` (LoRA or bottleneck, from its adapter_config.json) to
    `model`, the base it was trained on; returns `model` with the adapter, unmerged."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("peft_type") == "BOTTLENECK":
        return load_adapters(model, str(path))
    return load_lora(model, str(path))


def load_merged(path, dtype=None, device=None, head: str = "lm") -> nn.Module:
    """A plain model from a LoRA directory: its base + the adapter, merged (what `--init` gets).

    A bottleneck-adapter directory cannot become a plain checkpoint model: CheckpointError.
    """
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{path}: holds a {cfg.get('peft_type')} adapter, which cannot be merged into a plain "
            "model; start the next stage from its base, or train SFT with --peft lora or none")
    model = checkpoint.load_model(adapter_base(path), device=device, head=head)
    model = merge_lora(load_lora(model, str(path)), unload=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.to(dtype=dtype) if dtype is not None else model


def load_model(path, dtype=None, device=None, head: str = "lm") -> nn.Module:
    """A model from any stage's output directory, as a GPT (head="lm") or ScoreModel: a checkpoint
    directory by `checkpoint.load_model`, a LoRA output directory (adapter_config.json, no
    config.json) as its base with the adapter merged in (`load_merged`)."""
    if is_adapter_dir(path):
        return load_merged(path, dtype=dtype, device=device, head=head)
    return checkpoint.load_model(path, dtype=dtype, device=device, head=head)


def load_reward_models(paths: list[str], dtype=None, device=None, combine: str = "mean"):
    """One reward model (a `ScoreModel`), or the `RewardEnsemble` of several; frozen, eval mode."""
    members = [load_model(p, dtype, device, head="score").eval().requires_grad_(False)
               for p in paths]
    if len(members) == 1:
        return members[0]
    return RewardEnsemble(members, *zip(*map(checkpoint.reward_stats, paths)),
                          combine=combine).to(device)
