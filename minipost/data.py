"""JSONL loading with validation, and collation of token-id lists into padded or packed tensors.

Schemas (the field names TRL uses):
  sft         {"messages": [{"role", "content"}, ...]} or {"prompt": str|messages, "completion": str|messages}
  preference  {"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}
  rl          {"prompt": str|messages, ...}: every other column ("answer", "tests", ...) goes to the
              reward functions as a keyword argument (rewards.py), which say the columns they need;
              "answer", the arithmetic verifier's, must be a string. The prompt may not be empty
              (nothing to answer), where an sft or preference prompt may

How a string prompt is read: in every schema here, as the user turn of a chat (to_messages). TRL
reads an RL string prompt as raw text to continue and only a list of messages as a chat, so the RL
scripts print which reading they apply, and `--string-prompts text` applies TRL's.

`load_jsonl` stops at the first bad line with a `DataError` "{file}:{line}: {what is wrong}", so a
run fails before training starts. SFT rows come back normalised to {"messages": [...]};
preference and RL rows keep the form they were written in (`to_messages` converts a prompt).

Preference pairs (`encode_preference`, `collate_preference`) become one right-padded batch of 2B
rows, the B chosen sequences first and the B rejected ones after, so a reward model or DPO scores
both sides in one forward pass.

Packing (`pack_sequences`) concatenates documents into rows of at most `max_len` tokens with
position ids restarting at 0 and a segment id per document, so a model that blocks attention across
segments computes exactly what it computes on each document alone (docs/pitfalls.md, "Packing
without cross-contamination").
"""
from __future__ import annotations

import json

import torch

from .errors import DataError

ROLES = ("system", "user", "assistant")
SCHEMAS = ("sft", "preference", "rl")
MAX_LINE_BYTES = 1 << 20   # one record; far beyond any --max-length of tokens


def to_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a string becomes one user message; messages are copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _check_messages(messages, field: str, last: str | None = None) -> str | None:
    """What is wrong with a messages list, or None. `last` is the role the list must end with."""
    if not isinstance(messages, list):
        return f"field '{field}' must be a list of messages, got {type(messages).__name__}"
    if not messages:
        return f"field '{field}' is an empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{field}[{i}] must be an object with 'role' and 'content'"
        for key in ("role", "content"):
            if key not in m:
                return f"{field}[{i}] has no '{key}'"
            if not isinstance(m[key], str):
                return f"{field}[{i}].{key} must be a string, got {type(m[key]).__name__}"
        if m["role"] not in ROLES:
            return f"{field}[{i}] has unknown role {m['role']!r} (expected one of {ROLES})"
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    # ChatML turns: an optional system message first, then user/assistant alternating.
    if field in ("messages", "prompt"):
        for i, role in enumerate(body):
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                pos = i + (len(roles) - len(body))
                return (f"{field}[{pos}] has role {role!r} where {want!r} was expected "
                        "(system only first, then user and assistant alternate)")
    elif "system" in roles:
        return f"field '{field}' may not contain a system message"
    if last and roles[-1] != last:
        return f"field '{field}' must end with a {last!r} message, ends with {roles[-1]!r}"
    return None


def _check_text_or_messages(row: dict, field: str, last: str | None) -> str | None:
    if field not in row:
        return f"missing field '{field}'"
    value = row[field]
    if isinstance(value, str):
        return None if value.strip() or field == "prompt" else f"field '{field}' is empty"
    if isinstance(value, list):
        return _check_messages(value, field, last)
    return f"field '{field}' must be a string or a list of messages, got {type(value).__name__}"


def _is_blank(prompt) -> bool:
    """True for a prompt with no text: "" or whitespace, or messages whose contents all are."""
    if isinstance(prompt, str):
        return not prompt.strip()
    return all(not m["content"].strip() for m in prompt)


