"""The S2L rollout phase: the hook a Megatron-Core training loop calls once per iteration.

A training loop needs three things from it (`RolloutHook`):
- `phases(step)`: which sources each optimizer phase of the step draws from. `combined` groups (the paper)
  give one phase with both sources; `separate` groups (the authors' code) an explorer-only phase, then a
  learner-only phase rolled out after the first update.
- `rollout(step, prompts, sources)`: the rollout groups with rewards, identical on every rank.
- `sync_weights(named_tensors)`: push the learner's new weights (HF names) into its rollout engine.

`RolloutPhase` implements it over `S2LMixer`. Plain GRPO is the same object without an explorer and the
token-level baseline the same with a hotter learner: both are config choices. A user with their own
Megatron loop builds one and calls these three methods; another generation backend is any object with them.

Colocation (SPMD, as verl runs vLLM): every rank of the job holds the engines. Ranks form engine replicas
of `tensor_parallel_size` consecutive ranks (vLLM's external launcher shards one engine over them); each
replica generates for its share of the step's prompts, and the groups are gathered so that every rank
trains on the same batch and takes its own data-parallel shard.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
import torch.distributed as dist

from megatron_s2l.rollout.mixer import S2LMixer
from megatron_s2l.rollout.refit import Refitter
from megatron_s2l.types import Prompt, RolloutGroup, Source


class RolloutHook(Protocol):
    def phases(self, step: int) -> list[tuple[Source, ...]]: ...

    def rollout(self, step: int, prompts: list[Prompt], sources: tuple[Source, ...]) -> list[RolloutGroup]: ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def engine_replicas(engine_tp: int) -> tuple[int, int, int]:
    """(replica index, number of replicas, rank inside the replica) of this process for engines of `engine_tp`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world % engine_tp:
        raise ValueError(f"engine tensor_parallel_size={engine_tp} must divide the number of processes {world}")
    return rank // engine_tp, world // engine_tp, rank % engine_tp


class RolloutPhase:
    """S2L rollout over a mixer whose engines are replicated SPMD over the job's ranks."""

    def __init__(self, mixer: S2LMixer, refitter: Refitter, engine_tp: int = 1):
        self.mixer = mixer
        self.refitter = refitter
        self.weights_version = 0  # learner updates pushed to the engine so far
        self.replica, self.num_replicas, self.rank_in_replica = engine_replicas(engine_tp)

    def phases(self, step: int) -> list[tuple[Source, ...]]:
        return self.mixer.phases(step)

    def rollout(self, step: int, prompts: list[Prompt], sources: tuple[Source, ...]) -> list[RolloutGroup]:
        """Groups for `prompts` in prompt order (each prompt's groups together), the same on every rank."""
        mine = self.mixer.rollout(step, prompts[self.replica::self.num_replicas], sources)
        if self.num_replicas == 1 and not dist.is_initialized():
            return mine
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine if self.rank_in_replica == 0 else None)
        by_prompt: dict[str, list[RolloutGroup]] = {}
        for groups in filter(None, gathered):
            for group in groups:
                by_prompt.setdefault(group.prompt_id, []).append(group)
        return [group for p in prompts for group in by_prompt.get(p.prompt_id, [])]

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Collective: every rank streams the gathered HF tensors into its engine shard."""
        self.weights_version += 1
        self.refitter.refit(named_tensors, version=self.weights_version)
