"""Per-token log-probs and entropy from vocab-parallel (tensor-parallel sharded) logits.

Each TP rank holds logits for a contiguous slice of the vocabulary, [B, T, V/TP]. Gathering them into
[B, T, V] costs TP times the memory (151,936 x 4 bytes = 0.6 MB per token for Qwen3 in fp32), so
this module reduces per-token statistics instead, as NeMo-RL's `DistributedLogprob` does:

    m      = all_reduce_max(max_v x_v)                      global max, for a stable exp
    S      = all_reduce_sum(sum_v exp(x_v - m))             global partition function, log Z = m + log S
    x_t    = all_reduce_sum(x_target if owned else 0)       the target logit, from the shard that owns it
    E      = all_reduce_sum(sum_v p_v (x_v - m))            E_p[x] - m, only for the entropy
    logp   = x_t - m - log S
    H      = log S - E

The sums (with a count of the shards owning each target, which validates the targets) travel in one
all-reduce. The backward needs no communication: with the per-token m, log S and E saved, each rank
forms the gradient of its own slice,

    d logp / d x_v = onehot_v(target) - p_v
    d H    / d x_v = -p_v (x_v - E_p[x])

With `vocab_size` set, ids >= vocab_size are padding rows (Megatron pads the vocabulary to a multiple of
TP): each shard reads only its columns below `vocab_size`, so padded logits never enter m, S or E and
their gradient is zero, exactly as if the logits ended at the true vocabulary.

Math is fp32 whatever the logits' dtype. Tokens are processed `chunk_size` at a time in forward and
again (recomputing the softmax) in backward, in one or two fp32 [chunk, V/TP] buffers reused by
every chunk; beyond them only the gradient itself, [B, T, V/TP] in the logits' dtype, is allocated.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _shards(group: Optional[dist.ProcessGroup]) -> bool:
    """True when `group` spans more than one rank (None or a size-1 group is a single shard)."""
    return group is not None and dist.get_world_size(group) > 1


def _chunks(num_tokens: int, chunk_size: Optional[int]):
    step = chunk_size or max(num_tokens, 1)
    return ((start, min(start + step, num_tokens)) for start in range(0, num_tokens, step))


def _workspace(logits: Tensor, chunk_size: Optional[int], with_entropy: bool) -> Tensor:
    """fp32 scratch for one chunk, [1 or 2, chunk, V_local], reused by every chunk: on CPU a fresh
    allocation of this size costs more page faults than the arithmetic does."""
    rows = min(chunk_size or logits.shape[0], logits.shape[0])
    return logits.new_empty((2 if with_entropy else 1, rows, logits.shape[-1]), dtype=torch.float32)


def _as_fp32(x: Tensor, scratch: Tensor) -> Tensor:
    """`x` itself when fp32 (read in place: one pass less), else copied into the fp32 `scratch` of its shape.
    Subtracting from low-precision `x` straight into fp32 would cast it into a temporary of scratch's size."""
    return x if x.dtype == torch.float32 else scratch.copy_(x)


def _forward_chunk(x: Tensor, targets: Tensor, group, vocab_start: int, work: Tensor, with_entropy: bool):
    """Statistics of one chunk of tokens: x [n, V_valid] any dtype (this shard's real, unpadded columns;
    possibly none), targets [n] global ids, work the chunk's scratch [1 or 2, n, >= V_valid].

    Returns logp [n], entropy [n] or None, and what the backward needs: m [n], log S [n], E [n] or
    None, and how many shards own each target [n] (1 everywhere for valid targets).
    """
    v_valid = x.shape[-1]
    x = _as_fp32(x, work[0, :, :v_valid])  # [n, V_valid]
    # A shard holding only padding contributes -inf to the max and nothing to the sums.
    m = x.amax(dim=-1) if v_valid else work.new_full(x.shape[:1], float("-inf"))  # [n]
    if _shards(group):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = torch.sub(x, m.unsqueeze(-1), out=work[0, :, :v_valid])  # [n, V_valid] x - m <= 0
    local = targets - vocab_start  # [n]
    owned = (local >= 0) & (local < v_valid)  # [n]
    z_target = (z.gather(-1, local.clamp(0, v_valid - 1).unsqueeze(-1)).squeeze(-1) if v_valid
                else torch.zeros_like(m))  # [n]
    if with_entropy:
        e = torch.exp(z, out=work[1, :, :v_valid])  # [n, V_valid]
        rows = [e.sum(dim=-1), e.mul_(z).sum(dim=-1)]  # 2 x [n] sum_v e_v and sum_v e_v z_v
    else:
        rows = [z.exp_().sum(dim=-1)]  # [n]
    stats = torch.stack(rows + [torch.where(owned, z_target, 0.0), owned.float()])  # [3 or 4, n]
    if _shards(group):
        dist.all_reduce(stats, group=group)
    log_s = stats[0].log()  # [n]
    logp = stats[-2] - log_s  # [n]
    expectation = stats[1] / stats[0] if with_entropy else None  # [n] E_p[z]
    entropy = log_s - expectation if with_entropy else None  # [n]
    return logp, entropy, m, log_s, expectation, stats[-1]


