"""Task world: verifier hand cases, disjoint splits, determinism, data products, CLI."""
import re

import pytest

from minipost import data, tasks
from minipost.tasks import Difficulty, extract_answer, is_well_formed, verify


@pytest.mark.parametrize("completion,answer,expected", [
    ("23 + 45 = 68\n68 - 12 = 56\n#### 56", "56", 1.0),        # right answer
    ("23 + 45 = 68\n68 - 12 = 55\n#### 55", "56", 0.0),        # wrong answer
    ("23 + 45 = 68\n68 - 12 = 56\nThe answer is 56", "56", 0.0),  # malformed: no ####
    ("#### 56\nHope this helps!", "56", 0.0),                    # trailing junk after answer line
    ("#### 56\n\n  \n", "56", 1.0),                              # trailing blank lines are fine
    ("#### 1,234", "1234", 1.0),                                 # commas
    ("####   56  ", "56", 1.0),                                  # spaces
    ("####56", "56", 1.0),
    ("10 - 15 = -5\n#### -5", "-5", 1.0),                        # negative numbers
    ("#### -5", "5", 0.0),
    ("#### 12\n#### 56", "56", 0.0),                             # two answer lines: malformed
    ("#### 56.0", "56", 1.0),                                    # numeric equality
    ("#### fifty-six", "56", 0.0),
    ("", "56", 0.0),
])
def test_verify_hand_cases(completion, answer, expected):
    assert verify(completion, answer) == expected


def test_extract_answer_takes_the_last_and_handles_absence():
    assert extract_answer("#### 12\n#### 56") == "56"
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("#### -7") == "-7"
    assert extract_answer("no answer here") is None
    assert not is_well_formed("#### 5 apples")
    assert is_well_formed("step\n#### 5")


def test_difficulty_from_str_round_trips():
    d = Difficulty.from_str("4x3+-*")
    assert (d.n_operands, d.max_digits, d.ops) == (4, 3, "+-*")
    assert str(d) == "4x3+-*" and Difficulty.from_str(str(Difficulty())) == Difficulty()
    assert Difficulty.from_str("2x1") == Difficulty(2, 1, "+-")
    with pytest.raises(ValueError):
        Difficulty.from_str("three")
    with pytest.raises(ValueError):
        Difficulty(1, 2, "+")


@pytest.mark.parametrize("spec", ["3x2+-", "4x2+-*", "2x1+-"])
def test_solutions_are_correct_and_non_negative(spec):
    for p in tasks.make_problems(100, "train", Difficulty.from_str(spec), seed=0):
        assert verify(p["solution"], p["answer"]) == 1.0
        lines = p["solution"].split("\n")
        assert len(lines) == Difficulty.from_str(spec).n_operands  # steps + "#### n"
        for line in lines[:-1]:
            a, op, b, c = re.fullmatch(r"(\d+) (\S) (\d+) = (\d+)", line).groups()
            assert eval(f"{a} {op} {b}") == int(c) >= 0
        assert p["question"].endswith("?")


def _keys(problems):
    # The expression a problem is made of, read back from its solution.
    return {tuple(line.split(" = ")[0] for line in p["solution"].split("\n")[:-1]) for p in problems}


def test_train_and_test_never_share_a_problem():
    d = Difficulty(2, 1, "+-")  # 126 problems in all (8 held out), so collisions would show up
    train = tasks.make_problems(110, "train", d, seed=0)
    test = tasks.make_problems(8, "test", d, seed=0)
    assert len(_keys(train)) == 110 and len(_keys(test)) == 8  # distinct within a split
    assert not _keys(train) & _keys(test)
    assert not _keys(tasks.make_problems(500, "train", Difficulty(), 1)) & _keys(
        tasks.make_problems(500, "test", Difficulty(), 1))


def test_too_small_a_space_raises():
    with pytest.raises(ValueError):
        tasks.make_problems(2000, "test", Difficulty(2, 1, "+"), seed=0)


