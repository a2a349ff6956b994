"""Adaptive explorer allocation on hand-made groups: which prompts get explorer samples, and the share used."""

import pytest
import torch

from megatron_s2l.algo.allocation import adaptive_explorer_counts, explorer_usage, probe_split


def test_probe_split_leaves_at_most_half_the_group_open_and_never_more_than_the_schedule_allows():
    # (G, G_w) -> (learner probe, open slots)
    cases = {(8, 8): (4, 4), (8, 5): (4, 4), (8, 3): (5, 3), (8, 1): (7, 1), (8, 0): (8, 0), (5, 5): (3, 2),
             (16, 11): (8, 8), (1, 1): (1, 0)}
    for (group, budget), split in cases.items():
        assert probe_split(group, budget) == split
    with pytest.raises(ValueError, match="explorer_budget=-1"):
        probe_split(8, -1)


def test_only_prompts_whose_learner_rewards_are_all_equal_get_the_budget():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    prompts = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # prompt 0 all fail, 1 mixed (GRPO has a gradient), 2 all succeed, 3 dropped by the engine (no samples)
    assert adaptive_explorer_counts(rewards, prompts, 4, budget=3).tolist() == [3, 0, 3, 0]
    assert adaptive_explorer_counts(rewards, prompts, 4, budget=0).tolist() == [0, 0, 0, 0]  # after T_mix


def test_partial_rewards_any_group_size_and_order():
    rewards = torch.tensor([0.5, 0.25, 0.5, 0.5, 0.5, 0.5000001, 0.7])
    prompts = torch.tensor([2, 0, 2, 2, 1, 1, 3])
    # prompt 0 and 3 have one sample each: nothing to compare, so no learner signal either
    assert adaptive_explorer_counts(rewards, prompts, 4, budget=5).tolist() == [5, 0, 5, 5]


def test_no_learner_samples_at_all_and_bad_input():
    assert adaptive_explorer_counts(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2, 4).tolist() == [0, 0]
    with pytest.raises(ValueError, match="must be 1-D of the same length"):
        adaptive_explorer_counts(torch.zeros(3), torch.zeros(2, dtype=torch.long), 1, 4)
    with pytest.raises(ValueError, match="budget=-1"):
        adaptive_explorer_counts(torch.zeros(1), torch.zeros(1, dtype=torch.long), 1, -1)


def test_explorer_usage_counts_the_share_and_the_groups_with_explorer_samples():
    is_explorer = torch.tensor([True, True, False, False, False, False, True, False])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert explorer_usage(is_explorer, groups) == (3 / 8, 2)
    assert explorer_usage(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)) == (0.0, 0)
