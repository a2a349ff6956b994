"""RewardScorer: a step's samples scored in one call, each by its row's function, failures stopped or counted."""

import pytest

from megatron_s2l.algo.reward_scorer import RewardError, RewardScorer, reward_info_means
from megatron_s2l.types import Prompt, Sample

# Token ids are characters here: decode is chr, so a response's text is spelled by its ids.
PATHOLOGICAL = "so \\boxed{9^{9^{9^{9}}}}"  # sympy tries to evaluate the tower: math-verify never returns
MODULE = "tests.unit.user_rewards"


def sample(prompt_id: str, text: str) -> Sample:
    return Sample(prompt_id, [0], [ord(c) for c in text], [0.0] * len(text), "learner", "learner")


def decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def scorer_for(**kw) -> RewardScorer:
    return RewardScorer(decode, **{"timeout_s": 30.0, "workers": 2, **kw})


@pytest.fixture(scope="module")
def math_scorer():
    scorer = RewardScorer(decode, timeout_s=3.0, workers=2)
    yield scorer
    scorer.close()


def test_math_rewards_in_input_order_with_time_outs_recorded(math_scorer):
    prompts = [Prompt("a", [0], "12"), Prompt("b", [0], "7"), Prompt("a", [0], "12"), Prompt("c", [0], "7")]
    samples = [sample("a", "\\boxed{12}"), sample("b", "\\boxed{8}"), sample("a", "\\boxed{\\frac{24}{2}}"),
               sample("c", PATHOLOGICAL)]
    assert math_scorer.score(prompts, samples) == [1.0, 0.0, 1.0, 0.0]
    assert [s.reward_info for s in samples] == [{"timed_out": 0.0, "failed": 0.0}] * 3 + [
        {"timed_out": 1.0, "failed": 0.0}]


def test_one_prompt_per_sample(math_scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 samples"):
        math_scorer.score([Prompt("a", [0], "1")] * 2, [sample("a", "\\boxed{1}")])


def test_a_user_function_from_a_module_sees_every_argument():
    scorer = scorer_for(function=f"{MODULE}:with_metrics")
    prompts = [Prompt("a", [0], "42", text="Q: 6*7?", data_source="code", extra={"difficulty": 3}),
               Prompt("b", [0], "5", text="Q: 2+3, quickly?", extra={"difficulty": 1})]
    samples = [sample("a", "it is 42"), sample("b", "it is 6")]
    assert scorer.score(prompts, samples) == [1.0, 0.0]
    assert samples[0].reward_info == {"timed_out": 0.0, "failed": 0.0, "response_chars": 8.0, "difficulty": 3.0,
                                      "prompt_chars": 7.0, "is_code": 1.0}
    assert samples[1].reward_info == {"timed_out": 0.0, "failed": 0.0, "response_chars": 7.0, "difficulty": 1.0,
                                      "prompt_chars": 16.0, "is_code": 0.0}
    scorer.close()


def test_a_user_function_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def reward(response, ground_truth):\n    return len(response) / 10 if ground_truth in response "
                    "else -1\n")
    scorer = scorer_for(function=f"{path}:reward")
    assert scorer.score([Prompt("a", [0], "ok")] * 2, [sample("a", "ok, done"), sample("a", "no")]) == [0.8, -1.0]
    scorer.close()


def test_verl_signature_gets_solution_str_and_the_rows_extra_info():
    scorer = scorer_for(function=f"{MODULE}:compute_score")
    prompts = [Prompt("a", [0], "7", extra={"extra_info": {"split": "train"}, "ability": "MATH"}),
               Prompt("b", [0], "7", extra={})]
    assert scorer.score(prompts, [sample("a", "7"), sample("b", "7")]) == [1.0, 0.5]
    scorer.close()


