"""Rollout helpers for the online RL scripts (PPO, GRPO): re-scoring sampled completions.

A rollout is `generate.generate(...)`: left-padded prompts of width P, completions of width N
right-padded after their EOS, side by side in `Generation.sequences` (B, P + N). Everything an RL
trainer computes about a completion lives at the completion's token positions, shifted by one
(docs/pitfalls.md, "Log-prob alignment"): the token at column P + t is predicted by the logits at
column P + t − 1.
These helpers compute, for the N completion columns:

- `completion_logps(model, sequences, attention_mask, prompt_len, temperature)`: log π(a_t) of the
  sampled tokens under `logits / temperature` — the distribution actually sampled from, so PPO/GRPO
  ratios start at exactly 1 (docs/pitfalls.md, "Sampling temperature in log-probs") — and
  optionally the per-token entropy. With grad when called with grad (the training forward), so one
  function serves rollout and update.
- `completion_values(value_model, sequences, attention_mask, prompt_len)`: a ScoreModel's V(s_t),
  read at the same shifted column as the log-prob of a_t (the state before the token is chosen).
- `sequence_scores(reward_model, sequences, attention_mask)`: the reward model's score at each
  row's last real token, i.e. the EOS that ends the completion (docs/pitfalls.md, "EOS and
  truncation" and "Reward-model score position").
- `values_and_scores(score_model, sequences, attention_mask, prompt_len)`: both of the above from
  one forward, for PPO whose value model is the reward model itself (`--freeze-value`).
- `gold_rewards(tokenizer, completion_ids, completion_mask, answers)`: the verifier's 0/1 reward.
- `sampled_pairs(model, tokenizer, problems, ...)`: preference pairs from the policy's own answers,
  labelled by the verifier (`pair_up`): the comparisons of DPO's and the reward model's built-in data.
- `sample_answers` and `preferred_pair`: a policy's answers to some prompts, and which of one
  prompt's answers to prefer by their rewards (online DPO, `train_dpo.py --online`).

Plain temperature sampling only: top-k / top-p change the sampled distribution, and these
log-probs would then not match the sampler's (ms-swift PR #8442).
"""
import contextlib
import random

import torch
from tqdm import tqdm

from .evaluate import chat_prompt_ids
from .generate import generate
from .model import entropies, last_scores, token_logprobs
from .tasks import verify
from .worlds import score


def completion_logps(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0,
                     with_entropy: bool = False, entropy_grad: bool = False):
    """Log-probs (B, N) of the completion tokens under softmax(logits / T), N = T_seq − prompt_len.

    Args:
        model: a GPT (or a DDP/PEFT wrapper of one) returning logits (B, T_seq, V).
        sequences: (B, T_seq) left-padded prompt then completion; attention_mask: (B, T_seq).
        prompt_len: P, the width of the (padded) prompt block.
        temperature: the sampling temperature; 0 (greedy) scores at temperature 1, as `generate`
            records it.
        with_entropy: also return the per-token entropy (B, N) of softmax(logits / T), detached.
        entropy_grad: the entropy keeps its graph (an entropy bonus in the loss differentiates it).

    Returns logps (B, N), or (logps, entropy). Values at padded completion positions are garbage
    the caller masks out.
    """
    t = temperature if temperature > 0 else 1.0
    n = sequences.shape[1] - prompt_len + 1      # the LM head runs on positions P−1 … end only
    logits = model(sequences, attention_mask=attention_mask, logits_to_keep=n).float()  # (B, N+1, V)
    if t != 1.0:
        logits = logits / t
    logps = token_logprobs(logits, sequences[:, prompt_len - 1:])                  # (B, N)
    if not with_entropy:
        return logps
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropies(logits[:, :-1])                                        # (B, N)
    return logps, entropy


def completion_values(value_model, sequences, attention_mask, prompt_len: int):
    """V(s_t) for each completion token a_t: the value head at column P + t − 1. (B, N), fp32."""
    return value_model(sequences, attention_mask=attention_mask)[:, prompt_len - 1:-1]


def sequence_scores(reward_model, sequences, attention_mask):
    """(B,) reward-model score at each row's last real token: the completion's EOS, if it has one."""
    return reward_model.score_last(sequences, attention_mask)


