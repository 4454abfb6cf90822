"""The second built-in task world: countdown, and its verifier.

Given 3–4 numbers and a target, write an arithmetic expression that uses each number at most once
and equals the target ("Use 3, 5, 7 to make 8." → "#### 3 + 5", or "#### 7 - 3 + 5 - 1" when a 1
is given too). It is the task of TinyZero (Pan et al. 2025) and of the "aha moment" reproductions
of DeepSeek-R1-Zero (DeepSeek-AI 2025, arXiv 2501.12948). Unlike the arithmetic task many answers
are right, so no reference answer exists: only the verifier (`verify`: parse, check the numbers
used, evaluate exactly without `eval`) can judge, and pass@k measures something a greedy answer
does not.

A worked solution, as SFT shows it, is one step per line, then the whole expression after "####":
    7 - 3 = 4
    4 * 5 = 20
    #### (7 - 3) * 5
Every problem is generated with one such chain through all of its numbers (so one solution always
exists); the verifier accepts any other expression that reaches the target. Intermediate values
stay non-negative and "/" is never generated (the verifier still evaluates it, exactly).

The difficulty knob is `tasks.Difficulty`'s grammar: "3-4x2+-*" (the default) is 3 or 4 numbers
(in equal shares) of up to 2 digits, operators + - *. One-digit numbers hold few problems: "3x1+-*"
has about 190 held-out ones, too few for the 500 every stage is scored on. Splits are a stable hash
of the sorted numbers and the target, so a problem is held out whatever its wording or seed. The
functions mirror tasks.py's (make_problems, pretrain_corpus, pretrain_eval_prompts,
equation_probes, sft_chats, preference_pairs, rl_prompts), so the stage scripts take either world
(`--task`, worlds.py).
`python -m minipost.countdown --out data/countdown` writes them as JSONL.
"""
from __future__ import annotations

import ast
import random
import re
import sys
from collections import Counter
from fractions import Fraction

from .tasks import Difficulty, _split_of, equation_probes, world_cli, write_world

DEFAULT_DIFFICULTY = "3-4x2+-*"
TEST_MODULUS = 10  # a problem is held out when hash(sorted numbers, target) % 10 == 0
MAX_EXPRESSION_CHARS = 200  # a longer answer line is not parsed (it cannot be a short expression)

__all__ = ["DEFAULT_DIFFICULTY", "Difficulty", "equation_probes", "make_problems", "verify",
           "is_well_formed", "score", "sft_chats", "preference_pairs", "rl_prompts",
           "pretrain_corpus", "pretrain_eval_prompts"]

QUESTIONS = ["Use {nums} to make {t}.", "Make {t} from {nums}.",
             "Using {nums}, each at most once, reach {t}.", "Combine {nums} to get {t}."]


# ---------------------------------------------------------------------------- problems
def _chain(rng: random.Random, numbers: list[int], ops: str) -> tuple[list[tuple], int, str]:
    """A left-to-right chain through `numbers` in a random order: (steps (a, op, b, result), the
    result, the expression with the parentheses it needs)."""
    order = rng.sample(numbers, len(numbers))
    value, expr, low = order[0], str(order[0]), False    # low: the expression's top op is + or -
    steps = []
    for n in order[1:]:
        choices = [op for op in ops if not (op == "-" and n > value)]
        op = rng.choice(choices or ["+"])
        new = value + n if op == "+" else value - n if op == "-" else value * n
        steps.append((value, op, n, new))
        expr = f"({expr}) {op} {n}" if op == "*" and low else f"{expr} {op} {n}"
        value, low = new, op in "+-"
    return steps, value, expr


