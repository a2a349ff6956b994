"""Submitting examples/slurm/s2l_multinode.sbatch through the Slurm shims of this folder (sbatch, srun,
scontrol on PATH), as a user submits it from the checkout: shared by the template's unit and e2e tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "slurm" / "s2l_multinode.sbatch"
FAKES = Path(__file__).resolve().parent
# Settings of the template that the test's own environment must not leak into a job.
TEMPLATE_SETTINGS = ("S2L_CONFIG", "S2L_ENTRY", "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "NPROC_PER_NODE",
                     "SLURM_RESTART_COUNT", "FAKE_RESTART_COUNT", "FAKE_SRUN_DRY")


def sbatch_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of `sbatch` through the shims: calls logged to tmp_path/slurm_calls.log, RUN_DIR
    tmp_path/run (the "shared storage"), one thread per rank, and the template settings given in `env`."""
    base = {key: value for key, value in os.environ.items() if key not in TEMPLATE_SETTINGS}
    return base | {"PATH": f"{FAKES}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                   "FAKE_SLURM_LOG": str(tmp_path / "slurm_calls.log"), "RUN_DIR": str(tmp_path / "run"),
                   "OMP_NUM_THREADS": "1"} | env


def submit(tmp_path: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run `sbatch TEMPLATE args` to completion (the shim waits for the job) from the checkout."""
    return subprocess.run(["sbatch", str(TEMPLATE), *args], cwd=ROOT, env=sbatch_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=timeout)


def srun_calls(tmp_path: Path) -> list[str]:
    """The srun command lines the jobs under `tmp_path` issued, in order."""
    return [line for line in (tmp_path / "slurm_calls.log").read_text().splitlines() if line.startswith("srun ")]
