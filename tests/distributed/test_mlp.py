"""The local spec's MLP (`learner.mlp.SwiGLUMLP`) against megatron-core's own `MLP` with the same weights:
the same outputs and input and weight gradients, alone and with its fc1 and fc2 split over two tensor-parallel
ranks (real processes), where each rank's fc1 shard holds its own gate and up halves."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.config import ParallelConfig
from tests.multiprocess import run_ranks

HIDDEN, FFN, SEQ, BATCH = 16, 24, 5, 3


def _compare(rank: int, world_size: int) -> dict:
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP

    from megatron_s2l.learner.cpu_shims import megatron_on_cpu
    from megatron_s2l.learner.mlp import SwiGLUMLP
    from megatron_s2l.learner.model import init_parallel

    init_parallel(ParallelConfig(tensor_model_parallel_size=world_size), seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=2,
                               gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                               bias_activation_fusion=False, tensor_model_parallel_size=world_size,
                               use_cpu_initialization=True)
    submodules = get_gpt_layer_local_spec().submodules.mlp.submodules
    with megatron_on_cpu():
        reference, product = MLP(config, submodules), SwiGLUMLP(config)  # as the layer spec builds it
    generator = torch.Generator().manual_seed(5 + rank)
    for weight in reference.parameters():  # weights of order one: megatron's init (std 0.02) gives tiny outputs
        weight.data.normal_(generator=generator)
    product.load_state_dict(reference.state_dict())
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(5))  # the same on every rank
    outputs, grads = [], []
    for mlp in (reference, product):
        inputs = hidden.clone().requires_grad_()
        with megatron_on_cpu():
            out, bias = mlp(inputs)  # [SEQ, BATCH, HIDDEN], None
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outputs.append(out.detach())
        grads.append([inputs.grad] + [p.grad for p in mlp.parameters()])
    errors = {"output": (outputs[0] - outputs[1]).abs().max().item(), "scale": outputs[0].abs().max().item(),
              "grads": max((a - b).abs().max().item() for a, b in zip(*grads)), "bias": bias}
    with pytest.raises(ValueError, match="add_bias_linear"):
        config.add_bias_linear = True
        SwiGLUMLP(config)
    return errors


@pytest.mark.parametrize("world_size", [1, 2])
def test_swiglu_mlp_matches_megatron_core_mlp(world_size):
    for errors in run_ranks(_compare, world_size, timeout=120):
        assert errors["scale"] > 1 and errors["bias"] is None  # the outputs are not all zero
        assert errors["output"] < 1e-5 and errors["grads"] < 1e-5, errors
