"""Sequence packing and reshuffled PPO epochs in the Learner, against the padded Learner (DP=2, TP=2, PP=2).

The reference is the padded path (`optim.pack_sequences=False`), which tests/distributed/test_learner.py
checks against plain torch. In each layout one spawn builds a padded and a packed Learner with the same
weights and compares log-probs, the first GRPO step (loss, entropy, KL, grad norm, every gradient
shard), one SFT step and a three-step training curve. The loss aggregates per sequence
(seq-mean-token-mean), so unpacking must hand each sequence its own row. The DP=2 spawn (TP=1; the
ranks hold 3 groups of 7 sequences and 2 groups of 3) also shows that RoPE scores depend only on
relative positions (why packing at an offset is exact) and that PPO epochs after the first visit the
groups in the order `_epoch_group_order` draws.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig
from megatron_s2l.types import TrainBatch
from tests.distributed.test_learner import GROUP_SIZES, MODEL, make_batch as learner_batch
from tests.multiprocess import run_ranks

# rows of at most 16 tokens, 2 per micro-batch: the 10 sequences (5-13 tokens) fill 7 rows, 4 micro-batches
PADDED = OptimConfig(lr=1e-2, clip_grad=1.0, mini_batch_prompts=5, micro_batch_size=3)
PACKED = dataclasses.replace(PADDED, pack_sequences=True, pack_row_tokens=16, micro_batch_size=2)
AUTO_PACKED = dataclasses.replace(PACKED, pack_row_tokens=0)  # the row budget chosen per batch shard
LOSS = LossConfig(kl_coef=0.05, kl_type="k3", entropy_coef=0.01, aggregation="seq-mean-token-mean")
STEPS = 3
SEED = 11
TIMEOUT = 240


def make_batch() -> TrainBatch:
    """The Learner tests' 10 sequences (responses of 2-9 tokens) with other token ids and advantages."""
    return learner_batch(seed=1)


def _learners(parallel: ParallelConfig, padded: OptimConfig, packed: OptimConfig):
    """A padded and a packed Learner holding the same weights."""
    from megatron_s2l.learner.step import Learner

    reference = Learner(MODEL, parallel, padded, LOSS, FP8Config(), seed=SEED, with_reference=False)
    learner = Learner(MODEL, parallel, packed, LOSS, FP8Config(), seed=SEED, with_reference=False)
    learner.model_chunks[0].load_state_dict(reference.model_chunks[0].state_dict())
    return reference, learner


def _grads(learner) -> dict[str, torch.Tensor]:
    return {name: param.main_grad.detach().clone() for name, param in learner.model_chunks[0].named_parameters()}


def _compare(parallel: ParallelConfig, packed: OptimConfig = PACKED) -> dict:
    """Padded vs `packed` on this layout: log-probs, one GRPO step with its gradients, SFT, a training curve."""
    batch = make_batch()
    reference, learner = _learners(parallel, PADDED, packed)
    out = {"logprobs": (reference.logprobs(batch), learner.logprobs(batch))}
    batch.old_logprobs = batch.ref_logprobs = out["logprobs"][0]
    out["steps"], out["grads"] = [], []
    for side in (reference, learner):
        steps = [side.train(batch)]  # one optimizer step per call: the mini-batch is the whole batch
        out["grads"].append(_grads(side))
        out["steps"].append(steps + [side.train(batch) for _ in range(STEPS - 1)])
    out["sft"] = [side.sft_step(batch.tokens, batch.response_mask) for side in (reference, learner)]
    return out


def _layout(rank, world_size, tp, pp):
    return _compare(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))


