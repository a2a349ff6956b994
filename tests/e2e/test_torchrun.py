"""`torchrun --nproc_per_node=2 examples/pretrain_s2l.py --config ...` as a user runs it on CPU.

The learner at TP=2 and both vLLM engines at tensor_parallel_size 2, colocated on the job's two ranks
(vLLM's external launcher). The run must finish, write TensorBoard events with the documented tags and
save its final checkpoint. The entry script uses the real math reward, which random models never earn.
"""

from __future__ import annotations

import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_s2l.learner.checkpoint import checkpoint_dir, latest_step
from tests.e2e.conftest import job_env, tiny_config, torchrun_command, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.distributed]

STEPS = 2
TAGS = ("reward/mean", "schedule/explorer_share", "train/kl", "train/clip_frac_low", "train/clip_frac_high",
        "train/entropy", "train/token_mult_prob_error", "rollout/tokens_per_s", "time/rollout", "time/logprobs",
        "time/train", "time/refit")


def tp2_config(family, tmp_path, **sections) -> dict:
    """The tiny family trained at learner TP=2 with TP=2 engines, logging and saving under `tmp_path`."""
    cfg = tiny_config(family, train_steps=STEPS, parallel={"tensor_model_parallel_size": 2},
                      logging={"tensorboard_dir": str(tmp_path / "tb")},
                      checkpoint={"save_dir": str(tmp_path / "ckpt"), "save_interval": 1}, **sections)
    cfg["learner_engine"] = cfg["learner_engine"] | {"tensor_parallel_size": 2}
    cfg["explorer"]["engine"] = cfg["explorer"]["engine"] | {"tensor_parallel_size": 2}
    return cfg


def test_torchrun_two_ranks_tp2_logs_and_saves(tiny_family, tmp_path):
    config = write_config(tp2_config(tiny_family, tmp_path), tmp_path / "run.yaml")
    done = subprocess.run(torchrun_command(config), env=job_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count(f"trained steps 1-{STEPS}: training reward") == 1  # the summary, first rank only

    assert latest_step(tmp_path / "ckpt") == STEPS
    assert (checkpoint_dir(tmp_path / "ckpt", STEPS) / "metadata.json").is_file()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    missing = [tag for tag in TAGS if tag not in scalars]
    assert not missing, (missing, scalars)
    assert [e.step for e in events.Scalars("reward/mean")] == list(range(1, STEPS + 1))
    assert [e.value for e in events.Scalars("schedule/explorer_share")] == [1.0, 0.5]  # T_mix=3, linear
    # Trainer vs engine probability ratio on learner tokens: none at step 1 (explorer only), ~1 at step 2 (fp32).
    prob_error = events.Scalars("train/token_mult_prob_error")
    assert [e.step for e in prob_error] == [2] and abs(prob_error[0].value - 1.0) < 1e-3, prob_error


def test_a_config_mistake_under_torchrun_is_printed_once(tmp_path):
    """Both ranks find the mistake; the first prints it and ends the job before the other's wait is over."""
    config = write_config({"schedule": {"t_mixx": 4}}, tmp_path / "run.yaml")
    done = subprocess.run(torchrun_command(config), env=job_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("pretrain_s2l.py: error: 3 problems:") == 1, done.stderr[-3000:]
    assert done.stderr.count("schedule.t_mixx: unknown key; did you mean 't_mix'?") == 1
    assert "(rank 1)" not in done.stderr and "exitcode  : 2" in done.stderr  # the first rank's status 2 ended it
