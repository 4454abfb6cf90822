"""batches.py: GRPO's rollouts joined and cut into micro-batches, dynamic sampling's choice of
groups, and PPO's rollout batch on a tiny model."""
import contextlib
import math

import torch

from minipost import batches, rewards
from minipost.evaluate import heldout_problems, prompt_ids
from minipost.model import ScoreModel
from minipost.peft import load_model
from minipost.reference import Reference
from minipost.tokenizer import load_tokenizer


def part(prompt_lens, completion_lens, rewards_=None, seed=0):
    """One rollout's rows, as group_rollout returns them: prompts left-padded (with 3, mask 0),
    completions right-padded to the rows' widths; `prompt_lens`/`completion_lens` real tokens."""
    g = torch.Generator().manual_seed(seed)
    n, P, C = len(prompt_lens), max(prompt_lens), max(completion_lens)
    ids = torch.full((n, P + C), 3, dtype=torch.long)
    mask = torch.zeros(n, P + C, dtype=torch.long)
    loss_mask, logps = torch.zeros(n, C), torch.zeros(n, C)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        ids[i, P - p:P + c] = torch.randint(4, 50, (p + c,), generator=g)
        mask[i, P - p:P + c] = 1
        loss_mask[i, :c] = 1
        logps[i, :c] = -torch.rand(c, generator=g)
    r = torch.tensor(rewards_, dtype=torch.float32) if rewards_ is not None else torch.zeros(n)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
            "sampler_logps": logps, "rewards": r, "rewards/correct": r.clone(),
            "truncated": torch.zeros(n, dtype=torch.bool)}


def real_tokens(batch, i):
    """Row i's real prompt and completion tokens, wherever the padding put them."""
    P = batches.prompt_len(batch)
    ids, mask = batch["input_ids"][i], batch["attention_mask"][i].bool()
    return ids[:P][mask[:P]].tolist(), ids[P:][mask[P:]].tolist()


def test_cat_rollouts_pads_prompts_left_and_completions_right():
    a, b = part([2, 3], [4, 1]), part([5], [2], seed=1)
    out = batches.cat_rollouts([a, b])
    assert out["input_ids"].shape == (3, 5 + 4) and out["loss_mask"].shape == (3, 4)
    assert batches.prompt_len(out) == 5
    # a's prompts (width 3) gain 2 columns on the left, b's completion (width 2) 2 on the right
    assert torch.equal(out["attention_mask"][0], torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1]))
    assert torch.equal(out["attention_mask"][2], torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0]))
    assert torch.equal(out["loss_mask"][2], torch.tensor([1., 1, 0, 0]))
    assert torch.equal(out["sampler_logps"][:2], a["sampler_logps"])
    assert torch.equal(out["sampler_logps"][2, :2], b["sampler_logps"][0])
    assert (out["sampler_logps"][2, 2:] == 0).all()
    for i, (src, j) in enumerate([(a, 0), (a, 1), (b, 0)]):
        assert real_tokens(out, i) == real_tokens(src, j)
    for k in ("rewards", "rewards/correct", "truncated"):       # per-row values: concatenated
        assert torch.equal(out[k], torch.cat([a[k], b[k]]))


def test_micro_batches_trim_each_to_its_longest_prompt_and_completion():
    batch = batches.cat_rollouts([part([2, 6, 3, 2], [1, 2, 7, 3])])       # P = 6, C = 7
    mbs = batches.micro_batches(batch, 2)
    assert len(mbs) == 2
    # rows 0-1: prompts 2 and 6 long, completions 1 and 2; rows 2-3: 3 and 2, 7 and 3
    assert [(batches.prompt_len(mb), mb["loss_mask"].shape[1]) for mb in mbs] == [(6, 2), (3, 7)]
    for mb, rows in zip(mbs, ([0, 1], [2, 3])):
        assert mb["input_ids"].shape == mb["attention_mask"].shape
        assert mb["sampler_logps"].shape == mb["loss_mask"].shape
        for i, row in enumerate(rows):              # nothing real was trimmed away
            assert real_tokens(mb, i) == real_tokens(batch, row)
            c = mb["loss_mask"].shape[1]
            assert torch.equal(mb["sampler_logps"][i], batch["sampler_logps"][row, :c])
    assert batches.micro_batches(batch, 8)[0]["input_ids"].shape == batch["input_ids"].shape


