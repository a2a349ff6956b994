"""Group-relative advantages (GRPO, Dr.GRPO), DAPO dynamic sampling and per-source means.

A group is the set of rollouts whose rewards are compared with each other: one prompt's G samples in
`combined` mode, one prompt's samples of one source in `separate` mode, so groups may differ in size.
Everything is vectorised over groups with index ops.
"""

from __future__ import annotations

from typing import NamedTuple, get_args

import torch
from torch import Tensor

from megatron_s2l.constants import AdvantageNorm

NORMS = get_args(AdvantageNorm)


class AdvantageResult(NamedTuple):
    """Per-sample advantages and the statistics of each group (groups in sorted order of their ids)."""

    advantages: Tensor  # [N]
    zero_variance_groups: int  # groups whose rewards are all equal: their advantages are exactly 0
    group_mean: Tensor  # [num_groups]
    group_std: Tensor  # [num_groups] unbiased; 0 for a group of one sample


def _group_ids(group_index: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..K-1 in sorted order; return them [N] and K."""
    ids, dense = torch.unique(group_index, return_inverse=True)  # [K], [N]
    return dense, ids.numel()


def _all_equal(rewards: Tensor, dense: Tensor, num_groups: int) -> Tensor:
    """[num_groups] bool: True where every reward of the group is the same (compared exactly)."""
    hi = rewards.new_full((num_groups,), -torch.inf).scatter_reduce(0, dense, rewards, "amax")  # [K]
    lo = rewards.new_full((num_groups,), torch.inf).scatter_reduce(0, dense, rewards, "amin")  # [K]
    return hi == lo


def group_advantages(rewards: Tensor, group_index: Tensor, norm: str = "std", eps: float = 1e-6) -> AdvantageResult:
    """Return A_j = (r_j - mean_g) / (std_g + eps) (norm="std", GRPO) or r_j - mean_g (norm="none", Dr.GRPO).

    rewards: [N] float; group_index: [N] integer id of each sample's group (any ids, any group sizes).
    The std is unbiased (Bessel-corrected), as in verl and NeMo-RL. A group whose rewards are all equal
    (including a group of one sample) carries no signal: its advantages are exactly 0 and it is counted
    in `zero_variance_groups` (mean-centring alone would leave float residue there).
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: accepted values are {list(NORMS)} (std: GRPO, none: Dr.GRPO)")
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be "
                         f"1-D of the same length")
    dense, num_groups = _group_ids(group_index)
    counts = torch.bincount(dense, minlength=num_groups).to(rewards.dtype)  # [K]
    mean = rewards.new_zeros(num_groups).index_add_(0, dense, rewards) / counts  # [K]
    centred = rewards - mean[dense]  # [N]
    sq_sum = rewards.new_zeros(num_groups).index_add_(0, dense, centred.square())  # [K]
    std = (sq_sum / (counts - 1).clamp(min=1)).sqrt()  # [K] a single sample has sq_sum 0, so std 0
    flat = _all_equal(rewards, dense, num_groups)  # [K]
    advantages = centred / (std[dense] + eps) if norm == "std" else centred  # [N]
    advantages = torch.where(flat[dense], torch.zeros_like(advantages), advantages)  # [N]
    return AdvantageResult(advantages, int(flat.sum()), mean, std)


def dynamic_sampling_mask(rewards: Tensor, group_index: Tensor) -> Tensor:
    """[N] bool: True for samples of groups whose rewards are not all equal (DAPO dynamic sampling keeps them)."""
    dense, num_groups = _group_ids(group_index)
    return ~_all_equal(rewards, dense, num_groups)[dense]


def source_means(values: Tensor, is_explorer: Tensor) -> dict[str, Tensor]:
    """Mean of `values` [N] over explorer and over learner samples (`is_explorer` [N] bool).

    Returns 0-dim tensors under "explorer" and "learner"; a source without samples is left out.
    """
    out = {}
    for name, selected in (("explorer", is_explorer), ("learner", ~is_explorer)):
        if selected.any():
            out[name] = values[selected].float().mean().detach()
    return out
