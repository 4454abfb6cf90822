"""data: JSONL validation naming file:line, normalisation, padding, truncation, packing."""
import json

import pytest
import torch

from minipost.data import (DataError, collate_packed, collate_preference, encode_preference,
                           load_jsonl, pack_sequences, pad_batch, to_messages, truncate)

GOOD = {
    "sft": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "preference": {"prompt": "q", "chosen": "#### 1", "rejected": "#### 2"},
    "rl": {"prompt": "q", "answer": "1"},
}
U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
S = {"role": "system", "content": "s"}

BAD = [  # (schema, bad line, a word the error must contain)
    ("sft", "{not json", "broken JSON"),
    ("sft", "[1, 2]", "JSON object"),
    ("sft", json.dumps({"text": "hi"}), "missing field 'messages'"),
    ("sft", json.dumps({"messages": "hi"}), "list of messages"),
    ("sft", json.dumps({"messages": []}), "empty"),
    ("sft", json.dumps({"messages": [U, {"role": "bot", "content": "a"}]}), "unknown role"),
    ("sft", json.dumps({"messages": [U, {"role": "assistant", "content": 3}]}), "must be a string"),
    ("sft", json.dumps({"messages": [U, {"role": "assistant"}]}), "no 'content'"),
    ("sft", json.dumps({"messages": [U, S, A]}), "system only first"),
    ("sft", json.dumps({"messages": [U, U, A]}), "alternate"),
    ("sft", json.dumps({"messages": [A]}), "'user' was expected"),
    ("sft", json.dumps({"messages": [S, U]}), "no assistant"),
    ("sft", json.dumps({"prompt": "q"}), "missing field 'completion'"),
    ("sft", json.dumps({"prompt": "q", "completion": 5}), "string or a list"),
    ("preference", json.dumps({"prompt": "q", "chosen": "x"}), "missing field 'rejected'"),
    ("preference", json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}), "identical"),
    ("preference", json.dumps({"prompt": [A], "chosen": "x", "rejected": "y"}), "'user' was expected"),
    ("preference", json.dumps({"prompt": "q", "chosen": [U], "rejected": "y"}), "end with"),
    ("rl", json.dumps({"prompt": "q", "answer": 56}), "must be a string"),
    ("rl", json.dumps({"prompt": None, "answer": "1"}), "field 'prompt'"),
    ("rl", json.dumps({"prompt": "", "answer": "1"}), "field 'prompt' is empty"),
    ("rl", json.dumps({"prompt": " \n", "answer": "1"}), "field 'prompt' is empty"),
    ("rl", json.dumps({"prompt": [{"role": "user", "content": ""}], "answer": "1"}),
     "field 'prompt' is empty"),
]


def _write(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


@pytest.mark.parametrize("schema,bad,what", BAD)
def test_every_validation_error_names_file_and_line(tmp_path, schema, bad, what):
    # good, blank, good, bad: the bad row is on line 4 (blank lines count as lines)
    good = json.dumps(GOOD[schema])
    path = _write(tmp_path / "d.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as e:
        load_jsonl(path, schema)
    assert str(e.value).startswith(f"{path}:4: ")
    assert what in str(e.value)
    assert e.value.line == 4


def test_rl_rows_keep_every_column_for_the_reward_functions(tmp_path):
    # no "answer" is no error here: the reward functions say which columns they need
    # (rewards.check_columns); the other columns come back as written
    row = {"prompt": "Make 8", "numbers": [3, 5], "target": 8, "tests": ["assert f(1)"]}
    path = _write(tmp_path / "d.jsonl", [json.dumps(row)])
    assert load_jsonl(path, "rl") == [row]


def test_non_utf8_and_empty_files(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD["rl"]), b'{"prompt": "\xff", "answer": "1"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_jsonl(path, "rl")
    empty = _write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty file"):
        load_jsonl(empty, "sft")
    with pytest.raises(ValueError):
        load_jsonl(path, "nope")


def test_valid_rows_load_and_normalise(tmp_path):
    rows = [
        {"messages": [S, U, A, U, A]},
        {"prompt": "hello", "completion": "world"},
        {"prompt": [S, U], "completion": [A]},
    ]
    out = load_jsonl(_write(tmp_path / "s.jsonl", [json.dumps(r) for r in rows] + [""]), "sft")
    assert out[0] == {"messages": [S, U, A, U, A]}
    assert out[1] == {"messages": [{"role": "user", "content": "hello"},
                                   {"role": "assistant", "content": "world"}]}
    assert out[2] == {"messages": [S, U, A]}
    pref = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "b"}]}]
    got = load_jsonl(_write(tmp_path / "p.jsonl", [json.dumps(r) for r in pref]), "preference")
    assert got == pref  # both forms kept as written
    assert to_messages("q") == [U] and to_messages([S, U]) == [S, U]


