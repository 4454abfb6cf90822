"""What the online-RL scripts, train_ppo.py and train_grpo.py, share around their loops: the task's
prompts and held-out rows, the models beside the policy (the reference; PPO's reward and value
models), the check that the trainer reproduces the sampler, and the held-out evaluation.
"""
from pathlib import Path

import torch

from . import dist, rewards
from .cli import require_checkpoint, same_tokenizer
from .errors import UserError
from .evaluate import evaluate_rewards, evaluate_task, heldout_problems, prompt_ids
from .flags import torch_dtype
from .generate import generate
from .model import ScoreModel
from .peft import load_model, load_reward_models
from .reference import Reference
from .reward import RewardEnsemble, reward_members
from .rollout import sequence_scores


# ---------------------------------------------------------------------------- data
def load_task(args, difficulty, eval_difficulty, format_reward: float = 0.0, log=print):
    """(training rows, held-out rows, reward functions): `--data` rows or `--n-prompts` built-in
    ones of `difficulty`, and the reward functions, each row checked and each function probed
    before anything is written (rewards.rl_task); the first `--eval-problems` rows of
    `--eval-data`, else of the built-in task's held-out problems of `eval_difficulty`."""
    rows, held_out, fns = rewards.rl_task(args, difficulty, args.n_prompts, format_reward, log=log)
    if held_out is None:
        held_out = heldout_problems(str(eval_difficulty), args.eval_problems, args.task)
    return rows, held_out[:args.eval_problems], fns


def load_prompts(tokenizer, difficulty, args, log=print) -> tuple[list, list, list, list]:
    """PPO's (prompt ids, rows, held-out rows, reward functions): `load_task`'s at `difficulty`,
    each prompt tokenized; a batch draws --batch-size / --samples-per-prompt distinct prompts, so
    there must be that many (else a UserError)."""
    rows, held_out, fns = load_task(args, difficulty, difficulty, log=log)
    prompts = [prompt_ids(tokenizer, r["prompt"], args.string_prompts) for r in rows]
    k = args.samples_per_prompt
    if len(prompts) < args.batch_size // k:           # a batch draws distinct prompts
        raise UserError(f"{args.data or '--n-prompts'}: {len(prompts)} prompts, fewer than the "
                        f"{args.batch_size // k} distinct ones a batch takes (--batch-size "
                        f"{args.batch_size} / --samples-per-prompt {k})")
    return prompts, rows, held_out, fns


def draw_prompts(order, pos: int, gen, batch_size: int, k: int, rank: int = 0,
                 world_size: int = 1) -> tuple[list, torch.Tensor, int]:
    """The next batch_size/k distinct prompts of the shuffled `order` (a new order, drawn with
    `gen`, when it runs out), each k times, this rank's share of them. Returns (prompt indices,
    order, position)."""
    n_new = batch_size // k
    if pos + n_new > len(order):
        order, pos = torch.randperm(len(order), generator=gen), 0
    B = batch_size // world_size
    idx = order[pos:pos + n_new].repeat_interleave(k)[rank * B:(rank + 1) * B].tolist()
    return idx, order, pos + n_new


# ---------------------------------------------------------------------------- models
def make_reference(model, peft: str, beta: float | None = None) -> Reference | None:
    """The frozen reference π_ref: a copy of the initial policy, or, when training LoRA/adapters
    (`peft` not "none"), the policy itself with its PEFT layers switched off (no copy). None when
    a KL weight `beta` is given and is 0 (nothing built, no memory spent)."""
    if beta == 0:
        return None
    return Reference(model, copy=peft == "none")


