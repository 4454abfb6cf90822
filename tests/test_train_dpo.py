"""train_dpo.py: ln 2 at step 0 inside the script's loss path, precomputed = live reference, the
adapters-off reference is the initial model, and end-to-end runs with tiny flags."""
import json
import random

import pytest
import torch

import train_dpo
from conftest import warnings_of
from minipost import tasks
from minipost.cli import UserError
from minipost.data import collate_preference, encode_preference
from minipost.dpo import dpo_loss
from minipost.peft import add_peft, load_model
from minipost.reference import Reference
from minipost.rollout import pair_up, preferred_pair, sampled_pairs
from minipost.tokenizer import load_tokenizer

TINY = dict(n_pairs=40, n_identity=8, eval_pairs=16, eval_problems=8, max_new_tokens=8,
            batch_size=8, max_steps=3, max_length=128, lr=1e-3, warmup_steps=1, threads=1,
            device="cpu")
LN2 = torch.log(torch.tensor(2.0)).item()  # ln 2 in fp32, the dtype of the loss


def tiny_batch(path, n=4):
    tok = load_tokenizer(path)
    rows = tasks.preference_pairs(n - 1, "train", seed=3) + tasks.identity_pairs(1, "train")
    return collate_preference([encode_preference(tok, r) for r in rows], tok.pad_token_id)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_path_is_exactly_ln2_when_policy_equals_reference(tiny_sft_dir):
    policy, ref = load_model(tiny_sft_dir), load_model(tiny_sft_dir).eval()
    batch = tiny_batch(tiny_sft_dir)
    chosen, rejected = train_dpo.pair_logps(policy, batch)          # policy in train mode, grad on
    with torch.no_grad():
        ref_chosen, ref_rejected = train_dpo.pair_logps(ref, batch)
    for loss_type, at_zero in (("sigmoid", LN2), ("hinge", 1.0), ("ipo", 25.0)):  # (0 − 1/(2·0.1))²
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen,
                                                            ref_rejected, 0.1, 0.0, loss_type)
        assert (losses == at_zero).all()
        assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()
    assert chosen.requires_grad and torch.isfinite(chosen).all() and (chosen < 0).all()


def test_precompute_ref_gives_the_same_losses_as_a_live_reference(tiny_sft_dir, tmp_path):
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"dpo_{precompute}"
        res = train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(out),
                                            precompute_ref=precompute, **{**TINY, "eval_problems": 0}))
        assert res["loss_step0"] == pytest.approx(LN2, abs=1e-7)
        assert res["rewards/margins_step0"] == 0.0
        runs[precompute] = ([r for r in read_metrics(out) if "loss" in r], res)
    (live, live_res), (pre, pre_res) = runs[False], runs[True]
    assert live_res["reference"] == "copy" and pre_res["reference"] == "precomputed"
    assert [r["step"] for r in live] == [r["step"] for r in pre] == [1, 3]
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen_drift"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
        assert a["loss"] != pytest.approx(LN2, abs=1e-6) or a["step"] == 1   # it did train
    assert live_res["eval/preference_accuracy"] == pytest.approx(pre_res["eval/preference_accuracy"])


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_adapters_off_reference_equals_the_initial_model(tiny_sft_dir, kind):
    batch = tiny_batch(tiny_sft_dir)
    model = load_model(tiny_sft_dir).eval()
    with torch.no_grad():
        initial = train_dpo.pair_logps(model, batch)
        add_peft(model, kind, lora_r=2, adapter_dim=4)
        reference = Reference(model, copy=False)
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():       # stand-in for training: move every adapter weight
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        trained = train_dpo.pair_logps(model, batch)
    ref_logps = reference.logps(train_dpo.pair_logps, batch)
    for init, ref, new in zip(initial, ref_logps, trained):
        assert torch.equal(ref, init)                                 # bit for bit
        assert not torch.allclose(new, init)                          # the adapters do act


