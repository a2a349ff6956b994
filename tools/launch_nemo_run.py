"""Launch S2L-PO training (examples/pretrain_s2l.py) with NeMo-Run, on this machine or on a Slurm cluster.

    python tools/launch_nemo_run.py local --nproc-per-node 2 -- --train-iters 4
    python tools/launch_nemo_run.py slurm --account ACCT --partition batch --nodes 4 --gpus-per-node 8 \\
        --job-dir /lustre/$USER/nemo_run --repo-dir /lustre/$USER/megatron-s2l \\
        --config examples/configs/paper_qwen3_1p7b_to_8b.yaml --run-dir /lustre/$USER/s2l-8b \\
        --container-image nvcr.io/nvidia/pytorch:25.01-py3 --container-mount /lustre:/lustre [--dryrun]

Everything after `--` goes to the training script (Megatron-style flags, key=value overrides). With
--run-dir, checkpoints are saved to and resumed from <run-dir>/checkpoints, so a requeued job continues.
--dryrun prints the sbatch script NeMo-Run would submit. S2L_ENTRY, if set, is the default --entry.
Needs NeMo-Run: pip install "nemo-run==0.11.1" "leptonai<0.47".
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_s2l import console
from megatron_s2l.launch import nemo_run as launch


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split `argv` at `--` into launcher options and the training script's arguments."""
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="where", required=True)
    for name in ("local", "slurm"):
        p = sub.add_parser(name)
        p.add_argument("--config", help="YAML config for the training script (default: the CPU demo)")
        p.add_argument("--run-dir", help="checkpoints (saved and resumed) and TensorBoard go here")
        p.add_argument("--entry", default=os.environ.get("S2L_ENTRY"),
                       help="training script (default: <repo-dir>/examples/pretrain_s2l.py)")
        p.add_argument("--name", default="s2l-po", help="experiment name")
        p.add_argument("--base-dir", help="NeMo-Run experiment directory (default: NeMo-Run's home)")
        p.add_argument("--detach", action="store_true", help="return once the job is submitted")
        console.add_verbose_flag(p)
    local = sub.choices["local"]
    local.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this machine")
    slurm = sub.choices["slurm"]
    slurm.add_argument("--account", required=True)
    slurm.add_argument("--partition")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--job-dir", required=True, help="NeMo-Run's job directory on the cluster's shared storage")
    slurm.add_argument("--repo-dir", default=str(launch.REPO), help="this checkout's path on the cluster")
    slurm.add_argument("--container-image", help="pyxis image the ranks run in")
    slurm.add_argument("--container-mount", action="append", default=[], help="SRC:DST, repeatable")
    slurm.add_argument("--retries", type=int, default=0, help="requeue a failed or preempted job this many times")
    slurm.add_argument("--ssh-host", help="submit through SSH to this login node")
    slurm.add_argument("--ssh-user")
    slurm.add_argument("--dryrun", action="store_true", help="print the sbatch script; submit nothing")
    return parser.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    train_args = launch.training_args(args.config, args.run_dir, extra)
    if args.where == "local":
        script = launch.pretrain_script(train_args, entry=args.entry)
        executor = launch.local_executor(args.nproc_per_node)
    else:
        script = launch.pretrain_script(train_args, repo_dir=args.repo_dir, entry=args.entry)
        executor = launch.slurm_executor(
            account=args.account, partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            job_dir=args.job_dir, time=args.time, container_image=args.container_image,
            container_mounts=args.container_mount, retries=args.retries, ssh_host=args.ssh_host,
            ssh_user=args.ssh_user)
        if args.dryrun:
            print(launch.render_sbatch(script, executor, name=args.name, base_dir=args.base_dir))
            return
    exp_dir = launch.run_job(script, executor, name=args.name, base_dir=args.base_dir, detach=args.detach)
    print(f"NeMo-Run experiment directory: {exp_dir}")


if __name__ == "__main__":  # the launcher's refusals (ConfigError) name the option and the fix
    console.setup_from_argv()
    console.run_main(main, "launch_nemo_run.py")