class Args:
    group_size, dynamic_sampling, max_refills = 2, True, 3


def scripted_rollouts(monkeypatch, rounds):
    """group_rollout replaced: its i-th call returns groups with the rewards of `rounds[i]`."""
    calls = []

    def fake(model, tokenizer, problems, fns, args, generator, autocast):
        calls.append(len(problems))
        flat = [r for group in rounds[len(calls) - 1] for r in group]
        return part([2] * len(flat), [1 + i % 3 for i in range(len(flat))], flat, len(calls))
    monkeypatch.setattr(batches, "group_rollout", fake)
    return calls


def test_dynamic_sampling_keeps_the_groups_whose_rewards_differ(monkeypatch):
    calls = scripted_rollouts(monkeypatch, [[(1, 0), (1, 1)], [(0, 0), (0, 1)]])
    pool, model = [{"prompt": "p"}] * 5, torch.nn.Linear(1, 1)
    batch, sampled, n_zero = batches.sample_batch(model, None, pool, [], 2, Args(),
                                                  torch.Generator().manual_seed(0), None)
    assert calls == [2, 2] and len(sampled) == 2 and n_zero == 2    # refilled once: 2 spread groups
    assert batch["rewards"].tolist() == [1, 0, 0, 1]

    rounds = [[(1, 1), (1, 0)], [(0, 0), (1, 1)], [(1, 1), (1, 1)], [(1, 1), (1, 1)]]
    calls = scripted_rollouts(monkeypatch, rounds)
    batch, sampled, n_zero = batches.sample_batch(model, None, pool, [], 2, Args(),
                                                  torch.Generator().manual_seed(0), None)
    assert len(calls) == 4 and n_zero == 7       # refills spent: zero-spread groups fill the rest
    assert batch["rewards"].tolist() == [1, 0, 1, 1]

    args = Args()
    args.dynamic_sampling = False                 # one round, its groups as they came
    calls = scripted_rollouts(monkeypatch, [[(1, 1), (1, 0)]])
    batch, _, n_zero = batches.sample_batch(model, None, pool, [], 2, args,
                                            torch.Generator().manual_seed(0), None)
    assert calls == [2] and n_zero == 1 and batch["rewards"].tolist() == [1, 1, 1, 0]


def test_ppo_rollout_scores_old_and_reference_log_probs_values_and_scores(tiny_sft_dir):
    import train_ppo
    torch.manual_seed(0)
    model, tok = load_model(tiny_sft_dir).eval(), load_tokenizer(tiny_sft_dir)
    rows = heldout_problems("", 4)
    prompts = [prompt_ids(tok, r["prompt"]) for r in rows]
    fns = rewards.load(["correct"], [])
    value_model = ScoreModel.from_lm(model).eval()
    for mask_truncated in (False, True):
        args = train_ppo.Args(reward="gold", max_new_tokens=6, missing_eos_penalty=0.5,
                              mask_truncated=mask_truncated)
        batch, P, stats = batches.ppo_rollout(model, value_model, None, Reference(model), tok,
                                              prompts, rows, fns, args, contextlib.nullcontext)
        assert P == max(len(p) for p in prompts) and batch["seq"].shape[1] == P + 6
        m = batch["completion_mask"].float()
        truncated = ~((batch["seq"][:, P:] == tok.eos_token_id) & m.bool()).any(1)   # no EOS
        assert truncated.any()
        gold = batch["scores"] + 0.5 * truncated.float()      # the score: gold, less the penalty
        assert set(gold.tolist()) <= {0.0, 1.0} and float(gold.mean()) == float(stats["gold/mean"])
        expect = m * (~truncated).float()[:, None] if mask_truncated else m
        assert torch.equal(batch["loss_mask"], expect)
        torch.testing.assert_close(batch["ref_logps"], batch["old_logps"])   # π_ref = π, untrained
        assert batch["values"].shape == m.shape and (batch["values"] == 0).all()   # a zero head
        assert stats["rollout/logp_mismatch"] < 1e-4                 # the sampler's, recomputed
        assert math.isnan(stats["reward/mean"])                      # no reward model
