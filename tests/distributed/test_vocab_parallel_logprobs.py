"""Vocab-parallel log-probs at TP=2 (two gloo ranks, each holding part of the vocabulary) against a
single-process log_softmax over the full vocabulary."""

import pytest
import torch

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from tests.multiprocess import run_ranks

BATCH, SEQ, VOCAB = 3, 9, 37
SPLIT = 19  # rank 0 holds ids [0, 19), rank 1 [19, 37): unequal shards
CHUNK_SIZES = (None, 4)  # one pass over all tokens; chunks of 4 (the last one partial)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    targets[0, :4] = torch.tensor([0, SPLIT - 1, SPLIT, VOCAB - 1])  # both edges of both shards
    grads = torch.randn(2, BATCH, SEQ, generator=gen, dtype=torch.float64)
    return logits, targets, grads


def _rank(rank, world_size):
    import torch.distributed as dist

    logits, targets, (g_logp, g_entropy) = _inputs()
    start, stop = (0, SPLIT) if rank == 0 else (SPLIT, VOCAB)
    results = {}
    for chunk_size in CHUNK_SIZES:
        shard = logits[..., start:stop].float().requires_grad_()  # [B, T, V_local]
        logp, entropy = vocab_parallel_logprobs(shard, targets, group=dist.group.WORLD, vocab_start=start,
                                                chunk_size=chunk_size, with_entropy=True)
        (logp.double() * g_logp + entropy.double() * g_entropy).sum().backward()
        # numpy, not tensors: tensors travel through shared memory that dies with the rank
        results[chunk_size] = (logp.detach().numpy(), entropy.detach().numpy(), shard.grad.numpy())
    try:  # an id outside the vocabulary fails on every rank alike instead of hanging one of them
        vocab_parallel_logprobs(shard, torch.full_like(targets, VOCAB), group=dist.group.WORLD, vocab_start=start)
        raised = False
    except ValueError:
        raised = True
    return results, raised


@pytest.mark.distributed
def test_tp2_matches_full_vocab_log_softmax():
    outputs = run_ranks(_rank, 2, timeout=120)
    logits, targets, (g_logp, g_entropy) = _inputs()
    full = logits.float().double().requires_grad_()  # the same fp32 values the ranks hold
    logsm = full.log_softmax(-1)  # [B, T, V]
    ref_logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ref_entropy = -(logsm.exp() * logsm).sum(-1)  # [B, T]
    (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()

    assert [raised for _, raised in outputs] == [True, True]
    for chunk_size in CHUNK_SIZES:
        per_rank = [results[chunk_size] for results, _ in outputs]
        for logp, entropy, _ in per_rank:
            torch.testing.assert_close(torch.from_numpy(logp).double(), ref_logp.detach(), atol=3e-6, rtol=1e-6)
            torch.testing.assert_close(torch.from_numpy(entropy).double(), ref_entropy.detach(), atol=3e-6,
                                       rtol=1e-6)
        grad = torch.cat([torch.from_numpy(g) for _, _, g in per_rank], dim=-1)  # [B, T, V] shards side by side
        torch.testing.assert_close(grad.double(), full.grad, atol=3e-6, rtol=1e-5)
