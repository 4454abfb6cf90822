"""The built-in task worlds by name, for every script's `--task`: arithmetic (tasks.py) and
countdown (countdown.py).

Both modules offer the same functions (make_problems, pretrain_corpus, pretrain_eval_prompts,
equation_probes, sft_chats, preference_pairs, rl_prompts, is_well_formed) and take the same
difficulty grammar (tasks.Difficulty). What a problem holds and how an answer is checked differ;
`score` hides that, and `REWARD` names each world's verifier among rewards.py's built-ins.
"""
from . import countdown, tasks

TASKS = ("arithmetic", "countdown")
REWARD = {"arithmetic": "correct", "countdown": "countdown"}   # rewards.BUILT_IN's verifier


def world(task: str):
    """The module of task `task`: tasks (arithmetic) or countdown."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return tasks if task == "arithmetic" else countdown


def default_difficulty(task: str) -> str:
    return world(task).DEFAULT_DIFFICULTY


def score(task: str, completion: str, problem) -> float:
    """1.0 when `completion` solves `problem`, else 0.0. `problem`: an rl_prompts row, or what the
    world's pretrain_eval_prompts pairs with a prompt (an answer string for arithmetic)."""
    if task == "countdown":
        return countdown.score(completion, problem)
    return tasks.verify(completion, problem["answer"] if isinstance(problem, dict) else problem)
