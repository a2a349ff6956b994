"""Megatron-Bridge recipes (NeMo's recipe format) for the paper's S2L-PO settings.

NeMo's LLM recipes now live in Megatron-Bridge: a recipe is a function returning a `ConfigContainer`.
Bridge's registry is closed to plugins, so megatron-s2l ships its own recipe functions:

    qwen3_8b_s2l_config(learner_hf_path, explorer_hf_path, ...)    Qwen3-8B-Base  + 1.7B explorer, G=16, T_mix=8
    qwen3_14b_s2l_config(learner_hf_path, explorer_hf_path, ...)   Qwen3-14B-Base + 4B explorer,   G=8,  T_mix=4

Each recipe has two halves, built from the same arguments. `s2l_settings(name, ...)` is the S2L-PO part: the
shipped paper config (examples/configs/paper_<name>.yaml) with the local paths filled in, as an S2LConfig
dict for examples/pretrain_s2l.py. The recipe function maps that config's learner side (model from the local
HF directory, parallelism, optimizer and LR schedule in optimizer steps, precision, checkpoints) onto a Bridge
`ConfigContainer`, for Bridge tooling on GPU clusters (model/optimizer setup, checkpoint conversion). Model
directories are local paths, never hub ids. Megatron-Bridge is imported only by the recipe functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_s2l.config import RECOMPUTE_FIELDS, ConfigError, S2LConfig, apply_overrides

CONFIG_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
RECIPES = {"qwen3_1p7b_to_8b": "paper_qwen3_1p7b_to_8b.yaml", "qwen3_4b_to_14b": "paper_qwen3_4b_to_14b.yaml"}
# Bridge mixed-precision recipes for megatron_s2l's fp8.recipe (bf16 without FP8).
MIXED_PRECISION = {"delayed": "bf16_with_fp8_delayed_scaling_mixed", "tensorwise": "bf16_with_fp8_current_scaling_mixed",
                   "blockwise": "bf16_with_fp8_subchannel_scaling_mixed", "mxfp8": "bf16_with_mxfp8_mixed"}


def s2l_settings(name: str, *, learner_hf_path: str, explorer_hf_path: str, run_dir: str,
                 train_path: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """The paper's S2L-PO config `name` (a key of RECIPES) as a dict for `S2LConfig.from_dict`.

    The learner and explorer are local HF directories (with config.json); checkpoints are saved to and
    resumed from <run_dir>/checkpoints, TensorBoard goes to <run_dir>/tensorboard; `train_path` replaces
    the prompt file; `overrides` are dotted key=value pairs applied last.
    """
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r}: accepted recipes are {sorted(RECIPES)}")
    for field, path in (("learner_hf_path", learner_hf_path), ("explorer_hf_path", explorer_hf_path)):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{field}={path!r}: not a local Hugging Face directory (no config.json); pass the "
                              f"directory of a downloaded checkpoint (hub ids are never downloaded)")
    source = CONFIG_DIR / RECIPES[name]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: the paper config is read from a megatron-s2l checkout "
                                f"(install it with pip install -e .)")
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    data["learner"]["hf_path"] = str(learner_hf_path)
    data["explorer"]["hf_path"] = str(explorer_hf_path)
    data["checkpoint"].update(save_dir=f"{run_dir}/checkpoints", load_dir=f"{run_dir}/checkpoints")
    data["logging"]["tensorboard_dir"] = f"{run_dir}/tensorboard"
    if train_path is not None:
        data["data"]["train_path"] = str(train_path)
    return apply_overrides(data, list(overrides))


def optimizer_steps_per_phase(cfg: S2LConfig) -> int:
    """Optimizer steps of one rollout phase: PPO epochs x mini-batches of the step's prompts."""
    return cfg.optim.ppo_epochs * (cfg.prompts_per_step // cfg.optim.mini_batch_prompts)


def optimizer_steps(cfg: S2LConfig) -> int:
    """Optimizer steps of a whole run: PPO epochs x mini-batches per phase x phases.

    Combined groups: one phase per step. Separate groups: an explorer and a learner phase during the first
    t_mix steps (an upper bound: a step whose split leaves one source empty runs one phase).
    """
    per_phase = optimizer_steps_per_phase(cfg)
    phases = cfg.train_steps
    if cfg.schedule.group_mode == "separate" and cfg.explorer.source != "none":
        phases += min(cfg.schedule.t_mix, cfg.train_steps)
    return per_phase * phases


def bridge_config(cfg: S2LConfig) -> Any:
    """The learner side of the validated `cfg` as a Megatron-Bridge `ConfigContainer`."""
    auto_bridge, c = _import_bridge()
    provider = auto_bridge.from_hf_pretrained(cfg.learner.hf_path).to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = cfg.parallel.tensor_model_parallel_size
    provider.pipeline_model_parallel_size = cfg.parallel.pipeline_model_parallel_size
    provider.sequence_parallel = False  # as the S2L learner: activations are not sharded along the sequence
    provider.seq_length = cfg.data.max_prompt_length + cfg.learner_sampling.max_new_tokens
    provider.transformer_impl = "transformer_engine" if cfg.learner.layer_spec == "te" else "local"
    for name, value in RECOMPUTE_FIELDS[cfg.learner.recompute].items():  # as the S2L learner recomputes
        setattr(provider, name, value)
    optim = cfg.optim
    bf16 = cfg.learner.params_dtype == "bfloat16"  # Bridge's recipes, like the learner, keep fp32 main params
    if cfg.fp8.enabled and not bf16:
        raise ConfigError("fp8.enabled=true with learner.params_dtype='float32': Bridge's FP8 recipes are BF16 "
                          "mixed precision; set learner.params_dtype='bfloat16'")
    constant = optim.lr_decay_style == "constant"
    per_step = optimizer_steps_per_phase(cfg)  # Bridge counts intervals in optimizer steps, S2L in rollout steps
    return c.ConfigContainer(
        model=provider,
        train=c.TrainingConfig(train_iters=optimizer_steps(cfg), micro_batch_size=optim.micro_batch_size,
                               global_batch_size=optim.mini_batch_prompts * cfg.schedule.group_size),
        optimizer=c.OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                                    weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
                                    adam_beta2=optim.adam_beta2, clip_grad=optim.clip_grad, bf16=bf16,
                                    use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
        scheduler=c.SchedulerConfig(lr_decay_style=optim.lr_decay_style, lr_warmup_iters=optim.lr_warmup_steps,
                                    lr_decay_iters=None if constant else optim.lr_decay_steps,
                                    start_weight_decay=optim.weight_decay, end_weight_decay=optim.weight_decay,
                                    weight_decay_incr_style="constant"),
        ddp=c.DistributedDataParallelConfig(use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                                            grad_reduce_in_fp32=True, check_for_nan_in_grad=True),
        dataset=None,  # prompts come from the S2L data section (as NeMo-RL does for its Megatron policy)
        logger=c.LoggerConfig(log_interval=cfg.logging.log_interval * per_step,
                              tensorboard_dir=cfg.logging.tensorboard_dir),
        tokenizer=c.TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=cfg.learner.hf_path),
        checkpoint=c.CheckpointConfig(save=cfg.checkpoint.save_dir, load=cfg.checkpoint.load_dir,
                                      save_interval=cfg.checkpoint.save_interval * per_step or None,
                                      ckpt_format="torch_dist"),
        rng=c.RNGConfig(seed=cfg.seed),
        mixed_precision=(MIXED_PRECISION[cfg.fp8.recipe] if cfg.fp8.enabled else "bf16_mixed") if bf16 else None,
    )


