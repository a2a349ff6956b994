"""The offline explorer cache with a real vLLM explorer: the CLI completes a crashed file to the exact
bytes of an uninterrupted run, and the cache serves back what the engine sampled."""

import json

import pytest
import yaml

pytest.importorskip("vllm")

from megatron_s2l.config import SamplingConfig  # noqa: E402
from megatron_s2l.rollout.explorer_cache import ExplorerCache, write_explorer_cache  # noqa: E402
from megatron_s2l.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_s2l.types import Prompt  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402
from tests.vllm.conftest import engine_config  # noqa: E402
from tools.generate_explorer_cache import main as generate_cli  # noqa: E402

pytestmark = pytest.mark.vllm

SAMPLING = SamplingConfig(temperature=0.7, top_p=0.95, max_new_tokens=12)
PROMPTS = [Prompt(f"q{i}", [0, 7 + i, 30 + 2 * i, 5], str(i)) for i in range(5)]


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("explorer") / "small", seed=3, init_std=0.5)
    return path, VLLMEngine(str(path), engine_config(), source="explorer", model_id="small", eos_token_id=1)


def test_cli_resumes_a_crashed_cache_to_the_uninterrupted_bytes(explorer, tmp_path):
    path, engine = explorer
    whole = tmp_path / "whole.jsonl"
    stats = write_explorer_cache(engine, PROMPTS, whole, n=4, sampling=SAMPLING, explorer_id="small", seed=0,
                                 batch_size=2, progress=False)
    assert stats["written"] == 5
    lines = whole.read_bytes().splitlines(keepends=True)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_bytes(b"".join(lines[:9]) + lines[9][:25])  # 2 prompts complete, the 3rd cut mid-line
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt_id": p.prompt_id, "prompt_ids": p.prompt_ids, "ground_truth": p.ground_truth}) + "\n"
        for p in PROMPTS))
    config = {"explorer": {"hf_path": str(path), "model_id": "small",
                           "engine": {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 128, "dtype": "float32"},
                           "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 12}},
              "data": {"max_prompt_length": 116}}  # the engine's 128 tokens hold a prompt and 12 new ones
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    generate_cli(["--config", str(tmp_path / "run.yaml"), "--out", str(crashed), "--n", "4", "--batch-size", "3",
                  "--prompt-ids", str(tmp_path / "prompts.jsonl"), "--eos-token-id", "1", "--no-reward"])
    assert crashed.read_bytes() == whole.read_bytes()

    sampled = engine.generate(PROMPTS, 4, SAMPLING, seed=0)
    served = ExplorerCache(whole).generate(PROMPTS, 4, SAMPLING, seed=123)
    for got, want in zip(served, sampled):
        assert sorted((s.response_ids, s.behaviour_logprobs, s.finish_reason) for s in got) == sorted(
            (s.response_ids, s.behaviour_logprobs, s.finish_reason) for s in want)
