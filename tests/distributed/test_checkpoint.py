"""Checkpoints: save at TP=2, resume at TP=1 x PP=2 and continue the same loss curve.

The first job trains 2 calls, saves (model, Adam state, LR warmup/cosine schedule, reference model,
state dict, RNG), trains 3 more calls, then leaves a half-written later checkpoint behind as a crash
would. The second job, on another layout, must resume from the complete one: same step and state,
same RNG draws, same log-probs, the same 3 remaining losses; then it saves over the broken directory.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from megatron_s2l.config import FP8Config, ParallelConfig
from tests.distributed.test_learner import LOSS, MODEL, OPTIM, SEED, make_batch
from tests.multiprocess import run_ranks

SCHEDULED = dataclasses.replace(OPTIM, lr_warmup_steps=4, lr_decay_steps=40, lr_decay_style="cosine", min_lr=1e-3)
TIMEOUT = 240


def _learner(tp: int, pp: int):
    from megatron_s2l.learner.step import Learner

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Learner(MODEL, parallel, SCHEDULED, LOSS, FP8Config(), seed=SEED, with_reference=True)


def _draws() -> list[float]:
    return [random.random(), float(np.random.rand()), torch.rand(()).item()]


def _save_then_continue(rank, world_size, root):
    from megatron_s2l.learner.checkpoint import checkpoint_dir, save_checkpoint

    learner = _learner(tp=2, pp=1)
    batch = make_batch()
    batch.old_logprobs = learner.logprobs(batch)
    batch.ref_logprobs = learner.logprobs(batch, reference=True)
    curve = [learner.train(batch)["loss"] for _ in range(2)]
    save_checkpoint(root, 2, learner, state={"data_position": 7})
    saved = {"draws": _draws(), "logprobs": learner.logprobs(batch)}
    with pytest.raises(ValueError, match="already the latest"):
        save_checkpoint(root, 2, learner, state={})
    curve += [learner.train(batch)["loss"] for _ in range(3)]
    if rank == 0:  # a crash while writing step 3: its directory exists, `latest` still names step 2
        checkpoint_dir(root, 3).mkdir()
        (checkpoint_dir(root, 3) / "__0_0.distcp").write_bytes(b"partial")
    return {"old": batch.old_logprobs, "ref": batch.ref_logprobs, "curve": curve, **saved}


def _resume(rank, world_size, root, first):
    from megatron_s2l.learner.checkpoint import latest_step, load_checkpoint, save_checkpoint

    first = first
    learner = _learner(tp=1, pp=2)
    assert load_checkpoint(f"{root}/empty", learner) is None
    assert load_checkpoint(root, learner) == (2, {"data_position": 7})
    draws = _draws()
    batch = make_batch()
    batch.old_logprobs, batch.ref_logprobs = first["old"], first["ref"]
    resumed = {"draws": draws, "logprobs": learner.logprobs(batch), "ref": learner.logprobs(batch, reference=True),
               "curve": [learner.train(batch)["loss"] for _ in range(3)]}
    save_checkpoint(root, 3, learner, state={"data_position": 9})
    assert latest_step(root) == 3 and load_checkpoint(root, learner) == (3, {"data_position": 9})
    return resumed


@pytest.mark.distributed
def test_save_at_tp2_resume_at_tp1_pp2_continues_the_curve(tmp_path):
    first = run_ranks(_save_then_continue, 2, str(tmp_path), timeout=TIMEOUT)[0]
    assert (tmp_path / "latest").read_text() == "2\n"
    resumed = run_ranks(_resume, 2, str(tmp_path), first, timeout=TIMEOUT)
    first = first
    scored = first["old"] != 0  # positions the learner computed
    for run in resumed:
        assert run["draws"] == first["draws"]  # RNG of rank 0 restored
        torch.testing.assert_close(run["logprobs"][scored], first["logprobs"][scored], rtol=0, atol=2e-5)
        torch.testing.assert_close(run["ref"][scored], first["ref"][scored], rtol=0, atol=2e-5)
        torch.testing.assert_close(torch.tensor(run["curve"]), torch.tensor(first["curve"][2:]), rtol=0, atol=5e-5)
    assert first["curve"][-1] < first["curve"][0] - 0.02  # training moved: the comparison is not vacuous
