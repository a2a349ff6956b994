"""Megatron-Bridge recipes: the S2L-PO half (pure, tested here) and the Bridge ConfigContainer half (needs
megatron.bridge: GPU clusters only, skipped with the reason elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_s2l.config import S2LConfig
from megatron_s2l.launch import bridge_recipes as recipes


def _bridge_import_error() -> str | None:
    """Why megatron.bridge cannot be imported here, or None when it can."""
    try:
        import megatron.bridge  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


BRIDGE_ERROR = _bridge_import_error()
needs_bridge = pytest.mark.skipif(BRIDGE_ERROR is not None,
                                  reason=f"megatron.bridge cannot be imported ({BRIDGE_ERROR}): Megatron-Bridge needs "
                                         f"Transformer Engine, so it runs on CUDA machines only")


@pytest.fixture
def hf_dirs(tmp_path):
    """Local HF directories as the recipes require (config.json present; the weights are not read here)."""
    dirs = {}
    for name, layers in (("learner", 36), ("explorer", 28)):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": layers}))
        dirs[name] = str(path)
    return dirs


# (recipe, G, T_mix, learner TP): the paper's two settings (method.md) on 8x H100 nodes.
PAPER = [("qwen3_1p7b_to_8b", 16, 8, 4), ("qwen3_4b_to_14b", 8, 4, 8)]


@pytest.mark.parametrize("name,group_size,t_mix,tp", PAPER)
def test_s2l_settings_are_the_papers_and_validate(hf_dirs, tmp_path, name, group_size, t_mix, tp):
    run, train_path = str(tmp_path / "run"), tmp_path / "dapo.parquet"
    train_path.touch()  # validation checks that the prompt file exists
    settings = recipes.s2l_settings(name, learner_hf_path=hf_dirs["learner"], explorer_hf_path=hf_dirs["explorer"],
                                    run_dir=run, train_path=str(train_path))
    cfg = S2LConfig.from_dict(settings).validate(check_files=False)  # placeholder data paths
    assert (cfg.schedule.group_size, cfg.schedule.t_mix, cfg.schedule.group_mode) == (group_size, t_mix, "combined")
    assert cfg.parallel.tensor_model_parallel_size == tp
    assert (cfg.learner.hf_path, cfg.explorer.hf_path) == (hf_dirs["learner"], hf_dirs["explorer"])
    assert cfg.checkpoint.save_dir == cfg.checkpoint.load_dir == f"{run}/checkpoints"  # requeued jobs resume
    assert cfg.logging.tensorboard_dir == f"{run}/tensorboard"
    assert cfg.data.train_path == str(train_path)
    assert (cfg.optim.lr, cfg.loss.kl_type, cfg.loss.kl_coef) == (1e-6, "low_var_kl", 0.001)
    assert (cfg.prompts_per_step, cfg.optim.mini_batch_prompts) == (1024, 32)
    # The Bridge side's horizon: 1024 / 32 mini-batches x 1 epoch x 16 steps, all combined.
    assert recipes.optimizer_steps_per_phase(cfg) == 32
    assert recipes.optimizer_steps(cfg) == 32 * 16


def test_overrides_apply_last_and_keep_the_rest(hf_dirs, tmp_path):
    settings = recipes.s2l_settings("qwen3_1p7b_to_8b", learner_hf_path=hf_dirs["learner"],
                                    explorer_hf_path=hf_dirs["explorer"], run_dir=str(tmp_path),
                                    overrides=["schedule.group_mode=separate", "train_steps=10", "optim.ppo_epochs=2"])
    cfg = S2LConfig.from_dict(settings).validate(check_files=False)  # placeholder data paths
    assert (cfg.schedule.group_mode, cfg.train_steps, cfg.schedule.t_mix) == ("separate", 10, 8)
    # separate groups: 10 steps + 8 with an explorer phase, each 2 epochs x 32 mini-batches.
    assert recipes.optimizer_steps(cfg) == 2 * 32 * (10 + 8)


def test_hub_ids_and_unknown_recipes_are_refused(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"learner_hf_path='Qwen/Qwen3-8B-Base': not a local Hugging Face "
                                         r"directory .*hub ids are never downloaded"):
        recipes.s2l_settings("qwen3_1p7b_to_8b", learner_hf_path="Qwen/Qwen3-8B-Base",
                             explorer_hf_path=hf_dirs["explorer"], run_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"recipe 'qwen3_8b': accepted recipes are \['qwen3_1p7b_to_8b', "
                                         r"'qwen3_4b_to_14b'\]"):
        recipes.s2l_settings("qwen3_8b", learner_hf_path=hf_dirs["learner"], explorer_hf_path=hf_dirs["explorer"],
                             run_dir=str(tmp_path))


@pytest.mark.skipif(BRIDGE_ERROR is None, reason="megatron.bridge is installed: the recipe builds instead")
def test_recipe_without_bridge_says_where_it_runs(hf_dirs, tmp_path):
    with pytest.raises(ImportError, match="Megatron-Bridge recipes need megatron.bridge .* GPU clusters"):
        recipes.qwen3_8b_s2l_config(hf_dirs["learner"], hf_dirs["explorer"], run_dir=str(tmp_path))


@needs_bridge
def test_recipe_builds_a_bridge_config_container_from_local_hf_dirs(tmp_path):
    from megatron.bridge.training.config import ConfigContainer

    from tests.tiny_models import write_tiny_model

    learner = write_tiny_model(tmp_path / "learner", num_layers=3, tie_word_embeddings=False, with_tokenizer=True)
    explorer = write_tiny_model(tmp_path / "explorer", num_layers=2, seed=1)
    container = recipes.qwen3_8b_s2l_config(str(learner), str(explorer), run_dir=str(tmp_path / "run"))
    assert isinstance(container, ConfigContainer)
    assert container.model.num_layers == 3 and container.model.hidden_size == 128  # read from the local dir
    assert container.model.tensor_model_parallel_size == 4 and container.model.seq_length == 512 + 4096
    assert (container.train.train_iters, container.train.global_batch_size) == (32 * 16, 32 * 16)
    assert container.optimizer.lr == 1e-6 and container.scheduler.lr_decay_style == "constant"
    assert container.checkpoint.save == container.checkpoint.load == f"{tmp_path}/run/checkpoints"
    assert container.checkpoint.save_interval == 32  # every rollout step = 32 optimizer steps
    assert container.tokenizer.tokenizer_model == str(learner)
    assert container.dataset is None
    assert container.model.recompute_granularity is None  # learner.recompute: "none", as the learner
    # the paper configs train in BF16: the learner and Bridge alike
    assert container.optimizer.bf16 and container.mixed_precision == "bf16_mixed"
