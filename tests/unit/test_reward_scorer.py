"""RewardScorer: a step's samples scored in one call against their own prompts, in input order."""

import pytest

from megatron_s2l.algo.reward_scorer import RewardScorer, reward_info_means
from megatron_s2l.types import Prompt, Sample

# Token ids are characters here: decode is chr, so a response's text is spelled by its ids.
PATHOLOGICAL = "so \\boxed{9^{9^{9^{9}}}}"  # sympy tries to evaluate the tower: math-verify never returns


def sample(prompt_id: str, text: str) -> Sample:
    return Sample(prompt_id, [0], [ord(c) for c in text], [0.0] * len(text), "learner", "learner")


def decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(decode, timeout_s=1.0)
    yield scorer
    scorer.close()


def test_math_rewards_in_input_order_with_time_outs_recorded(scorer):
    prompts = [Prompt("a", [0], "12"), Prompt("b", [0], "7"), Prompt("a", [0], "12"), Prompt("c", [0], "7")]
    samples = [sample("a", "\\boxed{12}"), sample("b", "\\boxed{8}"), sample("a", "\\boxed{\\frac{24}{2}}"),
               sample("c", PATHOLOGICAL)]
    assert scorer.score(prompts, samples) == [1.0, 0.0, 1.0, 0.0]
    assert [s.reward_info["timed_out"] for s in samples] == [0.0, 0.0, 0.0, 1.0]


def test_one_prompt_per_sample(scorer):
    with pytest.raises(ValueError, match="2 prompts but 1 samples"):
        scorer.score([Prompt("a", [0], "1")] * 2, [sample("a", "\\boxed{1}")])


def test_reward_info_means_over_the_samples_that_have_each_key():
    samples = [sample("a", "x") for _ in range(4)]
    for s, info in zip(samples, [{"timed_out": 1.0, "format": 0.5}, {"timed_out": 0.0}, {"timed_out": 0.0, "format": 1.0},
                                 {"timed_out": 1.0}]):
        s.reward_info.update(info)
    assert reward_info_means(samples) == {"reward_info/timed_out": 0.5, "reward_info/format": 0.75}
