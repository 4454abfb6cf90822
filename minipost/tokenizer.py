"""Byte-level BPE tokenizer with ChatML chat formatting and an assistant-token mask.

The tokenizer is trained with the Hugging Face `tokenizers` library (GPT-2-style byte-level BPE,
Radford et al. 2019) with one change: digits are split one per token before BPE, so every number is
spelled digit by digit (as in LLaMA / PaLM), which makes arithmetic learnable by a tiny model.

Special tokens, ids 0..3 in this order:
  <|endoftext|>  document separator, BOS of plain-text pretraining documents
  <|im_start|>   ChatML turn start
  <|im_end|>     ChatML turn end; the EOS of chat models
  <|pad|>        padding, deliberately distinct from EOS (were they one token, masking out the
                 pad would mask out the EOS too; docs/pitfalls.md, "EOS and truncation")

Chats are rendered in ChatML with no BOS (ChatML has none), i.e. a chat holds zero <|endoftext|>:
    <|im_start|>{role}\n{content}<|im_end|>\n   ... per message
    <|im_start|>assistant\n                       ... if add_generation_prompt

`format_chat` encodes the pieces separately and concatenates them, so the assistant mask is exact
by construction. Special tokens and the "\n" that ends each header are pre-token boundaries for the
byte-level regex, so this equals encoding the whole rendered string (what `transformers`'
`apply_chat_template` does) for every message whose content does not START with whitespace. When a
content starts with whitespace, the regex would glue the header's "\n" to it; the per-piece
encoding is then the canonical minipost tokenization (the mask could not be exact otherwise).

Saved directories hold `tokenizer.json` + `tokenizer_config.json` (`PreTrainedTokenizerFast`,
ChatML `chat_template`) so `transformers.AutoTokenizer` loads them as they are. A reward model's
directory holds `score_tokenizer`'s template instead: a chat ends at its last <|im_end|>, the token
the model is scored at.

Hugging Face tokenizers (docs/real_models.md): `load_tokenizer` reads any `tokenizer.json`; the
`tokenizer_class` is not used (transformers 5 writes "TokenizersBackend"), and the template may sit
in `chat_template.jinja`. No Jinja runs here: a template is taken as ChatML when it contains
"<|im_start|>" (Qwen2/2.5/3, SmolLM2), and `format_chat` renders exactly the messages it is given,
so a template's default system prompt (Qwen2.5's "You are Qwen...", SmolLM2's "You are a helpful AI
assistant named SmolLM...") appears only if the data has it; Qwen3's <think> handling is not
reproduced. Another template (Llama 3, Gemma, ...) makes `format_chat` raise; loading with
`chat_template="chatml"` (the scripts' `--chat-template chatml`) formats ChatML with the
tokenizer's own <|im_start|>/<|im_end|> tokens and saves the ChatML template with the result.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]  # ids 0..3

# The standard Qwen-style ChatML template, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The same ChatML without the "\n" after the last message's <|im_end|> (kept before a generation
# prompt): what a reward model is saved with, see `score_tokenizer`.
CHATML_SCORE_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}"
    "{% if not loop.last or add_generation_prompt %}{{'\\n'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and ChatML formatting minipost needs."""

    def __init__(self, tok: HFTokenizer, chat_template: str = CHATML_TEMPLATE,
                 bos_token: str | None = BOS_TOKEN, eos_token: str = IM_END,
                 pad_token: str | None = PAD_TOKEN,
                 model_max_length: int = 2048):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._id(eos_token)
        # Optional for foreign (e.g. imported Hugging Face) tokenizers that lack them (or name
        # none, like Qwen's `bos_token: null`): None then.
        self.bos_token_id = tok.token_to_id(bos_token) if bos_token else None
        self.pad_token_id = tok.token_to_id(pad_token) if pad_token else None
        self.im_start_id = tok.token_to_id(IM_START)
        self.im_end_id = tok.token_to_id(IM_END)

    def _id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return idx

    @property
    def is_chatml(self) -> bool:
        """True when the chat template is ChatML (it contains <|im_start|>): `format_chat` is exact."""
        return IM_START in (self.chat_template or "")

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Nothing is added; special-token strings in `text` become specials."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """ChatML token ids of `messages` and the assistant mask.

        The mask is 1 on each assistant message's content tokens and its closing <|im_end|> (the
        model must learn to end its turn; docs/pitfalls.md, "Assistant-only loss masks"), 0 on
        headers, the "\\n" after <|im_end|> and all non-assistant messages. No BOS is added.
        """
        if not self.is_chatml:
            raise ValueError("the tokenizer's chat template is not ChatML (no <|im_start|>) and "
                             "minipost formats chats only as ChatML; pass --chat-template chatml "
                             "(load_tokenizer(path, chat_template='chatml')) to train in ChatML")
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError("this tokenizer has no <|im_start|>/<|im_end|> tokens for ChatML; "
                             "minipost cannot add tokens to a pretrained vocabulary")
        ids: list[int] = []
        mask: list[int] = []
        newline = self.encode("\n")
        for m in messages:
            role, content = m["role"], m["content"]
            header = [self.im_start_id] + self.encode(f"{role}\n")
            body = self.encode(content) + [self.im_end_id]
            flag = 1 if role == "assistant" else 0
            ids += header + body + newline
            mask += [0] * len(header) + [flag] * len(body) + [0] * len(newline)
        if add_generation_prompt:
            header = [self.im_start_id] + self.encode("assistant\n")
            ids += header
            mask += [0] * len(header)
        return ids, mask

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The ChatML string that `format_chat` tokenizes (what the Jinja template renders)."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def save(self, path: str) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers loads as is."""
        os.makedirs(path, exist_ok=True)
        self.tok.save(os.path.join(path, "tokenizer.json"))
        added = {}
        for idx, tok in sorted(self.tok.get_added_tokens_decoder().items()):
            added[str(idx)] = {"content": tok.content, "lstrip": tok.lstrip,
                               "normalized": tok.normalized, "rstrip": tok.rstrip,
                               "single_word": tok.single_word, "special": tok.special}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "added_tokens_decoder": added,
            "chat_template": self.chat_template,
        }
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def score_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` to save with a reward model, whose chat template renders a chat up to
    the <|im_end|> that closes its last message and no further (`CHATML_SCORE_TEMPLATE`).

    minipost reads a reward at that <|im_end|>: `data.encode_preference` ends each sequence there
    and a PPO completion ends at its EOS. transformers' *ForSequenceClassification reads the score
    at the last non-pad token of what it is given, and ChatML's own template puts a "\n" after
    every <|im_end|>, so `apply_chat_template` + AutoModelForSequenceClassification would read one
    token later, at a "\n" the score was never trained on. Of the two ways to make them agree,
    this one moves the template, not the model: training and scoring at the "\n" instead would
    have PPO append a token its policy never sampled to every completion before scoring it, and
    would leave a completion cut off by the length limit (no <|im_end|>, no "\n") scored where no
    training sequence ended. The template renders exactly the messages given, as `format_chat`
    does (no default system prompt), so transformers gets minipost's token ids; with
    `add_generation_prompt` it renders as ChatML does.
    """
    out = copy.copy(tokenizer)   # the underlying `tokenizers.Tokenizer` is shared, not changed
    out.chat_template = CHATML_SCORE_TEMPLATE
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE (digits split one per token) on `texts`; `vocab_size` includes specials.

    Deterministic for the same texts.
    """
    tok = HFTokenizer(models.BPE())
    # Digits first: each digit becomes its own pre-token, so no merge can ever join two digits.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # All 256 byte symbols, so any text (unseen unicode included) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def _token_str(config: dict, key: str, default: str) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict; an explicit
    null (Qwen's bos_token) is None, an absent key the minipost default."""
    if key not in config:
        return default
    value = config[key]
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
    """Load a tokenizer directory written by `Tokenizer.save` or by transformers.

    The chat template comes from `chat_template.jinja` when present (transformers 5 writes it
    there), else from `tokenizer_config.json`, else ChatML. chat_template="chatml" replaces the
    directory's template by ChatML (for tokenizers whose own template is not ChatML).
    """
    if chat_template not in (None, "chatml"):
        raise ValueError(f"chat_template must be None or 'chatml', not {chat_template!r}")
    tok = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    config = {}
    config_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template") or CHATML_TEMPLATE
    if isinstance(template, list):  # older transformers: a list of named templates
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()))
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if chat_template == "chatml":
        template = CHATML_TEMPLATE
    max_len = config.get("model_max_length", 2048)
    if not isinstance(max_len, int) or max_len > 10**9:  # transformers writes 1e30 for "no limit"
        max_len = 2048
    return Tokenizer(
        tok, chat_template=template,
        bos_token=_token_str(config, "bos_token", BOS_TOKEN),
        eos_token=_token_str(config, "eos_token", IM_END) or IM_END,
        pad_token=_token_str(config, "pad_token", PAD_TOKEN),
        model_max_length=max_len,
    )
