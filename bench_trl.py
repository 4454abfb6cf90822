"""The TRL / transformers side of `python bench.py --compare trl`: the same workloads, their code.

    pip install trl transformers            # only for this comparison; minipost never imports them
    python bench.py --compare trl --repeats 2

The model is `LlamaForCausalLM` (`LlamaForSequenceClassification` for W2) with the bench model's
config (SDPA attention); the data are the same random token ids, given to each trainer already
tokenized. Trainers are timed by a callback from the start to the end of each optimiser step, so
the data loader is inside a step's time, as it is in a real run; warm-up steps are dropped.

    W0  a bare loop: model(input_ids, labels=...) loss, backward, torch AdamW (fused)
    W1  SFTTrainer, completion-only loss        W2  RewardTrainer
    W3  DPOTrainer with a live reference        W4  model.generate (sampled and greedy)
    W5  GRPOTrainer, 8 generations per prompt, β=0.04, the same stand-in reward (even token ids)
"""
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench_common import (bench_config, flops_per_token, generation_flops, matmul_ceiling,
                          random_ids, row, sync, time_steps)
from minipost.cli import peak_rss_mb, setup


def llama_config(cfg, **kw):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                       max_position_embeddings=cfg.max_position_embeddings,
                       bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id, attn_implementation="sdpa", **kw)


def word_tokenizer(cfg):
    """A tokenizer with one word per token id ("t17 t5 t900"), for trainers that want text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t0"))
    # "t5t2" (EOS appended without a space) is two tokens
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"t\d+"), "isolated")])
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t2",
                                   pad_token="t3", unk_token="t0")


def as_text(ids):
    return [" ".join(f"t{i}" for i in r) for r in ids.tolist()]


def step_timer():
    """A TrainerCallback recording the wall time of each optimiser step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(self.device)
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def common_args(args, rt, out_dir):
    return dict(output_dir=out_dir, max_steps=args.warmup + args.steps, learning_rate=1e-4,
                report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
                use_cpu=rt.device.type == "cpu", bf16=rt.device.type == "cuda", seed=args.seed,
                dataloader_num_workers=0, max_grad_norm=1.0, adam_beta2=0.95,
                lr_scheduler_type="constant",
                gradient_checkpointing=args.grad_checkpointing)   # TRL's own default is True


def run_trainer(trainer_cls, config, model, dataset, args, rt, **kw):
    timer = step_timer()
    timer.device = rt.device
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, callbacks=[timer], **kw)
    trainer.train()
    return timer.times[args.warmup:], trainer


def rows_of(ids):
    return [r.tolist() for r in ids.cpu()]


# ---------------------------------------------------------------------------- workloads
def w0(args, cfg, rt, gen):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(llama_config(cfg)).to(rt.device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = random_ids(gen, cfg, 16, 256, device=rt.device)

    def step():
        with rt.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args, rt.device)
    return [matmul_ceiling(args, rt), row("bare transformers train loop 16×256", times, ids.numel(),
                                          "tok/s", ids.numel() * flops_per_token(cfg, 256))]


def w1(args, cfg, rt, gen):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    n = 16 * (args.warmup + args.steps)
    ids = rows_of(random_ids(gen, cfg, n, 256, device="cpu"))
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * 128 + [1] * 128] * n})
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(per_device_train_batch_size=16, max_length=256, packing=False,
                           completion_only_loss=True, **common_args(args, rt, out))
        times, _ = run_trainer(SFTTrainer, config, LlamaForCausalLM(llama_config(cfg)), data, args,
                               rt, processing_class=word_tokenizer(cfg))
    return [row("SFTTrainer 16×256", times, 16 * 256, "tok/s", 16 * 256 * flops_per_token(cfg, 256))]


def w2(args, cfg, rt, gen):
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    n = 16 * (args.warmup + args.steps)
    data = Dataset.from_dict({"chosen_ids": rows_of(random_ids(gen, cfg, n, 128, device="cpu")),
                              "rejected_ids": rows_of(random_ids(gen, cfg, n, 128, device="cpu"))})
    model = LlamaForSequenceClassification(llama_config(cfg, num_labels=1))
    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(per_device_train_batch_size=16, max_length=256,
                              **common_args(args, rt, out))
        times, _ = run_trainer(RewardTrainer, config, model, data, args, rt,
                               processing_class=word_tokenizer(cfg))
    return [row("RewardTrainer 16 pairs × 128", times, 16, "pairs/s",
                32 * 128 * flops_per_token(cfg, 128, head_size=1))]


