"""Sequence packing: several variable-length sequences per row instead of one padded row each.

Pure torch (tensors in, tensors out). `plan_packing` places sequences into rows of at most a token
budget (first-fit decreasing) and groups the rows into micro-batches, `cheapest_packing` picks the budget
that costs least; the rest turns a plan into what attention needs and moves [n, L] per-sequence tensors
into packed [R, T] rows and back.

Within a packed row every position belongs to one segment: a sequence, or the row's padding tail
(a segment of its own, so that every query attends to at least itself). Attention is causal inside a
segment and blocked across segments, either as a boolean mask (`block_causal_mask`, for megatron-core's
local attention) or as cumulative segment lengths over the flattened rows (`cu_seqlens`, for the
`thd` format of Transformer Engine). RoPE depends only on relative positions, so a sequence placed at
an offset scores the same as the sequence alone (tests/distributed/test_packing.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedMicroBatch:
    """Where the sequences of one micro-batch sit in its packed rows."""

    sequences: Tensor  # [n] long, the caller's sequence indices packed here, ascending
    row: Tensor  # [n] long, packed row of each sequence
    offset: Tensor  # [n] long, first position of each sequence in its row
    length: Tensor  # [n] long, tokens of each sequence
    num_rows: int  # R
    row_length: int  # T: tokens of the longest packed row

    def to(self, device: torch.device) -> "PackedMicroBatch":
        """The same plan with its tensors on `device`."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(device)
                                            for name in ("sequences", "row", "offset", "length")})


def plan_packing(lengths: Tensor, row_tokens: int, rows_per_micro_batch: int) -> list[PackedMicroBatch]:
    """Pack sequences of `lengths` [n] into rows of at most `row_tokens` tokens, `rows_per_micro_batch` rows each.

    First-fit decreasing (ties by index): each sequence, longest first, goes into the first row with room,
    or opens a row; a sequence longer than `row_tokens` gets a row of its own. Rows keep their opening
    order and are cut into consecutive micro-batches; inside a row, sequences sit in ascending index order.
    """
    if row_tokens < 1 or rows_per_micro_batch < 1:
        raise ValueError(f"plan_packing: row_tokens={row_tokens} and rows_per_micro_batch={rows_per_micro_batch} "
                         f"must be >= 1")
    sizes = [int(n) for n in lengths]
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = next((r for r, room in enumerate(free) if room >= sizes[index]), None)
        if target is None:
            rows.append([])
            free.append(row_tokens)
            target = len(rows) - 1
        rows[target].append(index)
        free[target] -= sizes[index]
    plans = []
    for start in range(0, len(rows), rows_per_micro_batch):
        placed = {}  # sequence index -> (row, offset)
        for local_row, members in enumerate(rows[start:start + rows_per_micro_batch]):
            offset = 0
            for index in sorted(members):
                placed[index] = (local_row, offset)
                offset += sizes[index]
        sequences = sorted(placed)
        length = torch.tensor([sizes[i] for i in sequences], dtype=torch.long)  # [n]
        row = torch.tensor([placed[i][0] for i in sequences], dtype=torch.long)  # [n]
        offset = torch.tensor([placed[i][1] for i in sequences], dtype=torch.long)  # [n]
        num_rows = min(rows_per_micro_batch, len(rows) - start)
        row_length = int(torch.zeros(num_rows, dtype=torch.long).index_add_(0, row, length).max())
        plans.append(PackedMicroBatch(torch.tensor(sequences, dtype=torch.long), row, offset, length,
                                      num_rows, row_length))
    return plans


