"""Launch examples/pretrain_s2l.py with NeMo-Run: locally through torchrun, or on Slurm.

NeMo-Run (`pip install "nemo-run==0.11.1" "leptonai<0.47"`, the `nemo` extra) is imported only when a
function here is called. The job is a `run.Script` (the training script and its arguments), so a run
launched here is exactly `torchrun ... examples/pretrain_s2l.py ARGS`, with the same flags and `key=value`
overrides as by hand. The CLI is tools/launch_nemo_run.py.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from megatron_s2l.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path("examples") / "pretrain_s2l.py"
INSTALL_HINT = 'pip install "nemo-run==0.11.1" "leptonai<0.47"  (or pip install -e ".[nemo]")'


def import_nemo_run():
    """The `nemo_run` module, or ImportError saying how to install it."""
    try:
        import nemo_run
    except ImportError as err:
        raise ImportError(f"NeMo-Run launch needs nemo_run ({err}); install it with {INSTALL_HINT}") from err
    return nemo_run


def training_args(config: Optional[str], run_dir: Optional[str], extra: Sequence[str] = ()) -> list[str]:
    """Arguments of examples/pretrain_s2l.py: the config, then (with a run directory) checkpoints saved to
    and resumed from the same place plus TensorBoard there, then `extra` flags and key=value overrides."""
    args = ["--config", str(config)] if config else []
    if run_dir:
        checkpoints = f"{run_dir}/checkpoints"
        args += ["--save", checkpoints, "--load", checkpoints, "--tensorboard-dir", f"{run_dir}/tensorboard"]
    return args + list(extra)


def pretrain_script(args: Sequence[str] = (), *, repo_dir: str | Path = REPO, entry: str | Path | None = None,
                    env: Optional[Mapping[str, str]] = None):
    """`run.Script` running the training script of the checkout at `repo_dir` (a path on the machines that
    run it) with `args` (see `training_args`); `entry` replaces examples/pretrain_s2l.py."""
    run = import_nemo_run()
    path = Path(entry) if entry else Path(repo_dir) / ENTRY
    return run.Script(path=str(path), entrypoint="python", args=list(args), env=dict(env or {}))


def local_executor(nproc_per_node: int, *, env: Optional[Mapping[str, str]] = None):
    """`run.LocalExecutor` starting `nproc_per_node` ranks on this machine with torchrun.

    torchrun is taken from this interpreter's environment (its bin directory goes first on PATH), so a
    virtual environment need not be activated.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"nproc_per_node={nproc_per_node}: must be >= 1 (ranks on this machine)")
    run = import_nemo_run()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                             env_vars={"PATH": path, **dict(env or {})})


def slurm_executor(*, account: str, partition: Optional[str], nodes: int, gpus_per_node: int, job_dir: str,
                   time: str = "04:00:00", container_image: Optional[str] = None,
                   container_mounts: Sequence[str] = (), retries: int = 0, ssh_host: Optional[str] = None,
                   ssh_user: Optional[str] = None, env: Optional[Mapping[str, str]] = None):
    """`run.SlurmExecutor` for `nodes` x `gpus_per_node` ranks under torchrun (one Slurm task per node).

    `job_dir` is on the cluster's shared storage (sbatch scripts and logs go there). Submission is local
    (run on a login node) or through SSH with `ssh_host`/`ssh_user`. With `container_image` the ranks run in
    that pyxis image, with `container_mounts` ("src:dst"). `retries` requeues a failed or preempted job that
    many times; the training script resumes from its latest checkpoint when --load names the save directory.
    """
    errors = [f"{name}={value}: must be >= 1" for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node))
              if value < 1]
    if retries < 0:
        errors.append(f"retries={retries}: must be >= 0")
    if not account:
        errors.append("account is empty: Slurm needs the account to charge (sbatch --account)")
    if errors:
        raise ConfigError(errors)
    run = import_nemo_run()
    tunnel = (run.SSHTunnel(host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir)
              if ssh_host else run.LocalTunnel(job_dir=job_dir))
    # The code is not packaged: the script path names the checkout on shared storage (see pretrain_script).
    return run.SlurmExecutor(account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
                             gpus_per_node=gpus_per_node, time=time, container_image=container_image,
                             container_mounts=list(container_mounts), launcher="torchrun", retries=retries,
                             packager=run.Packager(), tunnel=tunnel, env_vars=dict(env or {}))


def run_job(script: Any, executor: Any, *, name: str = "s2l-po", base_dir: Optional[str] = None,
            detach: bool = False) -> Path:
    """Run `script` on `executor` as a NeMo-Run experiment; return the experiment directory (logs inside).

    Waits for the job unless `detach`; raises RuntimeError naming the directory if it did not succeed.
    """
    run = import_nemo_run()
    with run.Experiment(name, executor=executor, base_dir=base_dir, log_level="WARN") as exp:
        exp.add(script, name=name)
        exp.run(sequential=True, detach=detach, tail_logs=False)
    # Leaving the experiment waits for a non-detached job and records its final torchx AppState.
    exp_dir = Path(exp._exp_dir)  # NeMo-Run has no public accessor for it
    state = exp.jobs[0].state.name
    if not detach and state != "SUCCEEDED":
        raise RuntimeError(f"NeMo-Run job {name!r} ended {state}; logs under {exp_dir}")
    return exp_dir


def render_sbatch(script: Any, executor: Any, *, name: str = "s2l-po", base_dir: Optional[str] = None) -> str:
    """The sbatch script NeMo-Run would submit for `script` on a SlurmExecutor (a dry run: nothing runs)."""
    run = import_nemo_run()
    with run.Experiment(name, executor=executor, base_dir=base_dir, log_level="WARN") as exp:
        exp.add(script, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        exp_dir = Path(exp._exp_dir)
    rendered = sorted(exp_dir.glob("*_sbatch.sh"))
    text = rendered[0].read_text() if len(rendered) == 1 else None
    shutil.rmtree(exp_dir)
    if text is None:
        raise ValueError(f"render_sbatch needs a run.SlurmExecutor, got {type(executor).__name__} "
                         f"(no sbatch script was rendered)")
    return text