def w3(args, cfg, rt, gen):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    n = 16 * (args.warmup + args.steps)
    # text, as DPOTrainer tokenizes it itself; it appends EOS, so completions are 63 + 1 tokens
    data = Dataset.from_dict({"prompt": as_text(random_ids(gen, cfg, n, 64, device="cpu")),
                              "chosen": as_text(random_ids(gen, cfg, n, 63, device="cpu")),
                              "rejected": as_text(random_ids(gen, cfg, n, 63, device="cpu"))})
    model = LlamaForCausalLM(llama_config(cfg))
    ref_model = LlamaForCausalLM(llama_config(cfg))
    ref_model.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(per_device_train_batch_size=16, max_length=128, beta=0.1,
                           precompute_ref_log_probs=args.precompute_ref, **common_args(args, rt, out))
        times, _ = run_trainer(DPOTrainer, config, model, data, args, rt, ref_model=ref_model,
                               processing_class=word_tokenizer(cfg))
    flops = 32 * 128 * flops_per_token(cfg, 128)
    if not args.precompute_ref:
        flops += 32 * 128 * flops_per_token(cfg, 128, train=False)
    name = "DPOTrainer 16 pairs, " + ("precomputed ref" if args.precompute_ref else "live ref")
    return [row(name, times, 16, "pairs/s", flops)]


def w4(args, cfg, rt, gen):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM(llama_config(cfg)).to(rt.device).eval()
    prompts = random_ids(gen, cfg, 32, 32, device=rt.device)
    mask = torch.ones_like(prompts)
    flops = generation_flops(cfg, 32, 32, 64)
    rows = []
    for sample, name in [(True, "generate T=1, 32×64 new"), (False, "generate greedy, 32×64 new")]:
        def step():
            with torch.no_grad(), rt.autocast():
                model.generate(prompts, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                               do_sample=sample, temperature=1.0 if sample else None, top_k=0 if sample else None,
                               top_p=1.0 if sample else None, eos_token_id=None, pad_token_id=3)
        rows.append(row(name, time_steps(step, args, rt.device), 32 * 64, "new tok/s", flops))
    return rows


def w5(args, cfg, rt, gen):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    n = 8 * (args.warmup + args.steps)
    prompts = as_text(random_ids(gen, cfg, n, 32, device="cpu"))

    def even_tokens(completion_ids, **kw):          # the stand-in reward of bench.w5
        return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out:
        # GRPOTrainer builds its reference model from the policy's path, so it gets a path
        model = LlamaForCausalLM(llama_config(cfg))
        model.save_pretrained(f"{out}/init")
        word_tokenizer(cfg).save_pretrained(f"{out}/init")
        config = GRPOConfig(per_device_train_batch_size=64, num_generations=8,
                            max_completion_length=64, beta=0.04, temperature=1.0,
                            generation_kwargs={"min_new_tokens": 64},  # no early EOS, as W5 says
                            **common_args(args, rt, out))
        times, _ = run_trainer(GRPOTrainer, config, f"{out}/init",
                               Dataset.from_dict({"prompt": prompts}), args, rt,
                               reward_funcs=even_tokens, processing_class=word_tokenizer(cfg))
    N, P, C = 64, 32, 64
    flops = (generation_flops(cfg, N, P, C) + N * (P + C) * flops_per_token(cfg, P + C, train=False)
             + N * (P + C) * flops_per_token(cfg, P + C))
    return [row("GRPOTrainer 8×8, 32+64", times, 1, "steps/s", flops)]


def run_workload(args) -> dict:
    rt = setup(args)
    cfg = bench_config(args.tiny)
    gen = torch.Generator().manual_seed(args.seed)
    fn = {"W0": w0, "W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5}[args.workload]
    rows = fn(args, cfg, rt, gen)
    return {"workload": args.workload, "impl": "trl", "device": str(rt.device), "rows": rows,
            "peak_rss_mb": peak_rss_mb()}
