"""The demo task: deterministic, disjoint splits, and solutions whose answers are right."""

import dataclasses
import json
import operator
import random
import re

import pytest

from megatron_s2l.config import TaskConfig
from megatron_s2l.data.task import (Problem, Tutor, generate_problems, pretraining_examples, task_splits,
                                    worked_solution, wrap_count, wraps, write_jsonl)

SPEC = TaskConfig(modulus=10, min_ops=2, max_ops=5)


def reference_answer(question: str, modulus: int) -> int:
    """Evaluate the expression after the colon left to right with Python's operators, reducing at the end."""
    tokens = re.findall(r"\d+|[-+*]", question.split(":", 1)[1])
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = ops[op](value, int(operand))
    return value % modulus  # reducing once at the end equals reducing at every step (a ring homomorphism)


def test_generation_is_deterministic_and_seed_dependent():
    a = generate_problems(50, SPEC, seed=3)
    assert a == generate_problems(50, SPEC, seed=3)
    assert a != generate_problems(50, SPEC, seed=4)
    assert len({p.question for p in a}) == 50


def test_first_problem_by_hand():
    problem = generate_problems(1, SPEC, seed=0)[0]
    steps = problem.solution.split(" ")[:-1]
    assert problem.question.startswith("Compute left to right mod 10: ")
    assert 2 <= len(steps) <= 5
    # each written step is right: a op b = c with c = (a op b) mod 10, chained from the question's first number
    value = int(problem.question.split(": ")[1][0])
    for step in steps:
        a, op, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", step).groups()
        assert int(a) == value
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] % 10
        assert int(c) == value
    assert problem.solution.endswith(f"\\boxed{{{value}}}") and problem.answer == str(value)


@pytest.mark.parametrize("spec", [SPEC, TaskConfig(modulus=100, min_ops=1, max_ops=4, mul_max=12)])
def test_answers_match_an_independent_evaluation(spec):
    for p in generate_problems(300, spec, seed=1):
        expected = reference_answer(p.question, spec.modulus)
        assert p.answer == str(expected)
        assert p.solution.endswith(f"\\boxed{{{expected}}}")


def test_solutions_score_one_with_the_verifier():
    rewards = pytest.importorskip("megatron_s2l.algo.rewards")
    problems = generate_problems(30, SPEC, seed=2)
    assert all(rewards.math_reward(p.solution, p.answer) == 1.0 for p in problems)
    wrong = str((int(problems[0].answer) + 1) % 10)
    assert rewards.math_reward(problems[0].solution, wrong) == 0.0


def test_splits_are_disjoint_and_stable():
    train, held_out = task_splits(dataclasses.replace(SPEC, num_train=2000), seed=0)
    assert len(train) == 2000 and len(held_out) == 200
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert len({p.problem_id for p in train + held_out}) == 2200
    assert task_splits(dataclasses.replace(SPEC, num_train=10), seed=0)[1] == held_out  # held-out set independent of the train size


def test_too_small_a_space_is_reported():
    tiny = TaskConfig(modulus=2, min_ops=1, max_ops=1, ops="+-*", mul_max=2)  # 2 starts x 3 ops x 1 operand
    assert len(generate_problems(6, tiny, seed=0)) == 6
    with pytest.raises(ValueError, match="too few distinct questions"):
        generate_problems(7, tiny, seed=0)


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match=r"task.min_ops=3, task.max_ops=2: need 1 <= min_ops <= max_ops; "
                                         r"task.ops='\+/': must be a non-empty selection of '\+-\*'"):
        generate_problems(1, TaskConfig(min_ops=3, max_ops=2, ops="+/"), seed=0)


def test_pretraining_examples_end_with_eos():
    class CharTokenizer:
        eos_id = 1

        def encode(self, text):
            return [ord(c) for c in text]

    problems = generate_problems(3, SPEC, seed=0)
    examples = pretraining_examples(problems, CharTokenizer(), render=lambda q: f"<{q}>", modulus=10)
    for p, (prompt_ids, completion_ids) in zip(problems, examples):
        assert prompt_ids == [ord(c) for c in f"<{p.question}>"]
        assert completion_ids == [ord(c) for c in p.solution] + [1]


def test_tutor_blind_spot_is_off_by_one_at_each_wrap_around():
    # the blind tutor writes 8+3 (11, wraps) as 1+1=2, continues from 2: 2-2=0 is exact, 0-1 (wraps) is 9+1=0
    solution, answer = worked_solution(8, [("+", 3), ("-", 2), ("-", 1)], 10, Tutor(wrap_error_rate=1.0),
                                       random.Random(0))
    assert solution == "8+3=2 2-2=0 0-1=0 \\boxed{0}" and answer == "0"
    assert worked_solution(8, [("+", 3), ("-", 2), ("-", 1)], 10) == ("8+3=1 1-2=9 9-1=8 \\boxed{8}", "8")
    assert [wraps(*step, 10) for step in ((8, "+", 3), (1, "-", 2), (9, "-", 1), (4, "*", 3))] == [True, True,
                                                                                                   False, True]


def test_wrap_count_follows_the_exact_chain():
    # 8+3 = 11 wraps -> 1; 1-2 = -1 wraps -> 9; 9-1 = 8 does not; 8+2 = 10 wraps
    problem = Problem("p", "q", "0", "s", start=8, chain=(("+", 3), ("-", 2), ("-", 1), ("+", 2)))
    assert wrap_count(problem, 10) == 3
    assert wrap_count(Problem("p", "q", "6", "s", start=2, chain=(("+", 3), ("-", 1), ("+", 2))), 10) == 0


def test_tutor_slips_at_its_rate_and_never_writes_the_right_result_by_slipping():
    rng = random.Random(1)
    steps = [worked_solution(5, [("+", 1)], 10, Tutor(slip_rate=0.3), rng)[1] for _ in range(4000)]
    wrong = [s for s in steps if s != "6"]
    assert abs(len(wrong) / 4000 - 0.3) < 0.03  # binomial s.e. 0.007
    assert set(wrong) == set("012345789")  # slips go anywhere but the right result


def test_tutor_rates_are_validated_and_mistakes_need_an_rng():
    with pytest.raises(ValueError, match="Tutor.slip_rate=1.5"):
        Tutor(slip_rate=1.5)
    with pytest.raises(ValueError, match="needs an rng"):
        worked_solution(1, [("+", 1)], 10, Tutor(slip_rate=0.1))


def test_write_jsonl(tmp_path):
    problems = generate_problems(3, SPEC, seed=0)
    path = write_jsonl(problems, tmp_path / "b" / "bench.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt_id": p.problem_id, "question": p.question, "answer": p.answer,
                     "data_source": "s2l_arith"} for p in problems]
