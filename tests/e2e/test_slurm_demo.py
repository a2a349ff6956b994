"""examples/slurm/s2l_multinode.sbatch launching the real entry script, preempted, requeued and resumed.

The Slurm shims (tests/fakes) stand in for a one-node allocation with 2 "GPUs": the template starts
torchrun with 2 ranks running examples/pretrain_s2l.py on the tiny family (learner TP=2, colocated TP=2
engines, 2 steps, a checkpoint every step). Once step 1's checkpoint is complete the whole job is killed,
as a preemption kills a node's processes; the requeued job (same command line, SLURM_RESTART_COUNT=1)
must resume from step 1, run only step 2 and leave per-restart logs on the run directory (the shared
storage). TensorBoard tells which steps each job ran: one event file per job (and per torchrun restart).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_s2l.learner.checkpoint import checkpoint_dir, latest_step
from tests.e2e.conftest import _free_port, tiny_config, write_config
from tests.fakes.slurm import ROOT, TEMPLATE, sbatch_env, srun_calls, submit

TIMEOUT_S = 240  # per job; the whole test is capped below
pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.distributed, pytest.mark.timeout(2 * TIMEOUT_S + 60)]


def _steps_per_job(tensorboard_dir: Path) -> list[list[int]]:
    """The steps each job logged, one list per event file, oldest job first."""
    jobs = []
    for events_file in sorted(tensorboard_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        events = EventAccumulator(str(events_file))
        events.Reload()
        jobs.append([event.step for event in events.Scalars("reward/mean")])
    return jobs


def _kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the job and every process under it (sbatch, srun, torchrun, ranks and their helpers)."""
    tree = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in tree:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    job.wait(timeout=30)


def test_sbatch_runs_the_demo_entry_and_a_requeue_resumes(tiny_family, tmp_path):
    cfg = tiny_config(tiny_family, train_steps=2, parallel={"tensor_model_parallel_size": 2},
                      checkpoint={"save_interval": 1})
    for engine in (cfg["learner_engine"], cfg["explorer"]["engine"]):
        engine["tensor_parallel_size"] = 2
    settings = {"S2L_CONFIG": str(write_config(cfg, tmp_path / "run.yaml")), "FAKE_GPUS": "2"}
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    # The first job, preempted once step 1 is saved (output to files: killed ranks' helpers may hold pipes).
    with (tmp_path / "job1.out").open("w") as out:
        job = subprocess.Popen(["sbatch", str(TEMPLATE)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env=sbatch_env(tmp_path, MASTER_PORT=str(_free_port()), **settings))
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while latest_step(checkpoints) != 1:
            assert job.poll() is None, (tmp_path / "job1.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 1 was not saved in time"
            time.sleep(0.1)
    finally:
        _kill_job(job)
    assert latest_step(checkpoints) == 1

    requeued = submit(tmp_path, timeout=TIMEOUT_S, MASTER_PORT=str(_free_port()), FAKE_RESTART_COUNT="1", **settings)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "s2l: job 4242 restart 1 on 1 node(s)" in requeued.stdout

    assert latest_step(checkpoints) == 2 and (checkpoint_dir(checkpoints, 2) / "metadata.json").is_file()
    # The preempted job logged step 1; the requeued one step 2 only (torchrun's own restart of a failed
    # attempt, --max-restarts=1, would add one more file, again from step 2: never from the start).
    first_job, *requeued_attempts = _steps_per_job(run / "tensorboard")
    assert first_job == [1] and requeued_attempts and all(steps == [2] for steps in requeued_attempts)
    first_log = (run / "logs" / "s2l-po-4242-node0-restart0.log").read_text()
    second_log = (run / "logs" / "s2l-po-4242-node0-restart1.log").read_text()
    assert "S2L-PO" in first_log and "trained" not in first_log  # preempted before it finished
    assert "trained steps 2-2: training reward" in second_log
    calls = srun_calls(tmp_path)
    assert len(calls) == 2 and all(f"{ROOT}/examples/pretrain_s2l.py --config {settings['S2L_CONFIG']} --save "
                                   f"{checkpoints} --load {checkpoints}" in call for call in calls)
