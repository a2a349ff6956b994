"""Offline explorer rollouts, as the authors ran S2L-PO: generate once into JSONL, draw G_w per step.

File format: one JSON object per rollout, the `n` rollouts of a prompt written together as one block:
  prompt_id, prompt_ids, response_ids, logprobs (per response token, the explorer's), finish_reason,
  reward (null without a scorer), explorer_id, sampling (temperature, top_p, ...), seed,
  sample_index, num_samples, ground_truth, data_source.
`write_explorer_cache` appends block by block and flushes, so after a crash the file holds complete
blocks plus at most one partial block, possibly ending in a truncated line; a rerun cuts that tail off
and generates only the prompts still missing. Seeds are per prompt (see `rollout.engine.prompt_seed`),
so a resumed file holds exactly what an uninterrupted run would have written.

`ExplorerCache` serves such a file through the `RolloutEngine` interface.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Optional

from megatron_s2l.config import SamplingConfig
from megatron_s2l.rollout.engine import RolloutEngine, counts_per_prompt, prompt_seed, sampling_record
from megatron_s2l.rollout.mixer import Scorer
from megatron_s2l.types import Prompt, Sample


def _scan(path: Path) -> tuple[list[dict], int]:
    """The records of `path` in complete blocks, and the byte length those blocks occupy."""
    records, pending, valid_end, offset = [], [], 0, 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # truncated last line of a crashed run
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err}) before the end of the file; the "
                                 f"cache is corrupt, regenerate it") from None
            if pending and record["prompt_id"] != pending[0]["prompt_id"]:
                pending = []  # a partial block followed by another prompt: only complete blocks count
            pending.append(record)
            if len(pending) == record["num_samples"]:
                records.extend(pending)
                pending, valid_end = [], offset
    return records, valid_end


def read_explorer_cache(path: str | Path) -> list[dict]:
    """All records of complete prompt blocks in `path` (a partial tail from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: explorer cache not found (write one with tools/generate_explorer_cache.py)")
    return _scan(path)[0]


def write_explorer_cache(engine: RolloutEngine, prompts: list[Prompt], path: str | Path, *, n: int,
                         sampling: SamplingConfig, explorer_id: str, scorer: Optional[Scorer] = None,
                         seed: int = 0, batch_size: int = 32, progress: bool = True) -> dict[str, int]:
    """Generate `n` explorer rollouts for every prompt not yet complete in `path` and append them.

    An existing file must have been written with the same explorer_id, sampling, n and seed (else
    ValueError naming the file and the difference). Returns counts: prompts total, skipped (already
    complete), written, dropped (the engine could not serve them, e.g. too long).
    """
    from tqdm import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n}, batch_size={batch_size}: both must be >= 1")
    path = Path(path)
    settings = {"explorer_id": explorer_id, "sampling": sampling_record(sampling), "num_samples": n, "seed": seed}
    done: set[str] = set()
    if path.exists():
        records, valid_end = _scan(path)
        for record in records[:1]:
            differing = [f"{k}: file {record[k]!r} vs now {v!r}" for k, v in settings.items() if record[k] != v]
            if differing:
                raise ValueError(f"{path}: written with other settings ({', '.join(differing)}); use another "
                                 f"output file or delete this one")
        done = {r["prompt_id"] for r in records}
        if valid_end < path.stat().st_size:
            os.truncate(path, valid_end)  # drop the partial block of an interrupted run
    todo = [p for p in prompts if p.prompt_id not in done]
    stats = {"prompts": len(prompts), "skipped": len(prompts) - len(todo), "written": 0, "dropped": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(prompts), initial=stats["skipped"],
                                                       desc="explorer rollouts", unit="prompt",
                                                       disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            drawn = [(prompt, samples) for prompt, samples in zip(batch, engine.generate(batch, n, sampling, seed=seed))
                     if samples]
            stats["dropped"] += len(batch) - len(drawn)
            if scorer is not None:  # one call per batch: slow verifications run side by side
                flat = [(prompt, s) for prompt, samples in drawn for s in samples]
                for (_, s), reward in zip(flat, scorer.score([p for p, _ in flat], [s for _, s in flat])):
                    s.reward = float(reward)
            for prompt, samples in drawn:
                f.write("".join(json.dumps(_record(prompt, s, k, settings)) + "\n" for k, s in enumerate(samples)))
                stats["written"] += 1
            f.flush()
            bar.update(len(batch))
    return stats


def _record(prompt: Prompt, sample: Sample, index: int, settings: dict) -> dict:
    return {"prompt_id": prompt.prompt_id, "prompt_ids": list(prompt.prompt_ids),
            "response_ids": list(sample.response_ids), "logprobs": list(sample.behaviour_logprobs),
            "finish_reason": sample.finish_reason, "reward": sample.reward, "sample_index": index,
            "ground_truth": prompt.ground_truth, "data_source": prompt.data_source, **settings}


class ExplorerCache:
    """A `RolloutEngine` drawing explorer samples from a cache file instead of running the explorer."""

    def __init__(self, path: str | Path, *, seed: int = 0):
        """Load every complete block of `path`. Draws without an explicit seed use `seed` + call number."""
        self.path = Path(path)
        self.seed = seed
        self._calls = 0
        self.by_prompt: dict[str, list[dict]] = defaultdict(list)
        for record in read_explorer_cache(self.path):
            self.by_prompt[record["prompt_id"]].append(record)
        if not self.by_prompt:
            raise ValueError(f"{self.path}: the explorer cache holds no complete prompt; regenerate it")
        first = next(iter(self.by_prompt.values()))[0]
        self.explorer_id, self.sampling = first["explorer_id"], first["sampling"]

    def generate(self, prompts: list[Prompt], n: int | list[int], sampling: SamplingConfig, *,
                 seed: Optional[int] = None) -> list[list[Sample]]:
        """Draw `n` (or `n[i]`) distinct cached rollouts per prompt; the same (seed, prompt) draws the same.

        Raises ValueError if `sampling` differs from the cache's, or naming the prompt id if the cache
        lacks the prompt, has fewer than n rollouts for it, or was made from other prompt tokens.
        """
        if sampling_record(sampling) != self.sampling:
            raise ValueError(f"{self.path}: cached with sampling {self.sampling}, asked for "
                             f"{sampling_record(sampling)}; set explorer.sampling to the cache's settings or "
                             f"regenerate the cache")
        call_seed = self.seed + self._calls if seed is None else seed
        self._calls += 1
        results = []
        for prompt, count in zip(prompts, counts_per_prompt(prompts, n)):
            cached = self.by_prompt.get(prompt.prompt_id, [])
            if count > len(cached):
                raise ValueError(f"{self.path}: prompt {prompt.prompt_id!r} has {len(cached)} cached rollouts, "
                                 f"{count} needed; regenerate the cache with n >= {count}")
            if cached and cached[0]["prompt_ids"] != list(prompt.prompt_ids):
                raise ValueError(f"{self.path}: prompt {prompt.prompt_id!r} was cached with other token ids "
                                 f"(different template or tokenizer); regenerate the cache")
            drawn = random.Random(prompt_seed(call_seed, prompt.prompt_id)).sample(cached, count)
            results.append([Sample(prompt_id=r["prompt_id"], prompt_ids=list(r["prompt_ids"]),
                                   response_ids=list(r["response_ids"]), behaviour_logprobs=list(r["logprobs"]),
                                   source="explorer", policy_id=r["explorer_id"], finish_reason=r["finish_reason"],
                                   sampling=dict(r["sampling"])) for r in drawn])
        return results
