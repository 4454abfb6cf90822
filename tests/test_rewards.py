"""rewards.py: the built-in reward functions on hand-written cases, GSM8K-format answers, how
weights combine, the checks on a user's function, and a user's function in a temporary module end
to end through train_grpo.py and train_ppo.py, its extra columns arriving as keyword arguments."""
import json
import math
import re
import sys

import pytest
import torch

from minipost import rewards
from minipost.errors import DataError, UserError

@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# real-looking GSM8K rows: the "answer" column is the whole worked solution
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72", "number": "72"},
    {"question": "A company pays $1,200 a month ...", "answer": "12 * 1,200 = <<12*1200=14400>>14,400"
                                                               "\n#### 14,400", "number": "14400"},
    {"question": "How much does she earn?", "answer": "#### $18", "number": "18"},
    {"question": "How far?", "answer": "#### 5 miles", "number": "5"},
    {"question": "How much colder?", "answer": "#### -3.5 degrees", "number": "-3.5"},
]


@pytest.mark.parametrize("row", GSM8K_ROWS, ids=lambda r: r["number"])
def test_gsm8k_answers_parse_past_commas_dollars_and_trailing_text(row):
    assert rewards.reference_number(row["answer"]) == row["number"]
    right, wrong = f"step\n#### {row['number']}", "step\n#### 7"
    assert rewards.correct([row["question"]] * 2, [right, wrong], [row["answer"]] * 2) == [1.0, 0.0]


def test_correct_takes_a_bare_number_a_json_number_and_commas_in_the_completion():
    assert rewards.reference_number("1,234") == "1234" and rewards.reference_number(56) == "56"
    completions = ["#### 1,234", "1234", "#### 1234\nthanks", "#### 56"]
    # no "####" line; junk after the answer line: not the format, so 0
    assert rewards.correct([""] * 4, completions, ["1234", "1234", "1234", 56]) == [1, 0, 0, 1]
    assert rewards.correct([""], ["#### 5"], ["no number here"]) == [0.0]


def test_well_formed_and_chat_form_completions():
    assert rewards.well_formed([""] * 3, ["1 + 2 = 3\n#### 3", "#### 3\n#### 3", "3"]) == [1, 0, 0]
    chat = [[{"role": "assistant", "content": "#### 3"}]]          # TRL's conversational form
    assert rewards.well_formed([""], chat) == [1.0]


COUNTDOWN = [   # (completion, value): numbers 3, 5, 7, 2, target 8
    ("3 + 5 = 8\n#### 3 + 5", 1.0),                 # right
    ("#### (7 - 3) * 2", 1.0),                      # another right answer: many are
    ("#### 7 + 3 - 2", 1.0),
    ("#### 7 + 2", 0.0),                            # a wrong value (9)
    ("#### 5 + 5 - 2", 0.0),                        # 5 used twice, given once
    ("#### 4 * 2", 0.0),                            # 4 is not given
    ("#### 8", 0.0),                                # 8 is not given either
    ("#### 7 / (5 - 5) + 8", 0.0),                  # division by zero, and 5 twice
    ("#### 3 / (7 - 7)", 0.0),                      # division by zero
    ("#### (7 + 5) / 3 * 2", 1.0),                  # exact division: 12 / 3 · 2 = 8
    ("#### 7 + 5 / 5", 0.0),                        # 5 twice
    ("#### 3 + 5 =", 0.0),                          # junk
    ("#### ((3 + 5)", 0.0),                         # unbalanced
    ("I think it is 8", 0.0),                       # no answer line
    ("#### -3 + 7 + 2 + 2", 0.0),                   # a unary minus is not a given number
    ("#### 2 ** 3", 0.0),                           # no powers
    ("#### __import__('os').system('echo pwned')", 0.0),   # an attempt to run code
    ("#### (lambda: 8)()", 0.0),
    ("#### 3 + 5\n#### 3 + 5", 0.0),                # two answer lines
]


