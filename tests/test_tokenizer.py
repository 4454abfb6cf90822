"""Tokenizer: round trips, digit splitting, ChatML mask, save/load, transformers compatibility."""
import json
import os

import pytest

from minipost import tasks
from minipost.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_tokenizer

VARIED = [
    "Plain ASCII text, with punctuation!?",
    "Digits 0123456789 and 1,234.56 and -42",
    "unicode: héllo wörld — 日本語 😀 ñ",
    "whitespace:\n\n\ttabs\t and   spaces   \r\n end ",
    "specials <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]
CHAT = [
    {"role": "system", "content": "You are a helpful math assistant."},
    {"role": "user", "content": "Mia has 23 apples. She buys 45 more. How many?"},
    {"role": "assistant", "content": "23 + 45 = 68\n#### 68"},
    {"role": "user", "content": "And if she eats 8?\nThanks 😀"},
    {"role": "assistant", "content": "68 - 8 = 60\n#### 60"},
]


@pytest.fixture(scope="module")
def tok():
    texts = tasks.pretrain_corpus(300, tasks.Difficulty(), seed=0) + VARIED
    return train_tokenizer(texts, vocab_size=400)


def test_special_token_ids_are_fixed(tok):
    assert (tok.bos_token_id, tok.im_start_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.vocab_size <= 400


def test_round_trip_varied_text(tok):
    for text in VARIED:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_special_strings_in_text_are_single_special_tokens(tok):
    ids = tok.encode("a<|im_end|>b<|endoftext|>")
    assert tok.eos_token_id in ids and tok.bos_token_id in ids
    assert tok.decode(ids) == "ab"  # skip_special_tokens=True drops them


def test_every_digit_is_its_own_token(tok):
    for number in ["0", "7", "42", "1234567890", "99999"]:
        ids = tok.encode(number)
        assert len(ids) == len(number)
        assert [tok.decode([i]) for i in ids] == list(number)
    # also inside text, after a space
    ids = tok.encode("x = 1234")
    assert [tok.decode([i]) for i in ids][-4:] == ["1", "2", "3", "4"]


def test_training_is_deterministic():
    texts = tasks.pretrain_corpus(100, seed=1)
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.tok.to_str() == b.tok.to_str()


def test_chat_mask_is_exactly_assistant_content_and_im_end(tok):
    ids, mask = tok.format_chat(CHAT)
    assert len(ids) == len(mask)
    # Decode each contiguous masked span: one span per assistant message.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    got = [tok.decode(s, skip_special_tokens=False) for s in spans]
    want = [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    assert got == want
    # every <|im_end|> closing an assistant turn is in the mask (the model must learn to stop)
    assert sum(m for i, m in zip(ids, mask) if i == tok.eos_token_id) == 2


def test_chat_has_no_bos_and_generation_prompt(tok):
    ids, mask = tok.format_chat(CHAT[:2], add_generation_prompt=True)
    assert ids.count(tok.bos_token_id) == 0  # ChatML has no BOS: exactly zero <|endoftext|>
    assert sum(mask) == 0
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_per_piece_encoding_equals_whole_string_encoding(tok):
    for gen in (False, True):
        ids, _ = tok.format_chat(CHAT, add_generation_prompt=gen)
        assert ids == tok.encode(tok.render_chat(CHAT, add_generation_prompt=gen))
        assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(CHAT, gen)


def test_save_load_identical(tok, tmp_path):
    tok.save(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|pad|>"
    assert config["unk_token"] is None and config["chat_template"] == CHATML_TEMPLATE
    assert config["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    loaded = load_tokenizer(str(tmp_path))
    for text in VARIED:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.format_chat(CHAT) == tok.format_chat(CHAT)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 2, 3)
    assert loaded.vocab_size == tok.vocab_size


def test_chat_template_jinja_is_preferred(tok, tmp_path):
    tok.save(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{{ 'custom' }}")
    assert load_tokenizer(str(tmp_path)).chat_template == "{{ 'custom' }}"
    os.remove(tmp_path / "chat_template.jinja")
    assert load_tokenizer(str(tmp_path)).chat_template == CHATML_TEMPLATE


def test_transformers_loads_it_identically(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    for text in VARIED:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text)  # no BOS/EOS added by default either
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 3, 0)
    for gen in (False, True):
        got = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=gen)
        if not isinstance(got, list):  # transformers 5 returns a BatchEncoding
            got = got["input_ids"]
        assert list(got) == tok.format_chat(CHAT, add_generation_prompt=gen)[0]


def test_leading_whitespace_content_keeps_an_exact_mask(tok):
    # Documented departure: the per-piece encoding is canonical, so the mask stays exact even
    # where whole-string BPE would glue the header's "\n" to the content's leading spaces.
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  #### 5"}]
    ids, mask = tok.format_chat(chat)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == (
        "  #### 5<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(chat)
