"""The `reward` section: values checked with the config, functions loaded and checked at start-up, each
problem naming its field."""

import re
from pathlib import Path

import pytest
import yaml

from megatron_s2l.algo.reward_scorer import RewardScorer
from megatron_s2l.config import ConfigError, RewardConfig, S2LConfig
from megatron_s2l.rollout.checks import check_config, reward_function_problems
from megatron_s2l.types import Prompt
from tests.unit.test_reward_scorer import decode, sample

MODULE = "tests.unit.user_rewards"


def problems(**reward) -> list[str]:
    cfg = S2LConfig.from_dict({"explorer": {"hf_path": "/m", "sampling": {"max_new_tokens": 32}},
                               "learner_sampling": {"max_new_tokens": 64}, "reward": reward})
    with pytest.raises(ConfigError) as caught:
        cfg.validate(check_files=False)
    return caught.value.problems


def test_defaults_are_the_builtin_math_check_without_overlong_handling():
    reward = RewardConfig()
    assert (reward.function, reward.by_data_source, reward.on_error, reward.overlong_buffer) == ("math", {}, "raise", 0)
    assert reward_function_problems(reward) == []


def test_bad_values_name_their_fields():
    assert problems(function="my_reward", by_data_source={"code": "x.py"}, timeout_s=0, workers=-1,
                    overlong_buffer=40, overlong_penalty_factor=-1) == [
        "reward.function='my_reward': must be 'math' (built-in), 'package.module:function' or "
        "'path/to/file.py:function'",
        "reward.by_data_source.code='x.py': must be 'math' (built-in), 'package.module:function' or "
        "'path/to/file.py:function'",
        "reward.timeout_s=0.0: must be > 0 (seconds per reward call)",
        "reward.workers=-1: must be >= 0 (0: sized to the machine)",
        "reward.overlong_buffer=40, overlong_penalty_factor=-1.0: both must be >= 0 (overlong_buffer=0: no penalty)",
        "reward.overlong_buffer=40: must be below explorer.sampling.max_new_tokens=32 (the penalty covers the last "
        "overlong_buffer tokens before it)"]
    assert problems(by_data_source=["a"]) == [
        "reward.by_data_source=['a']: must be a mapping data_source -> function"]


def test_functions_that_cannot_be_loaded_or_called_name_their_fields(tmp_path):
    reward = RewardConfig(function=f"{tmp_path}/missing.py:score",
                          by_data_source={"code": f"{MODULE}:needs_a_tokenizer", "tags": f"{MODULE}:tagged_answer",
                                          "typo": f"{MODULE}:tagged_answr"})
    assert reward_function_problems(reward) == [
        f"reward.function: '{tmp_path}/missing.py:score': file {tmp_path}/missing.py not found",
        f"reward.by_data_source.code: '{MODULE}:needs_a_tokenizer': it requires ['tokenizer'], which the scorer "
        f"does not pass; arguments are passed by keyword and may be any of ['response', 'solution_str', "
        f"'ground_truth', 'data_source', 'prompt', 'extra', 'extra_info']",
        f"reward.by_data_source.typo: '{MODULE}:tagged_answr': 'tagged_answr' in {MODULE} is not found"]


def test_start_up_check_reports_reward_functions_with_the_rest(tmp_path):
    cfg = S2LConfig.from_dict({"explorer": {"source": "none"}, "learner": {"hf_path": str(tmp_path / "nope")},
                               "reward": {"function": f"{MODULE}:no_such_function"}})
    with pytest.raises(ConfigError) as caught:
        check_config(cfg)
    assert f"reward.function: '{MODULE}:no_such_function': 'no_such_function' in {MODULE} is not found" in \
        caught.value.problems
    assert any(p.startswith("learner.hf_path") for p in caught.value.problems)


def test_the_readme_reward_example_works_as_written(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Your own reward"):]
    python_block = re.search(r"```python\n(# my_rewards.py\n.*?)```", section, re.S).group(1)
    yaml_block = re.search(r"```yaml\n(reward:.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    Path("my_rewards.py").write_text(python_block)
    cfg = S2LConfig.from_dict({**yaml.safe_load(yaml_block), "explorer": {"source": "none"}})
    cfg.validate(check_files=False)
    assert reward_function_problems(cfg.reward) == []
    r = cfg.reward
    scorer = RewardScorer(decode, function=r.function, by_data_source=r.by_data_source, timeout_s=r.timeout_s,
                          workers=r.workers or None, on_error=r.on_error)
    prompts = [Prompt("a", [0], "7"), Prompt("b", [0], "7", data_source="gsm8k")]
    samples = [sample("a", "<answer>7</answer>"), sample("b", "<answer>7</answer>")]
    assert scorer.score(prompts, samples) == [1.0, 0.0]  # gsm8k rows keep the math check: no \boxed{} here
    assert samples[0].reward_info == {"timed_out": 0.0, "failed": 0.0, "length": 18.0}
    scorer.close()