def test_pair_logps_entropy_is_the_chosen_rows_token_entropy_and_changes_no_logp(tiny_sft_dir):
    policy = load_model(tiny_sft_dir)
    batch = tiny_batch(tiny_sft_dir)
    chosen, rejected = train_dpo.pair_logps(policy, batch)
    chosen_e, rejected_e, entropy = train_dpo.pair_logps(policy, batch, with_entropy=True)
    assert torch.equal(chosen, chosen_e) and torch.equal(rejected, rejected_e)
    B = len(chosen)                      # by hand: H of every position of the chosen rows alone,
    with torch.no_grad():                # averaged over the tokens their loss mask scores
        logp = policy(batch["input_ids"][:B]).float().log_softmax(-1)[:, :-1]   # (B, T−1, V)
    h = -(logp.exp() * logp).sum(-1)
    mask = batch["loss_mask"][:B, 1:].float()
    assert entropy.item() == pytest.approx(((h * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert not entropy.requires_grad


def test_train_dpo_logs_entropy_warns_once_and_reports_to_tensorboard(tiny_sft_dir, tmp_path,
                                                                      watched):
    out = tmp_path / "dpo"
    train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(out), report_to="tensorboard",
                                  **TINY))
    train = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in train] == [1, 3] and all(r["entropy"] > 0 for r in train)
    (warning,) = warnings_of(out)
    assert warning["step"] == 1 and warning["warning"].startswith("the loss has stopped moving")
    (writer,) = watched
    assert [s for s, _ in writer.scalars["entropy"]] == [1, 3]


@pytest.mark.parametrize("peft,loss_type", [("none", "ipo"), ("lora", "sigmoid"),
                                            ("adapter", "hinge")])
def test_train_dpo_end_to_end(tiny_sft_dir, tmp_path, peft, loss_type):
    out = tmp_path / "dpo"
    res = train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(out), peft=peft,
                                        loss_type=loss_type, label_smoothing=0.0, lora_r=2,
                                        adapter_dim=4, **TINY))
    for key in ("before/preference_accuracy", "eval/preference_accuracy", "eval/rewards/accuracies",
                "before/accuracy", "eval/accuracy", "before/identity", "eval/identity",
                "train_minutes", "peak_rss_mb"):
        assert key in res, key
    assert res["reference"] == ("copy" if peft == "none" else "adapters_off")
    logged = [r for r in read_metrics(out) if "loss" in r][0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/chosen_drift"):
        assert key in logged
    assert json.loads((out / "results.json").read_text())["stage"] == "dpo"
    if peft == "none":
        assert json.loads((out / "config.json").read_text())["minipost"]["stage"] == "dpo"
        load_model(out)
    else:
        assert (out / "adapter_config.json").exists()


def test_train_dpo_rejects_bad_flags_and_missing_init(tiny_sft_dir, tmp_path):
    with pytest.raises(UserError, match="train_sft.py"):
        train_dpo.main(train_dpo.Args(init=str(tmp_path / "nope"), out_dir=str(tmp_path / "d")))
    with pytest.raises(UserError, match="loss-type"):
        train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "d"),
                                      loss_type="kto", **TINY))


def test_pair_up_labels_the_policys_answers_with_the_verifier():
    problem = {"question": "What is 2 + 3 + 4?", "answer": "9",
               "solution": "2 + 3 = 5\n5 + 4 = 9\n#### 9"}
    right, wrong = "2 + 3 = 5\n5 + 4 = 9\n#### 9", "2 + 3 = 5\n5 + 4 = 10\n#### 10"
    rng = random.Random(0)
    assert pair_up(problem, [right, right], [False, False], rng) is None  # all right
    assert pair_up(problem, [right, wrong], [False, False], rng) == {
        "prompt": problem["question"], "chosen": right, "rejected": wrong}
    # all wrong: the worked solution is the chosen answer
    wrong2 = "2 + 3 = 6\n6 + 4 = 10\n#### 10"
    pair = pair_up(problem, [wrong, wrong2], [False, False], rng)
    assert pair["chosen"] == problem["solution"] and pair["rejected"] in (wrong, wrong2)
    # an answer cut off by the length limit is never the rejected one
    assert pair_up(problem, [right, "2 + 3 = 5\n5 +"], [False, True], rng) is None
    pair = pair_up(problem, ["2 + 3 = 5\n5 +", wrong], [True, False], rng)
    assert pair["rejected"] == wrong and pair["chosen"] == problem["solution"]


def test_sampled_pairs_come_from_the_policy_and_repeat_with_the_seed(tiny_sft_dir):
    model = load_model(tiny_sft_dir)
    tok = load_tokenizer(tiny_sft_dir)
    problems = tasks.make_problems(8, "train", seed=1)
    args = dict(samples=4, temperature=1.0, max_new_tokens=64, seed=5, batch_problems=4,
                show_progress=False)
    a = sampled_pairs(model, tok, problems, **args)
    b = sampled_pairs(model, tok, problems, **args)
    assert a == b and 1 <= len(a) <= len(problems)
    assert model.training                               # the caller's mode is given back
    questions = {p["question"]: p for p in problems}
    for pair in a:                                      # the tiny model answers nothing right
        p = questions[pair["prompt"]]
        assert pair["chosen"] == p["solution"] and not tasks.verify(pair["rejected"], p["answer"])


