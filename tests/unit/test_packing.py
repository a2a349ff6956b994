"""The packing plan and its tensors against plans worked out by hand (megatron_s2l.learner.packing)."""

import dataclasses
import math

import pytest
import torch

from megatron_s2l.learner.packing import (block_causal_mask, cheapest_packing, cu_seqlens, pack, plan_packing,
                                          segment_ids, unpack)


def test_first_fit_decreasing_plan_by_hand():
    """Lengths 5 2 3 4 1 into rows of 6, two rows per micro-batch.

    Longest first: 0 (5) opens row 0; 3 (4) opens row 1; 2 (3) fits nowhere, opens row 2; 1 (2) fills
    row 1; 4 (1) fills row 0. Rows 0-1 form the first micro-batch, row 2 the second.
    """
    first, second = plan_packing(torch.tensor([5, 2, 3, 4, 1]), row_tokens=6, rows_per_micro_batch=2)
    assert first.sequences.tolist() == [0, 1, 3, 4]
    assert first.row.tolist() == [0, 1, 1, 0]
    assert first.offset.tolist() == [0, 0, 2, 5]
    assert first.length.tolist() == [5, 2, 4, 1]
    assert (first.num_rows, first.row_length) == (2, 6)
    assert second.sequences.tolist() == [2] and second.offset.tolist() == [0]
    assert (second.num_rows, second.row_length) == (1, 3)
    assert segment_ids(first).tolist() == [[0, 0, 0, 0, 0, 3], [1, 1, 2, 2, 2, 2]]
    cu, longest = cu_seqlens(segment_ids(first))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 6, 8, 12] and longest == 5


def test_sequence_longer_than_the_budget_gets_its_own_row():
    (plan,) = plan_packing(torch.tensor([2, 7, 1]), row_tokens=4, rows_per_micro_batch=8)
    # 1 (7) opens row 0 alone (over budget); 0 (2) opens row 1; 2 (1) does not fit row 0, joins row 1
    assert plan.row.tolist() == [1, 0, 1] and plan.offset.tolist() == [0, 0, 2]
    assert (plan.num_rows, plan.row_length) == (2, 7)
    assert segment_ids(plan).tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 2, 4, 4, 4, 4]]  # tail of row 1: 3 + 1


def test_padding_tail_is_its_own_causal_segment():
    (plan,) = plan_packing(torch.tensor([3, 2]), row_tokens=4, rows_per_micro_batch=4)
    segments = segment_ids(plan)
    assert segments.tolist() == [[0, 0, 0], [1, 1, 3]]
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    assert mask[1, 0].tolist() == [[False, True, True], [False, False, True], [True, True, False]]
    assert cu_seqlens(segments)[0].tolist() == [0, 3, 5, 6]


