"""DAPO's overlong handling on hand-made samples: the soft penalty by hand, filtering, the truncation flag."""

import pytest
import torch

from megatron_s2l.algo.overlong import overlong, overlong_penalty
from megatron_s2l.types import RolloutGroup, Sample, TrainBatch


def test_soft_penalty_by_hand():
    # max 16, buffer 4: no penalty up to 12 tokens, then -factor/4 per token into the buffer, -factor at 16
    lengths = torch.tensor([3, 12, 13, 14, 15, 16])
    penalty = overlong_penalty(lengths, torch.full((6,), 16), buffer=4, factor=0.5)
    assert penalty.tolist() == [0.0, 0.0, -0.125, -0.25, -0.375, -0.5]


def test_each_response_is_measured_against_its_own_limit():
    # explorer samples generated with max 8, learner samples with max 16; buffer 4 for both
    penalty = overlong_penalty(torch.tensor([6, 6, 14, 8]), torch.tensor([8, 16, 16, 8]), buffer=4, factor=1.0)
    assert penalty.tolist() == [-0.5, 0.0, -0.5, -1.0]


def test_no_buffer_no_penalty():
    assert overlong_penalty(torch.tensor([16, 1]), torch.tensor([16, 16]), buffer=0, factor=1.0).tolist() == [0.0, 0.0]


def sample(length: int, finish_reason: str, reward: float) -> Sample:
    return Sample("p", [1, 2], list(range(3, 3 + length)), [0.0] * length, "learner", "learner",
                  finish_reason=finish_reason, reward=reward)


@pytest.mark.parametrize("filter_truncated, keep", [(True, [True, False, True, False]), (False, [True] * 4)])
def test_truncated_samples_leave_the_loss_and_are_penalised(filter_truncated, keep):
    samples = [sample(5, "stop", 1.0), sample(8, "length", 0.0), sample(7, "stop", 1.0), sample(8, "length", 1.0)]
    batch = TrainBatch.from_groups([RolloutGroup("p", samples)], pad_id=0)
    assert batch.truncated.tolist() == [False, True, False, True]
    lengths = batch.response_mask.sum(1)  # [B]
    assert lengths.tolist() == [5, 8, 7, 8]
    result = overlong(batch.rewards, lengths, torch.full((4,), 8), batch.truncated, buffer=2, factor=1.0,
                      filter_truncated=filter_truncated)
    # max 8, buffer 2: 5 tokens no penalty, 7 tokens -0.5, 8 tokens -1
    assert result.penalty.tolist() == [0.0, -1.0, -0.5, -1.0]
    assert result.rewards.tolist() == [1.0, -1.0, 0.5, 0.0]
    assert result.keep.tolist() == keep