def load_reward_model(model, args, rt):
    """PPO's reward model of `--reward-model` (several: their `RewardEnsemble`), frozen. None with
    `--reward gold --value-init policy` when it is missing or does not share the policy's
    tokenizer (it only logs a score then); needed, either stops the run with a UserError."""
    need_rm = args.reward == "model" or args.value_init == "reward"
    rm_dirs = [d for d in args.reward_model.split(",") if d]    # several: an ensemble
    if need_rm:
        if not rm_dirs:
            raise UserError("--reward-model is empty")
        for d in rm_dirs:
            require_checkpoint(d, "python train_rm.py")
    if not rm_dirs or not (need_rm or all(Path(d, "config.json").exists() for d in rm_dirs)):
        return None
    reward_model = load_reward_models(rm_dirs, torch_dtype(args.dtype), rt.device, args.ensemble)
    for d, m in zip(rm_dirs, reward_members(reward_model)):
        msg = None
        if m.config.vocab_size != model.config.vocab_size:   # not the same tokenizer
            msg = (f"{d}: the reward model has {m.config.vocab_size} token embeddings, the "
                   f"policy {model.config.vocab_size}; they do not share a tokenizer")
        elif not same_tokenizer(args.init, d):
            msg = (f"{d}: the reward model's tokenizer.json is not the policy's ({args.init}): "
                   "the same text has other token ids")
        if msg:
            if need_rm:
                raise UserError(msg)
            if rt.is_main:
                print(f"note: {msg}, so its score is not logged")
            return None
    if rt.is_main and isinstance(reward_model, RewardEnsemble):
        print(f"reward: the {args.ensemble} of {len(rm_dirs)} reward models (each "
              "standardised with its held-out mean and std)")
    return reward_model


def make_value_model(model, reward_model, args, rt):
    """PPO's V(s_t), in eval mode: the reward model itself, frozen (--freeze-value: V is its score
    of the prefix), a trainable copy of the first reward model (Stiennon et al. 2020), or
    (--value-init policy) the policy's decoder with a zero head."""
    if args.freeze_value:
        return reward_members(reward_model)[0]
    if args.value_init == "reward":
        return load_model([d for d in args.reward_model.split(",") if d][0],
                          torch_dtype(args.dtype), rt.device, head="score").eval()
    return ScoreModel.from_lm(model).eval()


# ---------------------------------------------------------------------------- the first update
def sampler_tolerance(dtype, device, ratio: bool = False) -> float:
    """The largest difference that `check_sampler_match` lets pass: GRPO's |log π_trainer −
    log π_sampler|, or with `ratio` PPO's |ratio − 1|.

    Before its first update on a batch the policy is the one that sampled it, so the two log-probs
    differ only by rounding: the sampler decodes one token at a time against its KV cache, the
    trainer runs one full forward over prompt + completion, and their matmuls and attention add up
    in other orders. fp32 on a CPU: below 1e-4 (4e-6 on the tests' 2-layer model, 8e-5 on a 6-layer
    width-256 one with peaked logits), so 1e-3. bf16 (weights, or autocast on a GPU) keeps 8
    mantissa bits: the same two models drift 0.05 and 0.4 nats on their worst token, so 1 nat. A
    real mismatch moves them further: scoring at T = 1 what was sampled at T = 0.7 costs 1 to 3
    nats on those models, a shifted position or a dropped mask more.

    PPO's old log-probs come from a full forward at the rollout, so its first ratio compares two
    full forwards: fp32 on a CPU reproduces the rollout's forward to ~1e-6, so 1e-4; bf16 or a
    GPU's kernels to a few percent, so 5e-2.
    """
    exact = dtype == torch.float32 and device.type == "cpu"
    if ratio:
        return 1e-4 if exact else 5e-2
    return 1e-3 if exact else 1.0


def check_sampler_match(diff, tol: float, ratio: bool = False):
    """On a batch's first update π_θ is still the policy that sampled it, so the trainer must
    score its completions as the rollout did: `diff` < `tol` (`sampler_tolerance`), `diff` being
    GRPO's `sampler_logp_max_diff`, the largest |log π_trainer − log π_sampler|, or with `ratio`
    PPO's first max |ratio − 1|. Else π_old is not the policy that sampled and the clipped ratio
    optimises noise. Raises RuntimeError."""
    diff = float(diff)
    if not diff < tol:
        measured = (f"first PPO minibatch: max |ratio - 1| = {diff:.3g}" if ratio else
                    "first update of a batch: the trainer's log-probs differ from the sampler's "
                    f"log-probs by up to {diff:.3g}")
        raise RuntimeError(
            f"{measured} >= {tol:g}. The training forward does not reproduce the distribution "
            "that sampled (temperature, dropout, train/eval mode, dtype or padding differ): "
            f"{'PPO' if ratio else 'GRPO'} would be optimising noise.")


