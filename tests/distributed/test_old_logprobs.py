"""Old log-probs taken inside the training pass equal the separate pass they replace.

Two Learners with the same weights train on the same batch: one given old log-probs by a separate
`Learner.logprobs` pass before `train` (the path every on-policy PPO step used to take), one left to take
them itself (`batch.old_logprobs=None`). Their loss, metrics and gradients agree within 1e-6 when the
update is exactly on-policy (one mini-batch, one epoch), with no row scored by a separate pass. With
several mini-batches or epochs the later updates are off-policy: their rows are still scored before
the first update, shown by a PPO ratio away from 1 (a training pass's own log-probs would give exactly 1).
Each layout runs on real gloo ranks: TP=1 in one process, TP=2 and PP=2 in two.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig
from tests.distributed.test_learner import GROUP_SIZES, MODEL, SEED, make_batch, sharded_grads
from tests.multiprocess import run_ranks

# TIS makes the old log-probs reach the loss twice (ratio and rho); KL and entropy terms as in training
LOSS = LossConfig(kl_coef=0.05, kl_type="k3", entropy_coef=0.01, importance_correction="tis", tis_cap=1.5)
CASES = {  # name: (mini_batch_prompts, ppo_epochs)
    "one_mini_batch": (len(GROUP_SIZES), 1),
    "three_mini_batches": (2, 1),  # groups 2 + 2 + 1: rows of the last two are scored before the first update
    "two_epochs": (len(GROUP_SIZES), 2),
}
TIMEOUT = 240


def _learner(parallel: ParallelConfig, optim: OptimConfig, weights=None):
    from megatron_s2l.learner.step import Learner

    learner = Learner(MODEL, parallel, optim, LOSS, FP8Config(), seed=SEED, with_reference=True)
    if weights is not None:
        learner.model_chunks[0].load_state_dict(weights)
        learner.update_reference()
    return learner


def _both_paths(rank, world_size, tp, pp):
    """Per case: metrics and gradients of `train` with old log-probs given, then taken by the learner."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    out = {}
    for name, (prompts, epochs) in CASES.items():
        optim = OptimConfig(lr=1e-2, clip_grad=1.0, mini_batch_prompts=prompts, micro_batch_size=3, ppo_epochs=epochs)
        separate = _learner(parallel, optim)
        taken = _learner(parallel, optim, weights=separate.model_chunks[0].state_dict())
        batch = make_batch()
        batch.ref_logprobs = separate.logprobs(batch, reference=True)
        given = dataclasses.replace(batch, old_logprobs=separate.logprobs(batch))
        runs = {}
        for path, learner, train_batch in (("separate", separate, given), ("taken", taken, batch)):
            metrics = learner.train(train_batch)
            runs[path] = {"metrics": metrics, "grads": [piece for _, _, piece in sharded_grads(learner.model_chunks[0])],
                          "after": learner.logprobs(batch)}
        out[name] = runs
    return out


def _check(runs_per_rank: list[dict]) -> None:
    batch = make_batch()
    later_rows = sum(GROUP_SIZES[2:])
    for run in runs_per_rank:
        for name, runs in run.items():
            separate, taken = runs["separate"], runs["taken"]
            expected_rows = {"one_mini_batch": 0, "three_mini_batches": later_rows, "two_epochs": batch.size}[name]
            assert taken["metrics"]["old_logprob_rows"] == expected_rows, name
            assert separate["metrics"]["old_logprob_rows"] == 0, name  # given: nothing scored by train
            metrics = {k: v for k, v in separate["metrics"].items() if k != "old_logprob_rows"}
            assert metrics.keys() == taken["metrics"].keys() - {"old_logprob_rows"}
            for key, value in metrics.items():
                assert taken["metrics"][key] == pytest.approx(value, rel=0, abs=1e-6), f"{name}: {key}"
            for mine, theirs in zip(taken["grads"], separate["grads"]):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=f"{name}: gradient")
            torch.testing.assert_close(taken["after"], separate["after"], rtol=0, atol=1e-5, msg=name)
            if name == "one_mini_batch":  # exactly on-policy: the ratio is 1
                assert metrics["ratio_max"] == pytest.approx(1.0, abs=1e-6)
            else:  # updates after the first one moved the policy away from the old log-probs they were given
                assert metrics["ratio_max"] > 1.001, name
            assert metrics["token_mult_prob_error"] > 1.1, name  # random behaviour log-probs: far from 1


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_old_logprobs_in_pass_match_a_separate_pass(tp, pp):
    _check(run_ranks(_both_paths, tp * pp, tp, pp, timeout=TIMEOUT))
