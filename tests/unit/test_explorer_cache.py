"""Offline explorer cache: write, crash, resume to the same bytes, read back identical, draw deterministically.

The engine is a deterministic stand-in (responses a pure function of seed and prompt id, like vLLM's
per-prompt seeds); tests/vllm/test_explorer_cache_vllm.py runs the same cycle with a real vLLM explorer.
"""

import json
import random

import pytest

from megatron_s2l.config import SamplingConfig
from megatron_s2l.rollout.engine import prompt_seed
from megatron_s2l.rollout.explorer_cache import ExplorerCache, read_explorer_cache, write_explorer_cache
from megatron_s2l.types import Prompt, Sample

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=8)
PROMPTS = [Prompt(f"q{i}", [0, 10 + i, 20 + i], str(i), data_source="demo") for i in range(7)]


class SeededEngine:
    """Responses and log-probs drawn from random.Random(prompt_seed(seed, prompt_id)); can crash on demand."""

    def __init__(self, crash_after_calls=None, skip=()):
        self.calls, self.crash_after_calls, self.skip = 0, crash_after_calls, set(skip)

    def generate(self, prompts, n, sampling, *, seed=None):
        if self.crash_after_calls is not None and self.calls >= self.crash_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        out = []
        for p in prompts:
            rng = random.Random(prompt_seed(seed, p.prompt_id))
            samples = []
            for _ in range(n):
                length = rng.randint(1, sampling.max_new_tokens)
                samples.append(Sample(p.prompt_id, p.prompt_ids, [rng.randrange(3, 500) for _ in range(length)],
                                      [-rng.random() * 3 for _ in range(length)], "explorer", "small",
                                      finish_reason=rng.choice(["stop", "length"])))
            out.append([] if p.prompt_id in self.skip else samples)
        return out


class ParityScorer:
    """Rewards the parity of a response's first token; records the size of every batch it scores."""

    def __init__(self):
        self.batches = []

    def score(self, prompts, samples):
        assert [p.prompt_id for p in prompts] == [s.prompt_id for s in samples]
        self.batches.append(len(samples))
        return [float(s.response_ids[0] % 2) for s in samples]


def write(path, engine, **kw):
    kw = {"scorer": ParityScorer(), **kw}
    return write_explorer_cache(engine, PROMPTS, path, n=3, sampling=SAMPLING, explorer_id="small", seed=4,
                                batch_size=2, progress=False, **kw)


def test_write_records_every_field(tmp_path):
    path = tmp_path / "cache.jsonl"
    stats = write(path, SeededEngine())
    assert stats == {"prompts": 7, "skipped": 0, "written": 7, "dropped": 0}
    lines = path.read_text().splitlines()
    assert len(lines) == 7 * 3
    first = json.loads(lines[0])
    expected = SeededEngine().generate(PROMPTS[:1], 3, SAMPLING, seed=4)[0][0]
    assert first == {"prompt_id": "q0", "prompt_ids": [0, 10, 20], "response_ids": expected.response_ids,
                     "logprobs": expected.behaviour_logprobs, "finish_reason": expected.finish_reason,
                     "reward": float(expected.response_ids[0] % 2), "sample_index": 0, "ground_truth": "0",
                     "data_source": "demo", "explorer_id": "small",
                     "sampling": {"temperature": 0.7, "top_p": 0.95, "top_k": -1, "presence_penalty": 0.0,
                                  "max_new_tokens": 8},
                     "num_samples": 3, "seed": 4}


def test_each_engine_batch_is_scored_in_one_call(tmp_path):
    scorer = ParityScorer()
    write(tmp_path / "cache.jsonl", SeededEngine(skip={"q3"}), scorer=scorer)
    assert scorer.batches == [2 * 3, 1 * 3, 2 * 3, 1 * 3]  # 7 prompts in batches of 2, q3 dropped; 3 samples each


def test_resume_after_crash_gives_the_uninterrupted_file(tmp_path):
    whole = tmp_path / "whole.jsonl"
    write(whole, SeededEngine())
    crashed = tmp_path / "crashed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write(crashed, SeededEngine(crash_after_calls=2))  # 2 batches of 2 prompts written
    # a crash mid-write: one more prompt's block half written, ending in a truncated line
    tail = whole.read_bytes().splitlines(keepends=True)[12:14]
    with open(crashed, "ab") as f:
        f.write(tail[0] + tail[1][:17])
    assert len(read_explorer_cache(crashed)) == 12
    stats = write(crashed, SeededEngine())
    assert stats == {"prompts": 7, "skipped": 4, "written": 3, "dropped": 0}
    assert crashed.read_bytes() == whole.read_bytes()


def test_other_settings_are_refused_on_resume(tmp_path):
    path = tmp_path / "cache.jsonl"
    write(path, SeededEngine(crash_after_calls=10))
    with pytest.raises(ValueError, match="seed: file 4 vs now 5"):
        write_explorer_cache(SeededEngine(), PROMPTS, path, n=3, sampling=SAMPLING, explorer_id="small", seed=5,
                             progress=False)


def test_read_back_identical_and_draws_deterministic(tmp_path):
    path = tmp_path / "cache.jsonl"
    write(path, SeededEngine())
    written = SeededEngine().generate(PROMPTS, 3, SAMPLING, seed=4)
    cache = ExplorerCache(path, seed=0)
    all_three = cache.generate(PROMPTS, 3, SAMPLING, seed=1)
    for got, want in zip(all_three, written):
        key = lambda s: s.response_ids  # noqa: E731
        assert sorted(map(key, got)) == sorted(map(key, want))
        by_ids = {tuple(s.response_ids): s for s in want}
        for s in got:
            w = by_ids[tuple(s.response_ids)]
            assert (s.behaviour_logprobs, s.finish_reason, s.source, s.policy_id, s.reward) == (
                w.behaviour_logprobs, w.finish_reason, "explorer", "small", None)
    two = cache.generate(PROMPTS, [2] * 7, SAMPLING, seed=8)
    assert two == cache.generate(PROMPTS, 2, SAMPLING, seed=8)
    assert all(len({tuple(s.response_ids) for s in group}) == 2 for group in two)
    draws = {tuple(tuple(s.response_ids) for s in cache.generate(PROMPTS[:1], 1, SAMPLING, seed=k)[0])
             for k in range(20)}
    assert len(draws) == 3  # different seeds reach every cached rollout


def test_errors_name_the_prompt(tmp_path):
    path = tmp_path / "cache.jsonl"
    write(path, SeededEngine(skip={"q3"}))
    cache = ExplorerCache(path)
    with pytest.raises(ValueError, match="prompt 'q0' has 3 cached rollouts, 4 needed"):
        cache.generate(PROMPTS[:1], 4, SAMPLING)
    with pytest.raises(ValueError, match="prompt 'q3' has 0 cached rollouts"):
        cache.generate(PROMPTS[3:4], 1, SAMPLING)
    with pytest.raises(ValueError, match="prompt 'q1' was cached with other token ids"):
        cache.generate([Prompt("q1", [0, 99], "1")], 1, SAMPLING)
    with pytest.raises(ValueError, match="cached with sampling"):
        cache.generate(PROMPTS[:1], 1, SamplingConfig(temperature=1.0))


def test_dropped_prompts_are_counted_and_retried(tmp_path):
    path = tmp_path / "cache.jsonl"
    assert write(path, SeededEngine(skip={"q3"}))["dropped"] == 1
    assert write(path, SeededEngine()) == {"prompts": 7, "skipped": 6, "written": 1, "dropped": 0}
