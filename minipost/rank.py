"""How well reward models rank a policy's own answers: the number PPO's gain follows.

    python -m minipost.rank                                        # out/rm on out/sft's answers
    python -m minipost.rank --reward-model out/rm,out/rm-1,out/rm-2   # each, their mean and min

The policy answers each of `--problems` held-out problems (evaluate.heldout_problems) `--samples`
times at the rollout temperature of PPO; the verifier labels every answer (one cut off by the
length limit is wrong). Every (correct, wrong) pair of answers to the same problem is a
comparison, and the pairwise accuracy is the share of them the reward model scores the right way
round (a tie is wrong). Several reward models are scored one by one and as the ensembles
`train_ppo.py` would use (`reward.RewardEnsemble`, mean and min). Unlike train_rm.py's
`eval_policy/accuracy` (one pair per problem, at temperature 1), every pair counts, at the
temperature PPO samples at. Each accuracy is also split by the wrong answer's first slipped
step (`tasks.first_slip`): off by −1, +1, −10, +10, or otherwise.
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import reward_stats
from .cli import load_script_tokenizer, require_checkpoint, same_tokenizer, setup, user_errors
from .errors import UserError
from .evaluate import chat_prompt_ids, heldout_problems
from .flags import parse_args
from .generate import generate
from .peft import load_model, load_reward_models
from .reward import combine_scores
from .tasks import DEFAULT_DIFFICULTY, first_slip, verify


@dataclass
class Args:
    policy: str = "out/sft"          # the policy whose answers are ranked
    reward_model: str = "out/rm"     # reward model directory; several, comma-separated
    problems: int = 500              # held-out problems
    samples: int = 4                 # answers per problem
    temperature: float = 0.7         # sampling temperature (train_ppo.py's default)
    max_new_tokens: int = 64         # answer budget; no EOS by then = wrong
    difficulty: str = DEFAULT_DIFFICULTY  # task of the held-out problems
    seed: int = 0                    # sampling seed
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    threads: int = 0                 # CPU threads (0 = torch's default)


def pairwise_accuracy(scores: torch.Tensor, correct: torch.Tensor, problem: torch.Tensor,
                      wrong: torch.Tensor | None = None) -> tuple[float, int]:
    """(share of (correct, wrong) pairs of the same problem with score_c > score_w, pairs).
    wrong: which answers may be the wrong side (default: every answer not correct)."""
    wrong = ~correct if wrong is None else wrong
    same = problem[:, None] == problem[None, :]                      # (n, n)
    pairs = same & correct[:, None] & wrong[None, :]                 # row correct, column wrong
    n = int(pairs.sum())
    wins = (scores[:, None] > scores[None, :]) & pairs
    return (int(wins.sum()) / n if n else float("nan")), n


@torch.no_grad()
def main(args: Args) -> dict:
    rt = setup(args)
    dirs = [d for d in args.reward_model.split(",") if d]
    for d in [args.policy, *dirs]:
        require_checkpoint(d, "train_sft.py / train_rm.py")
        if not same_tokenizer(args.policy, d):
            raise UserError(f"{d}: its tokenizer.json is not the policy's ({args.policy})")
    tokenizer = load_script_tokenizer(args.policy)
    policy = load_model(args.policy, device=rt.device).eval()
    problems = heldout_problems(args.difficulty, args.problems)
    gen = torch.Generator().manual_seed(args.seed)
    batches, correct, problem, slip = [], [], [], []     # batches: each chunk's left-padded rows
    for s in tqdm(range(0, len(problems), 32), desc="sampling"):
        chunk = problems[s:s + 32]
        prompts = [chat_prompt_ids(tokenizer, p["prompt"]) for p in chunk
                   for _ in range(args.samples)]
        g = generate(policy, prompts, args.max_new_tokens, temperature=args.temperature,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     generator=gen)
        batches.append(g.sequences)
        for i in range(len(prompts)):
            p = chunk[i // args.samples]
            text = tokenizer.decode(g.completion_ids[i][g.completion_mask[i]].tolist(),
                                    skip_special_tokens=True)
            correct.append(bool(verify(text, p["answer"])) and not bool(g.truncated[i]))
            problem.append(s + i // args.samples)
            slip.append(first_slip(text))
    correct, problem = torch.tensor(correct), torch.tensor(problem)

    def scores_of(reward_model):
        return torch.cat([reward_model.score_last(ids, mask).float().cpu() for ids, mask in batches])

    results = {"sampled_accuracy": correct.float().mean().item()}
    scores = {d: scores_of(load_reward_models([d], None, rt.device)) for d in dirs}
    if len(dirs) > 1:    # the ensembles train_ppo.py --reward-model a,b,c would train against
        r = torch.stack([scores[d] for d in dirs])
        mu, sigma = (torch.tensor(x) for x in zip(*map(reward_stats, dirs)))
        for how in ("mean", "min"):
            scores[f"{how} of {len(dirs)}"] = combine_scores(r, mu, sigma, how)[0]
    # the wrong answer's first slipped step: off by ±1, ±10, or anything else (or no slip at all)
    labels = {-1: "-1", 1: "+1", -10: "-10", 10: "+10"}
    kind = [labels.get(d, "other") for d in slip]
    for name, s in scores.items():
        results[name], n = pairwise_accuracy(s, correct, problem)
        parts = []
        for k in [*labels.values(), "other"]:
            acc, m = pairwise_accuracy(s, correct, problem,
                                       ~correct & torch.tensor([x == k for x in kind]))
            results[f"{name} / slip {k}"] = acc
            parts.append(f"{k}: {acc:.2f} of {m}")
        print(f"{name}: pairwise accuracy {results[name]:.3f} on {n} (correct, wrong) pairs; "
              f"by the wrong answer's first slip: {', '.join(parts)}")
    print(f"sampled accuracy of {args.policy}: {results['sampled_accuracy']:.3f} "
          f"({args.problems} problems × {args.samples} at temperature {args.temperature})")
    return results


if __name__ == "__main__":
    with user_errors():
        main(parse_args(Args, description=__doc__))
