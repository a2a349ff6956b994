"""megatron-core on CUDA without Transformer Engine: the local-spec Learner on one GPU against HF transformers.

The first device check, needing only the megatron-core wheel: the CPU shims stay off on a GPU, megatron-core's
local layer spec runs on CUDA (0.19.x on the device, 0.16.1 on CPU CI), and the Learner's per-token
log-probs equal an HF transformers float32 forward of the same checkpoint on the same GPU (TF32 off, as
torch's default for matmuls: within 1e-4, as on CPU). One GRPO step then raises the advantage-weighted
log-probs of the batch (the surrogate's first-order gain).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.gpu.test_te_learner import hf_model, learner, make_batch  # noqa: F401  (hf_model is a fixture)

pytestmark = pytest.mark.gpu


def hf_logprobs(path: str, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) from HF transformers in float32 on the GPU: [B, L-1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1].cuda()).logits.float()  # [B, L-1, V]
    return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None].cuda())[..., 0].cpu()  # [B, L-1]


def test_local_spec_learner_on_cuda_matches_hf(hf_model):  # noqa: F811
    from megatron_s2l.learner import cpu_shims

    model, path = hf_model
    batch = make_batch(model.vocab_size)
    trained = learner(model, path)
    assert not cpu_shims._applied, "the CPU shims must never be active on a GPU"
    assert next(trained.model_chunks[0].parameters()).is_cuda

    logprobs = trained.logprobs(batch)  # [B, L-1]
    expected = hf_logprobs(path, batch.tokens)
    mask = batch.response_mask
    diff = (logprobs - expected)[mask].abs()
    print(f"\nlocal spec on CUDA vs HF: log-probs max {diff.max():.3e} mean {diff.mean():.3e}")
    assert diff.max() <= 1e-4, diff.max()

    metrics = trained.train(dataclasses.replace(batch, old_logprobs=logprobs))
    assert metrics["optimizer_steps"] == 1 and metrics["grad_norm"] > 0
    moved = (trained.logprobs(batch) - logprobs) * mask  # [B, L-1]
    gain = (batch.advantages[:, None] * moved).sum().item()
    print(f"advantage-weighted log-prob change after one step: {gain:.3e}")
    assert gain > 0, "the update lowered the probability of tokens with positive advantages"
