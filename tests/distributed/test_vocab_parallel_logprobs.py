"""Vocab-parallel log-probs at TP=2 (two gloo ranks, each holding part of the vocabulary) against a
single-process log_softmax over the full vocabulary, with and without padded vocabulary rows."""

import pytest
import torch

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from tests.multiprocess import run_ranks

BATCH, SEQ, VOCAB = 3, 9, 37
CHUNK_SIZES = (None, 4)  # one pass over all tokens; chunks of 4 (the last one partial)
# (ids of rank 0's shard, total columns, vocab_size given): unequal shards without padding; Megatron's
# padding to 48 columns (24 per rank), cutting rank 1's shard; and padding that fills rank 1's shard.
LAYOUTS = {"unequal": (19, VOCAB, None), "padded": (24, 48, VOCAB), "padding-only shard": (24, 48, 20)}


def _inputs(columns: int, vocab: int, split: int):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, SEQ, columns, generator=gen, dtype=torch.float64) * 4
    logits[..., vocab:] = 50.0  # padding: would dominate any softmax it entered
    targets = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    edges = sorted({0, min(split, vocab) - 1, split if split < vocab else 0, vocab - 1})
    targets[0, :len(edges)] = torch.tensor(edges)  # both edges of the real ids of each shard
    grads = torch.randn(2, BATCH, SEQ, generator=gen, dtype=torch.float64)
    return logits, targets, grads


def _rank(rank, world_size):
    import torch.distributed as dist

    results = {}
    for name, (split, columns, vocab_size) in LAYOUTS.items():
        logits, targets, (g_logp, g_entropy) = _inputs(columns, vocab_size or columns, split)
        start, stop = (0, split) if rank == 0 else (split, columns)
        for chunk_size in CHUNK_SIZES:
            shard = logits[..., start:stop].float().requires_grad_()  # [B, T, V_local]
            logp, entropy = vocab_parallel_logprobs(shard, targets, group=dist.group.WORLD, vocab_start=start,
                                                    vocab_size=vocab_size, chunk_size=chunk_size,
                                                    with_entropy=True)
            (logp.double() * g_logp + entropy.double() * g_entropy).sum().backward()
            # numpy, not tensors: tensors travel through shared memory that dies with the rank
            results[name, chunk_size] = (logp.detach().numpy(), entropy.detach().numpy(), shard.grad.numpy())
    try:  # an id outside the vocabulary fails on every rank alike instead of hanging one of them
        vocab_parallel_logprobs(shard, torch.full_like(targets, vocab_size), group=dist.group.WORLD,
                                vocab_start=start, vocab_size=vocab_size)
        raised = False
    except ValueError:
        raised = True
    return results, raised


@pytest.mark.distributed
def test_tp2_matches_full_vocab_log_softmax():
    outputs = run_ranks(_rank, 2, timeout=120)
    assert [raised for _, raised in outputs] == [True, True]
    for name, (split, columns, vocab_size) in LAYOUTS.items():
        vocab = vocab_size or columns
        logits, targets, (g_logp, g_entropy) = _inputs(columns, vocab, split)
        full = logits[..., :vocab].float().double().requires_grad_()  # the real ids' fp32 values
        logsm = full.log_softmax(-1)  # [B, T, V]
        ref_logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
        ref_entropy = -(logsm.exp() * logsm).sum(-1)  # [B, T]
        (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()
        ref_grad = torch.cat([full.grad, torch.zeros(BATCH, SEQ, columns - vocab, dtype=torch.float64)], -1)
        for chunk_size in CHUNK_SIZES:
            per_rank = [results[name, chunk_size] for results, _ in outputs]
            for logp, entropy, _ in per_rank:
                torch.testing.assert_close(torch.from_numpy(logp).double(), ref_logp.detach(), atol=3e-6,
                                           rtol=1e-6, msg=lambda m: f"{name}: {m}")
                torch.testing.assert_close(torch.from_numpy(entropy).double(), ref_entropy.detach(), atol=3e-6,
                                           rtol=1e-6, msg=lambda m: f"{name}: {m}")
            grad = torch.cat([torch.from_numpy(g) for _, _, g in per_rank], dim=-1)  # [B, T, V] side by side
            torch.testing.assert_close(grad.double(), ref_grad, atol=3e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