def cheapest_packing(lengths: Tensor, rows_per_micro_batch: int, attention_span: float = math.inf,
                     budgets: int = 9) -> list[PackedMicroBatch]:
    """`plan_packing` at the cheapest of `budgets` row budgets spaced evenly from the longest sequence L to 2L;
    a budget B gets `rows_per_micro_batch * L // B` rows per micro-batch, so that no micro-batch holds more
    slots than `rows_per_micro_batch` padded rows of L.

    Rows of L cannot pair sequences longer than L/2: when lengths bunch near the longest (similar prompts,
    responses that run to the token limit) they pad as much as padding does, and longer rows that take two
    or more sequences pack them tightly. But block-masked attention computes all T x T scores of a row, so
    longer rows cost more per position: a micro-batch of R rows of T costs R x T x (1 + T / attention_span),
    where `attention_span` is the row length at which a position's attention costs as much as its
    position-wise work (projections and MLP); infinite for attention that skips the masked blocks (THD),
    where the cost is the slot count. Ties go to the shorter rows.
    """
    longest = int(lengths.max())
    best_cost, best = math.inf, []
    for budget in sorted({longest + longest * k // max(budgets - 1, 1) for k in range(budgets)}):
        plans = plan_packing(lengths, budget, max(1, rows_per_micro_batch * longest // budget))
        cost = sum(plan.num_rows * plan.row_length * (1 + plan.row_length / attention_span) for plan in plans)
        if cost < best_cost:
            best_cost, best = cost, plans
    return best


def _positions(plan: PackedMicroBatch, length: int) -> tuple[Tensor, Tensor]:
    """Flat indices into the [R * T] packed rows of each sequence's first `length` tokens, and which exist."""
    steps = torch.arange(length, device=plan.row.device)  # [L]
    valid = steps < plan.length[:, None]  # [n, L]
    flat = plan.row[:, None] * plan.row_length + plan.offset[:, None] + steps  # [n, L]
    return torch.where(valid, flat, 0), valid


def pack(values: Tensor, plan: PackedMicroBatch, fill: float | int = 0) -> Tensor:
    """Move per-sequence `values` [n, L] (row k is sequence `plan.sequences[k]`) into packed rows [R, T].

    Only each sequence's first `plan.length[k]` entries are moved; the rest of the rows is `fill`.
    """
    flat, valid = _positions(plan, values.shape[1])  # [n, L] each
    packed = values.new_full((plan.num_rows * plan.row_length,), fill)  # [R*T]
    packed[flat[valid]] = values[valid]
    return packed.view(plan.num_rows, plan.row_length)  # [R, T]


def unpack(packed: Tensor, plan: PackedMicroBatch, length: int) -> Tensor:
    """The inverse of `pack`: [R, T] rows back to [n, length] per sequence, 0 beyond each sequence. Differentiable."""
    flat, valid = _positions(plan, length)  # [n, L] each
    values = packed.reshape(-1)[flat]  # [n, L]
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def segment_ids(plan: PackedMicroBatch) -> Tensor:
    """[R, T] long: k where sequence `plan.sequences[k]` sits, n + r on the padding tail of row r."""
    n = len(plan.sequences)
    tails = n + torch.arange(plan.num_rows, device=plan.row.device)  # [R]
    ids = tails[:, None].expand(plan.num_rows, plan.row_length).contiguous()  # [R, T]
    slots = torch.arange(n, device=plan.row.device)[:, None].expand(n, int(plan.length.max()))  # [n, Lmax]
    flat, valid = _positions(plan, slots.shape[1])  # [n, Lmax] each
    ids.view(-1)[flat[valid]] = slots[valid]
    return ids


def block_causal_mask(segments: Tensor) -> Tensor:
    """[R, 1, T, T] bool attention mask from `segment_ids` [R, T]: True where a query may NOT see a key.

    A query sees the keys of its own segment at or before its position (megatron-core's convention:
    True is masked out).
    """
    length = segments.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=segments.device).triu(1)  # [T, T]
    other = segments[:, :, None] != segments[:, None, :]  # [R, T, T]
    return (other | future).unsqueeze(1)  # [R, 1, T, T]


def cu_seqlens(segments: Tensor) -> tuple[Tensor, int]:
    """Cumulative segment lengths over the flattened rows of `segment_ids` [R, T], and the longest segment.

    Returns ([S+1] int32 starting at 0 and ending at R*T, max length): the `thd` layout of Transformer
    Engine, with every row's padding tail a segment of its own.
    """
    flat = segments.reshape(-1)  # [R*T]
    starts = torch.ones_like(flat, dtype=torch.bool)  # [R*T]
    starts[1:] = flat[1:] != flat[:-1]
    bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])  # [S+1]
    return bounds.to(torch.int32), int((bounds[1:] - bounds[:-1]).max())
