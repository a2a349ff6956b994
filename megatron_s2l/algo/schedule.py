"""The explorer's share of each rollout group, step by step (S2L-PO Algorithm 1).

At step i (1-based) the explorer contributes G_w = ceil(alpha_i * G) of the G rollouts of a prompt and
the learner the other G_s = G - G_w. After T_mix steps every schedule except `constant` gives G_w = 0:
plain on-policy GRPO.

The split is a pure function of the step, so a checkpoint only has to record the step: resuming at
step i reproduces the uninterrupted run's G_w exactly.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple, get_args

from megatron_s2l.constants import GroupMode, ScheduleKind

KINDS, GROUP_MODES = get_args(ScheduleKind), get_args(GroupMode)

# alpha * G computed in floating point may land a hair above a whole number (0.7 * 10 =
# 7.000000000000001); products this close to an integer are that integer.
_INTEGER_TOLERANCE = 1e-9


class GroupSplit(NamedTuple):
    """Rollouts per prompt at one step: `explorer` (G_w) and `learner` (G_s)."""

    explorer: int
    learner: int


def _check(step: int, t_mix: int, kind: str, constant_share: float) -> None:
    if step < 1:
        raise ValueError(f"step={step}: steps are 1-based, pass a step >= 1")
    if t_mix < 1:
        raise ValueError(f"t_mix={t_mix}: must be >= 1 (the number of steps with explorer samples)")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: accepted values are {list(KINDS)}")
    if not 0 <= constant_share <= 1:
        raise ValueError(f"constant_share={constant_share}: must be in [0, 1]")


def _share(step: int, t_mix: int, kind: str, constant_share: float) -> Fraction | float:
    """alpha_i; an exact fraction for `linear` so that whole-number products stay whole."""
    if kind == "constant":
        return constant_share
    if step > t_mix:
        return Fraction(0)
    if kind == "step":
        return constant_share
    if t_mix == 1:
        return Fraction(1)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / (t_mix - 1)))
    return Fraction(t_mix - step, t_mix - 1)


def explorer_share(step: int, t_mix: int, kind: str = "linear", constant_share: float = 0.5) -> float:
    """Return alpha_i, the explorer's share of each group at 1-based `step`.

    linear: 1 - (i-1)/(T_mix-1) (the paper); cosine: 0.5 * (1 + cos(pi*(i-1)/(T_mix-1))), the same
    endpoints; step: `constant_share` up to T_mix, then 0 (a hard switch); constant: `constant_share`
    at every step (the no-annealing ablation). Every kind but `constant` is 0 after T_mix; linear and
    cosine are 1 at step 1 (also when T_mix = 1).
    """
    _check(step, t_mix, kind, constant_share)
    return float(_share(step, t_mix, kind, constant_share))


def _ceil_count(share: Fraction | float, group_size: int) -> int:
    """ceil(share * group_size), exact for fractions and robust to float error for floats."""
    if isinstance(share, Fraction):
        return math.ceil(share * group_size)
    product = share * group_size
    nearest = round(product)
    return nearest if abs(product - nearest) <= _INTEGER_TOLERANCE * group_size else math.ceil(product)


def group_split(step: int, group_size: int, t_mix: int, kind: str = "linear", constant_share: float = 0.5,
                group_mode: str = "combined") -> GroupSplit:
    """Return how many of a prompt's rollouts come from the explorer and from the learner at `step`.

    combined (the paper): G_w = ceil(alpha * G), G_s = G - G_w, one group of G per prompt.
    separate (the authors' code): explorer-only groups of ceil(alpha * G) and learner-only groups of
    ceil((1 - alpha) * G), trained as two optimizer steps; intermediate steps thus use up to G + 1
    rollouts per prompt.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1 (rollouts per prompt)")
    if group_mode not in GROUP_MODES:
        raise ValueError(f"group_mode={group_mode!r}: accepted values are {list(GROUP_MODES)}")
    _check(step, t_mix, kind, constant_share)
    share = _share(step, t_mix, kind, constant_share)
    explorer = _ceil_count(share, group_size)
    if group_mode == "combined":
        return GroupSplit(explorer, group_size - explorer)
    return GroupSplit(explorer, _ceil_count(1 - share, group_size))
