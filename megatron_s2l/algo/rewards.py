"""Verifiable math rewards: 1.0 when a response's final answer equals the ground truth, else 0.0.

The answer is the content of the response's last `\\boxed{...}`. Most answers in a training step are
short numbers, so a cheap exact comparison decides them in microseconds: equal normalised strings,
or two plain numbers (integers, decimals, a/b) with the same exact value, score 1; two different
integers score 0. Everything else (LaTeX, expressions, sets, decimals against fractions, responses
without a box) goes to math-verify, whose parsing (sympy) can take unbounded time on pathological
input. Its checks therefore run in the worker processes of `algo.reward_pool`, several at a time,
each under a hard deadline: an answer whose check runs out of time scores 0 and the time-out is
counted.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import NamedTuple, Optional

from megatron_s2l.algo.reward_pool import FunctionPool, default_workers

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"[-+]?\d+/\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")
MATH_VERIFY = "megatron_s2l.algo.math_verify_check:equivalent"  # the worker-side check, as a function spec
# Wrappers that never change an answer's value: math mode, \left/\right, thin spaces, whitespace.
_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _normalise(answer: str) -> str:
    answer = _NOISE.sub("", answer)
    answer = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", answer)  # \frac{1}{2} -> 1/2
    if _THOUSANDS.fullmatch(answer):  # 1,000 but not the pair 1,2
        answer = answer.replace(",", "")
    return answer.rstrip(".")


def _exact_value(answer: str) -> Optional[Fraction]:
    """The exact value of a plain number (42, -3.5, 1/2), else None."""
    if _NUMBER.fullmatch(answer) or _FRACTION.fullmatch(answer):
        try:
            return Fraction(answer)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def quick_match(answer: str, ground_truth: str) -> Optional[bool]:
    """Decide equality cheaply where that is certain, else None (ask math-verify).

    True: the normalised strings are equal, or both are plain numbers of the same exact value.
    False: both are integers and differ (math-verify never equates distinct integers). Decimals that
    differ are left undecided because math-verify equates values equal after rounding (0.333333, 1/3).
    """
    a, g = _normalise(answer), _normalise(ground_truth)
    if a == g:
        return True if a else None  # an empty box is not an answer
    va, vg = _exact_value(a), _exact_value(g)
    if va is None or vg is None:
        return None
    if va == vg:
        return True
    return False if va.denominator == 1 == vg.denominator and "." not in a + g and "/" not in a + g else None


def quick_verdict(response: str, ground_truth: str) -> Optional[bool]:
    """`quick_match` of the response's last box against the ground truth; None: math-verify must decide."""
    boxed = last_boxed(response)
    return None if boxed is None else quick_match(boxed, ground_truth)


class ScoreResult(NamedTuple):
    """Scores (1.0/0.0) in input order and how many verifications hit the time limit (scored 0)."""

    scores: list[float]
    timeouts: int


class MathScorer:
    """Scores math answers; math-verify runs in a pool of `workers` processes, each check under `timeout_s`.

    Thread-safe. Call `close()` to stop the workers; they also stop with the host process.
    """

    def __init__(self, timeout_s: float = 5.0, workers: Optional[int] = None):
        """`workers`: checks run at once (default `reward_pool.default_workers()`)."""
        self.pool = FunctionPool(timeout_s=timeout_s, workers=workers or default_workers())

    def score(self, responses: list[str], ground_truths: list[str]) -> ScoreResult:
        """Score each response against its ground truth (same length lists)."""
        verdicts = self.verdicts(responses, ground_truths)
        return ScoreResult([1.0 if v else 0.0 for v in verdicts], sum(v is None for v in verdicts))

    def verdicts(self, responses: list[str], ground_truths: list[str]) -> list[Optional[bool]]:
        """Per response: equal to its ground truth, or None when the verification ran out of time."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths: pass one "
                             f"ground truth per response")
        verdicts = [quick_verdict(r, g) for r, g in zip(responses, ground_truths)]
        undecided = [i for i, v in enumerate(verdicts) if v is None]
        outcomes = self.pool.run([(MATH_VERIFY, {"response": responses[i], "ground_truth": ground_truths[i]})
                                  for i in undecided])
        for i, outcome in zip(undecided, outcomes):
            if outcome.error is not None:
                raise RuntimeError(f"the math-verify check failed: {outcome.error}")
            verdicts[i] = None if outcome.timed_out else bool(outcome.value)
        return verdicts

    def close(self) -> None:
        """Stop the worker processes."""
        self.pool.close()


_DEFAULT: dict[float, MathScorer] = {}  # one shared scorer per timeout, for math_reward
_DEFAULT_LOCK = threading.Lock()


def math_reward(response: str, ground_truth: str, *, timeout_s: float = 5.0) -> float:
    """1.0 if the response's final answer equals `ground_truth` (math-verify equivalence), else 0.0.

    Uses a shared `MathScorer` per timeout; a verification that exceeds `timeout_s` scores 0. Use a
    `MathScorer` directly to also count the timeouts.
    """
    with _DEFAULT_LOCK:
        if timeout_s not in _DEFAULT:
            _DEFAULT[timeout_s] = MathScorer(timeout_s)
    return _DEFAULT[timeout_s].score([response], [ground_truth]).scores[0]
