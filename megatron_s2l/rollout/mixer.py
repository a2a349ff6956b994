"""The S2L group mixer: per step and prompt, G_w explorer + G_s learner samples, scored and grouped.

`combined` mode (the paper) makes one group per prompt holding both sources, so advantages compare
explorer and learner rollouts with each other. `separate` mode (the authors' code) makes explorer-only
and learner-only groups, trained as two optimizer phases of the same step (`phases(step)`), the
learner phase rolled out after the explorer phase's update. Without an explorer the mixer is plain
GRPO: G learner samples per prompt at every step.
"""

from __future__ import annotations

from typing import Optional, Protocol

from megatron_s2l.algo.schedule import GroupSplit, explorer_share, group_split
from megatron_s2l.config import SamplingConfig, ScheduleConfig
from megatron_s2l.rollout.engine import RolloutEngine
from megatron_s2l.types import Prompt, RolloutGroup, Sample, Source

SOURCES: tuple[Source, ...] = ("explorer", "learner")


class Scorer(Protocol):
    """Rewards a whole batch at once, so that slow verifications can run side by side."""

    def score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        """The reward of `samples[i]` as an answer to `prompts[i]`, in input order. A scorer may also
        record numbers about a sample's scoring (time-outs, a reward's extra metrics) in its
        `reward_info`, which travels with the sample and is averaged per step by the loop."""
        ...


class S2LMixer:
    """Turns the schedule, the explorer and learner engines and a scorer into rollout groups."""

    def __init__(self, schedule: ScheduleConfig, *, explorer: Optional[RolloutEngine], learner: RolloutEngine,
                 explorer_sampling: SamplingConfig, learner_sampling: SamplingConfig, scorer: Scorer,
                 seed: int = 0):
        """`explorer=None` gives plain GRPO. `seed` with the step fixes every draw, so a resumed run
        samples exactly what the uninterrupted one did (given the same learner weights)."""
        self.schedule = schedule
        self.engines: dict[Source, Optional[RolloutEngine]] = {"explorer": explorer, "learner": learner}
        self.sampling: dict[Source, SamplingConfig] = {"explorer": explorer_sampling, "learner": learner_sampling}
        self.scorer = scorer
        self.seed = seed
        self.dropped_prompts = 0  # prompts an engine could not serve (too long), left out of the groups

    def split(self, step: int) -> GroupSplit:
        """(G_w, G_s) per prompt at 1-based `step`; (0, G) without an explorer."""
        s = self.schedule
        if self.engines["explorer"] is None:
            return GroupSplit(0, s.group_size)
        return group_split(step, s.group_size, s.t_mix, s.kind, s.constant_share, s.group_mode)

    def explorer_share(self, step: int) -> float:
        """alpha at `step` (0 without an explorer), for logging."""
        s = self.schedule
        return 0.0 if self.engines["explorer"] is None else explorer_share(step, s.t_mix, s.kind, s.constant_share)

    def phases(self, step: int) -> list[tuple[Source, ...]]:
        """The sources of each optimizer phase of `step`: one phase in combined mode, an explorer phase
        then a learner phase in separate mode; sources with no samples this step are left out."""
        counts = self.split(step)
        active = tuple(source for source, count in zip(SOURCES, counts) if count > 0)
        if self.schedule.group_mode == "combined":
            return [active]
        return [(source,) for source in active]

    def rollout(self, step: int, prompts: list[Prompt], sources: tuple[Source, ...]) -> list[RolloutGroup]:
        """Sample `sources` for every prompt at `step`, set each sample's reward, and group them.

        combined: one group per prompt with all requested sources; separate: one group per prompt and
        source. A prompt that an engine dropped (too long) gets no group and is counted in
        `dropped_prompts`. All samples of the call are scored in one `scorer.score` call.
        """
        unknown = [s for s in sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources={sources!r}: accepted sources are {list(SOURCES)}")
        if "explorer" in sources and self.engines["explorer"] is None:
            raise ValueError("sources include 'explorer' but the mixer has no explorer (explorer.source='none')")
        counts = dict(zip(SOURCES, self.split(step)))
        drawn: dict[Source, list[list[Sample]]] = {}
        for source in sources:
            if counts[source] > 0:
                drawn[source] = self.engines[source].generate(prompts, counts[source], self.sampling[source],
                                                              seed=self.seed * 1_000_003 + step)
        kept: list[tuple[Prompt, list[list[Sample]]]] = []
        for i, prompt in enumerate(prompts):
            per_source = [drawn[source][i] for source in drawn]
            if any(not samples for samples in per_source):
                self.dropped_prompts += 1
            else:
                kept.append((prompt, per_source))
        self._score([(prompt, sample) for prompt, per_source in kept for samples in per_source for sample in samples])
        groups = []
        for prompt, per_source in kept:
            if self.schedule.group_mode == "combined":
                groups.append(RolloutGroup(prompt.prompt_id, [s for samples in per_source for s in samples]))
            else:
                groups.extend(RolloutGroup(prompt.prompt_id, samples) for samples in per_source)
        return groups

    def _score(self, pairs: list[tuple[Prompt, Sample]]) -> None:
        """Set every sample's reward with one scorer call."""
        if not pairs:
            return
        prompts, samples = [p for p, _ in pairs], [s for _, s in pairs]
        rewards = self.scorer.score(prompts, samples)
        if len(rewards) != len(samples):
            raise ValueError(f"the scorer returned {len(rewards)} rewards for {len(samples)} samples: it must return "
                             f"one reward per sample, in input order")
        for sample, reward in zip(samples, rewards):
            sample.reward = float(reward)