def qwen3_8b_s2l_config(learner_hf_path: str, explorer_hf_path: str, *, run_dir: str,
                        train_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """Qwen3-8B-Base learner with a Qwen3-1.7B-Base explorer (G=16, T_mix=8) as a Bridge ConfigContainer;
    the matching S2L-PO settings are `s2l_settings("qwen3_1p7b_to_8b", ...)` with the same arguments."""
    return _recipe("qwen3_1p7b_to_8b", learner_hf_path, explorer_hf_path, run_dir, train_path, overrides)


def qwen3_14b_s2l_config(learner_hf_path: str, explorer_hf_path: str, *, run_dir: str,
                         train_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """Qwen3-14B-Base learner with a Qwen3-4B-Base explorer (G=8, T_mix=4) as a Bridge ConfigContainer;
    the matching S2L-PO settings are `s2l_settings("qwen3_4b_to_14b", ...)` with the same arguments."""
    return _recipe("qwen3_4b_to_14b", learner_hf_path, explorer_hf_path, run_dir, train_path, overrides)


def _recipe(name, learner_hf_path, explorer_hf_path, run_dir, train_path, overrides) -> Any:
    settings = s2l_settings(name, learner_hf_path=learner_hf_path, explorer_hf_path=explorer_hf_path,
                            run_dir=run_dir, train_path=train_path, overrides=overrides)
    # Values only: the paper config's data paths are placeholders until the user's overrides set them, and the
    # job checks its files where it starts.
    return bridge_config(S2LConfig.from_dict(settings).validate(check_files=False))


def _import_bridge():
    """megatron.bridge's AutoBridge and training.config module, or ImportError saying where Bridge runs."""
    try:
        from megatron.bridge import AutoBridge
        from megatron.bridge.training import config
    except ImportError as err:
        raise ImportError(f"Megatron-Bridge recipes need megatron.bridge ({err}); it installs on GPU clusters "
                          f"(NGC NeMo containers): it imports Transformer Engine, which needs CUDA. "
                          f"examples/pretrain_s2l.py runs the same settings without it: s2l_settings(...)") from err
    return AutoBridge, config
