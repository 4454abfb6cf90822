"""train_sft.py: the loss mask, packing, token-weighted accumulation, and end-to-end runs in-process."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_sft  # noqa: E402
from conftest import warnings_of  # noqa: E402
from minipost import tasks  # noqa: E402
from minipost.checkpoint import save_model  # noqa: E402
from minipost.cli import user_errors  # noqa: E402
from minipost.data import pack_sequences  # noqa: E402
from minipost.model import GPT, GPTConfig  # noqa: E402
from minipost.peft import load_model  # noqa: E402
from minipost.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random base checkpoint with a tokenizer trained on the task corpus."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = train_tokenizer(tasks.pretrain_corpus(300, seed=0), vocab_size=300)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    save_model(GPT(cfg), path, tokenizer)
    return str(path)


def tiny_args(base, out_dir, **kw):
    defaults = dict(init=base, out_dir=str(out_dir), n_train=48, batch_size=8, max_steps=3,
                    warmup_steps=1, eval_every=2, eval_chats=8, eval_quick=4, eval_problems=6,
                    max_length=192, device="cpu", threads=1)
    return train_sft.Args(**{**defaults, **kw})


MULTI_TURN = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
              {"role": "user", "content": "And 5 - 1?"},
              {"role": "assistant", "content": "5 - 1 = 4\n#### 4"}]


def test_loss_mask_is_exactly_the_assistant_turns_and_their_im_end(base):
    tok = load_tokenizer(base)
    ids, mask, truncated = train_sft.tokenize(tok, MULTI_TURN, "assistant", 1024)
    assert not truncated and len(ids) == len(mask)
    # the masked-in tokens, run by run, decode to each assistant message + <|im_end|>
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
        "2 + 3 = 5\n#### 5<|im_end|>", "5 - 1 = 4\n#### 4<|im_end|>"]
    assert all(r[-1] == tok.im_end_id for r in runs)
    # exactly one <|im_start|> per message and no BOS
    assert ids.count(tok.im_start_id) == len(MULTI_TURN) and tok.bos_token_id not in ids


def test_loss_on_all_counts_every_token_and_truncation_is_reported(base):
    tok = load_tokenizer(base)
    ids, mask, truncated = train_sft.tokenize(tok, MULTI_TURN, "all", 1024)
    assert mask == [1] * len(ids) and not truncated
    short, short_mask, truncated = train_sft.tokenize(tok, MULTI_TURN, "assistant", 10)
    assert truncated and short == ids[:10] and len(short_mask) == 10


def test_packed_per_document_losses_equal_unpacked(base):
    tok = load_tokenizer(base)
    model = load_model(base).double()
    docs = [train_sft.tokenize(tok, c["messages"], "assistant", 256)[:2]
            for c in tasks.sft_chats(5, "train", seed=1)]
    rows = pack_sequences([d[0] for d in docs], [d[1] for d in docs], max_len=400)
    assert len(rows) < len(docs)  # several chats share a row
    packed = train_sft.collate(rows, tok.pad_token_id)
    logits = model(packed["input_ids"], position_ids=packed["position_ids"],
                   segment_ids=packed["segment_ids"])
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), packed["input_ids"][:, 1:].flatten(),
                         reduction="none").view(len(rows), -1) * packed["loss_mask"][:, 1:]
    seg = packed["segment_ids"][:, 1:]
    tgt = packed["loss_mask"][:, 1:]
    # per-document mean loss over its target tokens, read off the packed rows
    packed_losses = [ce[r][seg[r] == s].sum() / tgt[r][seg[r] == s].sum()
                     for r in range(len(rows)) for s in seg[r].unique().tolist() if s > 0]
    alone = [train_sft.batch_loss_sum(model, train_sft.collate([d], tok.pad_token_id))
             for d in docs]
    alone_losses = torch.stack([s / n for s, n in alone]).double()
    assert_close(torch.stack(packed_losses), alone_losses, atol=1e-5, rtol=0)
    # the script's own path: the packed batch's sum and count are the documents' sums and counts
    packed_sum, packed_n = train_sft.batch_loss_sum(model, packed)
    assert packed_n == sum(n for _, n in alone)
    assert_close(packed_sum / packed_n, sum(s for s, _ in alone) / packed_n, atol=1e-5, rtol=0)


def test_grad_accumulation_over_unequal_micro_batches_equals_the_one_batch_gradient(base):
    tok = load_tokenizer(base)
    model = load_model(base).double()
    chats = tasks.sft_chats(6, "train", seed=2)
    chats[0]["messages"][1]["content"] += " Long tail." * 10   # very unequal target counts
    units = [train_sft.tokenize(tok, c["messages"], "assistant", 256)[:2] for c in chats]

    def grads(micro_sizes):
        model.zero_grad()
        bounds = torch.tensor([0] + micro_sizes).cumsum(0).tolist()
        micro = [train_sft.collate(units[a:b], tok.pad_token_id)
                 for a, b in zip(bounds, bounds[1:])]
        loss = train_sft.accumulate(model, micro)
        return loss, [p.grad.clone() for p in model.parameters()]

    loss_1, g_1 = grads([6])
    loss_3, g_3 = grads([1, 2, 3])
    assert_close(loss_3, loss_1)
    for a, b in zip(g_3, g_1):
        assert_close(a, b, atol=1e-10, rtol=1e-8)
    # the data exposes the bug: averaging per-micro-batch means gives another gradient
    counts = [train_sft.collate(units[a:b], tok.pad_token_id)["loss_mask"][:, 1:].sum()
              for a, b in [(0, 1), (1, 3), (3, 6)]]
    assert max(counts) > 2 * min(counts)
    model.zero_grad()
    for (a, b), n in zip([(0, 1), (1, 3), (3, 6)], counts):
        loss_sum, _ = train_sft.batch_loss_sum(model, train_sft.collate(units[a:b], tok.pad_token_id))
        (loss_sum / n / 3).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    exact = torch.cat([g.flatten() for g in g_1])
    assert (naive - exact).norm() > 1e-2 * exact.norm()


@pytest.mark.parametrize("peft", ["none", "lora", "adapter"])
def test_end_to_end_tiny_run(base, tmp_path, peft):
    out = tmp_path / f"sft-{peft}"
    res = train_sft.main(tiny_args(base, out, peft=peft, lr=1e-2 if peft != "none" else 1e-3,
                                   merge=peft == "lora", packing=peft == "adapter"))
    for key in ("eval/loss", "eval/accuracy", "eval/well_formed", "start/accuracy",
                "trainable_share", "peak_rss_mb"):
        assert key in res
    assert res["eval/n"] == 6 and 0 <= res["eval/accuracy"] <= 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any(x.get("step") == 2 and "eval/loss" in x
                                                   for x in lines)
    quick = [x for x in lines if x.get("step") == 2 and "eval/loss" in x][0]   # says its n
    assert quick["eval/n"] == 4 and "eval/accuracy_ci95" in quick
    assert json.loads((out / "results.json").read_text())["stage"] == "sft"
    if peft == "none":
        assert res["trainable_share"] == 1.0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["minipost"]["stage"] == "sft" and not (out / "adapter_config.json").exists()
    else:
        assert res["trainable_share"] < 0.5
        assert (out / "adapter_model.safetensors").exists() and not (out / "config.json").exists()
        assert (out / "tokenizer.json").exists()
    if peft == "lora":   # a later stage can --init from the LoRA output; it equals the merged one
        ids = torch.tensor([[5, 6, 7, 8]])
        assert_close(load_model(out)(ids), load_model(out / "merged")(ids), atol=1e-5, rtol=0)


def test_sft_warns_once_in_metrics_jsonl_and_reports_to_tensorboard(base, tmp_path, watched):
    train_sft.main(tiny_args(base, tmp_path / "sft", report_to="tensorboard"))
    (warning,) = warnings_of(tmp_path / "sft")
    assert warning["step"] == 1 and warning["warning"].startswith("the loss has stopped moving")
    (writer,) = watched
    assert [s for s, _ in writer.scalars["loss"]] == [1, 3]
    assert [s for s, _ in writer.scalars["eval/loss"]] == [0, 2, 3]


def test_bad_data_line_exits_2_naming_file_and_line(base, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e, user_errors():
        train_sft.main(tiny_args(base, out, data=str(data)))
    assert e.value.code == 2
    assert f"{data}:2:" in capsys.readouterr().err
    assert not out.exists()   # stopped before anything was written


def test_missing_init_names_the_command_that_makes_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e, user_errors():
        train_sft.main(train_sft.Args(init=str(tmp_path / "nope"), out_dir=str(tmp_path / "o"),
                                      device="cpu"))
    assert e.value.code == 2 and "python pretrain.py" in capsys.readouterr().err


def test_user_jsonl_prompt_completion_trains(base, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} + 1?",
                                          "completion": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                              for i in range(20)))
    res = train_sft.main(tiny_args(base, tmp_path / "o", data=str(data), eval_problems=0,
                                   grad_accum=2, loss_on="all", max_steps=2))
    assert res["eval/loss"] > 0 and "eval/accuracy" not in res


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_under_torchrun_two_processes(base, tmp_path, peft):
    import os
    import subprocess
    root = Path(__file__).resolve().parents[1]
    args = tiny_args(base, tmp_path / peft, peft=peft, grad_accum=2, max_steps=2)
    flags = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v is True else [] if v is False else [flag, str(v)])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29527" if peft == "none" else "29528", "train_sft.py",
                        *flags], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / peft / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"step": 0,' in x]) == 1   # only rank 0 writes
    assert json.loads((tmp_path / peft / "results.json").read_text())["eval/n"] == 6
