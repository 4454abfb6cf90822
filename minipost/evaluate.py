"""Held-out evaluation shared by every stage: task accuracy by the verifier, with a 95% interval,
and on a user's prompts each reward function's mean (`evaluate_rewards`).

Greedy pass@1 is the headline number. With n samples a problem at a temperature, pass@k for
k = 1 … n is the unbiased estimator of Chen et al. 2021 (stats.pass_at_k: the chance that k of the
n samples include a correct one, averaged over problems); at k = n it is "any sample correct".
Under torchrun each rank scores its share of the problems and the counts are summed, so every rank
returns the same numbers.
"""
import math

import torch

from . import dist, rewards, worlds
from .generate import generate
from .stats import mean_pass_at_k
from .tasks import Difficulty, digit_check


def heldout_problems(difficulty: str, n: int = 500, task: str = "arithmetic") -> list[dict]:
    """The held-out problems every stage is scored on: the same n for every stage (seed 0).
    `difficulty` "" is the task's default."""
    world = worlds.world(task)
    d = Difficulty.from_str(difficulty or world.DEFAULT_DIFFICULTY)
    return world.rl_prompts(n, "test", d, seed=0)


def ci95(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of a proportion p over n trials."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a user prompt (str or messages) followed by the assistant header."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.format_chat(messages, add_generation_prompt=True)[0]


def prompt_ids(tokenizer, prompt, string_prompts: str = "chat") -> list[int]:
    """Token ids of an RL prompt: a list of messages is a chat; a string is a user turn of a chat
    (`string_prompts` "chat") or raw text to continue ("text", TRL's reading: no template)."""
    if isinstance(prompt, str) and string_prompts == "text":
        return tokenizer.encode(prompt)
    return chat_prompt_ids(tokenizer, prompt)


@torch.no_grad()
def complete(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 64,
             batch_size: int = 64, temperature: float = 0.0, eos_token_id: int | None = None,
             generator=None, autocast=None) -> list[str]:
    """Decoded completions (special tokens dropped) for a list of prompt-id lists."""
    was_training = model.training
    model.eval()
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    # longest prompts first, so each batch has little padding
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out = [None] * len(prompt_ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ctx = autocast() if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            g = generate(model, [prompt_ids[i] for i in idx], max_new_tokens,
                         temperature=temperature, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, generator=generator)
        for j, i in enumerate(idx):
            ids = g.completion_ids[j][g.completion_mask[j]].tolist()
            out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_task(model, tokenizer, problems: list[dict], max_new_tokens: int = 64,
                  batch_size: int = 64, temperature: float = 0.0, samples: int = 1,
                  autocast=None, seed: int = 0, task: str = "arithmetic") -> dict:
    """Accuracy and well-formed share on chat problems of `task` (rl_prompts rows, or
    make_problems' with a "question"), by its verifier (worlds.score).

    samples = n > 1 at a temperature > 0: also the unbiased pass@k of Chen et al. 2021 for
    k = 1 … n over the problems (stats.mean_pass_at_k), as lists "pass@k" and "pass@k_ci95"
    (index k − 1), and "pass@n" alone; accuracy and well-formed share are the first sample's.
    Returns {"accuracy", "accuracy_ci95", "well_formed", "n"} (+ those when samples > 1).
    """
    mine = dist.shard(problems)
    prompts = [chat_prompt_ids(tokenizer, p.get("prompt", p.get("question"))) for p in mine]
    g = torch.Generator().manual_seed(seed + dist.rank())
    is_well_formed = worlds.world(task).is_well_formed
    correct = formed = 0.0
    n_correct = torch.zeros(samples + 1, dtype=torch.float64)   # problems with c correct samples
    if samples == 1 or temperature == 0:
        texts = complete(model, tokenizer, prompts, max_new_tokens, batch_size, temperature,
                         generator=g, autocast=autocast)
        for t, p in zip(texts, mine):
            correct += worlds.score(task, t, p)
            formed += is_well_formed(t)
    else:
        texts = complete(model, tokenizer, [q for q in prompts for _ in range(samples)],
                         max_new_tokens, batch_size, temperature, generator=g, autocast=autocast)
        for i, p in enumerate(mine):
            scores = [worlds.score(task, t, p) for t in texts[i * samples:(i + 1) * samples]]
            correct += scores[0]
            formed += is_well_formed(texts[i * samples])
            n_correct[int(sum(scores))] += 1
    totals = dist.all_reduce_sum(torch.tensor([correct, formed, float(len(mine))],
                                              dtype=torch.float64)).tolist()
    n = int(totals[2])
    acc = totals[0] / max(n, 1)
    result = {"accuracy": acc, "accuracy_ci95": ci95(acc, n), "well_formed": totals[1] / max(n, 1),
              "n": n}
    if samples > 1 and temperature > 0 and n:
        result.update(pass_at_ks(samples, dist.all_reduce_sum(n_correct)))
    return result


def pass_at_ks(samples: int, n_correct: torch.Tensor) -> dict:
    """{"pass@n", "pass@k", "pass@k_ci95"} from `n_correct[c]`, the number of problems with c of
    their `samples` = n samples correct (the ranks' counts summed): lists over k = 1 … n."""
    counts = [c for c, m in enumerate(n_correct.long().tolist()) for _ in range(m)]
    ks = [mean_pass_at_k(samples, counts, k) for k in range(1, samples + 1)]
    return {f"pass@{samples}": ks[-1]["mean"], "pass@k": [r["mean"] for r in ks],
            "pass@k_ci95": [r["ci95"] for r in ks]}


def evaluate_base(model, tokenizer, prompts_answers: list[tuple[str, str]],
                  max_new_tokens: int = 64, batch_size: int = 64, autocast=None,
                  task: str = "arithmetic") -> dict:
    """Greedy accuracy of a base model completing plain-text "Question: ...\\nAnswer:" prompts
    (the pairs of the task's pretrain_eval_prompts).

    Generation stops at the document separator <|endoftext|>, which the corpus puts after each
    problem, so the verifier's "last line is #### N" rule applies as it does to chats.
    """
    mine = dist.shard(prompts_answers)
    ids = [tokenizer.encode(p) for p, _ in mine]
    texts = complete(model, tokenizer, ids, max_new_tokens, batch_size, 0.0,
                     eos_token_id=tokenizer.bos_token_id, autocast=autocast)
    correct = sum(worlds.score(task, t, a) for t, (_, a) in zip(texts, mine))
    formed = sum(worlds.world(task).is_well_formed(t) for t in texts)
    totals = dist.all_reduce_sum(torch.tensor([correct, formed, float(len(mine))],
                                              dtype=torch.float64)).tolist()
    n = int(totals[2])
    acc = totals[0] / max(n, 1)
    return {"accuracy": acc, "accuracy_ci95": ci95(acc, n), "well_formed": totals[1] / max(n, 1),
            "n": n}


def evaluate_equations(model, tokenizer, probes: list[dict], batch_size: int = 64,
                       autocast=None) -> dict:
    """Greedy accuracy of a base model on bare equations ("52 + 14 =" → " 66"), split by digit.

    A base model that copies operands and formats answers well can still fail at the arithmetic,
    and how it fails tells why: `last_digit` low with `leading_digits` high means it never learned
    the units digit's lookup (a circuit that forms late in some seeds and not at all in others),
    not that it cannot carry. Returns {"accuracy", "last_digit", "leading_digits", "n"}.
    """
    mine = dist.shard(probes)
    # each prompt opens a document, after the separator, as a drill does in the corpus
    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p["prompt"]) for p in mine]
    texts = complete(model, tokenizer, ids, 6, batch_size, 0.0,
                     eos_token_id=tokenizer.bos_token_id, autocast=autocast)
    checks = [digit_check(t, p["result"]) for t, p in zip(texts, mine)]
    sums = [sum(c[k] for c in checks) for k in ("right", "last_digit", "leading_digits")]
    totals = dist.all_reduce_sum(torch.tensor(sums + [float(len(mine))],
                                              dtype=torch.float64)).tolist()
    n = max(int(totals[3]), 1)
    return {"accuracy": totals[0] / n, "last_digit": totals[1] / n,
            "leading_digits": totals[2] / n, "n": int(totals[3])}


