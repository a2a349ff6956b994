"""Group-relative advantages against values worked out by hand."""

import math

import pytest
import torch

from megatron_s2l.algo.advantages import dynamic_sampling_mask, group_advantages, source_means


def test_std_normalised():
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735, A = +-0.5 / 0.57735 = +-0.866025
    result = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]), eps=0.0)
    assert result.advantages.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-6)
    assert result.group_std.tolist() == pytest.approx([math.sqrt(1 / 3)])
    assert result.zero_variance_groups == 0


def test_eps_enters_the_denominator():
    result = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=0.5)
    # std sqrt(0.5) = 0.70711, A = 0.5 / 1.20711 = 0.414214
    assert result.advantages.tolist() == pytest.approx([0.414214, -0.414214], abs=1e-6)


def test_dr_grpo_is_mean_centred_only():
    result = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([3, 3, 3, 3]), norm="none")
    assert result.advantages.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_unequal_groups_with_arbitrary_ids():
    # group 2: [0, 1, 1] mean 2/3, std sqrt((4/9 + 1/9 + 1/9) / 2) = 0.57735;
    # group 5: [1, 0]    mean 1/2, std sqrt(0.5) = 0.70711.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    result = group_advantages(rewards, torch.tensor([5, 2, 5, 2, 2]), eps=0.0)
    expected = [0.707107, -1.154701, -0.707107, 0.577350, 0.577350]
    assert result.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert result.group_mean.tolist() == pytest.approx([2 / 3, 0.5])  # sorted group ids: 2, 5


def test_zero_variance_groups_and_groups_of_one_are_zero_and_counted():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.7, 1.0, 0.0])
    result = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 2, 2]))
    assert result.advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly, no float residue
    assert result.zero_variance_groups == 2  # the all-0.3 group and the group of one
    assert result.advantages[4:].tolist() == pytest.approx([0.707106, -0.707106], abs=1e-5)


def test_dynamic_sampling_keeps_groups_with_signal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    mask = dynamic_sampling_mask(rewards, torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    assert mask.tolist() == [False, False, True, True, False, False, False]


def test_source_means():
    values = torch.tensor([1.0, 2.0, 3.0, 6.0])
    means = source_means(values, torch.tensor([True, False, True, False]))
    assert {k: v.item() for k, v in means.items()} == {"explorer": 2.0, "learner": 4.0}
    assert set(source_means(values, torch.zeros(4, dtype=torch.bool))) == {"learner"}


def test_bad_input():
    with pytest.raises(ValueError, match="norm='l2'.*std"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), norm="l2")
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
