"""GPU colocation: a CUDA vLLM engine gives its memory back while the learner trains, and takes it back.

Measured with `torch.cuda.mem_get_info` (free bytes on the device) around each call, in the order
`rollout.colocation.Colocation` uses:
- the learner's engine sleeps at level 2: nearly all it reserved (weights and KV cache) comes back; waking
  its weights re-acquires about the checkpoint's bytes and no KV cache; the refit loads the weights; waking
  the KV cache re-acquires the rest; greedy answers then equal those before the sleep (the level-2 sleep
  dropped the weights, so only the refit can have restored them);
- the explorer sleeps at level 1 (weights kept in host memory): the same memory comes back, and after a
  whole wake its greedy answers are unchanged, with no refit.
Needs a CUDA GPU and a CUDA build of vLLM (`vllm_cuda` in conftest); prints the measured figures (`-s`).
"""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.config import EngineConfig, SamplingConfig
from megatron_s2l.types import Prompt

pytestmark = [pytest.mark.gpu, pytest.mark.vllm_cuda]

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)
PROMPTS = [Prompt(f"p{i}", [3 + i, 17, 40 + i, 9], "") for i in range(4)]
GIB = 2**30


def free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def start_engine(path, source: str):
    """A bf16 engine reserving a fifth of the GPU, with sleep mode; returns it and the bytes it took."""
    from megatron_s2l.rollout.vllm_engine import VLLMEngine

    before = free_bytes()
    engine = VLLMEngine(str(path), EngineConfig(gpu_memory_utilization=0.2, max_model_len=256, dtype="bfloat16",
                                                enable_sleep_mode=True), source=source, model_id=source,
                        eos_token_id=1)
    return engine, before - free_bytes()


def greedy(engine) -> list[list[int]]:
    return [samples[0].response_ids for samples in engine.generate(PROMPTS, 1, GREEDY, seed=0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Qwen3 of about 0.5 GB in bf16, so that the weights stand out from allocator noise."""
    from tests.tiny_models import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("sleep") / "model", vocab_size=32768, hidden_size=1024,
                            intermediate_size=4096, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=64,
                            init_std=0.5)
    torch.cuda.init()
    return path


def test_learner_engine_releases_all_and_comes_back_weights_first(checkpoint):
    from megatron_s2l.learner.safetensors_io import read_hf_state

    engine, reserved = start_engine(checkpoint, "learner")
    state = read_hf_state(checkpoint)
    weights = sum(state[name].numel() * 2 for name in state)  # bf16 in the engine
    before = greedy(engine)
    awake = free_bytes()

    engine.sleep(2)
    released = free_bytes() - awake
    engine.wake(["weights"])
    weights_back = released - (free_bytes() - awake)
    engine.update_weights(((name, state[name]) for name in state), version=1)
    engine.wake(["kv_cache"])
    kv_back = released - weights_back - (free_bytes() - awake)
    after = greedy(engine)
    print(f"learner engine: reserved {reserved / GIB:.2f} GiB, level-2 sleep released {released / GIB:.2f} GiB; "
          f"wake weights {weights_back / GIB:.3f} GiB (checkpoint {weights / GIB:.3f} GiB), "
          f"then KV cache {kv_back / GIB:.2f} GiB")

    assert released >= 0.9 * reserved
    # the weights alone, no KV cache yet (several GiB); sleep mode rounds every allocation up to 2 MiB pages
    assert 0.9 * weights <= weights_back <= 2 * weights
    assert kv_back >= 0.9 * (released - weights_back)
    assert engine.asleep == frozenset() and not engine.weights_dropped
    assert after == before
    engine.sleep(2)  # hand the GPU to the next test (closing an in-process engine ends the process group)


def test_explorer_engine_keeps_its_weights_on_the_host(checkpoint):
    engine, reserved = start_engine(checkpoint, "explorer")
    before = greedy(engine)
    awake = free_bytes()

    engine.sleep(1)
    released = free_bytes() - awake
    engine.wake()
    back = released - (free_bytes() - awake)
    after = greedy(engine)
    print(f"explorer engine: reserved {reserved / GIB:.2f} GiB, level-1 sleep released {released / GIB:.2f} GiB, "
          f"whole wake re-acquired {back / GIB:.2f} GiB")

    assert released >= 0.9 * reserved and back >= 0.9 * released
    assert not engine.weights_dropped and after == before
