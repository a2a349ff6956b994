"""S2L-PO training entry point: `torchrun [--nproc_per_node=N] examples/pretrain_s2l.py [options] [key=value ...]`.

Without --config it runs the embedded default, the CPU demo: it builds (once, cached under runs/) a tiny
Qwen3-style model family on a synthetic verifiable task, then trains the larger model with the smaller one
as explorer. With --config it trains whatever the YAML describes. Settings are applied in this order:
the YAML file, then Megatron-style flags, then dotted `section.field=value` overrides; the result is
validated once and every problem is reported together.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_s2l import console
from megatron_s2l.config import S2LConfig
from megatron_s2l.rollout.checks import check_config

if TYPE_CHECKING:
    from megatron_s2l.loop import TrainResult

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
# Megatron-LM flag -> dotted config field.
MEGATRON_FLAGS = {
    "--tensor-model-parallel-size": ("parallel.tensor_model_parallel_size", int),
    "--pipeline-model-parallel-size": ("parallel.pipeline_model_parallel_size", int),
    "--use-distributed-optimizer": ("parallel.use_distributed_optimizer", bool),
    "--train-iters": ("train_steps", int),
    "--lr": ("optim.lr", float),
    "--micro-batch-size": ("optim.micro_batch_size", int),
    "--seed": ("seed", int),
    "--save": ("checkpoint.save_dir", str),
    "--load": ("checkpoint.load_dir", str),
    "--save-interval": ("checkpoint.save_interval", int),
    "--tensorboard-dir": ("logging.tensorboard_dir", str),
}


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config (default: the CPU demo, examples/configs/demo.yaml)")
    for flag, (field, kind) in MEGATRON_FLAGS.items():
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f"sets {field}")
        else:
            parser.add_argument(flag, type=kind, help=f"sets {field}")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. schedule.t_mix=4 loss.kl_coef=0")
    console.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    flags = [f"{MEGATRON_FLAGS[f][0]}={v}" for f in MEGATRON_FLAGS
             if (v := getattr(args, f.lstrip("-").replace("-", "_"))) is not None]
    return args, flags + args.overrides


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    cfg, problems = S2LConfig.parse_yaml(args.config or DEMO_CONFIG, overrides)
    demo = args.config is None  # the demo fills in the model paths once its family is built
    check_config(cfg, problems, check_files=not demo)  # every problem at once, before anything slow
    from megatron_s2l.demo import prepare_demo  # Megatron and vLLM: imported once the config is known good
    from megatron_s2l.loop import train

    if demo:
        cfg = prepare_demo(cfg)
    result = train(cfg)
    for line in summary(cfg, result):
        console.say(line)


def summary(cfg: S2LConfig, result: TrainResult) -> list[str]:
    """The run's closing lines: held-out pass@1 before and after, training reward, where the logs and
    checkpoints are."""
    if not result.history:
        return [f"nothing to train: the latest checkpoint is already at train_steps={cfg.train_steps}"]
    first_step = result.last_step - len(result.history) + 1
    rewards = [(first_step + i, m["reward/mean"]) for i, m in enumerate(result.history)]
    lines = [f"trained steps {first_step}-{result.last_step}: training reward {_first_and_last(rewards)}"]
    evaluated = [(0, result.initial_eval["eval/pass@1"])] if result.initial_eval else []
    evaluated += [(step, m["eval/pass@1"]) for (step, _), m in zip(rewards, result.history) if "eval/pass@1" in m]
    # before and after; a resumed run has only its own evaluations
    lines.append(f"held-out pass@1: {_first_and_last(evaluated)}" if evaluated
                 else "held-out pass@1: not evaluated (set logging.eval_interval)")
    logs = cfg.logging.tensorboard_dir
    lines.append(f"TensorBoard: tensorboard --logdir {logs}" if logs else "TensorBoard: off (logging.tensorboard_dir)")
    saved = cfg.checkpoint.save_dir
    lines.append(f"checkpoints: {saved} (resume with --load {saved})" if saved
                 else "checkpoints: none saved (checkpoint.save_dir)")
    return lines


def _first_and_last(points: list[tuple[int, float]]) -> str:
    """"0.261 at step 0, 0.446 at step 32" (one point when there is only one)."""
    return ", ".join(f"{value:.3f} at step {step}" for step, value in dict([points[0], points[-1]]).items())


if __name__ == "__main__":  # checkpoint writers re-import __main__
    console.setup_from_argv()
    console.run_main(main, Path(__file__).name)