def mean_stats(updates: list[dict]) -> dict:
    """PPO's minibatch stats of one iteration, averaged; of the ratio's deviation from 1 only the
    first minibatch's (`policy/ratio_first_max_dev`), which must be ~0."""
    out = {k: torch.stack([u[k] for u in updates]).mean() for k in updates[0]
           if k != "policy/ratio_max_dev"}
    out["policy/ratio_first_max_dev"] = updates[0]["policy/ratio_max_dev"]
    return out


# ---------------------------------------------------------------------------- eval
def evaluate(model, tokenizer, held_out, fns, args, autocast, max_new_tokens: int,
             pass_k: int = 0) -> dict:
    """Held-out greedy accuracy by the task's verifier (`accuracy`, `accuracy_ci95`,
    `well_formed`, `n`; evaluate.evaluate_task), or with --eval-data each reward function's
    greedy mean (`<name>/mean`, `<name>/ci95`, and `n`; evaluate_rewards). With `pass_k` > 1 also,
    from `pass_k` samples a problem at --temperature, the unbiased pass@k for k = 1 … pass_k with
    its 95% intervals (lists `pass@k`, `pass@k_ci95`, and `pass@<pass_k>`) and the accuracy of
    one sample (`sampled_accuracy`); with --eval-data the pass@k of each 0/1 function. From
    `args`: --eval-data, --task, --string-prompts, --temperature, --seed."""
    if args.eval_data:
        out = evaluate_rewards(model, tokenizer, held_out, fns, max_new_tokens,
                               string_prompts=args.string_prompts, autocast=autocast)
        if pass_k > 1:
            res_k = evaluate_rewards(model, tokenizer, held_out, fns, max_new_tokens,
                                     temperature=args.temperature, samples=pass_k,
                                     string_prompts=args.string_prompts, autocast=autocast,
                                     seed=args.seed)
            out.update({k: v for k, v in res_k.items() if "pass@" in k})
        return out
    res = evaluate_task(model, tokenizer, held_out, max_new_tokens, autocast=autocast,
                        task=args.task)
    out = {"accuracy": res["accuracy"], "accuracy_ci95": res["accuracy_ci95"],
           "well_formed": res["well_formed"], "n": res["n"]}
    if pass_k > 1:
        res_k = evaluate_task(model, tokenizer, held_out, max_new_tokens,
                              temperature=args.temperature, samples=pass_k,
                              autocast=autocast, seed=args.seed, task=args.task)
        for key in (f"pass@{pass_k}", "pass@k", "pass@k_ci95"):
            out[key] = res_k[key]
        out["sampled_accuracy"] = res_k["accuracy"]
    return out


@torch.no_grad()
def reward_model_score(model, reward_model, tokenizer, rows, max_new_tokens: int,
                       string_prompts: str, autocast) -> float:
    """The reward model's mean score of the policy's greedy answers to `rows`, each rank scoring
    its share (a multiple of the world size gives every rank some)."""
    mine = dist.shard(rows)
    with autocast():
        g = generate(model, [prompt_ids(tokenizer, p["prompt"], string_prompts) for p in mine],
                     max_new_tokens, temperature=0.0,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        s = sequence_scores(reward_model, *g.sequences)
    return dist.all_reduce_mean({"r": float(s.mean())})["r"]


def before_and_after(before: dict, after: dict) -> dict:
    """PPO's held-out numbers before and after training, for results.json."""
    out = {"accuracy_before": before.get("eval/accuracy"), "accuracy": after.get("eval/accuracy"),
           "accuracy_ci95": after.get("eval/accuracy_ci95"),
           "well_formed": after.get("eval/well_formed"),
           "reward_before": before.get("eval/reward"), "reward": after.get("eval/reward")}
    for tag, res in (("_before", before), ("", after)):     # --eval-data: each function's mean
        out.update({k[5:] + tag: v for k, v in res.items() if k.endswith(("/mean", "/ci95"))})
    return out