def test_same_seed_same_data_other_seed_other_data():
    assert tasks.make_problems(50, "train", seed=3) == tasks.make_problems(50, "train", seed=3)
    assert tasks.make_problems(50, "train", seed=3) != tasks.make_problems(50, "train", seed=4)
    assert tasks.pretrain_corpus(50, seed=3) == tasks.pretrain_corpus(50, seed=3)
    assert tasks.preference_pairs(20, "test", seed=3) == tasks.preference_pairs(20, "test", seed=3)
    assert tasks.identity_pairs(20, "train", 3) == tasks.identity_pairs(20, "train", 3)


def test_pretrain_corpus_and_eval_prompts():
    docs = tasks.pretrain_corpus(200, Difficulty(3, 2), seed=0)
    assert sum(d.startswith("Question: ") and "\nAnswer: " in d for d in docs) > 100
    assert any(not d.startswith("Question:") for d in docs)  # equation drills
    steps = {len(d.split("\n")) - 2 for d in docs if d.startswith("Question:")}
    assert steps == {1, 2}  # 2 and 3 operands mixed: question line, steps, "####" line
    prompts = tasks.pretrain_eval_prompts(20, Difficulty(3, 2), seed=0)
    for prompt, answer in prompts:
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        assert answer.isdigit()
    # held out: no eval question appears in the corpus
    corpus_questions = {d.split("\n")[0] for d in tasks.pretrain_corpus(2000, Difficulty(3, 2), 0)}
    assert not corpus_questions & {p.split("\n")[0] for p, _ in prompts}


def test_preference_pairs_rejected_is_worse():
    for pair in tasks.preference_pairs(300, "train", Difficulty(3, 2, "+-*"), seed=0):
        answer = extract_answer(pair["chosen"])
        assert verify(pair["chosen"], answer) == 1.0
        assert verify(pair["rejected"], answer) == 0.0
        assert pair["chosen"] != pair["rejected"]


def test_sft_chats_and_rl_prompts():
    chats = tasks.sft_chats(50, "train", seed=0, system_frac=0.5)
    assert any(c["messages"][0]["role"] == "system" for c in chats)
    for c in chats:
        assert [m["role"] for m in c["messages"]][-2:] == ["user", "assistant"]
    for row in tasks.rl_prompts(20, "test", seed=0):
        assert set(row) == {"prompt", "answer"} and row["answer"].isdigit()


def test_identity_split_and_name():
    train, test = tasks.identity_prompts("train"), tasks.identity_prompts("test")
    assert len(train) + len(test) >= 30 and len(test) >= 5
    assert not set(train) & set(test)
    pairs = tasks.identity_pairs(50, "test", seed=0)
    assert {p["prompt"] for p in pairs} <= set(test)
    assert all(tasks.says_name(p["chosen"]) and not tasks.says_name(p["rejected"]) for p in pairs)
    assert not tasks.says_name("pipeline")


def test_cli_writes_files_that_load_jsonl_reads(tmp_path, capsys):
    tasks.main(["--out", str(tmp_path), "--n-pretrain", "30", "--n-train", "40", "--n-test", "10",
                "--n-identity", "8", "--difficulty", "2x2+-"])
    schemas = {"sft": "sft", "pref": "preference", "identity": "preference", "rl": "rl"}
    for prefix, schema in schemas.items():
        for split, n in (("train", 40), ("test", 10)):
            rows = data.load_jsonl(tmp_path / f"{prefix}_{split}.jsonl", schema)
            assert len(rows) == (8 if prefix == "identity" else n)
    text = (tmp_path / "pretrain.jsonl").read_text().splitlines()
    assert len(text) == 30 and '"text"' in text[0]


def test_questions_state_the_expression_unless_w_asks_for_word_problems():
    plain = tasks.make_problems(5, "train", Difficulty.from_str("3x2+-"), seed=0)
    words = tasks.make_problems(5, "train", Difficulty.from_str("3x2+-w"), seed=0)
    for p in plain:  # every operand of the solution appears in the question, in order
        first = p["solution"].split("\n")[0].split(" = ")[0]
        assert first in p["question"]
    assert all(any(name in p["question"] for name, _ in tasks.NAMES) for p in words)
    assert str(Difficulty.from_str("3x2+-w")) == "3x2+-w"