def values_and_scores(score_model, sequences, attention_mask, prompt_len: int):
    """`completion_values` (B, N) and `sequence_scores` (B,) of one ScoreModel from one forward:
    its per-token scores read at the completion columns and at each row's last real token."""
    scores = score_model(sequences, attention_mask=attention_mask)                   # (B, T)
    return scores[:, prompt_len - 1:-1], last_scores(scores, attention_mask)


def gold_rewards(tokenizer, completion_ids, completion_mask, answers) -> torch.Tensor:
    """(B,) float 0/1: the verifier on each decoded completion (special tokens dropped)."""
    texts = [tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
             for ids, m in zip(completion_ids, completion_mask)]
    return torch.tensor([verify(t, a) for t, a in zip(texts, answers)],
                        dtype=torch.float32, device=completion_ids.device)


# ---------------------------------------------------------------------------- the policy's own pairs
def preferred_pair(rewards: list[float], rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected): indices into one prompt's answers, one of the highest-rewarded over one
    of the lowest (ties broken by `rng`); None when every answer has the same reward, a tie with
    no preference to learn. The online-DPO labelling of Guo et al. 2024 ("Direct Language Model
    Alignment from Online AI Feedback", arXiv 2402.04792), with a verifier or any reward as judge.
    """
    hi, lo = max(rewards), min(rewards)
    if hi == lo:
        return None
    return (rng.choice([i for i, r in enumerate(rewards) if r == hi]),
            rng.choice([i for i, r in enumerate(rewards) if r == lo]))


def pair_up(problem: dict, answers: list[str], truncated: list[bool], rng: random.Random,
            task: str = "arithmetic") -> dict | None:
    """One preference pair from a policy's answers to `problem`, labelled by the verifier: a
    correct answer (else the worked solution) over a wrong answer that ended (an answer cut off by
    the length limit is not a mistake to learn from). None when every answer is right."""
    correct = [score(task, a, problem) for a in answers]
    right = [a for a, ok in zip(answers, correct) if ok]
    wrong = [a for a, ok, cut in zip(answers, correct, truncated) if not ok and not cut]
    if not wrong:
        return None
    return {"prompt": problem["question"],
            "chosen": rng.choice(right) if right else problem["solution"],
            "rejected": rng.choice(wrong)}


@torch.no_grad()
def sample_answers(model, tokenizer, questions: list[str], samples: int, temperature: float,
                   max_new_tokens: int, generator, autocast=None) -> tuple[list[str], list[bool]]:
    """`samples` answers to each question from `model` in eval mode, with the KV cache: the
    decoded texts and whether each hit the token budget, question-major (the answers to question
    j are rows j·samples … (j+1)·samples − 1)."""
    was_training = model.training
    model.eval()
    prompts = [chat_prompt_ids(tokenizer, q) for q in questions for _ in range(samples)]
    with (autocast or contextlib.nullcontext)():
        g = generate(model, prompts, max_new_tokens, temperature=temperature,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     generator=generator)
    model.train(was_training)
    texts = [tokenizer.decode(ids[m].tolist()).strip()
             for ids, m in zip(g.completion_ids, g.completion_mask)]
    return texts, g.truncated.tolist()


@torch.no_grad()
def sampled_pairs(model, tokenizer, problems: list[dict], samples: int, temperature: float,
                  max_new_tokens: int, seed: int, autocast=None, batch_problems: int = 32,
                  show_progress: bool = True, task: str = "arithmetic") -> list[dict]:
    """The policy's own preference pairs (`pair_up` on `samples` answers per problem), sampled
    with the KV cache. Every rank samples the same pairs (the same seed), so none are exchanged."""
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    pairs = []
    for s in tqdm(range(0, len(problems), batch_problems), desc="sampling pairs",
                  disable=not show_progress):
        chunk = problems[s:s + batch_problems]
        texts, cut = sample_answers(model, tokenizer, [p["question"] for p in chunk], samples,
                                    temperature, max_new_tokens, generator, autocast)
        for i, p in enumerate(chunk):
            rows = slice(i * samples, (i + 1) * samples)
            pair = pair_up(p, texts[rows], cut[rows], rng, task)
            if pair:
                pairs.append(pair)
    return pairs
