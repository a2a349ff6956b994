"""The demo tokenizer: fixed special ids, exact vocabulary size, lossless round trips, templates."""

import pytest

from megatron_s2l.config import TaskConfig
from megatron_s2l.data.task import generate_problems
from megatron_s2l.data.tokenizer import (DEMO_TOKENIZER_FILE, HFTokenizer, Tokenizer, chatml, load_tokenizer,
                                         render_prompt, train_tokenizer)
from tests.tiny_models import write_tiny_tokenizer

PROBLEMS = generate_problems(500, TaskConfig(), seed=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p.question for p in PROBLEMS] + [p.solution for p in PROBLEMS], vocab_size=512)


def test_ids_and_size(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(7)] == ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>",
                                                      "<|im_end|>", "\n"]
    assert tok.vocab_size == 512
    assert train_tokenizer(["a b c"] * 10, vocab_size=384).vocab_size == 384  # a poor corpus: reserved pieces


def test_training_is_deterministic(tok):
    again = train_tokenizer([p.question for p in PROBLEMS] + [p.solution for p in PROBLEMS], vocab_size=512)
    assert again == tok


@pytest.mark.parametrize("text", ["Compute left to right mod 10: 7+3*4-5", "7+3=0 0*4=0 \\boxed{0}",
                                  "héllo ∑ 世界\n\n  two  spaces\ttab", "", "emoji 🙂 and \x00 nul"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    ids = tok.encode("1234")
    assert [tok.id_to_piece(i) for i in ids] == ["1", "2", "3", "4"]


def test_specials_decode_to_nothing_and_are_not_added(tok):
    ids = tok.encode("ab")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == "ab"


def test_chat_markers_are_single_tokens(tok):
    ids = tok.encode(chatml([{"role": "user", "content": "1+1"}]))
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces[:3] == ["<|im_start|>", "user", "\n"] and pieces[-3:] == ["<|im_start|>", "assistant", "\n"]
    assert pieces.count("<|im_end|>") == 1


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / DEMO_TOKENIZER_FILE
    loaded = load_tokenizer(tmp_path / "model")
    assert isinstance(loaded, Tokenizer) and loaded == tok
    assert loaded.encode(PROBLEMS[0].solution) == tok.encode(PROBLEMS[0].solution)
    with pytest.raises(FileNotFoundError, match="no megatron-s2l tokenizer"):
        Tokenizer.load(tmp_path)


def test_odd_or_tiny_vocab_refused():
    with pytest.raises(ValueError, match="vocab_size=511: must be even"):
        train_tokenizer(["a"], vocab_size=511)
    with pytest.raises(ValueError, match="vocab_size=256"):
        train_tokenizer(["a"], vocab_size=256)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]


def test_templates(tok):
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(MESSAGES, "chat", tok) == chat
    assert render_prompt(MESSAGES, "qwen3-base", tok) == chat
    assert render_prompt(MESSAGES, "qwen3-base-nothink", tok) == chat.replace("1+1?", "1+1? /no_think")
    assert render_prompt(MESSAGES, "raw", tok) == "Be brief.\n1+1?"
    with pytest.raises(ValueError, match="prompt_template='alpaca': accepted values are"):
        render_prompt(MESSAGES, "alpaca", tok)
    with pytest.raises(ValueError, match="needs a user message"):
        render_prompt(MESSAGES[:1], "qwen3-base-nothink", tok)


def test_hf_directory_uses_its_own_tokenizer_and_template(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]"
    write_tiny_tokenizer(tmp_path, 16, chat_template=template)
    hf = load_tokenizer(tmp_path)
    assert isinstance(hf, HFTokenizer)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (0, 1, 2, 16)
    assert hf.encode("t5 t7 t15") == [5, 7, 15] and hf.decode([0, 5, 7, 1]) == "t5 t7"
    assert render_prompt(MESSAGES, "chat", hf) == "[system] Be brief. [user] 1+1? [assistant]"
    assert render_prompt(MESSAGES, "qwen3-base", hf) == chatml(MESSAGES)