def test_data_source_dispatch_with_the_builtin_math_check_as_the_default():
    scorer = scorer_for(by_data_source={"tags": f"{MODULE}:tagged_answer", "verl": f"{MODULE}:compute_score"})
    prompts = [Prompt("m", [0], "12", data_source="gsm8k"), Prompt("t", [0], "12", data_source="tags"),
               Prompt("v", [0], "12", data_source="verl"), Prompt("n", [0], "12")]
    samples = [sample(p.prompt_id, "<answer>12</answer>") for p in prompts]
    # math finds no \boxed{} (0); the tag function finds its tags (1); verl's finds "12" without extra_info (0.5)
    assert scorer.score(prompts, samples) == [0.0, 1.0, 0.5, 0.0]
    boxed = [sample(p.prompt_id, "\\boxed{12}") for p in prompts]
    assert scorer.score(prompts, boxed) == [1.0, 0.0, 0.5, 1.0]
    scorer.close()


def test_a_raising_reward_stops_with_the_prompt_id_and_its_traceback():
    scorer = scorer_for(function=f"{MODULE}:raises")
    prompts = [Prompt(f"q{i}", [0], "1", data_source="src") for i in range(4)]
    samples = [sample("q0", "fine"), sample("q1", "boom"), sample("q2", "fine"), sample("q3", "boom again")]
    with pytest.raises(RewardError, match=r"(?s)'tests.unit.user_rewards:raises' raised:\n.*user_rewards.py.*"
                                          r"ValueError: cannot score 'boom'.*on prompt 'q1' \(data_source 'src'\)"
                                          r".*1 more samples of this batch failed too.*on_error='zero'"):
        scorer.score(prompts, samples)
    scorer.close()


def test_a_raising_reward_scores_zero_and_is_counted_when_asked():
    scorer = scorer_for(function=f"{MODULE}:raises", on_error="zero")
    samples = [sample("q0", "fine"), sample("q1", "boom"), sample("q2", "fine"), sample("q3", "boom again")]
    assert scorer.score([Prompt("q", [0], "1")] * 4, samples) == [1.0, 0.0, 1.0, 0.0]
    assert reward_info_means(samples) == {"reward_info/timed_out": 0.0, "reward_info/failed": 0.5}
    scorer.close()


def test_a_hanging_reward_stops_the_step_or_scores_zero_when_asked():
    prompts = [Prompt("q0", [0], "1"), Prompt("q1", [0], "1"), Prompt("q2", [0], "1")]
    raising = scorer_for(function=f"{MODULE}:hangs", timeout_s=1.0)
    with pytest.raises(RewardError, match=r"hangs' ran out of time \(1.0 s\) on prompt 'q1'"):
        raising.score(prompts, [sample("q0", "ok"), sample("q1", "hang"), sample("q2", "ok")])
    raising.close()
    counting = scorer_for(function=f"{MODULE}:hangs", timeout_s=1.0, on_error="zero")
    samples = [sample("q0", "ok"), sample("q1", "hang"), sample("q2", "ok")]
    assert counting.score(prompts, samples) == [1.0, 0.0, 1.0]
    assert [s.reward_info["timed_out"] for s in samples] == [0.0, 1.0, 0.0]
    counting.close()


@pytest.mark.parametrize("function, message", [
    ("returns_text", "returned 'yes': a reward is a number or a dict with a number under 'score'"),
])
def test_a_reward_that_returns_no_number_is_a_failure(function, message):
    scorer = scorer_for(function=f"{MODULE}:{function}")
    with pytest.raises(RewardError, match=message):
        scorer.score([Prompt("q", [0], "1")], [sample("q", "x")])
    scorer.close()


def test_bad_functions_fail_when_the_scorer_is_built():
    with pytest.raises(ValueError, match="requires \\['tokenizer'\\]"):
        RewardScorer(decode, by_data_source={"x": f"{MODULE}:needs_a_tokenizer"})
    with pytest.raises(ValueError, match="on_error='skip': accepted values are \\['raise', 'zero'\\]"):
        RewardScorer(decode, on_error="skip")


def test_reward_info_means_over_the_samples_that_have_each_key():
    samples = [sample("a", "x") for _ in range(4)]
    infos = [{"timed_out": 1.0, "format": 0.5}, {"timed_out": 0.0}, {"timed_out": 0.0, "format": 1.0},
             {"timed_out": 1.0}]
    for s, info in zip(samples, infos):
        s.reward_info.update(info)
    assert reward_info_means(samples) == {"reward_info/timed_out": 0.5, "reward_info/format": 0.75}