def evaluate_rewards(model, tokenizer, rows: list[dict], fns: list, max_new_tokens: int = 64,
                     batch_size: int = 64, temperature: float = 0.0, samples: int = 1,
                     string_prompts: str = "chat", autocast=None, seed: int = 0) -> dict:
    """Each reward function's mean over held-out prompts (a user's `--eval-data` rows).

    Greedy (temperature 0): "<name>/mean" and "<name>/ci95", the normal-approximation interval
    over the prompts the function scored (not None). With samples = n > 1 at a temperature, for
    each function that returned only 0 and 1, also "<name>/pass@k" and "<name>/pass@k_ci95" for
    k = 1 … n (stats.mean_pass_at_k; a prompt counts when the function scored all its samples).
    """
    mine = dist.shard(rows)
    n_s = samples if samples > 1 and temperature > 0 else 1
    ids = [prompt_ids(tokenizer, r["prompt"], string_prompts) for r in mine for _ in range(n_s)]
    g = torch.Generator().manual_seed(seed + dist.rank())
    texts = complete(model, tokenizer, ids, max_new_tokens, batch_size, temperature,
                     generator=g, autocast=autocast) if mine else []
    reps = [r for r in mine for _ in range(n_s)]
    per_fn = (rewards.score(fns, [r["prompt"] for r in reps], texts, reps)[1] if mine
              else {f.name: torch.zeros(0, dtype=torch.float64) for f in fns})
    out = {}
    for name, r in per_fn.items():
        r = r.view(len(mine), n_s)
        first = r[:, 0][~r[:, 0].isnan()]                   # the first sample's, as greedy is one
        totals = dist.all_reduce_sum(torch.tensor([float(first.sum()), float((first ** 2).sum()),
                                                   float(len(first))], dtype=torch.float64))
        s1, s2, n = totals.tolist()
        mean = s1 / max(n, 1)
        sd = math.sqrt(max(s2 / max(n, 1) - mean ** 2, 0.0))
        out[f"{name}/mean"], out[f"{name}/ci95"] = mean, 1.96 * sd / math.sqrt(max(n, 1))
        if n_s > 1:
            binary = dist.all_reduce_sum(torch.tensor(float(not rewards.is_binary(r) and
                                                            bool((~r.isnan()).any()))))
            scored = ~r.isnan().any(1)                       # (P,) every sample scored
            n_correct = torch.zeros(n_s + 1, dtype=torch.float64)
            for c in r[scored].sum(1).long().tolist():
                n_correct[c] += 1
            n_correct = dist.all_reduce_sum(n_correct)
            if float(binary) == 0 and n_correct.sum() > 0:
                ks = pass_at_ks(n_s, n_correct)
                out[f"{name}/pass@k"], out[f"{name}/pass@k_ci95"] = ks["pass@k"], ks["pass@k_ci95"]
    out["n"] = int(dist.all_reduce_sum(torch.tensor(float(len(mine)), dtype=torch.float64)))
    return out
