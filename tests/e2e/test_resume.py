"""Resume mid-anneal reproduces the uninterrupted run exactly (CPU, one process).

Run A trains 4 steps (combined groups, T_mix=3, KL on, checkpoints and held-out evaluations every 2
steps). Run B trains 2 steps, then a fresh process resumes from B's checkpoint to step 4. Steps 3-4 of the
resumed run must report the very same metrics as A's steps 3-4 (rewards, losses, KL, explorer share), and
the final checkpoints (weights, reference, optimizer state) must be identical tensor for tensor: the
evaluation before step 1, which only fresh runs do, must not change what later steps sample.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_s2l.config import S2LConfig
from megatron_s2l.learner.checkpoint import checkpoint_dir, latest_step
from tests.e2e.conftest import even_token_rollout, tiny_config
from tests.multiprocess import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

COMPARED = ("reward/mean", "reward/explorer", "reward/learner", "schedule/explorer_share", "train/loss",
            "train/kl", "train/clip_frac_low", "train/clip_frac_high", "train/entropy", "advantage/explorer",
            "advantage/learner")


def _train(rank: int, world_size: int, cfg_dict: dict) -> tuple[list[dict], dict]:
    from megatron_s2l.loop import train

    cfg = S2LConfig.from_dict(cfg_dict)
    result = train(cfg, rollout=even_token_rollout(cfg))
    return result.history, result.initial_eval


def read_checkpoint(root, step: int, out) -> dict:
    """Every tensor of the checkpoint of `step` under `root` (model, reference, optimizer), by name."""
    dcp_to_torch_save(str(checkpoint_dir(root, step)), str(out))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        elif isinstance(node, torch.Tensor):
            flat[prefix.rstrip(".")] = node

    walk("", torch.load(out, weights_only=False))
    return flat


def test_resume_mid_anneal_equals_uninterrupted_run(tiny_family, tmp_path):
    def config(save: str, steps: int, load: str | None = None) -> dict:
        return tiny_config(tiny_family, train_steps=steps, logging={"eval_interval": 2, "eval_samples": 2},
                           checkpoint={"save_dir": str(tmp_path / save), "save_interval": 2, "load_dir": load})

    full, full_initial = run_ranks(_train, 1, config("full", 4), timeout=240)[0]
    first, first_initial = run_ranks(_train, 1, config("resumed", 2), timeout=240)[0]
    assert latest_step(tmp_path / "resumed") == 2
    rest, rest_initial = run_ranks(_train, 1, config("resumed", 4, load=str(tmp_path / "resumed")), timeout=240)[0]

    # evaluated before step 1 by fresh runs only (random models never box an answer: pass@k is 0)
    assert full_initial == first_initial == {"eval/pass@1": 0.0, "eval/pass@2": 0.0, "eval/mean_reward": 0.0}
    assert rest_initial == {} and all("eval/pass@1" in m for m in (full[1], full[3], first[1], rest[1]))

    assert [m["schedule/explorer_share"] for m in full] == [1.0, 0.5, 0.0, 0.0]  # resumed mid-anneal
    assert len(first) == 2 and len(rest) == 2
    assert all(m["train/optimizer_steps"] >= 1 and m["reward/mean"] > 0 for m in full)  # it really learns
    assert full[-1]["train/kl"] > 0  # the policy moved away from the reference
    for expected, got in zip(full, first + rest):
        for key in COMPARED:
            assert (key in expected) == (key in got), key
            if key in expected:
                assert got[key] == expected[key], (key, got[key], expected[key])

    final_full = read_checkpoint(tmp_path / "full", 4, tmp_path / "full.pt")
    final_resumed = read_checkpoint(tmp_path / "resumed", 4, tmp_path / "resumed.pt")
    assert final_full.keys() == final_resumed.keys() and any("reference" in k for k in final_full)
    initial = read_checkpoint(tmp_path / "full", 2, tmp_path / "initial.pt")
    assert any(not torch.equal(initial[k], final_full[k]) for k in final_full)  # steps 3-4 changed the weights
    for key, tensor in final_full.items():
        assert torch.equal(final_resumed[key], tensor), key
