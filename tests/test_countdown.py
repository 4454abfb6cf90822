"""countdown.py: every generated problem has a valid solution, splits never share a problem, SFT
shows one valid solution, the rejected side of a pair fails, and the files the CLI writes load
with data.py's schemas."""
from collections import Counter

from minipost import countdown
from minipost.data import load_jsonl
from minipost.tasks import Difficulty

D = Difficulty.from_str(countdown.DEFAULT_DIFFICULTY)


def test_every_problem_has_a_valid_worked_solution_that_uses_its_numbers():
    for p in countdown.make_problems(500, "train", D, seed=1):
        assert countdown.score(p["solution"], p) == 1.0
        assert countdown.is_well_formed(p["solution"])
        assert 1 <= p["target"] <= 999 and p["target"] not in p["numbers"]
        expression = countdown.answer_expression(p["solution"])
        used = [int(x) for x in expression.replace("(", " ").replace(")", " ").split()
                if x.isdigit()]
        assert Counter(used) == Counter(p["numbers"])         # the chain uses every number once


def test_number_counts_cycle_through_the_range_in_equal_shares():
    counts = Counter(len(p["numbers"]) for p in countdown.make_problems(40, "test", D))
    assert counts == {3: 20, 4: 20}


def test_train_and_held_out_never_share_a_problem():
    def key(p):
        return tuple(sorted(p["numbers"])), p["target"]
    train = {key(p) for p in countdown.make_problems(3000, "train", D, seed=0)}
    test = {key(p) for p in countdown.make_problems(300, "test", D, seed=0)}
    assert not train & test


def test_sft_shows_one_valid_solution_and_rejected_answers_fail():
    chats = countdown.sft_chats(50, "train", D, seed=3)
    problems = countdown.make_problems(50, "train", D, seed=3)
    for chat, p in zip(chats, problems):
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
        assert countdown.score(chat["messages"][1]["content"], p) == 1.0
    for pair, p in zip(countdown.preference_pairs(100, "train", D, seed=4),
                       countdown.make_problems(100, "train", D, seed=4)):
        assert countdown.score(pair["chosen"], p) == 1.0
        assert countdown.score(pair["rejected"], p) == 0.0


def test_the_cli_writes_files_that_load_with_the_schemas(tmp_path):
    countdown.main(["--out", str(tmp_path), "--n-pretrain", "20", "--n-train", "20",
                    "--n-test", "5", "--n-identity", "4"])
    rl = load_jsonl(tmp_path / "rl_train.jsonl", "rl")
    assert set(rl[0]) == {"prompt", "numbers", "target"}
    assert load_jsonl(tmp_path / "sft_train.jsonl", "sft")
    assert load_jsonl(tmp_path / "pref_test.jsonl", "preference")
    docs = countdown.pretrain_corpus(50, D, seed=0)
    assert any(d.startswith("Question: ") for d in docs) and all(d.strip() for d in docs)
