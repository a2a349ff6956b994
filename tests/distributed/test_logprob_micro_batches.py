"""`optim.logprob_micro_batch_size` sizes the forward-only log-prob passes; training keeps `micro_batch_size`.

A one-process Learner records every call of megatron-core's schedule. On the 10-row batch of
test_learner.py, with micro_batch_size 3: the log-prob passes run ceil(10/4) = 3 micro-batches at
logprob_micro_batch_size 4 and ceil(10/3) = 4 with it unset (0), while the training step of a mini-batch
of 10 rows runs 4 micro-batches either way. The log-probs agree whatever the cut.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig
from tests.distributed.test_learner import GROUP_SIZES, MODEL, SEED, make_batch
from tests.multiprocess import run_ranks

TIMEOUT = 180


def _schedule_calls(rank, world_size, logprob_micro_batch_size):
    """(log-probs, reference log-probs, the schedule calls as (forward_only, micro-batches, rows))."""
    import megatron_s2l.learner.step as step

    calls = []
    real = step.get_forward_backward_func

    def recording():
        schedule = real()

        def record(**kwargs):
            calls.append((kwargs["forward_only"], kwargs["num_microbatches"], kwargs["micro_batch_size"]))
            return schedule(**kwargs)
        return record

    step.get_forward_backward_func = recording
    optim = OptimConfig(lr=1e-2, mini_batch_prompts=len(GROUP_SIZES), micro_batch_size=3,
                        logprob_micro_batch_size=logprob_micro_batch_size)
    learner = step.Learner(MODEL, ParallelConfig(), optim, LossConfig(kl_coef=0.05), FP8Config(), seed=SEED,
                           with_reference=True)
    batch = make_batch()
    logprobs = learner.logprobs(batch)
    batch.ref_logprobs = learner.logprobs(batch, reference=True)
    learner.train(batch)  # one mini-batch, one epoch: its old log-probs come from its own training pass
    return logprobs, batch.ref_logprobs, calls


@pytest.mark.distributed
def test_log_prob_passes_take_their_own_micro_batch_size():
    rows = sum(GROUP_SIZES)
    assert rows == 10
    (set_lp, set_ref, set_calls), = run_ranks(_schedule_calls, 1, 4, timeout=TIMEOUT)
    (unset_lp, unset_ref, unset_calls), = run_ranks(_schedule_calls, 1, 0, timeout=TIMEOUT)
    assert set_calls == [(True, math.ceil(rows / 4), 4)] * 2 + [(False, math.ceil(rows / 3), 3)]
    assert unset_calls == [(True, math.ceil(rows / 3), 3)] * 2 + [(False, math.ceil(rows / 3), 3)]
    mask = make_batch().response_mask
    assert set_lp[mask].abs().min() > 0  # real log-probs on every scored position
    torch.testing.assert_close(set_lp, unset_lp, rtol=0, atol=1e-6)
    torch.testing.assert_close(set_ref, unset_ref, rtol=0, atol=1e-6)