@pytest.mark.parametrize("completion,value", COUNTDOWN, ids=[c for c, _ in COUNTDOWN])
def test_countdown_verifier_on_hand_written_answers(completion, value, capfd):
    assert rewards.countdown([""], [completion], [[3, 5, 7, 2]], [8]) == [value]
    assert "pwned" not in capfd.readouterr().out                    # nothing was run


def fn(name, f, weight=1.0):
    return rewards.RewardFn(name, f, weight, rewards.required_columns(f))


def test_weights_combine_as_a_sum_and_none_is_skipped():
    a = fn("a", lambda prompts, completions, **kw: [1.0, 0.0, None], 1.0)
    b = fn("b", lambda prompts, completions, **kw: [0.5, None, None], 2.0)
    total, per_fn = rewards.score([a, b], ["p"] * 3, ["x", "y", "z"], [{"prompt": "p"}] * 3)
    # total_i = Σ w·r over the functions that apply: 1·1 + 2·0.5 = 2; 1·0 = 0; nothing applies: 0
    assert total.tolist() == [2.0, 0.0, 0.0]
    assert math.isnan(per_fn["b"][1]) and per_fn["a"][1] == 0.0
    stats = rewards.log_stats(per_fn)
    assert stats["rewards/a/mean"] == 0.5 and stats["rewards/b/mean"] == 0.5
    assert stats["rewards/a/std"] == pytest.approx(math.sqrt(0.5)) and stats["rewards/b/std"] == 0


def test_columns_arrive_as_keyword_arguments_one_value_per_completion():
    seen = {}

    def f(prompts, completions, answer, **kwargs):
        seen.update(answer=answer, **kwargs)
        return [0.0] * len(completions)

    rows = [{"prompt": "p", "answer": "1", "tests": ["t1"]}, {"prompt": "q", "answer": "2"}]
    rewards.score([fn("f", f)], ["p", "q"], ["x", "y"], rows)
    assert seen == {"answer": ["1", "2"], "tests": [["t1"], None]}
    assert rewards.required_columns(f) == ("answer",)
    assert rewards.required_columns(rewards.countdown) == ("numbers", "target")


@pytest.mark.parametrize("returns,message", [
    (lambda p, c, **kw: 1 / 0, "raised ZeroDivisionError: division by zero"),
    (lambda p, c, **kw: [1.0], "returned 1 values for 2 completions"),
    (lambda p, c, **kw: 1.0, "returned float for 2 completions"),
    (lambda p, c, **kw: [1.0, float("nan")], "returned nan for completion 1"),
    (lambda p, c, **kw: [float("inf"), 1.0], "returned inf for completion 0"),
    (lambda p, c, **kw: ["yes", 1.0], "returned str for completion 0"),
])
def test_a_bad_reward_function_is_one_line_naming_it(returns, message):
    with pytest.raises(UserError, match=re.escape("reward function 'mine' " + message)):
        rewards.score([fn("mine", returns)], ["p"] * 2, ["x", "y"], [{"prompt": "p"}] * 2)


def test_loading_names_what_is_wrong(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                            "    return [-len(c) for c in completions]\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "my_rewards.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)   # each test its own module
    fns = rewards.load(["correct", "my_rewards:short"], [1.0, 0.5])
    assert [(f.name, f.weight, f.columns) for f in fns] == [("correct", 1.0, ("answer",)),
                                                             ("short", 0.5, ())]
    assert rewards.load([f"{tmp_path}/my_rewards.py:short"], [])[0].fn(["p"], ["abc"]) == [-3]
    for specs, weights, message in [
            (["nope"], [], "--reward-fn nope: not a built-in"),
            (["no_such_module:f"], [], "cannot import no_such_module (ModuleNotFoundError"),
            ([f"{tmp_path}/broken/my_rewards.py:f"], [], "(ModuleNotFoundError: No module named "
                                                           "'not_a_module_anywhere')"),
            ([f"{tmp_path}/missing.py:f"], [], "cannot import"),
            (["my_rewards:long"], [], "my_rewards has no function 'long'"),
            (["correct", "well_formed"], [1.0], "--reward-weights has 1 values for 2"),
            (["correct", "correct"], [], "two functions named 'correct'")]:
        with pytest.raises(UserError, match=re.escape(message)):
            rewards.load(specs, weights)


