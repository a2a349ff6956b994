"""Adaptive explorer allocation end to end (CPU, one process): it trains, and resumes exactly.

The reward is 0 for every response to half of the prompts (chosen by prompt id) and, for the others, the
fraction of even token ids plus a tie-breaker below 1e-3 hashed from the response, so the learner's samples
of the first half never differ in reward and two different responses to the second half always do. With G=4
and T_mix=3 (G_w = 4, 2, 0, 0: open slots S = 2, 2, 0, 0 after a learner probe of G - S), only first-half
prompts may get explorer samples, all rewarded 0, and a step's explorer share is k * S / (2 * G) for its k
such prompts. A run of 4 steps is compared with one of 2 steps resumed to 4, metric by metric and tensor by
tensor.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from megatron_s2l.config import S2LConfig
from megatron_s2l.types import Prompt, Sample
from tests.e2e.conftest import EvenTokenScorer, even_token_rollout, tiny_config
from tests.e2e.test_resume import COMPARED, read_checkpoint
from tests.multiprocess import run_ranks

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

GROUP, PROMPTS_PER_STEP, OPEN_SLOTS = 4, 2, [2, 2, 0, 0]


class HalfNeverSolvedScorer(EvenTokenScorer):
    """0 for every response to a prompt whose id hashes even; otherwise the fraction of even token ids plus
    a tie-breaker in [0, 1e-3) hashed from the response ids."""

    def score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        even = super().score(prompts, samples)
        return [0.0 if zlib.crc32(p.prompt_id.encode()) % 2 == 0
                else r + 1e-3 * zlib.crc32(str(s.response_ids).encode()) / 2**32
                for p, s, r in zip(prompts, samples, even)]


def _train(rank: int, world_size: int, cfg_dict: dict) -> list[dict]:
    from megatron_s2l.loop import train

    cfg = S2LConfig.from_dict(cfg_dict)
    return train(cfg, rollout=even_token_rollout(cfg, HalfNeverSolvedScorer())).history


def test_adaptive_allocation_trains_and_resumes_exactly(tiny_family, tmp_path):
    def config(save: str, steps: int, load: str | None = None) -> dict:
        return tiny_config(tiny_family, train_steps=steps, prompts_per_step=PROMPTS_PER_STEP,
                           schedule={"group_size": GROUP, "t_mix": 3, "allocation": "adaptive"},
                           checkpoint={"save_dir": str(tmp_path / save), "save_interval": 2, "load_dir": load})

    full = run_ranks(_train, 1, config("full", 4), timeout=600)[0]
    first = run_ranks(_train, 1, config("resumed", 2), timeout=600)[0]
    rest = run_ranks(_train, 1, config("resumed", 4, load=str(tmp_path / "resumed")), timeout=600)[0]

    served = [int(m["rollout/prompts_with_explorer"]) for m in full]
    assert 0 < served[0] + served[1] < 2 * PROMPTS_PER_STEP  # both kinds of prompt were met while G_w > 0
    assert served[2:] == [0, 0]
    for m, k, slots in zip(full, served, OPEN_SLOTS):
        assert m["rollout/explorer_share"] == pytest.approx(k * slots / (PROMPTS_PER_STEP * GROUP))
        assert m.get("reward/explorer", 0.0) == 0.0  # only never-solved prompts were served
    assert all(m["train/optimizer_steps"] >= 1 and m["reward/learner"] > 0 for m in full)  # it really learns

    for expected, got in zip(full, first + rest):
        for key in (*COMPARED, "rollout/explorer_share", "rollout/prompts_with_explorer"):
            assert (key in expected) == (key in got), key
            if key in expected:
                assert got[key] == expected[key], (key, got[key], expected[key])
    final_full = read_checkpoint(tmp_path / "full", 4, tmp_path / "full.pt")
    final_resumed = read_checkpoint(tmp_path / "resumed", 4, tmp_path / "resumed.pt")
    assert final_full.keys() == final_resumed.keys()
    for key, tensor in final_full.items():
        assert torch.equal(final_resumed[key], tensor), key
