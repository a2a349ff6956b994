"""The one interface every rollout source implements, and the helpers all of them share.

A rollout engine turns tokenised prompts into sampled responses: the vLLM engines (explorer and
learner) and the offline explorer cache implement the same `RolloutEngine` protocol, so the mixer
never knows which one it is talking to.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Protocol, runtime_checkable

from megatron_s2l.config import SamplingConfig
from megatron_s2l.types import Prompt, Sample


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that samples responses to prompts: an online vLLM engine or an offline explorer cache."""

    def generate(self, prompts: list[Prompt], n: int | list[int], sampling: SamplingConfig, *,
                 seed: Optional[int] = None) -> list[list[Sample]]:
        """Return, per prompt, `n` (or `n[i]`) samples with response ids, per-token behaviour log-probs,
        finish reason, source, policy id and the sampling settings used; rewards are left None.

        A prompt the engine cannot serve (longer than its limit, when configured to drop) gets an empty
        list. `seed` makes the draw reproducible independently of batch composition and history.
        """
        ...


def counts_per_prompt(prompts: list[Prompt], n: int | list[int]) -> list[int]:
    """Expand `n` (one count for all prompts, or one per prompt) into a validated per-prompt list."""
    counts = [n] * len(prompts) if isinstance(n, int) else list(n)
    if len(counts) != len(prompts):
        raise ValueError(f"n has {len(counts)} entries for {len(prompts)} prompts: pass one count per prompt "
                         f"or a single int")
    bad = [c for c in counts if not isinstance(c, int) or c < 0]
    if bad:
        raise ValueError(f"n={bad[0]!r}: sample counts must be ints >= 0")
    return counts


def sampling_record(sampling: SamplingConfig) -> dict:
    """The sampling settings as stored with every sample (a plain dict, JSON-serialisable)."""
    return dataclasses.asdict(sampling)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed from a call seed and the prompt id, stable across processes and batchings."""
    return (seed * 1_000_003 + zlib.crc32(prompt_id.encode("utf-8"))) % 2**31
