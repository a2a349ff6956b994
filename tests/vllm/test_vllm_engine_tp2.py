"""VLLMEngine at tensor_parallel_size=2 on CPU.

One process: vLLM's own worker per rank (threads bound "0|1"); a refit travels as serialised buckets and
the refitted engine's log-probs equal an HF float32 forward. Two gloo ranks (as under torchrun): the engine
is sharded over the job's ranks and starts although a killed job left its shared-memory segments behind.
"""

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from megatron_s2l.config import SamplingConfig  # noqa: E402
from megatron_s2l.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_s2l.types import Prompt  # noqa: E402
from tests.multiprocess import run_ranks  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402
from tests.vllm.conftest import engine_config, hf_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm


def test_tp2_refit_matches_hf(tmp_path):
    old = write_tiny_model(tmp_path / "old", seed=0, init_std=0.5)
    new = write_tiny_model(tmp_path / "new", seed=1, init_std=0.5)
    engine = VLLMEngine(str(old), engine_config(tensor_parallel_size=2, cpu_omp_threads_bind="0|1",
                                                refit_bucket_bytes=2**19),
                        source="learner", model_id="learner", eos_token_id=1)
    from safetensors.torch import load_file

    try:
        stats = engine.update_weights(load_file(str(new / "model.safetensors")).items(), version=1)
        prompts = [Prompt("a", [0, 5, 6, 7], "x"), Prompt("b", [0, 9, 10], "y")]
        samples = [s for group in engine.generate(prompts, 2, SamplingConfig(max_new_tokens=16), seed=2)
                   for s in group]
    finally:
        engine.close()
    assert stats["buckets"] > 1 and len(samples) == 4
    for sample in samples:
        expected = hf_logprobs(new, sample.prompt_ids, sample.response_ids)
        torch.testing.assert_close(torch.tensor(sample.behaviour_logprobs), expected, atol=1e-4, rtol=0)


def _sharded_engine(rank: int, world_size: int, model: str) -> tuple[list[str], list]:
    engine = VLLMEngine(model, engine_config(tensor_parallel_size=2, cpu_omp_threads_bind=str(rank)),
                        source="learner", model_id="learner", eos_token_id=1)
    try:
        segments = sorted(name for name in os.listdir("/dev/shm") if name.startswith("s2l"))
        samples = engine.generate([Prompt("a", [0, 5, 6, 7], "x")], 2, SamplingConfig(max_new_tokens=12), seed=3)[0]
    finally:
        engine.close()
    return segments, [(s.prompt_ids, s.response_ids, s.behaviour_logprobs) for s in samples]


def test_sharded_engine_starts_over_segments_a_killed_job_left(tmp_path):
    model = write_tiny_model(tmp_path / "model", seed=0, init_std=0.5)
    # What a SIGKILLed TP=2 job leaves: vLLM's own names, the same for every external-launcher job.
    stale = [Path(f"/dev/shm/-tp:0-[0-1]-cpushm_{rank}") for rank in range(2)]
    created = [path for path in stale if not path.exists()]
    for path in created:
        path.write_bytes(b"left by a killed job")
    try:
        results = run_ranks(_sharded_engine, 2, str(model), timeout=240)
    finally:
        for path in created:
            path.unlink()
    assert results[0] == results[1]  # one engine over both ranks
    segments, samples = results[0]
    assert segments == []  # unlinked once mapped: a kill now cannot leave them behind
    assert len(samples) == 2
    for prompt_ids, response_ids, logprobs in samples:
        expected = hf_logprobs(model, prompt_ids, response_ids)
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
