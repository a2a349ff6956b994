"""The S2L group mixer: per step and prompt, G_w explorer + G_s learner samples, scored and grouped.

`combined` mode (the paper) makes one group per prompt holding both sources, so advantages compare
explorer and learner rollouts with each other. `separate` mode (the authors' code) makes explorer-only
and learner-only groups, trained as two optimizer phases of the same step (`phases(step)`), the
learner phase rolled out after the explorer phase's update. Without an explorer the mixer is plain
GRPO: G learner samples per prompt at every step.

`schedule.allocation='adaptive'` (combined groups only) decides the explorer per prompt
(`algo.allocation`): the learner draws a probe of G - S samples for every prompt and they are scored; the
prompts whose probe rewards are all equal get S explorer samples, the others S more learner samples, so
every group holds G samples and rollout compute is at most GRPO's. While S > 0 a step has three generation
rounds one after the other (probe, explorer fill, learner fill), which also means the two engines never
overlap. Every round is seeded by (seed, step) and prompt id (the learner's fill by the complement of the
step seed, so its samples differ from the probe's), so a resumed run draws the same samples; an offline
explorer cache serves the chosen prompts the same way; each engine replica decides for its own prompts.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from megatron_s2l.algo.allocation import adaptive_explorer_counts, probe_split
from megatron_s2l.algo.reward_scorer import RewardScorer
from megatron_s2l.algo.schedule import GroupSplit, explorer_share, group_split
from megatron_s2l.config import RewardConfig, SamplingConfig, ScheduleConfig
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


def reward_scorer(reward: RewardConfig, decode: Callable[[list[int]], str]) -> RewardScorer:
    """The scorer the `reward` section describes; `decode` turns response token ids into text."""
    return RewardScorer(decode, function=reward.function, by_data_source=reward.by_data_source,
                        timeout_s=reward.timeout_s, workers=reward.workers or None, on_error=reward.on_error)


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
        # counters of the last `rollout` call: rollout/dropped_prompts (prompts left without a group because
        # an engine could not serve them: too long) and rollout/dropped_prompts/<source> (per engine)
        self.metrics: dict[str, float] = {}

    def split(self, step: int) -> GroupSplit:
        """(G_w, G_s) per prompt at 1-based `step`; (0, G) without an explorer."""
        s = self.schedule
        if self.engines["explorer"] is None:
            return GroupSplit(0, s.group_size)
        split = group_split(step, s.group_size, s.t_mix, s.kind, s.constant_share, s.group_mode)
        if s.allocation == "adaptive":  # (open slots, learner probe): the most a prompt gets from the explorer
            probe, slots = probe_split(s.group_size, split.explorer)
            return GroupSplit(slots, probe)
        return split

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
        source. A prompt that an engine dropped (too long) gets no group and is counted in `metrics`. The
        samples are scored in one `scorer.score` call, the learner's probe first in its own call with
        `allocation='adaptive'`: it decides which prompts the explorer serves (`algo.allocation`).
        """
        unknown = [s for s in sources if s not in SOURCES]
        if unknown:
            raise ValueError(f"sources={sources!r}: accepted sources are {list(SOURCES)}")
        if "explorer" in sources and self.engines["explorer"] is None:
            raise ValueError("sources include 'explorer' but the mixer has no explorer (explorer.source='none')")
        counts = dict(zip(SOURCES, self.split(step)))
        seed = self.seed * 1_000_003 + step
        order = [s for s in SOURCES if s in sources and counts[s] > 0]
        if self.schedule.allocation == "adaptive" and order == list(SOURCES):
            drawn = self._draw_adaptive(prompts, counts["learner"], counts["explorer"], seed)
        else:
            drawn = {source: self._draw(source, prompts, range(len(prompts)), counts[source], seed)
                     for source in order}
        self.metrics = {"rollout/dropped_prompts": 0.0}
        groups, unscored = [], []
        for i, prompt in enumerate(prompts):
            asked = {source: drawn[source][i] for source in SOURCES if source in drawn and drawn[source][i] is not None}
            dropped_by = [source for source, samples in asked.items() if not samples]
            if dropped_by:
                self.metrics["rollout/dropped_prompts"] += 1
                for source in dropped_by:
                    key = f"rollout/dropped_prompts/{source}"
                    self.metrics[key] = self.metrics.get(key, 0.0) + 1
                continue
            per_source = list(asked.values())
            unscored += [(prompt, s) for samples in per_source for s in samples if s.reward is None]
            if self.schedule.group_mode == "combined":
                groups.append(RolloutGroup(prompt.prompt_id, [s for samples in per_source for s in samples]))
            else:
                groups.extend(RolloutGroup(prompt.prompt_id, samples) for samples in per_source)
        self._score(unscored)
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

    def _draw(self, source: Source, prompts: list[Prompt], asked, n: int, seed: int) -> list[Optional[list[Sample]]]:
        """`n` samples of `source` for each prompt index in `asked`, per prompt (None where not asked)."""
        asked = list(asked)
        samples = self.engines[source].generate([prompts[i] for i in asked], n, self.sampling[source],
                                                seed=seed) if asked else []
        drawn: list[Optional[list[Sample]]] = [None] * len(prompts)
        for i, got in zip(asked, samples):
            drawn[i] = got
        return drawn

    def _draw_adaptive(self, prompts: list[Prompt], probe: int, slots: int,
                       seed: int) -> dict[Source, list[Optional[list[Sample]]]]:
        """The learner's probe for every prompt, then each prompt's open slots: the explorer's where the
        probe's rewards are all equal, the learner's where they differ (`algo.allocation`)."""
        learner = self._draw("learner", prompts, range(len(prompts)), probe, seed)
        self._score([(prompts[i], s) for i, got in enumerate(learner) for s in got or []])
        rewards = [s.reward for got in learner for s in got or []]
        index = [i for i, got in enumerate(learner) for _ in got or []]
        counts = adaptive_explorer_counts(torch.tensor(rewards, dtype=torch.float64),
                                          torch.tensor(index, dtype=torch.long), len(prompts), slots)  # [P]
        to_explorer = counts.nonzero().flatten().tolist()
        to_learner = [i for i, got in enumerate(learner) if got and counts[i] == 0]
        explorer = self._draw("explorer", prompts, to_explorer, slots, seed)
        fill = self._draw("learner", prompts, to_learner, slots, ~seed)
        for i in to_learner:
            learner[i] = learner[i] + fill[i] if fill[i] else []  # a fill the engine dropped drops the prompt
        return {"explorer": explorer, "learner": learner}
