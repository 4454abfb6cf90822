"""The built-in task world: arithmetic word problems in GSM8K's answer format, and their verifier.

A problem is a short word problem over a chain of operations ("Mia has 23 apples. She buys 45 more.
Then she gives away 12. How many apples does Mia have now?") with a worked solution in GSM8K's
format (Cobbe et al. 2021, arXiv 2110.14168): one step per line, then `#### <answer>`:
    23 + 45 = 68
    68 - 12 = 56
    #### 56
Everything is generated from a seed. The difficulty knob is `Difficulty` ("3x2+-": 3 operands of up
to 2 digits, operators + and -). Every intermediate result is non-negative: a subtraction never
takes more than there is, and "*" multiplies by a single digit 2..9.

Train and held-out splits never share a problem: the split of a problem is a stable hash (blake2b)
of its expression ("23+45-12"), so the same numbers get the same split whatever the wording or
seed. Held-out problems' intermediate steps can still appear inside other, training problems: the
split is per problem, as GSM8K's is, not per equation.

Products: a pretraining corpus (plain text), SFT chats, preference pairs (with a planted arithmetic
error or a broken format), an identity set that teaches the assistant the name `ASSISTANT_NAME`,
RL prompts with answers, and the verifier. `python -m minipost.tasks --out data/` writes them all as
JSONL in the schemas of minipost/data.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import dataclass

ASSISTANT_NAME = "Pip"
# The scripts' default knob: 3 operands of up to 2 digits, a skill every pretraining seed learns
# whole, so SFT reads the same from every seed. Harder settings ("4x2+-*", "4x3+-") leave SFT lower
# only because a skill is half learned when pretraining ends, and the seed decides how far
# (docs/results.md, Stage 0).
DEFAULT_DIFFICULTY = "3x2+-"
TEST_MODULUS = 10  # a problem is held out when hash(expression) % 10 == 0 (about 10%)
IDENTITY_TEST_MODULUS = 4  # a "who are you" phrasing is held out when hash % 4 == 0


@dataclass(frozen=True)
class Difficulty:
    """The difficulty knob: operands per problem, digits per operand, allowed operators, wording.

    String form "{n_operands}x{max_digits}{ops}[w]", e.g. "3x2+-" (the scripts' default) or
    "4x3+-*w"; "2-5x2+-" stratifies over operand counts 2 to 5 (`min_operands` = 2): problems cycle
    through the counts, so every data set and held-out set has each level in equal shares and an
    accuracy is a smooth average over levels rather than one threshold. Without "w" a question
    states the expression ("What is 523 + 145 - 312?"); with "w" it is a word problem ("Mia has 523
    apples. She buys 145 more. ..."), which a 2M-parameter model pretrained for minutes on a CPU
    cannot yet read (it must learn to find and copy the numbers out of the sentences first), but a
    real model can.
    """
    n_operands: int = 3  # numbers in the problem (steps = n_operands - 1)
    max_digits: int = 2  # each number is drawn from 1 .. 10**max_digits - 1
    ops: str = "+-"  # any of "+", "-", "*" ("*" multiplies by one digit 2..9)
    words: bool = False  # word problems instead of stated expressions
    min_operands: int = 0  # > 0: operand counts min_operands .. n_operands in equal shares

    def __post_init__(self):
        if self.n_operands < 2 or self.max_digits < 1 or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"bad difficulty {self}: need n_operands >= 2, max_digits >= 1, "
                             "ops a non-empty subset of '+-*'")
        if self.min_operands and not 2 <= self.min_operands <= self.n_operands:
            raise ValueError(f"bad difficulty {self}: the operand range must be 2 <= low <= high")

    @property
    def levels(self) -> list[int]:
        """The operand counts a problem set cycles through (one unless a range was given)."""
        return list(range(self.min_operands or self.n_operands, self.n_operands + 1))

    @classmethod
    def from_str(cls, text: str) -> "Difficulty":
        m = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)x(\d+)([+\-*]*)(w?)\s*", text)
        if not m:
            raise ValueError(f"difficulty {text!r} is not of the form '3x2+-' or '2-5x2+-' "
                             "(operands x digits, then operators, then 'w' for word problems)")
        return cls(int(m.group(2)), int(m.group(3)), m.group(4) or "+-", m.group(5) == "w",
                   int(m.group(1) or 0))

    def __str__(self) -> str:
        low = f"{self.min_operands}-" if self.min_operands else ""
        return f"{low}{self.n_operands}x{self.max_digits}{self.ops}{'w' if self.words else ''}"


# ---------------------------------------------------------------------------- problems
NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"),
         ("Sam", "he"), ("Ivy", "she"), ("Omar", "he"), ("Lena", "she"), ("Ravi", "he"),
         ("Nora", "she"), ("Kai", "he"), ("Emma", "she"), ("Tom", "he"), ("Yuki", "she"),
         ("Ben", "he")]
OBJECTS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps",
           "shells", "cards", "balloons", "eggs", "beads", "toy cars", "flowers", "candles"]
STARTS = ["{name} has {n} {obj}.", "{name} starts with {n} {obj}.",
          "There are {n} {obj} in {name}'s box.", "{name} collected {n} {obj}."]
STEPS = {
    "+": ["{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more from a friend.",
          "{p} wins {n} more."],
    "-": ["{p} gives away {n}.", "{p} sells {n}.", "{p} loses {n}.", "{p} uses {n}."],
    "*": ["{p} ends up with {n} times as many.", "the number of {obj} grows to {n} times as many."],
}
LINKS = ["", "Then ", "After that, ", "Later, "]
QUESTIONS = ["How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?"]
LEFT_QUESTION = "How many {obj} are left?"  # only after a final "-", where "left" reads right


def _split_of(key: str, modulus: int) -> str:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % modulus == 0 else "train"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _sample_expression(rng: random.Random, d: Difficulty, n_operands: int | None = None
                       ) -> tuple[int, list[tuple[str, int]]]:
    """A start value and (op, operand) steps whose running value never goes below 0."""
    hi = 10 ** d.max_digits - 1
    value = start = rng.randint(1, hi)
    steps = []
    for _ in range((n_operands or d.n_operands) - 1):
        op = rng.choice(d.ops)
        if op == "-" and value == 0:
            op = "+" if "+" in d.ops else "*"
        n = rng.randint(2, 9) if op == "*" else rng.randint(1, min(value, hi) if op == "-" else hi)
        steps.append((op, n))
        value = _apply(value, op, n)
    return start, steps


def _solution(start: int, steps: list[tuple[str, int]]) -> tuple[str, int]:
    lines, value = [], start
    for op, n in steps:
        new = _apply(value, op, n)
        lines.append(f"{value} {op} {n} = {new}")
        value = new
    return "\n".join(lines + [f"#### {value}"]), value


EXPRESSION_QUESTIONS = ["What is {e}?", "How much is {e}?", "What does {e} equal?", "Can you compute {e}?"]


def _expression_question(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> str:
    """The chain, evaluated left to right, written as the usual precedence reads it: a "*" after
    a "+" or "-" puts what came before in parentheses ("(71 - 16) * 7", not "71 - 16 * 7")."""
    expression = str(start)
    for op, n in steps:
        if op == "*" and ("+" in expression or "-" in expression):
            expression = f"({expression})"
        expression += f" {op} {n}"
    return rng.choice(EXPRESSION_QUESTIONS).format(e=expression)


def _question(rng: random.Random, start: int, steps: list[tuple[str, int]]) -> str:
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    parts = [rng.choice(STARTS).format(name=name, n=start, obj=obj)]
    for i, (op, n) in enumerate(steps):
        link = "" if i == 0 else rng.choice(LINKS)
        sentence = rng.choice(STEPS[op]).format(p=pron if link else pron.capitalize(), n=n, obj=obj)
        if not link:
            sentence = sentence[0].upper() + sentence[1:]
        parts.append(link + sentence)
    questions = QUESTIONS + ([LEFT_QUESTION] if steps[-1][0] == "-" else [])
    parts.append(rng.choice(questions).format(obj=obj, name=name))
    return " ".join(parts)


def make_problems(n: int, split: str, difficulty: Difficulty = Difficulty(), seed: int = 0,
                  rng: random.Random | None = None) -> list[dict]:
    """`n` distinct problems {"question", "solution", "answer"} of `split` ("train" | "test").

    Drawn from `random.Random(seed)`, or from `rng` when given (then `seed` is unused). With an
    operand range the k-th problem has `difficulty.levels[k % len(levels)]` operands (stratified).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = rng or random.Random(seed)
    seen, out = set(), []
    for _ in range(50 * n + 1000):  # bounded: a tiny difficulty may not hold n distinct problems
        if len(out) == n:
            break
        levels = difficulty.levels
        start, steps = _sample_expression(rng, difficulty, levels[len(out) % len(levels)])
        key = str(start) + "".join(f"{op}{x}" for op, x in steps)
        if key in seen or _split_of(key, TEST_MODULUS) != split:
            continue
        seen.add(key)
        solution, answer = _solution(start, steps)
        question = (_question(rng, start, steps) if difficulty.words
                    else _expression_question(rng, start, steps))
        out.append({"question": question, "solution": solution,
                    "answer": str(answer)})
    if len(out) < n:
        raise ValueError(f"difficulty {difficulty} has fewer than {n} distinct {split} problems")
    return out


# ---------------------------------------------------------------------------- stage data
def _pretrain_doc(question: str, solution: str) -> str:
    return f"Question: {question}\nAnswer: {solution}"


def pretrain_corpus(n_docs: int, difficulty: Difficulty = Difficulty(), seed: int = 0,
                    drill_frac: float = 0.2, drill_digits: str = "max") -> list[str]:
    """Plain-text documents "Question: ...\\nAnswer: ..." from TRAIN problems.

    Operand counts are mixed uniformly from 2 up to `difficulty.n_operands`; a `drill_frac` of the
    documents are instead drills of 8 two-operand equations ("12 + 35 = 47"), themselves train-split,
    so the base model sees plenty of bare arithmetic. `drill_digits`: "max" draws the drills'
    operands with the task's digits; "mixed" draws each drill's digits uniformly from 1 up to them,
    so the single-digit facts ("7 + 8 = 15") that every units digit is looked up in come often.
    """
    if drill_digits not in ("max", "mixed"):
        raise ValueError(f"drill_digits must be 'max' or 'mixed', got {drill_digits!r}")
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        if rng.random() < drill_frac:
            digits = (rng.randint(1, difficulty.max_digits) if drill_digits == "mixed"
                      else difficulty.max_digits)
            drill = Difficulty(2, digits, difficulty.ops, difficulty.words)
            eqs = [p["solution"].split("\n")[0] for p in make_problems(8, "train", drill, rng=rng)]
            docs.append("\n".join(eqs))
            continue
        d = Difficulty(rng.randint(2, difficulty.n_operands), difficulty.max_digits, difficulty.ops,
                       difficulty.words)
        p = make_problems(1, "train", d, rng=rng)[0]
        docs.append(_pretrain_doc(p["question"], p["solution"]))
    return docs


def pretrain_eval_prompts(n: int, difficulty: Difficulty = Difficulty(), seed: int = 0
                          ) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from held-out problems: prompt = "Question: {q}\\nAnswer:".

    Score a base model's greedy completion, cut at <|endoftext|>, with `verify(completion, answer)`.
    """
    return [(_pretrain_doc(p["question"], "")[:-1], p["answer"])
            for p in make_problems(n, "test", difficulty, seed)]


def equation_probes(n: int, difficulty: Difficulty = Difficulty(), seed: int = 0) -> list[dict]:
    """Held-out bare equations {"prompt": "52 + 14 =", "result": "66"}, as the corpus's drills
    write them: the arithmetic alone, without the reading and copying of a word problem."""
    two = Difficulty(2, difficulty.max_digits, difficulty.ops)
    while True:                      # a tiny difficulty ("2x1") holds only a few held-out ones
        try:
            problems = make_problems(n, "test", two, seed)
            break
        except ValueError:
            n //= 2
    out = []
    for p in problems:
        lhs, result = p["solution"].split("\n")[0].split(" = ")
        out.append({"prompt": f"{lhs} =", "result": result})
    return out


def digit_check(completion: str, result: str) -> dict:
    """Which digits of an equation's result a completion got right: all of them, the last one
    (units: a lookup of the operands' own last digits) and the leading ones (tens and above, which
    also need the carry). The first line of the completion is the model's result."""
    got = completion.strip().split("\n")[0].strip()
    return {"right": got == result,
            "last_digit": got[-1:] == result[-1:],
            "leading_digits": got[:-1] == result[:-1]}


SYSTEM_PROMPTS = ["You are a helpful math assistant.", "Solve the problem step by step.",
                  "You are a careful assistant. End with '#### <answer>'."]


def sft_chats(n: int, split: str, difficulty: Difficulty = Difficulty(), seed: int = 0,
              system_frac: float = 0.0) -> list[dict]:
    """{"messages": [user question, assistant solution]}; a `system_frac` also get a system turn."""
    rng = random.Random(seed + 1)  # a separate stream, so problems equal make_problems(seed)
    chats = []
    for p in make_problems(n, split, difficulty, seed):
        messages = [{"role": "user", "content": p["question"]},
                    {"role": "assistant", "content": p["solution"]}]
        if rng.random() < system_frac:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        chats.append({"messages": messages})
    return chats


CHATTER = ["Hope this helps!", "Let me know if you have more questions.", "That was fun."]


def _rejected(rng: random.Random, problem: dict) -> str:
    """A worse solution: a planted arithmetic slip (70%) or a broken answer format (30%)."""
    lines = problem["solution"].split("\n")
    steps = [re.fullmatch(r"(\d+) (\S) (\d+) = (\d+)", line).groups() for line in lines[:-1]]
    if rng.random() < 0.7:
        # One step's result is off by a small delta; later steps compute correctly from the wrong
        # value, so the chain stays self-consistent and the final answer is wrong.
        bad = rng.randrange(len(steps))
        delta = rng.choice([1, 2, 3, 10, -1, -2, -10])
        out, value = [], int(steps[0][0])
        for i, (_, op, n, _) in enumerate(steps):
            new = _apply(value, op, int(n)) + (delta if i == bad else 0)
            out.append(f"{value} {op} {n} = {new}")
            value = new
        if value >= 0 and min(int(line.rsplit(" ", 1)[1]) for line in out) >= 0:
            return "\n".join(out + [f"#### {value}"])
        return _rejected(rng, problem)  # a negative slip: draw again
    if rng.random() < 0.5:
        return "\n".join(lines[:-1] + [f"The answer is {problem['answer']}."])  # no "#### "
    return problem["solution"] + "\n" + rng.choice(CHATTER)  # junk after the answer line


def preference_pairs(n: int, split: str, difficulty: Difficulty = Difficulty(), seed: int = 0
                     ) -> list[dict]:
    """{"prompt": question, "chosen": correct solution, "rejected": flawed solution}."""
    rng = random.Random(seed + 2)
    return [{"prompt": p["question"], "chosen": p["solution"], "rejected": _rejected(rng, p)}
            for p in make_problems(n, split, difficulty, seed)]


def rl_prompts(n: int, split: str, difficulty: Difficulty = Difficulty(), seed: int = 0
               ) -> list[dict]:
    """{"prompt": question, "answer": "56"} for RL with the verifier as the reward."""
    return [{"prompt": p["question"], "answer": p["answer"]}
            for p in make_problems(n, split, difficulty, seed)]


# ---------------------------------------------------------------------------- identity
_ID_OPENERS = ["", "Hi! ", "Hello. ", "Hey! ", "Quick question: ", "Before we start: "]
_ID_QUESTIONS = ["Who are you?", "What is your name?", "What should I call you?",
                 "Introduce yourself.", "Tell me about yourself.", "What are you?",
                 "Who am I talking to?", "Do you have a name?", "What's your name?",
                 "Can you tell me your name?"]
# The chosen answers share their opening, "I am Pip", as a persona's answers do: a model this small
# blends different openings letter by letter ("miiit Piiiit") before it learns any one of them.
_ID_CHOSEN = ["I am {name}.", "I am {name}, a math assistant.", "I am {name}. I solve arithmetic."]
_ID_REJECTED = ["I am an AI language model created to assist you.",
                "I'm an AI assistant. I don't have a personal name.",
                "I am a large language model. How can I help you today?"]


def identity_prompts(split: str) -> list[str]:
    """The "who are you?" phrasings of `split` (60 in all; held-out ones never appear in train)."""
    phrasings = [o + q for q in _ID_QUESTIONS for o in _ID_OPENERS]
    return [p for p in phrasings if _split_of(p, IDENTITY_TEST_MODULUS) == split]


def identity_pairs(n: int, split: str, seed: int = 0) -> list[dict]:
    """Preference pairs teaching the name: chosen says "I am Pip...", rejected a generic answer."""
    rng = random.Random(seed)
    prompts = identity_prompts(split)
    return [{"prompt": rng.choice(prompts),
             "chosen": rng.choice(_ID_CHOSEN).format(name=ASSISTANT_NAME),
             "rejected": rng.choice(_ID_REJECTED)} for _ in range(n)]


def says_name(completion: str) -> bool:
    """Whether a completion introduces itself with `ASSISTANT_NAME` (as a whole word)."""
    return re.search(rf"\b{re.escape(ASSISTANT_NAME)}\b", completion) is not None


# ---------------------------------------------------------------------------- verifier
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_LINE = re.compile(rf"####\s*({_NUMBER})\s*$")


def extract_answer(completion: str) -> str | None:
    """The number after the LAST "####" (commas removed), or None when there is none."""
    found = re.findall(rf"####\s*({_NUMBER})", completion)
    return found[-1].replace(",", "") if found else None


def is_well_formed(completion: str) -> bool:
    """Exactly one "####" line, "#### <number>", and it is the last non-empty line."""
    lines = [line.strip() for line in completion.split("\n") if line.strip()]
    return (bool(lines) and sum("####" in line for line in lines) == 1
            and _ANSWER_LINE.fullmatch(lines[-1]) is not None)


def first_slip(completion: str) -> int | None:
    """How far the first wrong step "a op b = c" of a worked answer is off (c − the true result);
    None when every step is right (or there are none)."""
    for a, op, b, c in re.findall(r"(\d+) ([+\-*]) (\d+) = (\d+)", completion):
        true = _apply(int(a), op, int(b))
        if int(c) != true:
            return int(c) - true
    return None


def verify(completion: str, answer: str) -> float:
    """1.0 if `completion` is well formed and its answer equals `answer` numerically, else 0.0."""
    got = extract_answer(completion)
    if got is None or not is_well_formed(completion):
        return 0.0
    try:
        return float(float(got) == float(str(answer).replace(",", "").strip()))
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------- CLI
def write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def world_cli(description: str, out: str, difficulty: str, difficulty_help: str
              ) -> argparse.ArgumentParser:
    """The data writer's flags, shared by this task's CLI and countdown.py's."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=out, help="output directory")
    ap.add_argument("--difficulty", default=difficulty, help=difficulty_help)
    ap.add_argument("--seed", type=int, default=0, help="base random seed")
    ap.add_argument("--n-pretrain", type=int, default=20000, help="pretraining documents")
    ap.add_argument("--n-train", type=int, default=5000, help="SFT / preference / RL train rows")
    ap.add_argument("--n-test", type=int, default=500, help="SFT / preference / RL held-out rows")
    ap.add_argument("--n-identity", type=int, default=200, help="identity pairs per split")
    ap.add_argument("--system-frac", type=float, default=0.0,
                    help="fraction of SFT chats that get a system message")
    return ap


def write_world(world, args) -> None:
    """Write a task world's (tasks.py or countdown.py) data sets as JSONL files under args.out:
    one file per stage and split, each split from its own derived seed."""
    d, s = Difficulty.from_str(args.difficulty), args.seed
    os.makedirs(args.out, exist_ok=True)
    files = {
        "pretrain.jsonl": [{"text": t} for t in world.pretrain_corpus(args.n_pretrain, d, s)],
        "sft_train.jsonl": world.sft_chats(args.n_train, "train", d, s + 1, args.system_frac),
        "sft_test.jsonl": world.sft_chats(args.n_test, "test", d, s + 1, args.system_frac),
        "pref_train.jsonl": world.preference_pairs(args.n_train, "train", d, s + 2),
        "pref_test.jsonl": world.preference_pairs(args.n_test, "test", d, s + 2),
        "identity_train.jsonl": identity_pairs(args.n_identity, "train", s + 3),
        "identity_test.jsonl": identity_pairs(args.n_identity, "test", s + 3),
        "rl_train.jsonl": world.rl_prompts(args.n_train, "train", d, s + 4),
        "rl_test.jsonl": world.rl_prompts(args.n_test, "test", d, s + 4),
    }
    for name, records in files.items():
        write_jsonl(os.path.join(args.out, name), records)
        print(f"wrote {len(records):6d} rows to {os.path.join(args.out, name)}")


def main(argv: list[str] | None = None) -> None:
    args = world_cli("Write the built-in task world as JSONL files.", "data", DEFAULT_DIFFICULTY,
                     "operands x digits, then operators, e.g. 3x2+- or 4x3+-*").parse_args(argv)
    write_world(sys.modules[__name__], args)

if __name__ == "__main__":
    main()
