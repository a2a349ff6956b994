"""examples/slurm/s2l_multinode.sbatch, run for real on one machine.

Shims for sbatch/srun/scontrol (tests/fakes) stand in for a one-node allocation; the template then starts a
real torchrun whose entry script (S2L_ENTRY) is a probe that joins the gloo group and reports what it got.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "slurm" / "s2l_multinode.sbatch"
FAKES = ROOT / "tests" / "fakes"
PROBE = FAKES / "probe_entry.py"
CONFIG = "examples/configs/paper_qwen3_1p7b_to_8b.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`sbatch TEMPLATE args` through the shims, from the checkout (as a user submits it)."""
    full_env = {**os.environ, "PATH": f"{FAKES}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                "FAKE_SLURM_LOG": str(tmp_path / "slurm_calls.log"), "RUN_DIR": str(tmp_path / "run"),
                "OMP_NUM_THREADS": "1", **env}
    for name in ("S2L_CONFIG", "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "NPROC_PER_NODE", "SLURM_RESTART_COUNT"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(["sbatch", str(TEMPLATE), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=180)


def _srun_calls(tmp_path: Path) -> list[str]:
    return [line for line in (tmp_path / "slurm_calls.log").read_text().splitlines() if line.startswith("srun ")]


@pytest.mark.distributed
def test_template_launches_a_real_two_rank_torchrun_job(tmp_path):
    port = _free_port()
    out = tmp_path / "probe"
    out.mkdir()
    done = _submit(tmp_path, "--train-iters", "2", "schedule.t_mix=4", S2L_ENTRY=str(PROBE), S2L_CONFIG=CONFIG,
                   MASTER_PORT=str(port), PROBE_OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "run"
    expected_args = ["--config", CONFIG, "--save", f"{run}/checkpoints", "--load", f"{run}/checkpoints",
                     "--tensorboard-dir", f"{run}/tensorboard", "--train-iters", "2", "schedule.t_mix=4"]
    # The exact command the template renders: one srun task per node, torchrun per Megatron-LM conventions,
    # nproc from the GPUs the (fake) allocation has (2), the rendezvous on the head node from scontrol.
    launch = (f"srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 "
              f"--output={run}/logs/%x-%j-node%n-restart0.log "
              f"bash -c 'exec \"$0\" --node-rank=\"$SLURM_NODEID\" \"$@\"' "
              f"torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:{port} "
              f"--rdzv-id=4242 --max-restarts=1 {PROBE} " + " ".join(expected_args))
    assert f"s2l: launch: {launch}\n" in done.stdout
    assert "scontrol show hostnames localhost" in (tmp_path / "slurm_calls.log").read_text()
    assert len(_srun_calls(tmp_path)) == 1

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, report in enumerate(reports):
        assert report["argv"] == expected_args
        assert report["env"]["RANK"] == str(rank) and report["env"]["LOCAL_RANK"] == str(rank)
        assert report["env"]["WORLD_SIZE"] == "2" and report["env"]["LOCAL_WORLD_SIZE"] == "2"
        assert report["env"]["MASTER_ADDR"] == "localhost"
        assert report["env"]["GROUP_RANK"] == "0"
        assert report["all_reduce"] == 3.0  # (0 + 1) + (1 + 1): both ranks joined one group

    # Logs land on the run directory (shared storage), one file per node and restart.
    log = (run / "logs" / "s2l-po-4242-node0-restart0.log").read_text()
    assert "probe rank 0/2 all_reduce=3" in log and "probe rank 1/2 all_reduce=3" in log
    assert (run / "checkpoints").is_dir()


def test_container_flags_requeue_and_demo_mode(tmp_path):
    done = _submit(tmp_path, FAKE_SRUN_DRY="1", FAKE_RESTART_COUNT="1", NPROC_PER_NODE="8",
                   CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3", CONTAINER_MOUNTS="/lustre:/lustre")
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = _srun_calls(tmp_path)
    run = tmp_path / "run"
    assert (f"--output={run}/logs/%x-%j-node%n-restart1.log --container-image=nvcr.io/nvidia/pytorch:25.01-py3 "
            f"--container-workdir={ROOT} --container-mounts=/lustre:/lustre bash -c") in call
    assert "--nproc-per-node=8" in call
    # No S2L_CONFIG: the CPU demo (no --config), still resuming from the run directory.
    assert call.endswith(f"{ROOT}/examples/pretrain_s2l.py --save {run}/checkpoints --load {run}/checkpoints "
                         f"--tensorboard-dir {run}/tensorboard")


def test_mounts_without_an_image_add_no_container_flags(tmp_path):
    done = _submit(tmp_path, FAKE_SRUN_DRY="1", CONTAINER_MOUNTS="/lustre:/lustre")
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = _srun_calls(tmp_path)
    assert "--container" not in call


def test_header_follows_megatron_lm_conventions():
    header = [line.split(None, 1)[1] for line in TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in header
    assert "--requeue" in header
    assert any(opt.startswith("--gpus-per-node=") for opt in header)
