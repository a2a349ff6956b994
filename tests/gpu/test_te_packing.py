"""Sequence packing with the Transformer Engine layer spec (THD `PackedSeqParams`) against padding, one GPU.

Both Learners use the TE spec with BF16 parameters (TE's THD attention has only bf16/fp16 backends, so
the Learner refuses FP32 TE packing) and start from the same tiny random HF checkpoint; the padded one
is the reference. Responses vary from 3 to 40 tokens, so packed rows hold several sequences.

Tolerances (first estimates; run with `-s` to print the measured errors): the same BF16 weights through
differently shaped GEMMs and attention kernels (flash/cuDNN on [R*T] THD vs padded rows), each BF16
rounding ~4e-3 relative: log-probs 5e-2 absolute and 5e-3 mean, the GRPO loss and grad norm 2e-2
relative, every gradient 5e-2 relative (norm of the difference over the reference's norm). The CPU
suite shows the same packing exact to 1e-5 in FP32 (tests/distributed/test_packing.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig
from megatron_s2l.types import TrainBatch
from tests.tiny_models import write_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.te]

ROWS, LENGTH, GROUPS = 8, 49, 2
PADDED = OptimConfig(lr=1e-4, clip_grad=0.0, mini_batch_prompts=GROUPS, micro_batch_size=4, logprob_chunk_size=0)
PACKED = dataclasses.replace(PADDED, pack_sequences=True, pack_row_tokens=64, micro_batch_size=2)
LOSS = LossConfig(kl_coef=0.0, entropy_coef=0.01, aggregation="seq-mean-token-mean")
SEED = 5


def make_batch(vocab_size: int) -> TrainBatch:
    """8 rows of up to 49 tokens: prompts of 5-8 tokens, responses of 3-40 tokens, then padding."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab_size, (ROWS, LENGTH), generator=g)  # [B, L]
    mask = torch.zeros(ROWS, LENGTH - 1, dtype=torch.bool)  # [B, L-1]
    for row, response in enumerate((40, 3, 17, 9, 33, 5, 12, 26)):
        prompt = 5 + row % 4
        mask[row, prompt - 1:prompt - 1 + response] = True
        tokens[row, prompt + response:] = 2  # pad
    return TrainBatch(tokens=tokens, response_mask=mask,
                      behaviour_logprobs=-torch.rand(ROWS, LENGTH - 1, generator=g) * mask,  # [B, L-1]
                      is_explorer=torch.arange(ROWS) % 2 == 0,
                      group_index=torch.arange(ROWS) // (ROWS // GROUPS), rewards=torch.zeros(ROWS),
                      advantages=torch.randn(ROWS, generator=g))


def run(optim: OptimConfig, hf_path: str, batch: TrainBatch, old: torch.Tensor | None) -> dict:
    """A TE BF16 Learner from `hf_path`: its log-probs, then one GRPO step (on `old` log-probs) and its gradients."""
    from megatron_s2l.learner.hf_config import model_config_from_hf
    from megatron_s2l.learner.safetensors_io import read_hf_state
    from megatron_s2l.learner.step import Learner

    model = dataclasses.replace(model_config_from_hf(hf_path), layer_spec="te", params_dtype="bfloat16")
    learner = Learner(model, ParallelConfig(), optim, LOSS, FP8Config(), seed=SEED, with_reference=False)
    learner.load_hf(read_hf_state(hf_path))
    logprobs = learner.logprobs(batch)  # [B, L-1]
    metrics = learner.train(dataclasses.replace(batch, old_logprobs=logprobs if old is None else old))
    grads = {name: param.main_grad.detach().float().cpu()
             for name, param in learner.model_chunks[0].named_parameters()}
    return {"logprobs": logprobs, "metrics": metrics, "grads": grads}


def test_te_packed_matches_padded(tmp_path):
    path = write_tiny_model(tmp_path / "hf", vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=64, init_std=0.05, seed=SEED)
    batch = make_batch(1024)
    padded = run(PADDED, str(path), batch, None)
    packed = run(PACKED, str(path), batch, padded["logprobs"])  # the same old log-probs on both sides
    mask = batch.response_mask
    assert padded["logprobs"][mask].std() > 0.2, "reference log-probs barely vary: the comparison would be vacuous"
    diff = (packed["logprobs"] - padded["logprobs"])[mask].abs()
    rel = {name: ((packed["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12)).item()
           for name, grad in padded["grads"].items()}
    worst = max(rel.items(), key=lambda item: item[1])
    print(f"\nTE packed vs padded (BF16): log-probs max {diff.max():.3e} mean {diff.mean():.3e}; loss "
          f"{packed['metrics']['loss']:.6f} vs {padded['metrics']['loss']:.6f}; grad_norm "
          f"{packed['metrics']['grad_norm']:.6f} vs {padded['metrics']['grad_norm']:.6f}; worst grad rel {worst}")
    assert diff.max() <= 5e-2 and diff.mean() <= 5e-3, (diff.max(), diff.mean())
    assert packed["metrics"]["loss"] == pytest.approx(padded["metrics"]["loss"], rel=2e-2, abs=1e-3)
    assert packed["metrics"]["grad_norm"] == pytest.approx(padded["metrics"]["grad_norm"], rel=2e-2)
    assert worst[1] <= 5e-2, worst