def _validate(row, schema: str) -> tuple[str | None, dict | None]:
    """(error, normalised row)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}", None
    if schema == "sft":
        if "messages" in row:
            err = _check_messages(row["messages"], "messages")
            if err is None and "assistant" not in [m["role"] for m in row["messages"]]:
                err = "no assistant message: nothing to train on"
            if err is None and row["messages"][-1]["role"] != "assistant":
                err = "the last message must be the assistant's"
            return err, (None if err else {"messages": to_messages(row["messages"])})
        if "prompt" not in row and "completion" not in row:
            return "missing field 'messages' (or 'prompt' and 'completion')", None
        err = (_check_text_or_messages(row, "prompt", "user")
               or _check_text_or_messages(row, "completion", "assistant"))
        if err:
            return err, None
        completion = row["completion"]
        completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else to_messages(completion))
        return None, {"messages": to_messages(row["prompt"]) + completion}
    if schema == "preference":
        err = (_check_text_or_messages(row, "prompt", "user")
               or _check_text_or_messages(row, "chosen", "assistant")
               or _check_text_or_messages(row, "rejected", "assistant"))
        if err is None and row["chosen"] == row["rejected"]:
            err = "'chosen' and 'rejected' are identical"
        return err, (None if err else row)
    if schema == "rl":
        err = _check_text_or_messages(row, "prompt", "user")
        if err is None and _is_blank(row["prompt"]):   # a policy cannot be asked nothing
            err = "field 'prompt' is empty: an RL prompt is a question to answer"
        if err is None and "answer" in row and not isinstance(row["answer"], str):
            err = (f"field 'answer' must be a string, got {type(row['answer']).__name__} "
                   f"(write it as \"{row['answer']}\")")
        return err, (None if err else row)
    raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")


def load_jsonl(path, schema: str) -> list[dict]:
    """Read and validate a JSONL file of `schema` ("sft" | "preference" | "rl").

    Blank lines are skipped. Raises DataError naming file and line on the first bad line.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{path}: no such data file") from None
    rows = []
    for lineno, raw in enumerate(raw_lines, start=1):
        if len(raw) > MAX_LINE_BYTES:   # a whole file on one line, a base64 blob, a runaway dump
            raise DataError(path, lineno, f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}"
                            "-byte limit for one record (is the file one JSON document?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, lineno, f"not valid UTF-8 (byte {e.start})") from None
        if lineno == 1:
            text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark is harmless
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, f"broken JSON: {e.msg} at column {e.colno}") from None
        err, row = _validate(row, schema)
        if err:
            raise DataError(path, lineno, err)
        rows.append(row)
    if not rows:
        raise DataError(path, 1, "empty file: no records")
    return rows


# ---------------------------------------------------------------------------- collation
def record_lines(path) -> list[int]:
    """The 1-based line numbers of a JSONL file's records (its non-blank lines), in order, so an
    error found after `load_jsonl` can still name file:line."""
    with open(path, "rb") as f:
        return [i for i, raw in enumerate(f.read().split(b"\n"), start=1) if raw.strip()]


