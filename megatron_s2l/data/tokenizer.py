"""Tokenizers and prompt templates.

`train_tokenizer` trains a small sentencepiece BPE model locally (no downloads) for the CPU demo's model
family; `Tokenizer` wraps it. Its ids are fixed so that explorer and learner directories can be
compared at a glance:

    0 <s> (bos)   1 </s> (eos: ends every response)   2 <pad>   3 <unk>
    4 <|im_start|>   5 <|im_end|>   6 "\\n"   then reserved pieces, 256 byte pieces, learned pieces

Digits are always single tokens (arithmetic stays digit by digit), any UTF-8 text round-trips (unknown
characters fall back to byte pieces), and the vocabulary is exactly `vocab_size` pieces: unused slots
are filled with `<|reserved_i|>` pieces so the model's embedding matrix and the tokenizer agree.

`load_tokenizer(dir)` returns the demo tokenizer saved in a model directory, or wraps the directory's
Hugging Face tokenizer (real checkpoints such as Qwen3-Base) behind the same interface.

`render_prompt(messages, template, tokenizer)` applies a prompt template (`DataConfig.prompt_template`):
  chat                the tokenizer's own chat template (ChatML for the demo tokenizer)
  qwen3-base          ChatML written out literally, as the authors' training and explorer cache used it
  qwen3-base-nothink  the same with " /no_think" after the last user message (the paper's nothink eval)
  raw                 the message contents as they are, joined by newlines
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Protocol, get_args

import sentencepiece as spm

from megatron_s2l.config import ConfigError
from megatron_s2l.constants import DEMO_TOKENIZER_FILE, PromptTemplate

BOS_ID, EOS_ID, PAD_ID, UNK_ID = 0, 1, 2, 3
CHAT_SYMBOLS = ("<|im_start|>", "<|im_end|>", "\n")
TEMPLATES = get_args(PromptTemplate)
NOTHINK_SUFFIX = " /no_think"
_NUM_BYTE_PIECES = 256


class PromptTokenizer(Protocol):
    """The interface the data, rollout and evaluation code need of a tokenizer."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...


class Tokenizer:
    """A sentencepiece model with the ids documented above; `encode` adds no bos/eos."""

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID

    def __init__(self, model_proto: bytes):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id(), self._sp.unk_id())
        if ids != (BOS_ID, EOS_ID, PAD_ID, UNK_ID):
            raise ConfigError(f"sentencepiece model has bos/eos/pad/unk ids {ids}; megatron-s2l tokenizers use "
                              f"{(BOS_ID, EOS_ID, PAD_ID, UNK_ID)} (train it with data.tokenizer.train_tokenizer)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; bos/eos/pad decode to nothing."""
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (for logs and tests)."""
        return self._sp.id_to_piece(token_id)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """ChatML with the generation prompt (the demo tokenizer's chat template)."""
        return chatml(messages)

    def save(self, directory: str | Path) -> Path:
        """Write the model into `directory` (e.g. a model dir) as s2l_tokenizer.model; return its path."""
        path = Path(directory) / DEMO_TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._proto)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Read the tokenizer saved by `save` from `directory`."""
        path = Path(directory) / DEMO_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no megatron-s2l tokenizer here (write one with Tokenizer.save)")
        return cls(path.read_bytes())

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self._proto == other._proto

    __hash__ = None


class HFTokenizer:
    """A Hugging Face tokenizer (e.g. Qwen3-Base's) behind the `PromptTokenizer` interface."""

    def __init__(self, directory: str | Path):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(directory))
        if self._tok.eos_token_id is None:
            raise ConfigError(f"{directory}: the tokenizer defines no eos token; set eos_token in "
                              f"tokenizer_config.json")
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added: templates carry their own)."""
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` without special tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The tokenizer's chat template with the generation prompt; ChatML when it has none."""
        if not self._tok.chat_template:
            return chatml(messages)
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(directory: str | Path) -> PromptTokenizer:
    """The tokenizer of a model directory: the demo's sentencepiece model if saved there, else its HF tokenizer."""
    directory = Path(directory)
    if (directory / DEMO_TOKENIZER_FILE).is_file():
        return Tokenizer.load(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected a model or tokenizer directory)")
    return HFTokenizer(directory)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a BPE sentencepiece tokenizer on `texts` with exactly `vocab_size` pieces.

    Chat template text (ChatML roles, the nothink suffix) is added to the corpus so that templates
    encode compactly. When the corpus supports fewer merges than `vocab_size` allows, the remaining
    slots become `<|reserved_i|>` pieces. `vocab_size` must be even (tensor parallelism splits it).
    """
    fixed = 4 + len(CHAT_SYMBOLS) + _NUM_BYTE_PIECES
    if vocab_size % 2 or vocab_size < fixed + 64:
        raise ValueError(f"vocab_size={vocab_size}: must be even (TP=2 splits the vocabulary) and >= "
                         f"{fixed + 64} (special, byte and some learned pieces); 512 suits the demo")
    corpus = list(texts) + [chatml([{"role": role, "content": "x" + NOTHINK_SUFFIX}])
                            for role in ("system", "user", "assistant")]
    proto = _train(corpus, vocab_size, reserved=0)
    reserved = vocab_size - spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    if reserved:
        proto = _train(corpus, vocab_size, reserved=reserved)
    tokenizer = Tokenizer(proto)
    assert tokenizer.vocab_size == vocab_size, (tokenizer.vocab_size, vocab_size)
    return tokenizer


def _train(corpus: list[str], vocab_size: int, reserved: int) -> bytes:
    model = io.BytesIO()
    symbols = list(CHAT_SYMBOLS) + [f"<|reserved_{i}|>" for i in range(reserved)]
    # identity normalisation and kept whitespace: decode(encode(text)) == text for any text
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, user_defined_symbols=symbols,
        bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, unk_id=UNK_ID, num_threads=1, minloglevel=2)
    return model.getvalue()


def chatml(messages: list[dict]) -> str:
    """ChatML: each message as <|im_start|>role\\ncontent<|im_end|>\\n, then the assistant's opening."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def render_prompt(messages: list[dict], template: str, tokenizer: PromptTokenizer) -> str:
    """The prompt text of chat `messages` ([{role, content}, ...]) under `template` (see module doc)."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages)
    if template == "qwen3-base":
        return chatml(messages)
    if template == "qwen3-base-nothink":
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("prompt_template='qwen3-base-nothink' needs a user message to append /no_think to")
        messages = [dict(m, content=m["content"] + NOTHINK_SUFFIX) if i == last_user else m
                    for i, m in enumerate(messages)]
        return chatml(messages)
    if template == "raw":
        return "\n".join(m["content"] for m in messages)
    raise ValueError(f"prompt_template={template!r}: accepted values are {list(TEMPLATES)}")