class _VocabParallelLogprobs(torch.autograd.Function):
    """Log-probs (and entropy) of flattened tokens; logits [N, V_local], targets [N]; only the first
    `v_valid` columns of the shard are vocabulary (the rest is padding)."""

    @staticmethod
    def forward(ctx, logits, targets, group, vocab_start, v_valid, chunk_size, with_entropy):
        n = logits.shape[0]
        logp = logits.new_empty(n, dtype=torch.float32)  # [N]
        entropy = logits.new_empty(n if with_entropy else 0, dtype=torch.float32)  # [N] or [0]
        m, log_s = torch.empty_like(logp), torch.empty_like(logp)  # [N]
        expectation = torch.empty_like(entropy)  # [N] or [0]
        owners = torch.empty_like(logp)  # [N]
        work = _workspace(logits, chunk_size, with_entropy)  # [1 or 2, chunk, V_local]
        for a, b in _chunks(n, chunk_size):
            lp, h, m[a:b], log_s[a:b], ex, owners[a:b] = _forward_chunk(
                logits[a:b, :v_valid], targets[a:b], group, vocab_start, work[:, :b - a], with_entropy)
            logp[a:b] = lp
            if with_entropy:
                entropy[a:b], expectation[a:b] = h, ex
        # One host sync per call, not per chunk: every rank sees the same reduced counts.
        if n and not bool((owners == 1).all()):
            bad = targets[owners != 1].unique()[:5].tolist()
            raise ValueError(f"targets {bad}: not in the vocabulary (each target must be a global id below "
                             f"vocab_size owned by exactly one shard [vocab_start, vocab_start + V_local)); mask "
                             f"them by replacing them with a valid id such as the pad id")
        ctx.save_for_backward(logits, targets, m, log_s, expectation)
        ctx.vocab_start, ctx.v_valid = vocab_start, v_valid
        ctx.chunk_size, ctx.with_entropy = chunk_size, with_entropy
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, m, log_s, expectation = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [N, V_local] in the logits' dtype
        v_valid = ctx.v_valid
        grad[:, v_valid:] = 0  # padded columns are outside the softmax
        log_z = (m + log_s).unsqueeze(-1)  # [N, 1] global log partition function
        centre = (expectation - log_s).unsqueeze(-1) if ctx.with_entropy else None  # [N, 1] E_p[x] - log Z
        work = _workspace(logits, ctx.chunk_size, ctx.with_entropy)  # [1 or 2, chunk, V_local]
        for a, b in _chunks(logits.shape[0], ctx.chunk_size):
            x = _as_fp32(logits[a:b, :v_valid], work[0, :b - a, :v_valid])  # [n, V_valid]
            z = torch.sub(x, log_z[a:b], out=work[0, :b - a, :v_valid])  # [n, V_valid] log p
            g = grad_logp[a:b].unsqueeze(-1)  # [n, 1]
            if ctx.with_entropy:
                p = torch.exp(z, out=work[1, :b - a, :v_valid])  # [n, V_valid] softmax over the full vocabulary
                # -p (g_logp + g_H (x - E_p[x])), formed in place in z
                coef = z.sub_(centre[a:b]).mul_(grad_entropy[a:b].unsqueeze(-1)).add_(g)
                p.mul_(coef).neg_()
            else:
                p = z.exp_().mul_(-g)  # [n, V_valid] -g softmax
            local = targets[a:b] - ctx.vocab_start  # [n]
            owned = (local >= 0) & (local < v_valid)  # [n]
            rows = torch.arange(b - a, device=logits.device)[owned]  # [n_owned]
            p[rows, local[owned]] += grad_logp[a:b][owned]  # the one-hot term of the target's owner
            grad[a:b, :v_valid] = p
        return grad, None, None, None, None, None, None


def vocab_parallel_logprobs(logits: Tensor, targets: Tensor, *, group: Optional[dist.ProcessGroup] = None,
                            vocab_start: int = 0, vocab_size: Optional[int] = None, chunk_size: Optional[int] = None,
                            with_entropy: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log p(target) and entropy of the softmax over the full (sharded) vocabulary.

    logits: [B, T, V_local], this rank's vocabulary slice [vocab_start, vocab_start + V_local), any
    float dtype (the math is fp32). targets: [B, T] global token ids, each owned by exactly one shard.
    group: the tensor-parallel process group over which the vocabulary is split; None (or a group of
    one) means the logits hold the whole vocabulary. vocab_size: the true vocabulary size when the
    sharded logits are padded past it (None: no padding); padded columns are left out of the softmax,
    as if they were -inf, and get zero gradient. chunk_size: tokens processed at a time (None: all
    at once); bounds the fp32 work space to a few [chunk_size, V_local] tensors in forward and backward.
    Returns log-probs [B, T] fp32 and entropy [B, T] fp32 (None unless `with_entropy`), both
    differentiable w.r.t. `logits`. Collective over `group`: every rank must call it with its shard.
    Contiguous logits (what Megatron's GPTModel returns) are used in place; others are copied once.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected logits "
                         f"[B, T, V_local] and targets [B, T]")
    if not logits.is_floating_point() or targets.dtype != torch.long:
        raise ValueError(f"logits dtype {logits.dtype} / targets dtype {targets.dtype}: expected a float "
                         f"dtype and torch.long")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 (tokens per chunk) or None (no chunking)")
    if vocab_start < 0:
        raise ValueError(f"vocab_start={vocab_start}: must be >= 0 (the first global id of this shard)")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 1 (the true, unpadded vocabulary size) or None")
    batch, seq, v_local = logits.shape
    v_valid = v_local if vocab_size is None else min(max(vocab_size - vocab_start, 0), v_local)
    out = _VocabParallelLogprobs.apply(logits.reshape(batch * seq, v_local), targets.reshape(-1), group,
                                       vocab_start, v_valid, chunk_size, with_entropy)
    if with_entropy:
        logp, entropy = out
        return logp.view(batch, seq), entropy.view(batch, seq)
    return out.view(batch, seq), None
