"""Math rewards: boxed-answer extraction, the cheap exact path against math-verify, hard time limits."""

import threading

import pytest
from math_verify import parse, verify

from megatron_s2l.algo.rewards import MathScorer, last_boxed, math_reward, quick_match

# A power tower that sympy tries to evaluate: math-verify never returns on it.
PATHOLOGICAL = "so the answer is \\boxed{9^{9^{9^{9}}}}"


@pytest.fixture(scope="module")
def scorer():
    scorer = MathScorer(timeout_s=5.0)  # the pathological check's cost; room for real checks on a loaded machine
    yield scorer
    scorer.close()


def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert last_boxed("no box here: 42") is None
    assert last_boxed("\\boxed{unclosed {") is None


@pytest.mark.parametrize("answer, truth, expected", [
    ("42", "42", True), ("$42$", "42", True), ("42.", "42", True), ("\\frac{1}{2}", "0.5", True),
    ("-\\dfrac{3}{4}", "-0.75", True), ("1,000", "1000", True), ("\\left( 2 \\right)", "(2)", True),
    ("13", "42", False), ("-7", "7", False),
    ("0.333333", "\\frac{1}{3}", None),  # math-verify equates values after rounding: leave it to it
    ("1,2", "12", None), ("x=3", "3", None), ("2.5", "2.50001", None), ("", "", None),
])
def test_quick_match(answer, truth, expected):
    assert quick_match(answer, truth) is expected


@pytest.mark.parametrize("answer, truth", [
    ("42", "42"), ("\\frac{1}{2}", "0.5"), ("-\\dfrac{3}{4}", "-0.75"), ("1,000", "1000"), ("13", "42"),
    ("-7", "7"), ("100", "1000"),
])
def test_quick_decisions_agree_with_math_verify(answer, truth):
    decided = quick_match(answer, truth)
    assert decided is not None
    assert decided == verify(parse(f"\\boxed{{{truth}}}"), parse(f"\\boxed{{{answer}}}"))


def test_equivalences_that_need_math_verify():
    responses = ["\\boxed{0.333333}", "x = 3, so \\boxed{x=3}", "The answer is 17", "\\boxed{\\sqrt{2}/2}",
                 "\\boxed{\\pi}", "I give up"]
    truths = ["\\frac{1}{3}", "3", "17", "\\frac{\\sqrt{2}}{2}", "3", "5"]
    generous = MathScorer(timeout_s=60.0)  # these checks take milliseconds, or a second on a loaded machine
    assert generous.score(responses, truths) == ([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 0)
    generous.close()


def test_common_answers_never_reach_the_worker():
    fresh = MathScorer()
    result = fresh.score([f"steps... \\boxed{{{i}}}" for i in range(100)], [str(i % 10) for i in range(100)])
    assert result.scores == [1.0 if i < 10 else 0.0 for i in range(100)] and result.timeouts == 0
    assert fresh.pool.running == 0  # decided by exact comparison: no process was started


def test_pathological_input_times_out_scores_zero_and_the_scorer_recovers(scorer):
    result = scorer.score([PATHOLOGICAL, "\\boxed{\\sqrt{4}}"], ["7", "2"])
    assert result == ([0.0, 1.0], 1)


def test_time_limit_works_off_the_main_thread(scorer):
    results = []
    thread = threading.Thread(target=lambda: results.append(scorer.score([PATHOLOGICAL], ["7"])))
    thread.start()
    thread.join(timeout=60)
    assert results == [([0.0], 1)]


def test_math_reward():
    assert math_reward("so \\boxed{12}", "12") == 1.0
    assert math_reward("so \\boxed{\\frac{24}{2}}", "12") == 1.0
    assert math_reward("so \\boxed{11}", "12") == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s=0"):
        MathScorer(timeout_s=0)
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        MathScorer().score(["a", "b"], ["1"])