def test_pad_batch_right_and_left():
    seqs, masks = [[5, 6, 7], [8]], [[0, 1, 1], [1]]
    ids, att, loss = pad_batch(seqs, pad_id=3, side="right", masks=masks)
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3]] and ids.dtype == torch.long
    assert att.tolist() == [[1, 1, 1], [1, 0, 0]] and att.dtype == torch.long
    assert loss.tolist() == [[0, 1, 1], [1, 0, 0]] and loss.dtype == torch.float
    ids, att, loss = pad_batch(seqs, pad_id=3, side="left")
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1]] and loss is None


def test_truncate():
    assert truncate([1, 2, 3], [0, 1, 1], 5) == ([1, 2, 3], [0, 1, 1], False)
    assert truncate([1, 2, 3], [0, 1, 1], 2) == ([1, 2], [0, 1], True)
    assert truncate([1, 2, 3], None, 2, side="left") == ([2, 3], None, True)


def test_pack_sequences_positions_restart_and_segments_number_documents():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    masks = [[0, 1, 1], [1, 1], [0, 0, 1, 1], [1]]
    rows = pack_sequences(seqs, masks, max_len=5)
    # next-fit in order: [doc0 doc1] [doc2 doc3]
    assert [r[0] for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert [r[2] for r in rows] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert [r[3] for r in rows] == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2]]
    # each document's first token is never a target (it would be predicted across documents)
    assert [r[1] for r in rows] == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]]
    assert sum(len(r[0]) for r in rows) == sum(map(len, seqs))
    with pytest.raises(ValueError, match="truncate"):
        pack_sequences([[1] * 6], None, max_len=5)


def test_collate_packed_pads_with_segment_zero():
    rows = pack_sequences([[1, 2, 3], [4, 5], [6, 7]], None, max_len=4)
    batch = collate_packed(rows, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0], [1, 1, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 1]]
    assert all(t.shape == (2, 4) for t in batch.values())


@pytest.fixture(scope="module")
def chat_tokenizer():
    from minipost.tokenizer import train_tokenizer
    return train_tokenizer(["Who are you? I am Pip. 12 + 3 = 15\n#### 15"] * 20, vocab_size=300)


def test_encode_preference_masks_only_the_completion_and_ends_at_eos(chat_tokenizer):
    tok = chat_tokenizer
    row = {"prompt": [U, A, {"role": "user", "content": "Who are you?"}],
           "chosen": "I am Pip.", "rejected": [{"role": "assistant", "content": "#### 15"}]}
    c_ids, c_mask, r_ids, r_mask, truncated = encode_preference(tok, row)
    assert not truncated
    for ids, mask, text in ((c_ids, c_mask, "I am Pip."), (r_ids, r_mask, "#### 15")):
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1       # ends at <|im_end|>, scored
        scored = [t for t, m in zip(ids, mask) if m]               # the assistant turn inside the
        assert tok.decode(scored) == text                          # prompt is not scored
        assert scored[-1] == tok.eos_token_id
    n_prompt = len(tok.format_chat(to_messages(row["prompt"]))[0])
    assert c_ids[:n_prompt] == r_ids[:n_prompt]                    # the same prompt tokens


def test_encode_preference_truncates_the_prompt_first(chat_tokenizer):
    row = {"prompt": "Who are you? " * 20, "chosen": "I am Pip.", "rejected": "#### 15"}
    c_ids, c_mask, _, _, truncated = encode_preference(chat_tokenizer, row, max_length=16)
    assert truncated and len(c_ids) == 16
    full = encode_preference(chat_tokenizer, row)
    assert c_ids == full[0][-16:] and c_mask == full[1][-16:]


def test_collate_preference_puts_chosen_rows_first(chat_tokenizer):
    rows = [{"prompt": "Who are you?", "chosen": "I am Pip.", "rejected": "#### 15"},
            {"prompt": "12 + 3", "chosen": "#### 15", "rejected": "I am Pip. I am Pip."}]
    enc = [encode_preference(chat_tokenizer, r) for r in rows]
    batch = collate_preference(enc, pad_id=chat_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    order = [enc[0][0], enc[1][0], enc[0][2], enc[1][2]]       # chosen 0, chosen 1, rejected 0, 1
    for b, ids in enumerate(order):
        n = int(batch["attention_mask"][b].sum())
        assert n == len(ids) and batch["input_ids"][b, :n].tolist() == ids   # right padding
        assert (batch["input_ids"][b, n:] == chat_tokenizer.pad_token_id).all()