# ---------------------------------------------------------------------------- online DPO
def test_preferred_pair_picks_the_judges_preferred_answer_and_skips_ties():
    rng = random.Random(0)
    assert preferred_pair([0.0, 1.0], rng) == (1, 0)         # the correct one is chosen
    for _ in range(20):                          # a highest over a lowest, whichever is drawn
        chosen, rejected = preferred_pair([0.0, 1.0, 0.5, 1.0, 0.0], rng)
        assert chosen in (1, 3) and rejected in (0, 4)
    assert preferred_pair([1.0, 1.0, 1.0], rng) is None       # all right: a tie
    assert preferred_pair([0.0, 0.0], rng) is None            # all wrong: a tie


def online_verify(text, answer):
    """A judge the tiny model can satisfy: answers of even length are "correct"."""
    return float(len(text) % 2 == 0)


def test_online_pairs_are_the_policys_answers_judged_by_the_verifier(tiny_sft_dir, monkeypatch):
    monkeypatch.setattr(train_dpo.tasks, "verify", online_verify)
    monkeypatch.setattr(train_dpo, "encode_preference", lambda tok, row, max_length: row)
    model, tok = load_model(tiny_sft_dir), load_tokenizer(tiny_sft_dir)
    args = train_dpo.Args(samples=4, sample_temperature=1.0, max_new_tokens=8, seed=0)
    problems = tasks.make_problems(20, "train", seed=1)
    gen = torch.Generator().manual_seed(0)
    rt = type("RT", (), {"autocast": None})()
    encoded, stats = train_dpo.online_pairs(model, tok, problems, 8, args, gen, 0, rt)
    assert 0 < stats["online/pairs"] == len(encoded) <= 8
    for row in encoded:                                   # a correct answer over a wrong one
        assert online_verify(row["chosen"], "") == 1 and online_verify(row["rejected"], "") == 0
        assert row["prompt"] in [p["question"] for p in problems]
    # the same draw again, judged by a verifier that calls every answer right: all tie, no pair
    monkeypatch.setattr(train_dpo.tasks, "verify", lambda text, answer: 1.0)
    encoded, stats = train_dpo.online_pairs(model, tok, problems, 8, args,
                                            torch.Generator().manual_seed(0), 0, rt)
    assert encoded == [] and stats == {"online/pairs": 0.0, "online/sampled_accuracy": 1.0}


def test_train_dpo_online_end_to_end(tiny_sft_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_dpo.tasks, "verify", online_verify)
    out = tmp_path / "dpo"
    res = train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(out), online=True,
                                        samples=4, **{**TINY, "eval_problems": 0}))
    assert res["loss_step0"] == pytest.approx(LN2, abs=1e-6)   # the first step's policy = π_ref
    steps = [r for r in read_metrics(out) if "online/pairs" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["online/pairs"] > 0 and "loss" in r for r in steps)
    load_model(out)


def test_train_dpo_online_samples_the_tasks_own_problems(tiny_sft_dir, tmp_path, monkeypatch):
    """--task countdown --online: the pairs' problems are countdown's (numbers and a target), the
    ones its verifier judges, not the arithmetic problems."""
    judged = []
    def judge(completion, problem):
        judged.append(problem)
        return float(len(completion) % 2 == 0)
    monkeypatch.setattr(train_dpo.worlds.countdown, "score", judge)
    train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "dpo"), online=True,
                                  samples=2, task="countdown",
                                  **{**TINY, "max_steps": 1, "eval_problems": 0}))
    assert judged and all({"numbers", "target"} <= set(p) for p in judged)


def test_train_dpo_online_step_with_only_ties_makes_no_update(tiny_sft_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_dpo.tasks, "verify", lambda text, answer: 0.0)
    out = tmp_path / "dpo"
    train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(out), online=True, samples=2,
                                  **{**TINY, "max_steps": 2, "eval_problems": 0}))
    steps = [r for r in read_metrics(out) if "online/pairs" in r]
    assert [r["online/pairs"] for r in steps] == [0, 0] and not any("loss" in r for r in steps)
    before, after = load_model(tiny_sft_dir).state_dict(), load_model(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_dpo_online_refuses_offline_data_flags(tiny_sft_dir, tmp_path):
    with pytest.raises(UserError, match="--online"):
        train_dpo.main(train_dpo.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "d"), online=True,
                                      precompute_ref=True, **TINY))
