"""The S2L explorer schedule against values worked out by hand."""

import pytest

from megatron_s2l.algo.schedule import GroupSplit, explorer_share, group_split


def _explorer_counts(steps, **kwargs):
    return [group_split(step, **kwargs).explorer for step in steps]


def test_paper_schedule_g16_tmix8():
    # alpha_i = (8 - i) / 7; G_w = ceil(16 alpha): 16, ceil(13.71)=14, ceil(11.43)=12, ceil(9.14)=10,
    # ceil(6.86)=7, ceil(4.57)=5, ceil(2.29)=3, 0; then plain GRPO.
    splits = [group_split(step, group_size=16, t_mix=8) for step in range(1, 11)]
    assert [s.explorer for s in splits] == [16, 14, 12, 10, 7, 5, 3, 0, 0, 0]
    assert all(s.explorer + s.learner == 16 for s in splits)
    assert [explorer_share(i, 8) for i in (1, 2, 8, 9)] == pytest.approx([1.0, 6 / 7, 0.0, 0.0])


def test_tmix_one_is_all_explorer_then_grpo():
    assert group_split(1, group_size=8, t_mix=1) == GroupSplit(8, 0)
    assert group_split(2, group_size=8, t_mix=1) == GroupSplit(0, 8)
    assert group_split(1, group_size=8, t_mix=1, kind="cosine") == GroupSplit(8, 0)


def test_whole_products_are_exact():
    # alpha = (11 - 4) / 10 = 0.7 and 0.7 * 10 = 7.000000000000001 in floats: ceil would give 8.
    assert _explorer_counts(range(1, 12), group_size=10, t_mix=11) == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert group_split(1, group_size=10, t_mix=4, kind="constant", constant_share=0.7).explorer == 7
    assert group_split(1, group_size=10, t_mix=4, kind="constant", constant_share=0.3).explorer == 3
    assert group_split(1, group_size=10, t_mix=4, kind="step", constant_share=0.3).explorer == 3


def test_cosine():
    # alpha = 0.5 (1 + cos(pi (i-1)/4)): 1, 0.8536, 0.5, 0.1464, 0 -> ceil(8 alpha) = 8, 7, 4, 2, 0.
    assert _explorer_counts(range(1, 7), group_size=8, t_mix=5, kind="cosine") == [8, 7, 4, 2, 0, 0]
    assert explorer_share(2, 5, "cosine") == pytest.approx(0.8535534)


def test_step_and_constant():
    assert _explorer_counts(range(1, 6), group_size=8, t_mix=3, kind="step", constant_share=0.5) == [4, 4, 4, 0, 0]
    # constant ignores T_mix: the no-annealing ablation.
    assert _explorer_counts([1, 5, 100], group_size=8, t_mix=3, kind="constant", constant_share=0.25) == [2, 2, 2]


def test_separate_mode_counts():
    # explorer ceil(16 alpha), learner ceil(16 (1 - alpha)): G + 1 rollouts where neither is whole.
    splits = [group_split(step, group_size=16, t_mix=8, group_mode="separate") for step in range(1, 10)]
    assert splits == [(16, 0), (14, 3), (12, 5), (10, 7), (7, 10), (5, 12), (3, 14), (0, 16), (0, 16)]
    # Where alpha * G is whole the two groups add up to G exactly.
    assert group_split(4, group_size=10, t_mix=11, group_mode="separate") == GroupSplit(7, 3)


def test_the_split_depends_only_on_the_step():
    # What a resumed run relies on: no hidden state, any order of calls gives the same answer.
    forward = [group_split(i, group_size=16, t_mix=8) for i in range(1, 12)]
    backward = [group_split(i, group_size=16, t_mix=8) for i in reversed(range(1, 12))][::-1]
    assert forward == backward


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=0), "step=0"),
    (dict(t_mix=0), "t_mix=0"),
    (dict(kind="exponential"), "kind='exponential'.*linear"),
    (dict(group_size=0), "group_size=0"),
    (dict(group_mode="mixed"), "group_mode='mixed'.*combined"),
    (dict(constant_share=1.5), "constant_share=1.5"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    args = dict(step=1, group_size=8, t_mix=4) | kwargs
    with pytest.raises(ValueError, match=match):
        group_split(**args)
