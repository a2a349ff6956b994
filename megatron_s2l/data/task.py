"""The CPU demo's synthetic, verifiable reasoning task: chained modular arithmetic with a worked solution.

A problem is a chain of operations evaluated left to right modulo `modulus`:

    question:  "Compute left to right mod 10: 7+3-1+2"
    solution:  "7+3=0 0-1=9 9+2=1 \\boxed{1}"
    answer:    "1"

Every intermediate result is written out (a short chain of thought), so a tiny model learns one step at
a time and errors compound with the chain's length (`min_ops`, `max_ops`). Small steps (`max_addend`)
keep each step learnable in minutes on CPU: the result stays close to the previous value, which a model
picks up long before it could memorise a full modular table. Answers are checked by the same verifier as
real math data (`algo.rewards.math_reward` on the `\\boxed{...}` answer).

Everything is generated from a seed: `task_splits` returns disjoint train and held-out lists (no
question appears in both), `pretraining_examples` the supervised texts (prompt + worked solution + EOS)
written by a `Tutor` who may slip at random or have a blind spot for wrap-around steps (how the demo
gives its two model sizes different kinds of mistakes), and `write_jsonl` a benchmark file the prompt
loaders and the evaluation read like any user dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

from megatron_s2l.config import TaskConfig
from megatron_s2l.constants import TASK_OPS

DATA_SOURCE = "s2l_arith"


def instruction(spec: TaskConfig) -> str:
    return f"Compute left to right mod {spec.modulus}:"


@dataclass(frozen=True)
class Problem:
    """One generated problem: the question, its ground-truth answer and a worked solution."""

    problem_id: str
    question: str
    answer: str
    solution: str  # the chain of intermediate results ending in \boxed{answer}
    start: int  # the chain's first number
    chain: tuple[tuple[str, int], ...]  # its (operation, operand) steps, in order


@dataclass(frozen=True)
class Tutor:
    """Who writes the worked solutions a model is pretrained on, and the mistakes they make.

    A perfect tutor (the default) writes the ground truth. `slip_rate` is the chance that a step's
    result is replaced by a random wrong one; `wrap_error_rate` the chance that a step whose exact
    result leaves 0..modulus-1 (a wrap-around, like 8+3 mod 10) is written off by one, a consistent
    blind spot rather than noise. Later steps continue from what was written, as a student copying
    the solution would.
    """

    slip_rate: float = 0.0
    wrap_error_rate: float = 0.0

    def __post_init__(self):
        for name in ("slip_rate", "wrap_error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Tutor.{name}={getattr(self, name)}: must be a probability in [0, 1]")


class TextEncoder(Protocol):
    """What `pretraining_examples` needs of a tokenizer."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def make_problem(rng: random.Random, spec: TaskConfig, problem_id: str) -> Problem:
    """Draw one problem from `rng` (the only source of randomness) and solve it step by step."""
    start = rng.randrange(spec.modulus)
    chain = []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        op = rng.choice(spec.ops)
        operand = rng.randint(2, spec.mul_max) if op == "*" else rng.randint(1, min(spec.max_addend, spec.modulus - 1))
        chain.append((op, operand))
    solution, answer = worked_solution(start, chain, spec.modulus)
    expression = str(start) + "".join(f"{op}{operand}" for op, operand in chain)
    return Problem(problem_id=problem_id, question=f"{instruction(spec)} {expression}", answer=answer,
                   solution=solution, start=start, chain=tuple(chain))


def worked_solution(start: int, chain: Iterable[tuple[str, int]], modulus: int, tutor: Tutor = Tutor(),
                    rng: random.Random | None = None) -> tuple[str, str]:
    """The solution text `tutor` writes for a chain, and the answer it boxes (the truth for a perfect tutor).

    `rng` draws the tutor's mistakes; it is required when the tutor makes any.
    """
    if rng is None and tutor != Tutor():
        raise ValueError(f"worked_solution: {tutor} makes mistakes, so it needs an rng to draw them")
    value, steps = start, []
    for op, operand in chain:
        result = apply_op(value, op, operand, modulus)
        if tutor.wrap_error_rate and wraps(value, op, operand, modulus) and rng.random() < tutor.wrap_error_rate:
            result = (result + 1) % modulus
        elif tutor.slip_rate and rng.random() < tutor.slip_rate:
            result = rng.choice([wrong for wrong in range(modulus) if wrong != result])
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return " ".join(steps) + f" \\boxed{{{value}}}", str(value)


def wraps(value: int, op: str, operand: int, modulus: int) -> bool:
    """Whether `value op operand` leaves 0..modulus-1 before the reduction (the step that wraps around)."""
    exact = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
    return not 0 <= exact < modulus


def wrap_count(problem: Problem, modulus: int) -> int:
    """How many steps of `problem`'s exact solution wrap around (the steps the demo learner's tutor botches)."""
    value, count = problem.start, 0
    for op, operand in problem.chain:
        count += wraps(value, op, operand, modulus)
        value = apply_op(value, op, operand, modulus)
    return count


def apply_op(value: int, op: str, operand: int, modulus: int) -> int:
    """One step of a chain: `(value op operand) mod modulus`, always in [0, modulus)."""
    if op == "+":
        return (value + operand) % modulus
    if op == "-":
        return (value - operand) % modulus
    if op == "*":
        return (value * operand) % modulus
    raise ValueError(f"unknown operation {op!r}; accepted: {list(TASK_OPS)}")


def generate_problems(count: int, spec: TaskConfig, *, seed: int, prefix: str = "arith",
                      exclude: Iterable[str] = ()) -> list[Problem]:
    """`count` distinct problems drawn deterministically from `seed`, none whose question is in `exclude`.

    Raises ValueError when the spec is invalid or cannot yield that many distinct questions.
    """
    if errors := spec.validate("task"):
        raise ValueError("; ".join(errors))
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(f"{spec} yields too few distinct questions for count={count} (found "
                             f"{len(problems)}): raise max_ops or modulus, or ask for fewer problems")
        problem = make_problem(rng, spec, f"{prefix}-{len(problems)}")
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def task_splits(spec: TaskConfig, *, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, held-out) problem lists: the held-out set is drawn first, train excludes its questions."""
    held_out = generate_problems(spec.num_eval, spec, seed=seed, prefix="eval")
    train = generate_problems(spec.num_train, spec, seed=seed + 1, prefix="train",
                              exclude=(p.question for p in held_out))
    return train, held_out


def pretraining_examples(problems: Iterable[Problem], tokenizer: TextEncoder, render: Callable[[str], str],
                         modulus: int, tutor: Tutor = Tutor(), seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Supervised texts for pretraining a model of the family: (prompt_ids, completion_ids) per problem.

    `render` turns a question into the prompt text (`data.tokenizer.render_prompt` with a template);
    the completion is the solution `tutor` writes (its mistakes drawn from `seed`) followed by EOS, the
    part a trainer puts its loss on.
    """
    rng = random.Random(seed)
    return [(tokenizer.encode(render(p.question)),
             tokenizer.encode(worked_solution(p.start, p.chain, modulus, tutor, rng)[0]) + [tokenizer.eos_id])
            for p in problems]


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as a JSONL benchmark file (`prompt_id`, `question`, `answer`, `data_source` per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt_id": p.problem_id, "question": p.question, "answer": p.answer,
                                "data_source": DATA_SOURCE}) + "\n")
    return path
