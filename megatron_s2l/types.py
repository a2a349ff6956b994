"""Data that crosses layer boundaries: rollout samples and groups.

Rollout engines produce `Sample`s; the mixer assembles them into `RolloutGroup`s (one per prompt in
`combined` mode, one per prompt and source in `separate` mode); the loop turns groups into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

Source = Literal["explorer", "learner"]


@dataclass
class Sample:
    """One rollout: a response to a prompt and where it came from."""

    prompt_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]  # per response token, from the engine that sampled it
    source: Source
    policy_id: str  # model id of the policy that produced it (explorer id or learner step)
    finish_reason: str = "stop"  # "stop" (EOS / stop string) or "length" (hit max_new_tokens)
    sampling: dict = field(default_factory=dict)  # temperature, top_p, ... as used
    reward: Optional[float] = None

    def __post_init__(self):
        if len(self.behaviour_logprobs) != len(self.response_ids):
            raise ValueError(f"sample {self.prompt_id}: {len(self.response_ids)} response tokens but "
                             f"{len(self.behaviour_logprobs)} behaviour log-probs")


@dataclass
class RolloutGroup:
    """Samples whose advantages are computed relative to each other."""

    prompt_id: str
    samples: list[Sample]

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    def count(self, source: Source) -> int:
        return sum(s.source == source for s in self.samples)
