"""Tokenizers in and out of Hugging Face format, with `transformers.AutoTokenizer` as the reference.

minipost -> transformers: a minipost-trained tokenizer saved by `Tokenizer.save` encodes, decodes
and chat-formats exactly as AutoTokenizer does. transformers -> minipost: tokenizer directories as
real checkpoints ship them (transformers 5's "TokenizersBackend" class and chat_template.jinja,
Qwen2.5's `bos_token: null` and default system prompt, SmolLM2's pad == eos, a Llama-3 template
that is not ChatML) load in `tokenizer.load_tokenizer` with the documented behaviour.
"""
import json

import pytest

from minipost.tokenizer import (CHATML_TEMPLATE, load_tokenizer, score_tokenizer,
                                train_tokenizer)

transformers = pytest.importorskip("transformers")

CORPUS = ["Tom has 12 apples and buys 7 more. 12 + 7 = 19\n#### 19",
          "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀",
          "def f(x):\n\treturn x  *  2\r\n", "Ünïcödé and ASCII mixed    with   spaces."] * 20

VARIED = ["", " ", "   leading and trailing   ", "tabs\tand\nnew\n\nlines\r\n", "0123456789 1000000",
          "x=3.14159, y=-2e10", "héllo wörld 日本語 🙂 never-seen ‽ ∑ 𝔘",
          "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b<|pad|>c", "#### 42\n", "\u00a0nbsp\u2003em"]

CHAT = [{"role": "system", "content": "You solve arithmetic."},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19\n#### 19"},
        {"role": "user", "content": "And 3 × 4 (ünïcode)?"},
        {"role": "assistant", "content": "3 × 4 = 12\n#### 12"}]

# SmolLM2-135M-Instruct's template, verbatim: ChatML with a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5-Instruct's template without its tool-calling branches.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Llama 3's header-based template: not ChatML.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def hf_chat_ids(hf, messages, add_generation_prompt):
    got = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(got["input_ids"] if not isinstance(got, list) else got)  # transformers 5: a dict


def test_autotokenizer_encodes_and_decodes_like_minipost_on_varied_text(tok, tmp_path):
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in VARIED:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids == hf(text)["input_ids"], text
        assert hf.decode(ids) == tok.decode(ids, skip_special_tokens=False) == text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("gen", [False, True])
def test_format_chat_equals_apply_chat_template_for_chatml(tok, tmp_path, gen):
    tok.save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for chat in (CHAT, CHAT[1:3], CHAT[:2]):
        ids, mask = tok.format_chat(chat, add_generation_prompt=gen)
        assert ids == hf_chat_ids(hf, chat, gen)
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == (
            tok.render_chat(chat, add_generation_prompt=gen))
        assert len(mask) == len(ids)


@pytest.mark.parametrize("gen", [False, True])
def test_score_template_ends_a_chat_at_its_last_im_end(tok, tmp_path, gen):
    """A reward model's template: format_chat's ids without the final "\n" (the score is read at
    the <|im_end|>); with a generation prompt, ChatML's own rendering."""
    score_tokenizer(tok).save(str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for chat in (CHAT, CHAT[1:3], CHAT[:2]):
        ids, _ = tok.format_chat(chat, add_generation_prompt=gen)
        want = ids if gen else ids[:-len(tok.encode("\n"))]
        assert hf_chat_ids(hf, chat, gen) == want
        assert (want[-1] == tok.im_end_id) != gen
    assert tok.chat_template == CHATML_TEMPLATE        # the copy changed, not the tokenizer


def test_transformers5_saved_directory_loads(tok, tmp_path):
    # what transformers 5 writes: tokenizer_class "TokenizersBackend", chat_template.jinja
    tok.save(str(tmp_path / "ours"))
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours")).save_pretrained(
        str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend" and "chat_template" not in config
    assert (tmp_path / "hf" / "chat_template.jinja").exists()
    loaded = load_tokenizer(str(tmp_path / "hf"))
    assert loaded.is_chatml and loaded.chat_template == CHATML_TEMPLATE
    assert [loaded.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]
    assert loaded.format_chat(CHAT, True) == tok.format_chat(CHAT, True)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 2, 3)


def hf_style_dir(tok, path, template, **config):
    """A tokenizer directory as a Hub checkpoint ships it: our tokenizer.json, their config."""
    tok.save(str(path))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    cfg.update(tokenizer_class="Qwen2Tokenizer", **config)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").write_text(template)
    return path


@pytest.mark.parametrize("template, default_system", [
    (QWEN25_TEMPLATE, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    (SMOLLM2_TEMPLATE, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")])
def test_chatml_templates_with_a_default_system_prompt_match_when_the_data_has_one(
        tok, tmp_path, template, default_system):
    d = hf_style_dir(tok, tmp_path, template, bos_token=None, pad_token="<|endoftext|>")
    ours = load_tokenizer(str(d))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.is_chatml and ours.bos_token_id is None and ours.pad_token_id == 0
    for gen in (False, True):
        assert ours.format_chat(CHAT, gen)[0] == hf_chat_ids(hf, CHAT, gen)
        # documented: no Jinja, so the template's default system prompt is not invented
        no_system = CHAT[1:]
        with_default = [{"role": "system", "content": default_system}] + no_system
        assert ours.format_chat(with_default, gen)[0] == hf_chat_ids(hf, no_system, gen)


def test_pad_equal_to_eos_as_in_smollm2_loads(tok, tmp_path):
    d = hf_style_dir(tok, tmp_path, SMOLLM2_TEMPLATE, bos_token="<|im_start|>",
                     eos_token="<|im_end|>", pad_token="<|im_end|>")
    ours = load_tokenizer(str(d))
    assert ours.pad_token_id == ours.eos_token_id == 2 and ours.bos_token_id == 1


def test_non_chatml_template_gives_a_one_line_error_naming_the_fix(tok, tmp_path):
    d = hf_style_dir(tok, tmp_path, LLAMA3_TEMPLATE)
    ours = load_tokenizer(str(d))
    assert not ours.is_chatml
    assert ours.encode("12 + 7") == tok.encode("12 + 7")      # plain encoding still works
    with pytest.raises(ValueError, match="not ChatML.*--chat-template chatml") as e:
        ours.format_chat(CHAT)
    assert "\n" not in str(e.value)
    forced = load_tokenizer(str(d), chat_template="chatml")  # ChatML with the tokenizer's tokens
    assert forced.format_chat(CHAT, True) == tok.format_chat(CHAT, True)
    forced.save(str(tmp_path / "out"))                      # the result records what it was trained on
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_chat_ids(hf, CHAT, True) == forced.format_chat(CHAT, True)[0]


def test_tokenizer_without_chatml_tokens_says_so(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))               # GPT-2 style: no chat tokens at all
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": None}))
    ours = load_tokenizer(str(tmp_path))
    assert ours.eos_token_id == 0 and ours.pad_token_id is None
    with pytest.raises(ValueError, match="no <\\|im_start\\|>/<\\|im_end\\|> tokens"):
        ours.format_chat(CHAT)
