"""SIGKILL one rank mid-step: torchrun restarts the job, it resumes from the last complete checkpoint, and
the final checkpoint equals the uninterrupted run's tensor for tensor.

The fault comes from outside (no hooks in product code): the test watches `<save_dir>/latest` and, once
step 1 is saved, kills one worker (a child of the torchrun agent) while step 2 runs. The runs use the
real entry script and its real math reward (always 0 for random models), so an entropy bonus gives the
updates a non-zero gradient: the weights move every step and a lost or repeated step would show.

The faulty job runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. By default torchrun's c10d rendezvous lets
the workers share the agent's TCPStore across restarts without a per-attempt key prefix, so restarted
workers read the dead attempt's gloo addresses and fail with "Connection refused" (measured here); with
the variable set, every attempt gets a fresh store. Children of the SIGKILLed rank (the reward
subprocess, forked helpers) are not killed by torchrun; the test kills them itself.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
import torch

from megatron_s2l.learner.checkpoint import latest_step
from tests.e2e.conftest import job_env, tiny_config, torchrun_command, write_config
from tests.e2e.test_resume import read_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.distributed]

STEPS = 3
KILL_AFTER_SAVED = 1
TIMEOUT_S = 300


def fault_config(family, save_dir) -> dict:
    """Two ranks at learner TP=2, saving (and resuming from) `save_dir` every step."""
    return tiny_config(family, train_steps=STEPS, parallel={"tensor_model_parallel_size": 2},
                       loss={"kl_coef": 0.1, "entropy_coef": 0.05},
                       checkpoint={"save_dir": str(save_dir), "load_dir": str(save_dir), "save_interval": 1})


def workers(agent: psutil.Process) -> list[psutil.Process]:
    """The training processes torchrun's agent started (its direct children running the entry script)."""
    return [p for p in agent.children() if any("pretrain_s2l.py" in part for part in p.cmdline())]


def stop(processes: list[psutil.Process]) -> None:
    """SIGKILL the given processes of this test's jobs (those still alive)."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_sigkill_one_rank_mid_step_resumes_to_the_same_result(tiny_family, tmp_path):
    clean = write_config(fault_config(tiny_family, tmp_path / "clean"), tmp_path / "clean.yaml")
    done = subprocess.run(torchrun_command(clean), env=job_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-5000:]

    faulty = write_config(fault_config(tiny_family, tmp_path / "faulty"), tmp_path / "faulty.yaml")
    # output to files, not pipes: the killed rank's orphaned children would hold pipes open
    stdout, stderr = tmp_path / "faulty.out", tmp_path / "faulty.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        job = subprocess.Popen(torchrun_command(faulty, max_restarts=1), cwd=tmp_path, stdout=out, stderr=err,
                               env=job_env() | {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    agent, orphans = psutil.Process(job.pid), []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while latest_step(tmp_path / "faulty") != KILL_AFTER_SAVED:
            assert job.poll() is None and time.monotonic() < deadline, "the job ended or stalled before step 1 saved"
            time.sleep(0.1)
        victims = workers(agent)
        assert len(victims) == 2
        orphans = victims[1].children(recursive=True)
        victims[1].send_signal(signal.SIGKILL)  # rank 1, in the middle of step 2
        job.wait(timeout=TIMEOUT_S)
    finally:
        stop(orphans + (agent.children(recursive=True) + [agent] if job.poll() is None else []))
    assert job.returncode == 0, stderr.read_text()[-5000:]
    assert "failed (exitcode: -9) local_rank: 1" in stderr.read_text()  # torchrun saw the kill, then restarted
    assert f"-{STEPS}: training reward" in stdout.read_text()  # the summary of the restarted attempt

    expected = read_checkpoint(tmp_path / "clean", STEPS, tmp_path / "clean.pt")
    got = read_checkpoint(tmp_path / "faulty", STEPS, tmp_path / "faulty.pt")
    initial = read_checkpoint(tmp_path / "clean", KILL_AFTER_SAVED, tmp_path / "initial.pt")
    assert any(not torch.equal(initial[k], expected[k]) for k in expected)  # steps 2-3 changed the weights
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
