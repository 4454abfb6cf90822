"""train_rm.py end to end with tiny flags: it trains from an LM checkpoint, logs TRL's metrics,
starts at ln 2 (zero head), reads a user's JSONL, and saves a reward model that loads back."""
import json
import math
import re

import pytest
import torch

import train_rm
from conftest import warnings_of
from minipost.cli import UserError
from minipost.data import DataError
from minipost.model import ScoreModel
from minipost.peft import load_model

TINY = dict(n_pairs=48, n_identity=16, eval_problems=16, batch_size=8, max_steps=3, eval_every=2,
            max_length=128, lr=1e-3, warmup_steps=1, threads=1, device="cpu", policy_problems=16,
            eval_policy_problems=8, samples=2, max_new_tokens=24)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_rm_end_to_end(tiny_sft_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    res = train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), **TINY))
    printed = capsys.readouterr().out        # the policy's own pairs join the planted ones
    found = re.search(r"policy pairs: (\d+) of 16 training problems and (\d+) of 8 held-out",
                      printed)
    n_policy, n_policy_held_out = int(found.group(1)), int(found.group(2))
    assert f"data: {48 + 16 + n_policy} training pairs" in printed
    assert n_policy_held_out > 0 and res["eval_policy/n"] == n_policy_held_out
    assert 0 <= res["eval_policy/accuracy_before"] <= 1
    for key in ("eval/accuracy", "eval/margin", "eval/accuracy_before", "eval_identity/accuracy",
                "train_minutes", "peak_rss_mb"):
        assert key in res
    assert res["eval/n"] == 16
    log = read_metrics(out)
    steps = [r for r in log if "loss" in r]
    first = steps[0]
    assert first["loss/bt"] == pytest.approx(math.log(2), abs=1e-6)   # zero head: all rewards 0
    assert first["loss/prefix"] == pytest.approx(math.log(2), abs=1e-6)   # at every prefix too
    assert first["loss/lm"] > 0                                       # the chosen tokens' NLL
    assert first["loss"] == pytest.approx(first["loss/bt"] + 4.0 * first["loss/prefix"]
                                          + 1.0 * first["loss/lm"], rel=1e-5)
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen"} <= set(steps[0])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] is not None
    assert config["minipost"]["stage"] == "rm" and "reward_std" in config["minipost"]
    assert json.loads((out / "results.json").read_text())["stage"] == "rm"
    model = load_model(out, head="score")
    assert isinstance(model, ScoreModel) and model.score.weight.abs().sum() > 0  # the head trained


def test_train_rm_warns_once_and_reports_to_tensorboard(tiny_sft_dir, tmp_path, watched):
    out = tmp_path / "rm"
    train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), report_to="tensorboard",
                                **{**TINY, "policy_problems": 0, "eval_policy_problems": 0}))
    (warning,) = warnings_of(out)
    assert warning["step"] == 1 and warning["warning"].startswith("the loss has stopped moving")
    (writer,) = watched
    assert [s for s, _ in writer.scalars["loss"]] == [1, 3]


def test_train_rm_reads_a_jsonl_and_stops_on_a_bad_line(tiny_sft_dir, tmp_path):
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i} + 1 = {i + 1}\n#### {i + 1}",
             "rejected": f"#### {i + 2}", "margin": 0.5} for i in range(20)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "rm"),
                                      data=str(path), **TINY))
    assert res["eval/n"] == 2                                          # the last 10% held out
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:2: missing field 'rejected'"):
        train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(tmp_path / "rm2"),
                                    data=str(path), **TINY))


def test_train_rm_without_init_names_the_command(tmp_path):
    with pytest.raises(UserError, match="train_sft.py"):
        train_rm.main(train_rm.Args(init=str(tmp_path / "missing"), out_dir=str(tmp_path / "rm"),
                                    **TINY))


def test_train_rm_with_lora_trains_the_head_and_loads_back(tiny_sft_dir, tmp_path):
    out = tmp_path / "rm"
    train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), peft="lora", lora_r=2,
                                **TINY))
    assert (out / "adapter_config.json").exists()
    model = load_model(out, head="score")                              # base + adapter, merged
    assert isinstance(model, ScoreModel) and model.score.weight.abs().sum() > 0
    ids = torch.tensor([[5, 6, 7, 2]])
    assert torch.isfinite(model.score_last(ids, torch.ones_like(ids))).all()


def test_train_rm_lora_output_loads_in_peft_as_a_sequence_classifier(tiny_sft_dir, tmp_path):
    """PEFT's AutoPeftModelForSequenceClassification takes the adapter (task_type SEQ_CLS, the
    trained `score` head in modules_to_save) and scores as minipost does."""
    peft = pytest.importorskip("peft")
    out = tmp_path / "rm"
    train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), peft="lora", lora_r=2,
                                **TINY))
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    # the base is the SFT language model, whose config.json has no num_labels (2 by default)
    hf = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1).eval()
    ours = load_model(out, head="score").eval()
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 12, 2]])     # no pad token: scored at the end
    with torch.no_grad():
        want = hf(input_ids=ids).logits[:, 0]
        got = ours.score_last(ids, torch.ones_like(ids))
    assert got.abs().max() > 0                                   # the trained head, not a fresh one
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_transformers_scores_the_saved_templates_rendering_as_minipost_does(tiny_sft_dir,
                                                                           tmp_path):
    """The exported reward model as everyone else uses it: AutoModelForSequenceClassification on
    the saved tokenizer's apply_chat_template of held-out pairs (right-padded, a batch) gives
    minipost's own scores of the same pairs."""
    transformers = pytest.importorskip("transformers")
    from minipost import tasks
    from minipost.data import collate_preference, encode_preference, to_messages
    from minipost.reward import pair_rewards
    from minipost.tokenizer import load_tokenizer
    out = tmp_path / "rm"
    train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), **TINY))
    pairs = tasks.preference_pairs(8, "test", tasks.Difficulty(), seed=0)     # held-out problems
    ours, tok = load_model(out, head="score").eval(), load_tokenizer(str(out))
    batch = collate_preference([encode_preference(tok, r) for r in pairs], tok.pad_token_id)
    with torch.no_grad():
        want = torch.cat(pair_rewards(ours, batch["input_ids"], batch["attention_mask"]))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    chats = [to_messages(r["prompt"]) + [{"role": "assistant", "content": r[side]}]
             for side in ("chosen", "rejected") for r in pairs]
    enc = hf_tok.apply_chat_template(chats, tokenize=True, padding=True, return_dict=True,
                                     return_tensors="pt")
    with torch.no_grad():
        got = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
    assert want.std() > 1e-3                                    # a trained head: scores differ
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_train_rm_plain_bradley_terry_starts_at_ln2(tiny_sft_dir, tmp_path):
    """--prefix-weight 0 --lm-weight 0: the loss is Bradley-Terry alone, ln 2 at a zero head."""
    out = tmp_path / "rm"
    train_rm.main(train_rm.Args(init=tiny_sft_dir, out_dir=str(out), prefix_weight=0.0,
                                lm_weight=0.0, **TINY))
    first = [r for r in read_metrics(out) if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "loss/prefix" not in first and "loss/lm" not in first
