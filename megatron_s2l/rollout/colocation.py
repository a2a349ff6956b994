"""The one owner of the order in which colocated engines give up and take back accelerator memory.

While the learner trains, the engines sleep (as verl and NeMo-RL run vLLM next to the trainer): the frozen
explorer at level 1, its weights kept in host memory, since they never change; the learner's engine at
level 2, its weights dropped, since a refit replaces them anyway. Before the learner's engine serves again,
its weights are woken, refitted, and only then its KV cache, so old weights, new buckets and the KV cache
are never resident at once (vLLM #22310); an explorer wakes whole. Where sleep mode is off (always on CPU)
an engine's `sleep` and `wake` do nothing and nothing is ever dropped.

The learner's engine is refitted only when the learner's weights changed (an optimizer step was taken) or
when it dropped them while asleep; otherwise the lazy export it is handed is never started.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Optional, Protocol

import torch

from megatron_s2l.types import Source

EXPLORER_SLEEP_LEVEL = 1  # frozen weights offloaded to host memory, KV cache discarded
LEARNER_SLEEP_LEVEL = 2  # weights and KV cache discarded: a refit follows every weight change


class SleepingEngine(Protocol):
    """An engine that can release its accelerator memory between rollouts (VLLMEngine)."""

    weights_dropped: bool  # set by a level-2 sleep, cleared by the next full weight update

    def sleep(self, level: int) -> None: ...

    def wake(self, tags: Optional[Sequence[str]] = None) -> None: ...


class RefittableEngine(SleepingEngine, Protocol):
    """The learner's engine: sleeps, wakes, and accepts HF-named weights in place (VLLMEngine)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       version: Optional[int] = None) -> dict[str, float]: ...


class Colocation:
    """Sleep, wake and refit of the learner's engine and an optional explorer engine, in the one safe order."""

    def __init__(self, learner: RefittableEngine, explorer: Optional[SleepingEngine] = None):
        """`explorer`: an online explorer engine; None for an offline cache or no explorer (nothing to release)."""
        self.engines: dict[Source, SleepingEngine] = {"learner": learner}
        if explorer is not None:
            self.engines["explorer"] = explorer
        self.weights_version = 0  # learner weight changes pushed so far (the engine starts from the learner's)

    def wake_for(self, sources: Sequence[Source]) -> None:
        """Make the engines of `sources` whole before they generate."""
        for source in sources:
            engine = self.engines.get(source)
            if engine is None:
                continue
            if engine.weights_dropped:
                raise RuntimeError(f"the {source} engine dropped its weights while asleep and has not been "
                                   f"refitted since: call sync_weights after training, before the next rollout")
            engine.wake()

    def release(self) -> None:
        """Put every engine to sleep for training: the explorer keeps its weights on the host, the learner's
        engine drops them."""
        for source, engine in self.engines.items():
            engine.sleep(LEARNER_SLEEP_LEVEL if source == "learner" else EXPLORER_SLEEP_LEVEL)

    def refit(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, changed: bool) -> Optional[dict[str, float]]:
        """Load the learner's weights into its engine if they `changed` or the engine dropped its copy.

        Returns {"bytes", "seconds", "buckets"} of the load, or None when nothing was loaded (then
        `named_tensors` was never iterated: a lazy, collective export costs nothing). Every rank must pass
        the same `changed`: the engines of all ranks sleep alike, so all take the same decision.
        """
        engine = self.engines["learner"]
        if not changed and not engine.weights_dropped:
            return None
        if changed:
            self.weights_version += 1
        start = time.perf_counter()
        engine.wake(["weights"])
        stats = engine.update_weights(named_tensors, version=self.weights_version)
        engine.wake(["kv_cache"])
        return dict(stats, seconds=time.perf_counter() - start)
