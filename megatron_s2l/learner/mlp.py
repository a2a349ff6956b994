"""The dense MLP of the local layer spec, its SwiGLU computed as silu(gate) * up.

Megatron-Core's unfused gated activation is silu(gate) * (up + glu_linear_offset): with the offset at
0.0 the addition only copies the [s, b, ffn] half, on every forward (on CPU, a quarter of the activation's
time). Its fused path compiles a kernel with torch.compile at the first step instead. The math here is
the same product; the Transformer Engine spec keeps megatron-core's MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from torch import Tensor


class SwiGLUMLP(MLP):
    """`MLP` (same construction, weights and sharding) with the SwiGLU as one product of the fc1 halves.
    Dense SwiGLU without biases, clamping or offset only (the Qwen and Llama families this project maps).

    A layer spec names the class itself, not a ModuleSpec: megatron-core then builds it from the config
    alone (the linears default to the local spec's) and, as for its own MLP by default, the tensor-parallel
    group comes from parallel_state; for a ModuleSpec of a class it does not know it would log a warning.
    """

    def __init__(self, config, submodules: MLPSubmodules | None = None, **kwargs):
        super().__init__(config, submodules or MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                             linear_fc2=RowParallelLinear), **kwargs)
        unsupported = {"gated_linear_unit=False": not config.gated_linear_unit,
                       "activation_func other than silu": config.activation_func is not F.silu,
                       "add_bias_linear": config.add_bias_linear,
                       "glu_linear_offset": getattr(config, "glu_linear_offset", 0.0) != 0.0,
                       "activation_func_clamp_value": getattr(config, "activation_func_clamp_value", None) is not None}
        if any(unsupported.values()):
            raise ValueError(f"SwiGLUMLP: {[name for name, bad in unsupported.items() if bad]} not supported; "
                             f"use megatron-core's MLP for them")

    def forward(self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs):
        """hidden_states [s, b, h] -> (output [s, b, h], None): fc1, silu(gate) * up, fc2."""
        if per_token_scale is not None:
            raise ValueError("SwiGLUMLP is a dense MLP: per_token_scale (mixture-of-experts routing) is not supported")
        gate_up, _ = self.linear_fc1(hidden_states)  # [s, b, 2 ffn / TP]: this rank's gate and up halves
        gate, up = torch.chunk(gate_up, 2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)
