"""Shared set-up of the real-vLLM tests: one thread per engine, a small explicit KV cache, float32."""

import os

import torch

from megatron_s2l.config import EngineConfig

os.environ.setdefault("OMP_NUM_THREADS", "1")


def engine_config(**overrides) -> EngineConfig:
    """A CPU engine sized for tiny test models; float32 so log-probs compare to HF within 1e-5."""
    base = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=128, dtype="float32", seed=0)
    return EngineConfig(**(base | overrides))


def hf_logprobs(path, prompt_ids, response_ids) -> torch.Tensor:
    """Log-probs of `response_ids` after `prompt_ids` from an HF transformers float32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.tensor([prompt_ids + response_ids])  # [1, L]
    with torch.no_grad():
        logits = model(tokens).logits.float()  # [1, L, V]
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)  # [L-1, V]
    targets = tokens[0, 1:]  # [L-1]
    return logprobs.gather(-1, targets[:, None])[:, 0][len(prompt_ids) - 1:]  # [R]