def test_block_causal_mask_two_sequences_in_one_row():
    (plan,) = plan_packing(torch.tensor([2, 2]), row_tokens=4, rows_per_micro_batch=1)
    blocked = block_causal_mask(segment_ids(plan))[0, 0]
    expected = torch.tensor([[0, 1, 1, 1],
                             [0, 0, 1, 1],
                             [1, 1, 0, 1],
                             [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(blocked, expected)


def test_pack_and_unpack_by_hand_and_gradient():
    (plan,) = plan_packing(torch.tensor([3, 1, 2]), row_tokens=4, rows_per_micro_batch=2)
    # 0 (3) opens row 0; 2 (2) opens row 1; 1 (1) joins row 0 after sequence 0
    values = torch.tensor([[1., 2., 3.], [4., 9., 9.], [5., 6., 9.]], requires_grad=True)  # [n, L], 9 = padding
    packed = pack(values, plan, fill=-1)
    assert packed.tolist() == [[1., 2., 3., 4.], [5., 6., -1., -1.]]
    back = unpack(packed, plan, 3)
    assert back.tolist() == [[1., 2., 3.], [4., 0., 0.], [5., 6., 0.]]
    back.sum().backward()
    assert values.grad.tolist() == [[1., 1., 1.], [1., 0., 0.], [1., 1., 0.]]


def test_plan_covers_every_sequence_once_and_respects_the_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (37,), generator=g)  # [n]
    plans = plan_packing(lengths, row_tokens=50, rows_per_micro_batch=3)
    assert torch.cat([p.sequences for p in plans]).sort().values.tolist() == list(range(37))
    for plan in plans:
        segments = segment_ids(plan)  # [R, T]
        assert plan.row_length <= 50
        for slot, sequence in enumerate(plan.sequences.tolist()):
            assert int((segments == slot).sum()) == int(lengths[sequence])
        tokens = torch.arange(1, len(plan.sequences) + 1)[:, None].expand(-1, 40)  # [n, 40]
        assert torch.equal(unpack(pack(tokens, plan), plan, 40), tokens * (torch.arange(40) < plan.length[:, None]))


def _slots(plans) -> int:
    return sum(plan.num_rows * plan.row_length for plan in plans)


def test_cheapest_packing_pairs_sequences_that_bunch_near_the_longest():
    # budgets 10, 11, 12, 13, 15, 16, 17, 18, 20 (10 + 10k//8); one micro-batch whatever the budget
    # 10-15: no pair fits, 4 rows x 10 = 40 slots; 16: [10] [9] [8 8], 3 x 16 = 48; 17: [10] [9 8] [8], 3 x 17 = 51;
    # 18: [10 8] [9 8], 2 x 18 = 36; 20: [10 9] [8 8], 2 x 19 = 38
    (plan,) = cheapest_packing(torch.tensor([10, 9, 8, 8]), rows_per_micro_batch=100)
    assert (plan.num_rows, plan.row_length) == (2, 18)
    assert plan.row.tolist() == [0, 1, 0, 1] and plan.offset.tolist() == [0, 0, 10, 9]


def test_cheapest_packing_weighs_the_attention_of_longer_rows():
    # attention_span 20: a micro-batch of R rows of T costs R x T x (1 + T / 20); budgets 10-15: 40 x 1.5 = 60,
    # 18: 36 x 1.9 = 68.4, 20: 38 x 1.95 = 74.1, so the rows stay at the longest sequence
    (plan,) = cheapest_packing(torch.tensor([10, 9, 8, 8]), rows_per_micro_batch=100, attention_span=20)
    assert (plan.num_rows, plan.row_length) == (4, 10)


def test_attention_span_of_the_local_spec_and_te():
    from megatron_s2l.config import ModelConfig
    from megatron_s2l.learner.model import attention_span

    # hidden 256, 8 heads x 32, 4 groups x 32, ffn 768: (2*256*256 + 2*256*128 + 3*256*768) / (2*256)
    model = ModelConfig(hidden_size=256, num_attention_heads=8, num_query_groups=4, kv_channels=32, ffn_hidden_size=768)
    assert attention_span(model) == 1536
    assert attention_span(dataclasses.replace(model, layer_spec="te")) == math.inf


def test_cheapest_packing_keeps_the_shortest_rows_on_a_tie():
    (plan,) = cheapest_packing(torch.tensor([10, 5, 5]), rows_per_micro_batch=100)  # [10] [5 5]: no padding
    assert (plan.num_rows, plan.row_length) == (2, 10)


def test_cheapest_packing_never_exceeds_a_padded_micro_batch():
    # 2 padded rows of the longest (10) hold 20 slots: budget 10 cuts micro-batches of rows [10] [9] and [8] [8]
    # (20 + 16 = 36 slots); budgets 11-20 one row per micro-batch, the first of them (11) one sequence per row:
    # 35 slots, no padding
    plans = cheapest_packing(torch.tensor([10, 9, 8, 8]), rows_per_micro_batch=2)
    assert [(plan.num_rows, plan.row_length) for plan in plans] == [(1, 10), (1, 9), (1, 8), (1, 8)]
    assert _slots(plans) == 35
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 61, (64,), generator=g)  # [n], 3,200 tokens, the longest 60
    plans = cheapest_packing(lengths, rows_per_micro_batch=16)
    assert all(plan.num_rows * plan.row_length <= 16 * 60 for plan in plans)
    assert torch.cat([plan.sequences for plan in plans]).sort().values.tolist() == list(range(64))
    assert _slots(plans) == 3255 and _slots(plan_packing(lengths, 60, 16)) == 3344  # rows of the longest


def test_bad_budget_is_rejected():
    with pytest.raises(ValueError, match="row_tokens=0"):
        plan_packing(torch.tensor([1]), row_tokens=0, rows_per_micro_batch=1)


def test_config_rejects_a_negative_row_budget():
    from megatron_s2l.config import ConfigError, S2LConfig

    base = {"explorer": {"source": "none"}}
    with pytest.raises(ConfigError, match=r"optim.pack_row_tokens=-1: must be >= 0"):
        S2LConfig.from_dict(base | {"optim": {"pack_sequences": True, "pack_row_tokens": -1}}).validate(check_files=False)
    packed = S2LConfig.from_dict(base | {"optim": {"pack_sequences": True}}).validate(check_files=False)
    assert packed.optim.pack_row_tokens == 0
