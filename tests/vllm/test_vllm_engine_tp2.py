"""VLLMEngine at tensor_parallel_size=2 on CPU (one worker process per rank, threads bound "0|1"):
a refit travels as serialised buckets and the refitted engine's log-probs equal an HF float32 forward."""

import pytest
import torch

pytest.importorskip("vllm")

from megatron_s2l.config import SamplingConfig  # noqa: E402
from megatron_s2l.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_s2l.types import Prompt  # noqa: E402
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
