"""NeMo-Run launch: a real 2-rank torchrun job through run.LocalExecutor, and the sbatch script a
run.SlurmExecutor renders in a dry run. The entry script is the probe of tests/fakes (joins the gloo group,
reports its environment and arguments), so the launch itself is what is tested, quickly."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2l.config import ConfigError
from megatron_s2l.launch import nemo_run as launch

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "fakes" / "probe_entry.py"
needs_nemo_run = pytest.mark.skipif(importlib.util.find_spec("nemo_run") is None,
                                    reason=f"nemo_run is not installed: {launch.INSTALL_HINT}")


@pytest.fixture
def devnull_stdin(monkeypatch):
    """NeMo-Run runs `mkdir` through invoke, which reads stdin: pytest's captured stdin refuses reads."""
    with open(os.devnull) as null:
        monkeypatch.setattr(sys, "stdin", null)
        yield


def test_training_args_resume_from_the_run_directory():
    assert launch.training_args("c.yaml", "/r", ["--lr", "1e-6", "schedule.t_mix=4"]) == [
        "--config", "c.yaml", "--save", "/r/checkpoints", "--load", "/r/checkpoints",
        "--tensorboard-dir", "/r/tensorboard", "--lr", "1e-6", "schedule.t_mix=4"]
    assert launch.training_args(None, None, ["x=1"]) == ["x=1"]


def test_slurm_executor_rejects_bad_sizes_before_importing_anything():
    with pytest.raises(ConfigError) as caught:
        launch.slurm_executor(account="", partition=None, nodes=0, gpus_per_node=8, job_dir="/j", retries=-1)
    assert [p.split(":")[0] for p in caught.value.problems] == ["nodes=0", "retries=-1", "account is empty"]


def test_missing_nemo_run_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # what `import nemo_run` sees when it is absent
    with pytest.raises(ImportError, match=r'install it with pip install "nemo-run==0.11.1" "leptonai<0.47"'):
        launch.pretrain_script([])


def test_cli_splits_launcher_options_from_training_arguments():
    spec = importlib.util.spec_from_file_location("launch_nemo_run", ROOT / "tools" / "launch_nemo_run.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args, extra = cli.parse_args(["slurm", "--account", "acct", "--nodes", "4", "--job-dir", "/j", "--container-mount",
                                  "/a:/a", "--container-mount", "/b:/b", "--dryrun", "--", "--lr", "1e-6", "x.y=1"])
    assert (args.where, args.account, args.nodes, args.gpus_per_node, args.dryrun) == ("slurm", "acct", 4, 8, True)
    assert args.container_mount == ["/a:/a", "/b:/b"] and extra == ["--lr", "1e-6", "x.y=1"]
    with pytest.raises(SystemExit):  # --nproc-per-node is required for local runs
        cli.parse_args(["local"])


@needs_nemo_run
@pytest.mark.distributed
def test_local_executor_runs_a_two_rank_torchrun_job(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    env = {**os.environ, "PROBE_OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "tools/launch_nemo_run.py", "local", "--nproc-per-node", "2", "--entry", str(PROBE),
         "--run-dir", str(tmp_path / "run"), "--base-dir", str(tmp_path / "nemo"), "--", "--train-iters", "2",
         "schedule.t_mix=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NeMo-Run experiment directory: " + str(tmp_path / "nemo" / "experiments" / "s2l-po") in done.stdout

    run = tmp_path / "run"
    expected_args = ["--save", f"{run}/checkpoints", "--load", f"{run}/checkpoints", "--tensorboard-dir",
                     f"{run}/tensorboard", "--train-iters", "2", "schedule.t_mix=4"]
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["argv"] == expected_args
        assert report["env"]["RANK"] == str(rank) and report["env"]["WORLD_SIZE"] == "2"
        assert report["env"]["MASTER_ADDR"]
        assert report["all_reduce"] == 3.0  # (0 + 1) + (1 + 1): one real gloo group of two ranks
    logs = "".join(p.read_text() for p in (tmp_path / "nemo").rglob("*.log"))
    assert "probe rank 0/2 all_reduce=3" in logs and "probe rank 1/2 all_reduce=3" in logs


@needs_nemo_run
def test_slurm_executor_renders_a_multinode_torchrun_sbatch_script(tmp_path, devnull_stdin):
    args = launch.training_args("examples/configs/paper_qwen3_1p7b_to_8b.yaml", "/lustre/me/s2l-8b", ["--lr", "1e-6"])
    script = launch.pretrain_script(args, repo_dir="/lustre/me/megatron-s2l")
    executor = launch.slurm_executor(account="acct", partition="batch", nodes=2, gpus_per_node=8,
                                     job_dir=str(tmp_path / "jobs"), container_image="nvcr.io/nvidia/pytorch:25.01-py3",
                                     container_mounts=["/lustre:/lustre"], retries=2)
    text = launch.render_sbatch(script, executor, base_dir=str(tmp_path / "nemo"))
    lines = text.splitlines()
    for line in ("#SBATCH --account=acct", "#SBATCH --partition=batch", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00",
                 "# Run with: sbatch --requeue --parsable", "export TORCHX_MAX_RETRIES=2",
                 "nodes=( $( scontrol show hostnames $SLURM_JOB_NODELIST ) )"):
        assert line in lines, f"{line!r} missing from:\n{text}"
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert "--container-mounts /lustre:/lustre," in srun
    assert ("torchrun --rdzv-backend c10d --rdzv-endpoint $head_node_ip:29500 ") in srun
    assert "--nnodes 2 --nproc-per-node 8 --node-rank $SLURM_NODEID" in srun
    assert srun.endswith("/lustre/me/megatron-s2l/examples/pretrain_s2l.py --config "
                         "examples/configs/paper_qwen3_1p7b_to_8b.yaml --save /lustre/me/s2l-8b/checkpoints --load "
                         "/lustre/me/s2l-8b/checkpoints --tensorboard-dir /lustre/me/s2l-8b/tensorboard --lr 1e-6")
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert not (tmp_path / "nemo" / "experiments" / "s2l-po").exists() or not any(
        (tmp_path / "nemo" / "experiments" / "s2l-po").iterdir())  # the dry run leaves nothing behind


@needs_nemo_run
def test_render_sbatch_refuses_a_local_executor(tmp_path, devnull_stdin):
    script = launch.pretrain_script([], entry=str(PROBE))
    with pytest.raises(ValueError, match="needs a run.SlurmExecutor, got LocalExecutor"):
        launch.render_sbatch(script, launch.local_executor(1), base_dir=str(tmp_path))
