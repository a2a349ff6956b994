"""The README's "Using the hook in your own Megatron loop" block runs as it stands.

The block is read from README.md and executed in a fresh process (Megatron's parallel state is per process)
with `config_path` pointing at a tiny-family config: 3 steps, T_mix=3, G=4, 2 prompts per step. Random models
never write a boxed answer, so the real math reward is 0 everywhere and every group has zero variance; an
entropy bonus still moves the weights, so each step takes an optimizer step and refits the learner's engine.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.conftest import REPO, tiny_config, write_config
from tests.multiprocess import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def readme_loop() -> str:
    """The Python block under the README's "Using the hook in your own Megatron loop" heading."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Using the hook in your own Megatron loop")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_readme_loop(rank: int, world_size: int, config_path: str) -> tuple[list[dict], int]:
    namespace = {"config_path": config_path}
    exec(compile(readme_loop(), "README.md", "exec"), namespace)
    return namespace["history"], namespace["rollout"].weights_version


def test_readme_own_loop_runs(tiny_family, tmp_path):
    cfg = tiny_config(tiny_family, train_steps=3, loss={"kl_coef": 0.1, "entropy_coef": 0.05})
    history, refits = run_ranks(_run_readme_loop, 1, str(write_config(cfg, tmp_path / "run.yaml")), timeout=240)[0]

    assert [m["schedule/explorer_share"] for m in history] == [1.0, 0.5, 0.0]  # 1 - (i-1)/(T_mix-1)
    assert [m["reward/mean"] for m in history] == [0.0, 0.0, 0.0]
    assert [m["advantage/zero_variance_groups"] for m in history] == [2, 2, 2]
    assert [m["rollout/tokens"] > 0 for m in history] == [True] * 3
    assert [m["train/optimizer_steps"] for m in history] == [1, 1, 1]
    assert refits == 3  # one refit of the learner's engine per optimizer step
