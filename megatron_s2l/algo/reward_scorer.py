"""Scoring a step's samples in one call: decode each response and reward it against its prompt's answer.

The built-in reward is the math check of `algo.rewards` (last `\\boxed{}` against the ground truth,
math-verify with a time limit for what the exact comparison cannot decide). Each sample's
`reward_info` records `timed_out` (1.0 when the verification ran out of time and scored 0).
"""

from __future__ import annotations

from typing import Callable

from megatron_s2l.algo.rewards import MathScorer
from megatron_s2l.types import Prompt, Sample


class RewardScorer:
    """Rewards a batch of samples (one prompt per sample), results in input order."""

    def __init__(self, decode: Callable[[list[int]], str], *, timeout_s: float = 5.0):
        """`decode` turns response token ids into text; `timeout_s` bounds each verification."""
        self.decode = decode
        self.math = MathScorer(timeout_s)

    def score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        """The reward of `samples[i]` against `prompts[i]`; records `timed_out` in each `reward_info`."""
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples: pass one prompt per sample")
        verdicts = self.math.verdicts([self.decode(s.response_ids) for s in samples], [p.ground_truth for p in prompts])
        for sample, verdict in zip(samples, verdicts):
            sample.reward_info["timed_out"] = float(verdict is None)
        return [1.0 if verdict else 0.0 for verdict in verdicts]

    def close(self) -> None:
        """Stop the verification workers."""
        self.math.close()


def reward_info_means(samples: list[Sample]) -> dict[str, float]:
    """`reward_info/<key>`: the mean of each number in the samples' `reward_info`, over the samples that have it."""
    values: dict[str, list[float]] = {}
    for sample in samples:
        for key, value in sample.reward_info.items():
            values.setdefault(key, []).append(value)
    return {f"reward_info/{key}": sum(v) / len(v) for key, v in values.items()}