def test_a_row_without_a_needed_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n\n" + json.dumps({"prompt": "b"}))
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]
    with pytest.raises(DataError, match=r"d\.jsonl:3: missing field 'answer' \(reward function "
                                        r"'correct' needs it\)"):
        rewards.check_columns(rewards.load(["correct"], []), rows, path, [1, 3])


# ---------------------------------------------------------------------------- end to end
USER_MODULE = '''
import json, os

def hits_target(prompts, completions, target_len, **kwargs):
    """1 when the completion is at least target_len characters long; None for rows marked skip."""
    with open(os.environ["SEEN_LOG"], "a") as f:
        f.write(json.dumps(sorted(kwargs)) + "\\n")
    return [None if kw else float(len(c) >= n)
            for c, n, kw in zip(completions, target_len, kwargs["skip"])]
'''


def user_task(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    monkeypatch.setenv("SEEN_LOG", str(tmp_path / "seen.jsonl"))
    rows = [{"prompt": f"Say something {i}.", "target_len": 2 + i % 4, "skip": i == 5,
             "topic": "chat"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data)


def test_a_user_reward_function_end_to_end_through_train_grpo(tiny_sft_dir, tmp_path, monkeypatch):
    import train_grpo
    data = user_task(tmp_path, monkeypatch)
    out = tmp_path / "grpo"
    final = train_grpo.main(train_grpo.Args(
        init=tiny_sft_dir, out_dir=str(out), data=data, eval_data=data,
        reward_fn=["my_rewards:hits_target", "well_formed"], reward_weights=[1.0, 0.5],
        max_steps=2, batch_prompts=2, group_size=4, max_new_tokens=8, micro_batch_size=4,
        eval_problems=4, pass_k=2, eval_every=0, threads=1, device="cpu", max_minutes=0))
    seen = [json.loads(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert all(s == ["skip", "topic"] for s in seen)    # every other column, as keywords
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "reward/mean" in x]
    assert train and all(k in train[0] for k in ("rewards/hits_target/mean",
                                                 "rewards/hits_target/std",
                                                 "rewards/well_formed/mean", "reward/std"))
    for res in (final["before"], final["after"]):   # held-out: each function's greedy mean
        assert 0 <= res["hits_target/mean"] <= 1 and res["n"] == 4
        assert len(res["hits_target/pass@k"]) == 2     # 0/1: pass@k for k = 1, 2


def test_a_user_reward_function_end_to_end_through_train_ppo(tiny_sft_dir, tmp_path, monkeypatch):
    import train_ppo
    data = user_task(tmp_path, monkeypatch)
    out = tmp_path / "ppo"
    final = train_ppo.main(train_ppo.Args(
        init=tiny_sft_dir, reward_model=str(tmp_path / "none"), reward="gold",
        value_init="policy", out_dir=str(out), data=data, eval_data=data,
        reward_fn=[f"{tmp_path}/my_rewards.py:hits_target"], string_prompts="text",
        batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, max_steps=2,
        eval_every=0, eval_problems=4, threads=1, device="cpu"))
    assert (tmp_path / "seen.jsonl").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "gold/mean" in x]
    assert len(train) == 2 and "rewards/hits_target/mean" in train[0]
    assert 0 <= final["hits_target/mean"] <= 1 and "hits_target/mean_before" in final


def test_a_reward_function_that_raises_stops_before_anything_is_written(tiny_sft_dir, tmp_path,
                                                                        monkeypatch):
    import train_grpo
    (tmp_path / "my_rewards.py").write_text(
        "def picky(prompts, completions, **kw):\n    raise KeyError('expected')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    with pytest.raises(UserError, match="reward function 'picky' raised KeyError"):
        train_grpo.main(train_grpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "o"),
                                        reward_fn=["my_rewards:picky"], n_prompts=16,
                                        threads=1, device="cpu"))
    assert not (tmp_path / "o").exists()
