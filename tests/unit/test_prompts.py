"""Prompt loaders on the sample files (every bad-row case with its file and line) and PromptStream."""

from pathlib import Path

import pytest

from megatron_s2l.config import DataConfig, TaskConfig
from megatron_s2l.data.prompts import LoadedPrompts, PromptFileError, PromptStream, load_prompts, prompts_from_config
from megatron_s2l.data.task import generate_problems, task_splits
from megatron_s2l.data.tokenizer import chatml, train_tokenizer
from megatron_s2l.types import Prompt

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def tok():
    problems = generate_problems(300, TaskConfig(), seed=0)
    return train_tokenizer([p.question for p in problems] + [p.solution for p in problems], vocab_size=512)


def load(path, tok, **kw):
    kw = {"template": "chat", "max_prompt_length": 64, **kw}
    return load_prompts(path, tok, **kw)


def test_jsonl_with_bom_blank_lines_and_every_field_spelling(tok):
    loaded = load(DATA / "prompts_good.jsonl", tok)
    assert loaded.dropped == []
    got = [(p.prompt_id, p.ground_truth, p.data_source) for p in loaded.prompts]
    assert got == [("p1", "5", ""), ("prompts_good-3", "0", "s2l_arith"), ("prompts_good-4", "2", ""),
                   ("17", "9", "")]
    first = loaded.prompts[0]
    assert first.text == chatml([{"role": "user", "content": "What is 2+3? Put the answer in \\boxed{}."}])
    assert first.prompt_ids == tok.encode(first.text)  # the BOM is not part of the prompt
    assert loaded.prompts[2].text == chatml([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Café: 1+1=?"}])
    assert tok.decode(loaded.prompts[3].prompt_ids) == chatml([{"role": "user", "content": "世界 3*3"}])


def test_template_option_reaches_the_prompt(tok):
    loaded = load(DATA / "prompts_good.jsonl", tok, template="qwen3-base-nothink")
    assert loaded.prompts[0].text.endswith("\\boxed{}. /no_think<|im_end|>\n<|im_start|>assistant\n")


# line -> what the message must say, for tests/data/prompts_bad.jsonl
BAD_LINES = {2: "malformed JSON", 3: "missing field 'prompt' (or 'question')", 4: "empty 'question'",
             5: "missing field 'answer'", 6: "answer must be a non-empty string", 7: "not UTF-8 at column 18",
             8: "over data.max_prompt_length=64", 9: "expected a JSON object per line, got list",
             10: "duplicate prompt_id 'ok1'", 11: "prompt[0] must be {'role': str, 'content': str}"}


def test_drop_mode_counts_every_bad_row_with_its_line(tok):
    path = DATA / "prompts_bad.jsonl"
    loaded = load(path, tok, on_bad_prompt="drop")
    assert [p.prompt_id for p in loaded.prompts] == ["ok1", "ok2"]
    assert len(loaded.dropped) == len(BAD_LINES) == 10
    for message, (line, why) in zip(loaded.dropped, BAD_LINES.items()):
        assert message.startswith(f"{path}:{line}: ") and why in message, message


@pytest.mark.parametrize("line", sorted(BAD_LINES))
def test_error_mode_stops_at_each_bad_row_with_file_and_line(tok, tmp_path, line):
    rows = (DATA / "prompts_bad.jsonl").read_bytes().split(b"\n")
    path = tmp_path / "one_bad.jsonl"
    keep = [rows[0], rows[line - 1]] if line != 10 else rows[:1] + [b""] * 8 + [rows[9]]
    path.write_bytes(b"\n".join(keep) + b"\n")
    where = f"{path}:{2 if line != 10 else 10}: "
    with pytest.raises(PromptFileError) as err:
        load(path, tok)
    assert str(err.value).startswith(where) and BAD_LINES[line] in str(err.value)
    assert "data.on_bad_prompt=drop" in str(err.value)


def test_error_mode_on_the_shipped_file_stops_at_line_2(tok):
    with pytest.raises(PromptFileError, match=r"prompts_bad\.jsonl:2: malformed JSON"):
        load(DATA / "prompts_bad.jsonl", tok)


def test_verl_parquet(tok):
    loaded = load(DATA / "prompts_verl.parquet", tok)
    assert [(p.prompt_id, p.ground_truth, p.data_source) for p in loaded.prompts] == [
        ("prompts_verl-0", "42", "math_dapo"), ("prompts_verl-1", "5", "s2l_arith"),
        ("prompts_verl-2", "4", "math_dapo")]
    assert loaded.prompts[1].text == chatml([{"role": "user", "content": "Compute left to right mod 10: 9-4*3"}])


def test_rows_carry_their_other_fields_to_the_rewards(tok):
    verl = load(DATA / "prompts_verl.parquet", tok).prompts[2]
    assert verl.extra == {"ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule"},
                          "extra_info": {"index": "2"}}
    jsonl = load(DATA / "prompts_good.jsonl", tok).prompts
    assert [p.extra for p in jsonl] == [{"answer": "5"}, {"answer": 0}, {"ground_truth": "2"},
                                        {"reward_model": {"ground_truth": "9", "style": "rule"}}]


def test_verl_parquet_bad_rows(tok):
    path = DATA / "prompts_verl_bad.parquet"
    with pytest.raises(PromptFileError, match=rf"^{path}: row 1: prompt\[0\] has empty content"):
        load(path, tok)
    loaded = load(path, tok, on_bad_prompt="drop")
    assert [p.ground_truth for p in loaded.prompts] == ["2", "6"]
    assert [m.split(": ")[1] for m in loaded.dropped] == ["row 1", "row 2", "row 3"]
    assert "reward_model.ground_truth must be a non-empty string or a number, got None" in loaded.dropped[1]
    assert "over data.max_prompt_length=64" in loaded.dropped[2]


def test_parquet_binary_column_with_latin1_bytes(tok):
    path = DATA / "prompts_binary.parquet"
    with pytest.raises(PromptFileError, match=rf"^{path}: row 1: question: bytes that are not UTF-8 at offset 3"):
        load(path, tok, template="raw")
    loaded = load(path, tok, template="raw", on_bad_prompt="drop")
    assert [(p.text, p.ground_truth) for p in loaded.prompts] == [("What is 5+5?", "10"), ("What is 4+4?", "8")]


def test_file_level_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: prompt file not found"):
        load(tmp_path / "nope.jsonl", tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown prompt file type '.csv'"):
        load(tmp_path / "x.csv", tok)
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(PromptFileError, match="no usable prompts"):
        load(tmp_path / "blank.jsonl", tok, on_bad_prompt="drop")
    with pytest.raises(ValueError, match="on_bad_prompt='skip'"):
        load(DATA / "prompts_good.jsonl", tok, on_bad_prompt="skip")


def test_config_without_paths_gives_the_task_splits(tok):
    data = DataConfig(task=TaskConfig(num_train=50, num_eval=20), seed=3)
    train = prompts_from_config(data, tok, "train")
    held_out = prompts_from_config(data, tok, "eval")
    expected_train, expected_eval = task_splits(TaskConfig(num_train=50, num_eval=20), seed=3)
    assert [p.prompt_id for p in train.prompts] == [p.problem_id for p in expected_train]
    assert [p.ground_truth for p in held_out.prompts] == [p.answer for p in expected_eval]
    assert held_out.prompts[0].text == chatml([{"role": "user", "content": expected_eval[0].question}])
    from_file = prompts_from_config(DataConfig(train_path=str(DATA / "prompts_good.jsonl")), tok, "train")
    assert isinstance(from_file, LoadedPrompts) and len(from_file.prompts) == 4


def fake_prompts(n):
    return [Prompt(prompt_id=f"q{i}", prompt_ids=[i], ground_truth="0") for i in range(n)]


def test_stream_is_an_epochwise_permutation():
    stream = PromptStream(fake_prompts(7), seed=1)
    first, second = stream.next_batch(7), stream.next_batch(7)
    assert sorted(p.prompt_id for p in first) == sorted(p.prompt_id for p in second) == [f"q{i}" for i in range(7)]
    assert first != second and stream.epoch == 1
    assert [p.prompt_id for p in PromptStream(fake_prompts(7), seed=1).next_batch(7)] == [p.prompt_id for p in first]
    assert [p.prompt_id for p in PromptStream(fake_prompts(7), seed=2).next_batch(7)] != [p.prompt_id for p in first]


def test_stream_resume_equals_uninterrupted_order():
    uninterrupted = PromptStream(fake_prompts(5), seed=0)
    expected = [p.prompt_id for _ in range(6) for p in uninterrupted.next_batch(3)]  # 18 draws, 3.6 epochs
    first = PromptStream(fake_prompts(5), seed=0)
    drawn = [p.prompt_id for _ in range(3) for p in first.next_batch(3)]
    state = dict(first.state_dict())
    resumed = PromptStream(fake_prompts(5), seed=0)
    resumed.load_state_dict(state)
    drawn += [p.prompt_id for _ in range(3) for p in resumed.next_batch(3)]
    assert drawn == expected


def test_stream_refuses_state_of_another_dataset_or_seed():
    state = PromptStream(fake_prompts(5), seed=0).state_dict()
    with pytest.raises(ValueError, match="same data files and data.seed"):
        PromptStream(fake_prompts(6), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0 .* this stream has seed=1"):
        PromptStream(fake_prompts(5), seed=1).load_state_dict(state)