def _rope_scores(learner, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q.k scores [L, L] of random q, k rotated at positions 0..L-1 and at offset..offset+L-1."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    length, dim = 13, MODEL.kv_channels
    q, k = torch.randn(2, length, 1, 1, dim, generator=g)  # [L, b=1, heads=1, D] each
    freqs = learner.model_chunks[0].rotary_pos_emb(offset + length)  # [offset+L, 1, 1, D]
    scores = []
    for start in (0, offset):
        window = freqs[start:start + length]  # [L, 1, 1, D]
        q_rot, k_rot = (apply_rotary_pos_emb(x, window, learner.transformer_config) for x in (q, k))  # [L, 1, 1, D]
        scores.append(q_rot[:, 0, 0] @ k_rot[:, 0, 0].T)  # [L, L]
    return scores[0], scores[1]


def _data_parallel(rank, world_size):
    """DP=2, TP=1: padded vs packed (row budget chosen per shard), RoPE at an offset, and PPO epochs against
    explicitly ordered mini-batches."""
    from megatron_s2l.learner.step import _epoch_group_order

    out = _compare(ParallelConfig(), AUTO_PACKED)
    # two PPO epochs of 2-group mini-batches, packed, against one epoch each over mini-batches taken in
    # the order the Learner must draw (its seed and optimizer-step count 0)
    epochs = dataclasses.replace(PACKED, ppo_epochs=2, mini_batch_prompts=2)
    stepwise = dataclasses.replace(PACKED, mini_batch_prompts=len(GROUP_SIZES))
    shuffled, explicit = _learners(ParallelConfig(), epochs, stepwise)
    out["rope"] = _rope_scores(shuffled, offset=50)
    batch = make_batch()
    batch.old_logprobs = batch.ref_logprobs = shuffled.logprobs(batch)
    longest = int(batch.response_mask.sum(1).max())
    shuffled.train(batch, max_response_len=longest)
    orders = [_epoch_group_order(batch.group_index, epoch, (SEED, 0)) for epoch in range(2)]
    for order in orders:
        for start in range(0, len(order), 2):
            explicit.train(batch.select(torch.isin(batch.group_index, order[start:start + 2])),
                           max_response_len=longest)
    out["epochs"] = {"orders": orders, "shuffled": shuffled.logprobs(batch), "explicit": explicit.logprobs(batch),
                     "steps": shuffled.scheduler.num_steps}
    return out


def check(run: dict) -> None:
    """Packed results equal the padded ones on this rank."""
    batch = make_batch()
    where = batch.response_mask  # the positions the Learner scores
    padded, packed = run["logprobs"]
    assert padded[where].std() > 0.1  # log-probs vary: the comparison is not vacuous
    torch.testing.assert_close(packed[where], padded[where], rtol=0, atol=1e-5)
    assert torch.equal(packed[~where], torch.zeros_like(packed[~where]))  # never scored
    first_padded, first_packed = run["steps"][0][0], run["steps"][1][0]
    for name in ("loss", "grad_norm", "entropy", "kl", "ratio_mean"):
        assert first_packed[name] == pytest.approx(first_padded[name], rel=1e-5, abs=1e-7), name
    grads_padded, grads_packed = run["grads"]
    assert grads_packed.keys() == grads_padded.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    curve_padded, curve_packed = ([step["loss"] for step in steps] for steps in run["steps"])
    torch.testing.assert_close(torch.tensor(curve_packed), torch.tensor(curve_padded), rtol=0, atol=5e-5)
    assert abs(curve_padded[-1] - curve_padded[0]) > 1e-2  # the weights moved between the compared steps
    assert run["sft"][1] == pytest.approx(run["sft"][0], rel=1e-5)


@pytest.mark.distributed
def test_packing_data_parallel_rope_offset_and_ppo_epoch_order():
    runs = run_ranks(_data_parallel, 2, timeout=TIMEOUT)
    for run in runs:
        check(run)
    run = runs[0]
    plain, offset = run["rope"]
    assert plain.abs().max() > 1.0
    torch.testing.assert_close(offset, plain, rtol=0, atol=1e-5)  # a position 50 tokens later scores alike
    epochs = run["epochs"]
    first, second = (order.tolist() for order in epochs["orders"])
    assert first == list(range(len(GROUP_SIZES))) and sorted(second) == first and second != first
    assert epochs["steps"] == 6  # 3 mini-batches per epoch, 2 epochs
    torch.testing.assert_close(epochs["shuffled"], epochs["explicit"], rtol=0, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_packing_matches_padding_model_parallel(tp, pp):
    for run in run_ranks(_layout, 2, tp, pp, timeout=TIMEOUT):
        check(run)


def test_epoch_group_order_reshuffles_reproducibly():
    """Epoch 0 keeps batch order; later epochs permute whole groups, fixed by (seed, step count, epoch)."""
    from megatron_s2l.learner.step import _epoch_group_order, _mini_batches

    batch = make_batch()
    orders = [_epoch_group_order(batch.group_index, epoch, (SEED, 4)).tolist() for epoch in range(4)]
    assert orders[0] == [0, 1, 2, 3, 4]
    assert all(sorted(order) == orders[0] for order in orders)
    assert len({tuple(order) for order in orders}) == 4  # every epoch its own order
    assert orders == [_epoch_group_order(batch.group_index, epoch, (SEED, 4)).tolist() for epoch in range(4)]
    assert _epoch_group_order(batch.group_index, 1, (SEED, 5)).tolist() != orders[1]  # the next call differs
    mini = _mini_batches(batch, torch.tensor(orders[1]), 2)
    assert [m.group_index.unique().tolist() for m in mini] == [sorted(orders[1][i:i + 2]) for i in (0, 2, 4)]
    assert sum(m.size for m in mini) == batch.size  # whole groups, each once


def test_te_packing_in_fp32_is_refused_at_start_up():
    """TE's THD attention has no FP32 backend: the Learner says so before building anything."""
    from megatron_s2l.learner.step import Learner

    te_model = dataclasses.replace(MODEL, layer_spec="te")
    with pytest.raises(ValueError, match="learner.params_dtype='bfloat16'"):
        Learner(te_model, ParallelConfig(), PACKED, LOSS, FP8Config(), seed=SEED, with_reference=False)
