"""Data that crosses layer boundaries: rollout samples and groups.

Rollout engines produce `Sample`s; the mixer assembles them into `RolloutGroup`s (one per prompt in
`combined` mode, one per prompt and source in `separate` mode); `TrainBatch.from_groups` turns groups
into the tensors the learner trains on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

Source = Literal["explorer", "learner"]


@dataclass
class Prompt:
    """A tokenised prompt with what its responses are checked against."""

    prompt_id: str
    prompt_ids: list[int]
    ground_truth: str
    text: str = ""  # the prompt as text, after the template (for logs, caches and reward functions)
    data_source: str = ""
    extra: dict = field(default_factory=dict)  # the data row's other fields, as the file has them (rewards see them)


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
    reward_info: dict[str, float] = field(default_factory=dict)  # the scorer's numbers (time-outs, extra metrics)

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


@dataclass
class TrainBatch:
    """Samples as right-padded tensors, aligned for next-token log-probs.

    Position t of every [B, L-1] tensor scores target `tokens[:, t+1]` from the logits at `tokens[:, t]`.
    `response_mask` is True exactly on response targets (not prompt, not padding).
    """

    tokens: torch.Tensor  # [B, L] long, prompt + response, right-padded with pad_id
    response_mask: torch.Tensor  # [B, L-1] bool
    behaviour_logprobs: torch.Tensor  # [B, L-1] float32, the sampling engine's log-probs (0 off the mask)
    is_explorer: torch.Tensor  # [B] bool
    group_index: torch.Tensor  # [B] long, the group whose rewards each sample is compared with
    rewards: torch.Tensor  # [B] float32
    truncated: Optional[torch.Tensor] = None  # [B] bool, the response hit max_new_tokens (finish_reason "length")
    advantages: Optional[torch.Tensor] = None  # [B] float32
    old_logprobs: Optional[torch.Tensor] = None  # [B, L-1] float32, the learner before this step's updates
    ref_logprobs: Optional[torch.Tensor] = None  # [B, L-1] float32, the frozen reference (KL)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor) -> "TrainBatch":
        """The rows `index` ([b] long or [B] bool) of every tensor."""
        return TrainBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                             for f in dataclasses.fields(self)})

    @classmethod
    def from_groups(cls, groups: list[RolloutGroup], pad_id: int) -> "TrainBatch":
        """Collate groups (rewards set) into one batch; group_index numbers the groups 0..len-1."""
        samples = [(g, s) for g, group in enumerate(groups) for s in group.samples]
        if not samples:
            raise ValueError("cannot build a TrainBatch from no samples")
        length = max(len(s.prompt_ids) + len(s.response_ids) for _, s in samples)
        tokens = torch.full((len(samples), length), pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(samples), length - 1, dtype=torch.bool)  # [B, L-1]
        behaviour = torch.zeros(len(samples), length - 1)  # [B, L-1]
        for row, (_, s) in enumerate(samples):
            p, r = len(s.prompt_ids), len(s.response_ids)
            tokens[row, :p + r] = torch.tensor(s.prompt_ids + s.response_ids)
            mask[row, p - 1:p - 1 + r] = True
            behaviour[row, p - 1:p - 1 + r] = torch.tensor(s.behaviour_logprobs)
        if any(s.reward is None for _, s in samples):
            raise ValueError("every sample needs a reward before collation")
        return cls(tokens=tokens, response_mask=mask, behaviour_logprobs=behaviour,
                   is_explorer=torch.tensor([s.source == "explorer" for _, s in samples]),
                   group_index=torch.tensor([g for g, _ in samples]),
                   rewards=torch.tensor([float(s.reward) for _, s in samples]),
                   truncated=torch.tensor([s.finish_reason == "length" for _, s in samples]))