def make_problems(n: int, split: str, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
                  seed: int = 0, rng: random.Random | None = None) -> list[dict]:
    """`n` distinct problems {"question", "solution", "numbers", "target"} of `split`.

    Drawn from `random.Random(seed)`, or from `rng` when given. With a range of counts ("3-4x1")
    the k-th problem has `difficulty.levels[k % len(levels)]` numbers. Targets are 1 to 999 and
    never one of the numbers themselves (that would need no arithmetic).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if difficulty.words:
        raise ValueError(f"difficulty {difficulty}: countdown has no word problems ('w')")
    rng = rng or random.Random(seed)
    hi = 10 ** difficulty.max_digits - 1
    seen, out = set(), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        levels = difficulty.levels
        numbers = [rng.randint(1, hi) for _ in range(levels[len(out) % len(levels)])]
        steps, target, expr = _chain(rng, numbers, difficulty.ops)
        key = ",".join(map(str, sorted(numbers))) + f"->{target}"
        if (not 1 <= target <= 999 or target in numbers or key in seen
                or _split_of(key, TEST_MODULUS) != split):
            continue
        seen.add(key)
        lines = [f"{a} {op} {b} = {c}" for a, op, b, c in steps] + [f"#### {expr}"]
        question = rng.choice(QUESTIONS).format(nums=", ".join(map(str, numbers)), t=target)
        out.append({"question": question, "solution": "\n".join(lines), "numbers": numbers,
                    "target": target})
    if len(out) < n:
        raise ValueError(f"difficulty {difficulty} has fewer than {n} distinct {split} problems")
    return out


# ---------------------------------------------------------------------------- verifier
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
_ANSWER_LINE = re.compile(r"####\s*([\d\s()+\-*/]+?)\s*$")


def _evaluate(node, used: list[int]) -> Fraction:
    """The exact value of a parsed expression of non-negative integers and + - * / (parentheses
    are the tree's shape), appending each number to `used`. Anything else raises ValueError;
    a division by zero raises ZeroDivisionError."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    raise ValueError(f"not allowed in an answer: {type(node).__name__}")


def answer_expression(completion: str) -> str | None:
    """The text after the LAST "####", up to the end of its line (None when there is none)."""
    found = re.findall(r"####([^\n]*)", completion)
    return found[-1].strip() if found else None


def is_well_formed(completion: str) -> bool:
    """Exactly one "####" line, "#### <expression of digits, spaces, ( ) + - * />", and it is the
    last non-empty line."""
    lines = [line.strip() for line in completion.split("\n") if line.strip()]
    return (bool(lines) and sum("####" in line for line in lines) == 1
            and _ANSWER_LINE.fullmatch(lines[-1]) is not None)


def verify(completion: str, numbers: list[int], target: int) -> float:
    """1.0 if `completion` is well formed and its answer expression uses only given numbers, each
    at most as often as given, and equals `target` exactly; else 0.0 (junk, code, a division by
    zero included). The expression is parsed by `ast` and walked by `_evaluate`: never `eval`."""
    expression = answer_expression(completion)
    if expression is None or not is_well_formed(completion) or len(expression) > MAX_EXPRESSION_CHARS:
        return 0.0
    used = []
    try:
        value = _evaluate(ast.parse(expression, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) - Counter(int(x) for x in numbers):      # a number not given, or used twice
        return 0.0
    return float(value == int(target))


def score(completion: str, problem: dict) -> float:
    """`verify` against a problem's (or an RL row's) "numbers" and "target"."""
    return verify(completion, problem["numbers"], problem["target"])


# ---------------------------------------------------------------------------- stage data
def _pretrain_doc(question: str, solution: str) -> str:
    return f"Question: {question}\nAnswer: {solution}"


def pretrain_corpus(n_docs: int, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
                    seed: int = 0, drill_frac: float = 0.2, drill_digits: str = "max") -> list[str]:
    """Plain-text documents "Question: ...\\nAnswer: ..." from TRAIN problems of 2 up to the
    difficulty's count of numbers; a `drill_frac` of them are 8 bare train-split steps
    ("7 * 5 = 35"), whose operands have the task's digits ("max") or 1 up to them ("mixed")."""
    if drill_digits not in ("max", "mixed"):
        raise ValueError(f"drill_digits must be 'max' or 'mixed', got {drill_digits!r}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        if rng.random() < drill_frac:
            digits = (rng.randint(1, difficulty.max_digits) if drill_digits == "mixed"
                      else difficulty.max_digits)
            two = Difficulty(2, digits, difficulty.ops)
            docs.append("\n".join(p["solution"].split("\n")[0]
                                  for p in make_problems(8, "train", two, rng=rng)))
            continue
        d = Difficulty(rng.randint(2, difficulty.n_operands), difficulty.max_digits, difficulty.ops)
        p = make_problems(1, "train", d, rng=rng)[0]
        docs.append(_pretrain_doc(p["question"], p["solution"]))
    return docs


def pretrain_eval_prompts(n: int, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
                          seed: int = 0) -> list[tuple[str, dict]]:
    """(prompt, problem) pairs of held-out problems: prompt = "Question: {q}\\nAnswer:"."""
    return [(_pretrain_doc(p["question"], "")[:-1], p)
            for p in make_problems(n, "test", difficulty, seed)]


def sft_chats(n: int, split: str, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
              seed: int = 0, system_frac: float = 0.0) -> list[dict]:
    """{"messages": [user question, assistant solution]}: one valid solution per problem (a
    `system_frac` share also get a system turn)."""
    rng = random.Random(seed + 1)
    chats = []
    for p in make_problems(n, split, difficulty, seed):
        messages = [{"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["solution"]}]
        if rng.random() < system_frac:
            messages.insert(0, {"role": "system", "content": "Reach the target. End with "
                                                             "'#### <expression>'."})
        chats.append({"messages": messages})
    return chats


def _rejected(rng: random.Random, problem: dict) -> str:
    """A worse solution: one step's operator changed, the chain recomputed, so the expression
    misses the target (70%); or the right steps with a broken answer line (30%)."""
    lines = problem["solution"].split("\n")
    steps = [re.fullmatch(r"(\d+) (\S) (\d+) = (\d+)", line).groups() for line in lines[:-1]]
    if rng.random() < 0.7:
        for _ in range(20):
            bad = rng.randrange(len(steps))
            value, expr, low, out = int(steps[0][0]), steps[0][0], False, []
            for i, (_, op, n, _) in enumerate(steps):
                if i == bad:
                    op = rng.choice([o for o in "+-*" if o != op])
                new = value + int(n) if op == "+" else value - int(n) if op == "-" else value * int(n)
                out.append(f"{value} {op} {n} = {new}")
                expr = f"({expr}) {op} {n}" if op == "*" and low else f"{expr} {op} {n}"
                value, low = new, op in "+-"
            if value != problem["target"] and value >= 0:
                return "\n".join(out + [f"#### {expr}"])
    return "\n".join(lines[:-1] + [f"The answer is {lines[-1][5:]}."])      # no "#### "


def preference_pairs(n: int, split: str, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
                     seed: int = 0) -> list[dict]:
    """{"prompt": question, "chosen": a valid solution, "rejected": a flawed one}."""
    rng = random.Random(seed + 2)
    return [{"prompt": p["question"], "chosen": p["solution"], "rejected": _rejected(rng, p)}
            for p in make_problems(n, split, difficulty, seed)]


def rl_prompts(n: int, split: str, difficulty: Difficulty = Difficulty.from_str(DEFAULT_DIFFICULTY),
               seed: int = 0) -> list[dict]:
    """{"prompt": question, "numbers": [3, 5, 7], "target": 8}: the columns rewards.countdown reads."""
    return [{"prompt": p["question"], "numbers": p["numbers"], "target": p["target"]}
            for p in make_problems(n, split, difficulty, seed)]


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    args = world_cli("Write the countdown task world as JSONL files.", "data/countdown",
                     DEFAULT_DIFFICULTY, "numbers x digits, then operators, e.g. 3-4x2+-*").parse_args(argv)
    write_world(sys.modules[__name__], args)

if __name__ == "__main__":
    main()
