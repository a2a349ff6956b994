"""The CPU demo's synthetic, verifiable reasoning task: chained modular arithmetic with a worked solution.

A problem is a chain of operations evaluated left to right modulo `modulus`:

    question:  "Compute left to right mod 10: 7+3*4-5"
    solution:  "7+3=0 0*4=0 0-5=5 \\boxed{5}"
    answer:    "5"

Every intermediate result is written out (a short chain of thought), so a tiny model can learn one step
at a time and errors compound with the chain's length, which is the difficulty knob (`min_ops`,
`max_ops`), together with `modulus` and the largest multiplier `mul_max`. Answers are checked by the same
verifier as real math data (`algo.rewards.math_reward` on the `\\boxed{...}` answer).

Everything is generated from a seed: `task_splits` returns disjoint train and held-out lists (no
question appears in both), `pretraining_examples` the supervised texts (prompt + worked solution + EOS)
that pretrain the demo's model family, and `write_jsonl` a benchmark file the prompt loaders and the
evaluation read like any user dataset.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

OPS = ("+", "-", "*")
DATA_SOURCE = "s2l_arith"


@dataclass(frozen=True)
class TaskSpec:
    """Difficulty of the arithmetic chains."""

    modulus: int = 10  # every result is reduced modulo this; a random guess is right 1/modulus of the time
    min_ops: int = 2  # fewest operations in a chain
    max_ops: int = 5  # most operations in a chain (longer chains compound per-step errors)
    mul_max: int = 9  # multipliers are drawn from 2..mul_max (addends from 1..modulus-1)

    def __post_init__(self):
        if self.modulus < 2:
            raise ValueError(f"TaskSpec.modulus={self.modulus}: must be >= 2 (10 for single digits)")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"TaskSpec.min_ops={self.min_ops}, max_ops={self.max_ops}: need "
                             f"1 <= min_ops <= max_ops")
        if self.mul_max < 2:
            raise ValueError(f"TaskSpec.mul_max={self.mul_max}: must be >= 2")

    @property
    def instruction(self) -> str:
        return f"Compute left to right mod {self.modulus}:"


@dataclass(frozen=True)
class Problem:
    """One generated problem: the question, its ground-truth answer and a worked solution."""

    problem_id: str
    question: str
    answer: str
    solution: str  # the chain of intermediate results ending in \boxed{answer}


class TextEncoder(Protocol):
    """What `pretraining_examples` needs of a tokenizer."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def make_problem(rng: random.Random, spec: TaskSpec, problem_id: str) -> Problem:
    """Draw one problem from `rng` (the only source of randomness) and solve it step by step."""
    m = spec.modulus
    value = rng.randrange(m)
    expression, steps = str(value), []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        op = rng.choice(OPS)
        operand = rng.randint(2, spec.mul_max) if op == "*" else rng.randint(1, m - 1)
        result = apply_op(value, op, operand, m)
        steps.append(f"{value}{op}{operand}={result}")
        expression += f"{op}{operand}"
        value = result
    answer = str(value)
    return Problem(problem_id=problem_id, question=f"{spec.instruction} {expression}", answer=answer,
                   solution=" ".join(steps) + f" \\boxed{{{answer}}}")


def apply_op(value: int, op: str, operand: int, modulus: int) -> int:
    """One step of a chain: `(value op operand) mod modulus`, always in [0, modulus)."""
    if op == "+":
        return (value + operand) % modulus
    if op == "-":
        return (value - operand) % modulus
    if op == "*":
        return (value * operand) % modulus
    raise ValueError(f"unknown operation {op!r}; accepted: {list(OPS)}")


def generate_problems(count: int, spec: TaskSpec, *, seed: int, prefix: str = "arith",
                      exclude: Iterable[str] = ()) -> list[Problem]:
    """`count` distinct problems drawn deterministically from `seed`, none whose question is in `exclude`.

    Raises ValueError when the spec cannot yield that many distinct questions.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(f"TaskSpec {spec} yields too few distinct questions for count={count} (found "
                             f"{len(problems)}): raise max_ops or modulus, or ask for fewer problems")
        problem = make_problem(rng, spec, f"{prefix}-{len(problems)}")
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def task_splits(num_train: int, num_eval: int, spec: TaskSpec, *, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, held-out) problem lists: the held-out set is drawn first, train excludes its questions."""
    held_out = generate_problems(num_eval, spec, seed=seed, prefix="eval")
    train = generate_problems(num_train, spec, seed=seed + 1, prefix="train",
                              exclude=(p.question for p in held_out))
    return train, held_out


def pretraining_examples(problems: Iterable[Problem], tokenizer: TextEncoder,
                         render: Callable[[str], str]) -> list[tuple[list[int], list[int]]]:
    """Supervised texts for pretraining the family: (prompt_ids, completion_ids) per problem.

    `render` turns a question into the prompt text (`data.tokenizer.render_prompt` with a template);
    the completion is the worked solution followed by EOS, the part a trainer puts its loss on.
    """
    return [(tokenizer.encode(render(p.question)), tokenizer.encode(p.solution) + [tokenizer.eos_id])
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
