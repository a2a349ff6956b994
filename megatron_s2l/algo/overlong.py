"""DAPO's overlong handling (Yu et al., 2025): the soft overlong penalty and overlong filtering.

A response cut off at `max_new_tokens` has no final answer, so its reward says little about its
reasoning. DAPO's soft penalty lowers the reward of responses in the last `buffer` tokens before the
limit linearly, from 0 at `max_len - buffer` tokens to `-factor` at `max_len`; overlong filtering gives
truncated responses no loss at all (they still count in their group's advantages).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Overlong(NamedTuple):
    """Rewards with the penalty added, the penalty itself, and which responses keep their loss."""

    rewards: torch.Tensor  # [B] float32
    penalty: torch.Tensor  # [B] float32, <= 0
    keep: torch.Tensor  # [B] bool


def overlong_penalty(lengths: torch.Tensor, max_lengths: torch.Tensor, *, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong penalty: -factor * clamp(length - (max_length - buffer), 0, buffer) / buffer.

    lengths, max_lengths: [B] response lengths and the generation limit each was sampled with; buffer=0: none.
    """
    if buffer == 0:
        return torch.zeros(lengths.shape)  # [B]
    excess = (lengths - (max_lengths - buffer)).clamp(min=0, max=buffer).float()  # [B] tokens into the buffer
    return -factor * excess / buffer  # [B]


def overlong(rewards: torch.Tensor, lengths: torch.Tensor, max_lengths: torch.Tensor, truncated: torch.Tensor, *,
             buffer: int, factor: float, filter_truncated: bool) -> Overlong:
    """Both treatments at once. rewards, lengths, max_lengths: [B]; truncated: [B] bool (finish_reason "length")."""
    penalty = overlong_penalty(lengths, max_lengths, buffer=buffer, factor=factor)  # [B]
    keep = ~truncated if filter_truncated else torch.ones_like(truncated)  # [B]
    return Overlong(rewards + penalty, penalty, keep)
