"""The local spec's fused core attention (`learner.attention.SDPAttention`) against megatron-core's own
`DotProductAttention`: the same outputs and input gradients for grouped-query causal attention, unpacked
(no mask) and packed (a block-causal mask), in one real process with Megatron's parallel state."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.config import ParallelConfig
from tests.multiprocess import run_ranks

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 8, 7, 3


def _compare(rank: int, world_size: int) -> dict:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_s2l.learner.attention import SDPAttention
    from megatron_s2l.learner.cpu_shims import megatron_on_cpu
    from megatron_s2l.learner.model import init_parallel
    from megatron_s2l.learner.packing import block_causal_mask

    init_parallel(ParallelConfig(), seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               masked_softmax_fusion=False)
    reference = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    fused = SDPAttention(config, 1, AttnMaskType.causal, "self")
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=generator)
    key, value = (torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=generator) for _ in range(2))
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 2, 2, 2]])  # [BATCH, SEQ]
    errors = {}
    for name, mask in (("causal", None), ("packed", block_causal_mask(segments))):
        outputs, grads = [], []
        for attention in (reference, fused):
            inputs = [t.clone().requires_grad_() for t in (query, key, value)]
            with megatron_on_cpu():  # the reference builds its causal mask with device="cuda"
                out = attention(*inputs, mask)  # [SEQ, BATCH, HEADS * HEAD_DIM]
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
            outputs.append(out.detach())
            grads.append([t.grad for t in inputs])
        errors[name] = max([(outputs[0] - outputs[1]).abs().max().item()]
                           + [(a - b).abs().max().item() for a, b in zip(*grads)])
        errors[name + "_scale"] = outputs[0].abs().max().item()
    with pytest.raises(ValueError, match="window_size"):
        config.window_size = (4, 0)
        SDPAttention(config, 1, AttnMaskType.causal, "self")
    return errors


def test_fused_attention_matches_megatron_core_attention():
    errors = run_ranks(_compare, 1, timeout=120)[0]
    assert errors["causal_scale"] > 0.1 and errors["packed_scale"] > 0.1  # the outputs are not all zero
    assert errors["causal"] < 1e-5 and errors["packed"] < 1e-5, errors