def test_a_stated_expression_means_its_answer_under_the_usual_precedence():
    import re
    for p in tasks.make_problems(300, "train", Difficulty.from_str("2-5x2+-*"), seed=0):
        expression = re.fullmatch(r"\D*?([\d(][\d ()+*-]*\d\)?)\D*", p["question"]).group(1)
        assert eval(expression) == int(p["answer"]), p["question"]   # digits, ops, parentheses


def test_first_slip_is_how_far_the_first_wrong_step_is_off():
    from minipost.tasks import first_slip
    assert first_slip("86 + 30 = 116\n116 + 81 = 187\n#### 187") == -10      # the dropped carry
    assert first_slip("50 + 1 = 54\n54 + 80 = 134\n#### 134") == 3          # the first slip only
    assert first_slip("169 - 95 = 84\n84 * 2 = 168\n#### 168") == 10
    assert first_slip("86 + 30 = 116\n116 + 81 = 197\n#### 197") is None     # every step right
    assert first_slip("The answer is 12.") is None


def test_digit_check_splits_the_last_digit_from_the_leading_ones():
    assert tasks.digit_check(" 66\n####", "66") == {"right": True, "last_digit": True,
                                                    "leading_digits": True}
    # 59 + 63 = 122 answered 124: the carry into the hundreds is right, the units lookup is not
    assert tasks.digit_check(" 124", "122") == {"right": False, "last_digit": False,
                                                "leading_digits": True}
    assert tasks.digit_check(" 132", "122") == {"right": False, "last_digit": True,
                                                "leading_digits": False}


def test_equation_probes_are_held_out_bare_equations():
    probes = tasks.equation_probes(50)
    assert len(probes) == 50
    for p in probes:
        lhs = p["prompt"][:-2]
        a, op, b = lhs.split(" ")
        assert p["prompt"].endswith(" =") and int(p["result"]) == tasks._apply(int(a), op, int(b))
        assert tasks._split_of(lhs.replace(" ", ""), tasks.TEST_MODULUS) == "test"
    assert 0 < len(tasks.equation_probes(200, tasks.Difficulty.from_str("2x1"))) < 200


def test_mixed_drills_bring_single_digit_facts_and_max_keeps_the_old_corpus():
    import random
    mixed = tasks.pretrain_corpus(400, seed=0, drill_digits="mixed")
    drills = [d for d in mixed if "####" not in d]
    one_digit = [d for d in drills if all(len(x) == 1 for x in d.split("\n")[0].split(" ")[::2][:2])]
    assert 0.3 < len(one_digit) / len(drills) < 0.7          # half the drills, give or take
    plain = tasks.pretrain_corpus(400, seed=0)
    assert all(any(len(n) == 2 for n in d.split()[::2]) for d in plain if "####" not in d)
    with pytest.raises(ValueError):
        tasks.pretrain_corpus(4, drill_digits="few")


def test_an_operand_range_stratifies_every_problem_set_over_its_levels():
    d = Difficulty.from_str("2-5x2+-")
    assert (d.min_operands, d.n_operands, str(d)) == (2, 5, "2-5x2+-") and d.levels == [2, 3, 4, 5]
    problems = tasks.make_problems(40, "test", d, seed=0)
    steps = [p["solution"].count("\n") for p in problems]        # steps = operands − 1
    assert steps == [1, 2, 3, 4] * 10                               # equal shares, in turn
    assert all(verify(p["solution"], p["answer"]) for p in problems)
    # a single level is just itself
    assert Difficulty.from_str("3x2+-").levels == [3]
    for bad in ("5-2x2+-", "1-3x2+-"):
        with pytest.raises(ValueError):
            Difficulty.from_str(bad)
