"""Shared set-up of the real-vLLM tests: one thread per engine, a small explicit KV cache, float32."""

import os

from megatron_s2l.config import EngineConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")


def engine_config(**overrides) -> EngineConfig:
    """A CPU engine sized for tiny test models; float32 so log-probs compare to HF within 1e-5."""
    base = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=128, dtype="float32", seed=0)
    return EngineConfig(**(base | overrides))