def truncate(ids: list[int], mask: list[int] | None, max_length: int, side: str = "right"
             ) -> tuple[list[int], list[int] | None, bool]:
    """Keep `max_length` tokens: the first ones (side="right") or the last ones ("left")."""
    if len(ids) <= max_length:
        return ids, mask, False
    keep = slice(0, max_length) if side == "right" else slice(len(ids) - max_length, len(ids))
    return ids[keep], (mask[keep] if mask is not None else None), True


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right",
              masks: list[list[int]] | None = None):
    """Pad token-id lists into (input_ids[B,T] long, attention_mask[B,T] long, loss_mask[B,T] float).

    `side="left"` for generation prompts, "right" for training. loss_mask is None without `masks`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float) if masks is not None else None
    for b, s in enumerate(seqs):
        if not s:
            continue
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        input_ids[b, cols] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, cols] = 1
        if masks is not None:
            if len(masks[b]) != len(s):
                raise ValueError(f"mask {b} has length {len(masks[b])}, sequence has {len(s)}")
            loss_mask[b, cols] = torch.tensor(masks[b], dtype=torch.float)
    return input_ids, attention_mask, loss_mask


def pack_sequences(seqs: list[list[int]], masks: list[list[int]] | None, max_len: int
                   ) -> list[tuple[list[int], list[float], list[int], list[int]]]:
    """Greedily pack documents, in order, into rows of at most `max_len` tokens.

    Each row is (ids, loss_mask, position_ids, segment_ids): positions restart at 0 for each
    document; segment ids number the documents of a row 1, 2, 3, ... (0 is left for padding).
    `masks` None means every token counts. The loss mask of each document's first token is set to
    0: in a packed row it would be predicted from the previous document, and alone it has no
    predecessor, so zeroing it keeps "packed loss == sum of separate losses".
    A document longer than `max_len` is an error: `truncate` it first.
    """
    rows = []
    ids, loss, pos, seg = [], [], [], []
    for i, s in enumerate(seqs):
        if len(s) > max_len:
            raise ValueError(f"sequence {i} has {len(s)} tokens > max_len={max_len}; truncate first")
        if not s:
            continue
        if len(ids) + len(s) > max_len:  # next-fit: close the row, keep the document order
            rows.append((ids, loss, pos, seg))
            ids, loss, pos, seg = [], [], [], []
        m = [1.0] * len(s) if masks is None else [float(x) for x in masks[i]]
        if len(m) != len(s):
            raise ValueError(f"mask {i} has length {len(m)}, sequence has {len(s)}")
        m[0] = 0.0
        segment = (seg[-1] if seg else 0) + 1
        ids += s
        loss += m
        pos += list(range(len(s)))
        seg += [segment] * len(s)
    if ids:
        rows.append((ids, loss, pos, seg))
    return rows


def collate_packed(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into tensors [B,T]: input_ids, attention_mask, loss_mask,
    position_ids, segment_ids (segment 0 and attention_mask 0 on padding)."""
    input_ids, attention_mask, loss_mask = pad_batch([r[0] for r in rows], pad_id, "right",
                                                     [r[1] for r in rows])
    position_ids, _, _ = pad_batch([r[2] for r in rows], 0, "right")
    segment_ids, _, _ = pad_batch([r[3] for r in rows], 0, "right")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "position_ids": position_ids, "segment_ids": segment_ids}


def encode_preference(tokenizer, row: dict, max_length: int = 1024
                      ) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """ChatML ids and loss masks of a preference row's prompt + chosen and prompt + rejected.

    The loss mask is 1 on the completion's tokens and the <|im_end|> that closes it (0 on the
    prompt, even on assistant turns inside a multi-turn prompt), and each sequence ENDS at that
    <|im_end|>, so a reward model reads its score on the EOS. Sequences longer than `max_length`
    keep their last `max_length` tokens (the completion matters most; the prompt is cut first).

    Returns (chosen_ids, chosen_mask, rejected_ids, rejected_mask, truncated).
    """
    prompt = to_messages(row["prompt"])
    n_prompt = len(tokenizer.format_chat(prompt)[0])
    out, truncated = [], False
    for side in ("chosen", "rejected"):
        completion = row[side]
        completion = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else to_messages(completion))
        ids, mask = tokenizer.format_chat(prompt + completion)
        mask = [0] * n_prompt + mask[n_prompt:]
        end = max(i for i, m in enumerate(mask) if m) + 1 if any(mask) else len(ids)
        ids, mask, cut = truncate(ids[:end], mask[:end], max_length, side="left")
        out += [ids, mask]
        truncated |= cut
    return (*out, truncated)


def collate_preference(encoded: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoded pairs -> {"input_ids", "attention_mask", "loss_mask"}, each (2B, T), right-padded:
    rows 0..B−1 are the chosen sequences, rows B..2B−1 the rejected ones of the same pairs."""
    seqs = [e[0] for e in encoded] + [e[2] for e in encoded]
    masks = [e[1] for e in encoded] + [e[3] for e in encoded]
    input_ids, attention_mask, loss_mask = pad_batch(seqs, pad_id, "right", masks)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
