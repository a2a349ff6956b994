"""examples/slurm/s2l_multinode.sbatch rendered on one machine through the Slurm shims (tests/fakes).

With FAKE_SRUN_DRY=1 srun records its command line and runs nothing: the launch the template renders
is asserted exactly. tests/e2e/test_slurm_demo.py runs the same template for real (2-rank torchrun job
of examples/pretrain_s2l.py, requeue and resume).
"""

from __future__ import annotations

from tests.fakes.slurm import ROOT, TEMPLATE, srun_calls, submit

CONFIG = "examples/configs/paper_qwen3_1p7b_to_8b.yaml"


def _submit_dry(tmp_path, *args, **env):
    """sbatch through the shims with an srun that records its command line and runs nothing."""
    return submit(tmp_path, *args, FAKE_SRUN_DRY="1", **env)


def test_template_renders_the_megatron_lm_launch(tmp_path):
    port = 29555  # nothing listens: srun runs nothing
    done = _submit_dry(tmp_path, "--train-iters", "2", "schedule.t_mix=4", S2L_CONFIG=CONFIG, MASTER_PORT=str(port))
    assert done.returncode == 0, done.stdout + done.stderr

    run = tmp_path / "run"
    entry = ROOT / "examples" / "pretrain_s2l.py"
    expected_args = ["--config", CONFIG, "--save", f"{run}/checkpoints", "--load", f"{run}/checkpoints",
                     "--tensorboard-dir", f"{run}/tensorboard", "--train-iters", "2", "schedule.t_mix=4"]
    # The exact command the template renders: one srun task per node, torchrun per Megatron-LM conventions,
    # nproc from the GPUs the (fake) allocation has (2), the rendezvous on the head node from scontrol.
    launch = (f"srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 "
              f"--output={run}/logs/%x-%j-node%n-restart0.log "
              f"bash -c 'exec \"$0\" --node-rank=\"$SLURM_NODEID\" \"$@\"' "
              f"torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:{port} "
              f"--rdzv-id=4242 --max-restarts=1 {entry} " + " ".join(expected_args))
    assert f"s2l: launch: {launch}\n" in done.stdout
    assert "scontrol show hostnames localhost" in (tmp_path / "slurm_calls.log").read_text()
    (call,) = srun_calls(tmp_path)
    assert call.endswith(f"{entry} " + " ".join(expected_args))
    assert (run / "logs").is_dir() and (run / "checkpoints").is_dir()  # created on the shared storage


def test_container_flags_requeue_and_demo_mode(tmp_path):
    done = _submit_dry(tmp_path, FAKE_RESTART_COUNT="1", NPROC_PER_NODE="8",
                   CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.01-py3", CONTAINER_MOUNTS="/lustre:/lustre")
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = srun_calls(tmp_path)
    run = tmp_path / "run"
    assert (f"--output={run}/logs/%x-%j-node%n-restart1.log --container-image=nvcr.io/nvidia/pytorch:25.01-py3 "
            f"--container-workdir={ROOT} --container-mounts=/lustre:/lustre bash -c") in call
    assert "--nproc-per-node=8" in call
    # No S2L_CONFIG: the CPU demo (no --config), still resuming from the run directory.
    assert call.endswith(f"{ROOT}/examples/pretrain_s2l.py --save {run}/checkpoints --load {run}/checkpoints "
                         f"--tensorboard-dir {run}/tensorboard")


def test_mounts_without_an_image_add_no_container_flags(tmp_path):
    done = _submit_dry(tmp_path, CONTAINER_MOUNTS="/lustre:/lustre")
    assert done.returncode == 0, done.stdout + done.stderr
    (call,) = srun_calls(tmp_path)
    assert "--container" not in call


def test_header_follows_megatron_lm_conventions():
    header = [line.split(None, 1)[1] for line in TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in header
    assert "--requeue" in header
    assert any(opt.startswith("--gpus-per-node=") for opt in header)
