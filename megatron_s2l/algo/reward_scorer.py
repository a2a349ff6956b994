"""Scoring a step's samples in one call: each response rewarded against its prompt's row, by the row's source.

Each sample is scored by the function its prompt's `data_source` maps to in `by_data_source`, else
by `function`; `BUILTIN_MATH` names the built-in math check (`algo.rewards`: the last `\\boxed{}`
against the ground truth, math-verify for what the exact comparison cannot decide). Other functions
are specs run by `algo.reward_pool` (signature and return value described there). All calls of a
batch that need a worker go to one pool at once, so slow checks overlap.

Each sample's `reward_info` records `timed_out` and `failed` (1.0 or 0.0) and the extra numbers a
function returned next to its score. A math check that runs out of time scores 0 (pathological LaTeX
is not a correct answer). A user function that raises, runs out of time or returns something other
than a number or {"score": number, ...} stops scoring with the prompt id and its traceback
(`on_error="raise"`), or scores 0 and is counted (`on_error="zero"`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, get_args

from megatron_s2l.algo.reward_pool import (BUILTIN_MATH, FunctionPool, Outcome, absolute, check_function,
                                          default_workers)
from megatron_s2l.algo.rewards import MATH_VERIFY, quick_verdict
from megatron_s2l.constants import OnRewardError
from megatron_s2l.types import Prompt, Sample

ON_REWARD_ERROR = get_args(OnRewardError)
_RESERVED = ("timed_out", "failed")  # reward_info keys the scorer writes itself


class RewardError(RuntimeError):
    """A reward function failed on a sample (raised, ran out of time or returned no number)."""


class RewardScorer:
    """Rewards a batch of samples (one prompt per sample), results in input order."""

    def __init__(self, decode: Callable[[list[int]], str], *, function: str = BUILTIN_MATH,
                 by_data_source: Optional[Mapping[str, str]] = None, timeout_s: float = 5.0,
                 workers: Optional[int] = None, on_error: str = "raise"):
        """`decode` turns response token ids into text; `function` and `by_data_source` values are
        `BUILTIN_MATH` or function specs; `timeout_s` bounds every call, `workers` (default
        `default_workers()`) run at once."""
        if on_error not in ON_REWARD_ERROR:
            raise ValueError(f"on_error={on_error!r}: accepted values are {list(ON_REWARD_ERROR)}")
        for spec in {function, *(by_data_source or {}).values()} - {BUILTIN_MATH}:
            check_function(spec)  # a typo fails here, not at the first step
        self.decode = decode
        self.function = absolute(function)
        self.by_data_source = {source: absolute(spec) for source, spec in (by_data_source or {}).items()}
        self.on_error = on_error
        self.pool = FunctionPool(timeout_s=timeout_s, workers=workers or default_workers())

    def score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        """The reward of `samples[i]` against `prompts[i]`; fills each sample's `reward_info`."""
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples: pass one prompt per sample")
        responses = [self.decode(s.response_ids) for s in samples]
        specs = [self.by_data_source.get(p.data_source, self.function) for p in prompts]
        rewards: list[Optional[float]] = [None] * len(samples)
        calls: dict[int, tuple[str, dict]] = {}
        for i, (prompt, response, spec) in enumerate(zip(prompts, responses, specs)):
            samples[i].reward_info.update(timed_out=0.0, failed=0.0)
            if spec == BUILTIN_MATH:
                verdict = quick_verdict(response, prompt.ground_truth)
                if verdict is None:
                    calls[i] = MATH_VERIFY, {"response": response, "ground_truth": prompt.ground_truth}
                else:
                    rewards[i] = float(verdict)
            else:
                calls[i] = spec, {"response": response, "ground_truth": prompt.ground_truth,
                                  "data_source": prompt.data_source, "prompt": prompt.text, "extra": prompt.extra}
        failures = []
        for i, outcome in zip(calls, self.pool.run(list(calls.values()))):
            if specs[i] == BUILTIN_MATH:
                rewards[i] = self._math(outcome, samples[i])
            else:
                rewards[i], failure = self._user(outcome, samples[i])
                if failure:
                    failures.append(f"reward function {specs[i]!r} {failure} on prompt {prompts[i].prompt_id!r} "
                                    f"(data_source {prompts[i].data_source!r})")
        if failures and self.on_error == "raise":
            more = f"\n({len(failures) - 1} more samples of this batch failed too)" if len(failures) > 1 else ""
            raise RewardError(f"{failures[0]}{more}\nFix the function, or score failing samples 0 and count them "
                              f"with on_error='zero'")
        return rewards

    @staticmethod
    def _math(outcome: Outcome, sample: Sample) -> float:
        if outcome.error is not None:
            raise RuntimeError(f"the math-verify check failed: {outcome.error}")
        sample.reward_info["timed_out"] = float(outcome.timed_out)
        return float(bool(outcome.value))

    def _user(self, outcome: Outcome, sample: Sample) -> tuple[float, Optional[str]]:
        """(reward, why it failed or None); a failed sample scores 0 and is marked in its reward_info."""
        if outcome.timed_out:
            sample.reward_info["timed_out"] = 1.0
            return 0.0, f"ran out of time ({self.pool.timeout_s} s)"
        failure = f"raised:\n{outcome.error}" if outcome.error is not None else None
        if failure is None:
            score, extras, failure = _parse_value(outcome.value)
        if failure is not None:
            sample.reward_info["failed"] = 1.0
            return 0.0, failure
        sample.reward_info.update(extras)
        return score, None

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()


def _parse_value(value) -> tuple[float, dict[str, float], Optional[str]]:
    """(score, extra metrics, None) from a function's return value, or (0, {}, why it is not acceptable)."""
    extras = {}
    if isinstance(value, dict):
        if "score" not in value:
            return 0.0, {}, f"returned a dict without 'score' (keys {sorted(value)})"
        extras = {k: v for k, v in value.items() if k != "score"}
        value = value["score"]
        bad = {k: v for k, v in extras.items() if not _is_number(v) or k in _RESERVED}
        if bad:
            return 0.0, {}, (f"returned extra metrics that are not numbers or use the reserved names "
                             f"{list(_RESERVED)}: {bad}")
    if not _is_number(value):
        return 0.0, {}, f"returned {value!r}: a reward is a number or a dict with a number under 'score'"
    return float(value), {k: float(v) for k, v in extras.items()}, None


def _is_number(value) -> bool:
    return isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(value)


def reward_info_means(samples: list[Sample]) -> dict[str, float]:
    """`reward_info/<key>`: the mean of each number in the samples' `reward_info`, over the samples that have it."""
    values: dict[str, list[float]] = {}
    for sample in samples:
        for key, value in sample.reward_info.items():
            values.setdefault(key, []).append(value)
    return {f"reward_info/{key}": sum(v) / len(v) for key, v in values.items()}
