"""The S2L rollout phase: the hook a Megatron-Core training loop calls, and everything the loop asks of it.

`RolloutHook` is the whole contract between a training loop and the rollout side; `loop.py` uses nothing
else. Per optimizer phase the loop calls `rollout`, then `release_memory` before it trains, then
`sync_weights` after it trained; `generate` serves held-out evaluation and `metrics` closes each step.

`RolloutPhase` implements it over `S2LMixer` and `Colocation`. Plain GRPO is the same object without an
explorer and the token-level baseline the same with a hotter learner: both are config choices. Another
generation backend is any object with the six methods of `RolloutHook`.

Colocation (SPMD, as verl runs vLLM): every rank of the job holds the engines. Ranks form engine replicas
of `tensor_parallel_size` consecutive ranks (vLLM's external launcher shards one engine over them); each
replica generates for its share of the step's prompts, and the groups are gathered so that every rank
trains on the same batch and takes its own data-parallel shard.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_s2l.config import SamplingConfig
from megatron_s2l.rollout.colocation import Colocation
from megatron_s2l.rollout.mixer import S2LMixer
from megatron_s2l.types import Prompt, RolloutGroup, Sample, Source


class RolloutHook(Protocol):
    """What a training loop needs from the rollout side, and all it may use."""

    def phases(self, step: int) -> list[tuple[Source, ...]]:
        """The sources each optimizer phase of `step` draws from: one phase with both sources (`combined`
        groups, the paper) or an explorer phase then a learner phase (`separate`, the authors' code)."""
        ...

    def rollout(self, step: int, prompts: list[Prompt], sources: tuple[Source, ...]) -> list[RolloutGroup]:
        """The rewarded groups of `prompts` from `sources`, in prompt order, identical on every rank; a
        prompt no engine could serve gets no group (and is counted in `metrics`)."""
        ...

    def release_memory(self) -> None:
        """Give the engines' accelerator memory to the trainer until the next rollout (may do nothing)."""
        ...

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, changed: bool) -> None:
        """Called after every phase's training with the learner's HF-named weights, a lazy and collective
        export: load them into the learner's engine when they `changed` (an optimizer step was taken) or
        when the engine needs them back; otherwise leave the iterable unstarted."""
        ...

    def generate(self, prompts: list[Prompt], n: int | list[int], sampling: SamplingConfig, *,
                 seed: Optional[int] = None) -> list[list[Sample]]:
        """Samples of the current learner policy (its engine) for prompts outside training, such as the
        held-out evaluation; `RolloutEngine.generate`'s contract."""
        ...

    def metrics(self, step: int) -> dict[str, float]:
        """Rollout numbers of `step` so far: at least `schedule/explorer_share` (alpha), and counters such
        as dropped prompts (summed over engine replicas, the same on every rank) or refit bytes and seconds."""
        ...


def engine_replicas(engine_tp: int) -> tuple[int, int, int]:
    """(replica index, number of replicas, rank inside the replica) of this process for engines of `engine_tp`."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world % engine_tp:
        raise ValueError(f"engine tensor_parallel_size={engine_tp} must divide the number of processes {world}")
    return rank // engine_tp, world // engine_tp, rank % engine_tp


class RolloutPhase:
    """S2L rollout over a mixer whose engines are replicated SPMD over the job's ranks."""

    def __init__(self, mixer: S2LMixer, colocation: Colocation, engine_tp: int = 1):
        """`colocation` holds the mixer's online engines (the learner's, and an online explorer's)."""
        self.mixer = mixer
        self.colocation = colocation
        self.replica, self.num_replicas, self.rank_in_replica = engine_replicas(engine_tp)
        self._step: Optional[int] = None
        self._counters: Counter[str] = Counter()  # this step's counters, summed over phases and replicas

    def phases(self, step: int) -> list[tuple[Source, ...]]:
        return self.mixer.phases(step)

    def rollout(self, step: int, prompts: list[Prompt], sources: tuple[Source, ...]) -> list[RolloutGroup]:
        """Groups for `prompts` in prompt order (each prompt's groups together), the same on every rank."""
        self._start_step(step)
        self.colocation.wake_for(sources)
        mine = self.mixer.rollout(step, prompts[self.replica::self.num_replicas], sources)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            # Alone, no gather: gloo copies the gathered bytes on its own thread, whose OpenMP team then
            # outlives the call and makes libgomp throttle its spin-waits process-wide (more threads than
            # cores), so every parallel op after it, generation and training alike, waits to wake a thread.
            self._counters.update(self.mixer.metrics)
            return mine
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (mine, self.mixer.metrics) if self.rank_in_replica == 0 else None)
        by_prompt: dict[str, list[RolloutGroup]] = {}
        for groups, counters in filter(None, gathered):
            self._counters.update(counters)
            for group in groups:
                by_prompt.setdefault(group.prompt_id, []).append(group)
        return [group for p in prompts for group in by_prompt.get(p.prompt_id, [])]

    def release_memory(self) -> None:
        self.colocation.release()

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, changed: bool) -> None:
        """Collective: every rank streams the gathered HF tensors into its engine shard (when needed)."""
        stats = self.colocation.refit(named_tensors, changed=changed) or {"bytes": 0.0, "seconds": 0.0}
        self._counters.update({"refit/bytes": stats["bytes"], "refit/seconds": stats["seconds"]})

    def generate(self, prompts: list[Prompt], n: int | list[int], sampling: SamplingConfig, *,
                 seed: Optional[int] = None) -> list[list[Sample]]:
        """The learner's engine's samples (woken first); every rank serves all `prompts` itself."""
        self.colocation.wake_for(("learner",))
        return self.mixer.engines["learner"].generate(prompts, n, sampling, seed=seed)

    def metrics(self, step: int) -> dict[str, float]:
        self._start_step(step)
        return {"schedule/explorer_share": self.mixer.explorer_share(step)} | dict(self._counters)

    def _start_step(self, step: int) -> None:
        if step != self._step:
            self._step = step
            self._counters.clear()
