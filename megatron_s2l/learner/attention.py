"""Core attention of the local layer spec through torch's fused `scaled_dot_product_attention`.

Megatron-Core's local `DotProductAttention` materialises the [b, heads, s, s] scores, repeats the key and
value heads for grouped-query attention, and masks and softmaxes in separate kernels: on CPU that is 2-3x
the time of one fused SDPA call (forward and backward), and the same model in HF transformers uses SDPA.
The math is the same causal softmax attention; the Transformer Engine spec keeps its own fused kernel.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch import Tensor


class SDPAttention(DotProductAttention):
    """`DotProductAttention` (same construction, scale and state) computed by one fused SDPA call.

    Causal attention only, without softmax offsets, sliding windows or query-key layer scaling (the Qwen
    and Llama families this project maps); `attention_mask` is Megatron's boolean mask, True where a position
    may not attend.
    """

    def __init__(self, config, layer_number, attn_mask_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, *args, **kwargs)
        # layer scaling divides softmax_scale by the layer number and relies on the unfused softmax to undo it
        unsupported = {"softmax_type": config.softmax_type != "vanilla", "window_size": config.window_size is not None,
                       "apply_query_key_layer_scaling": config.apply_query_key_layer_scaling,
                       "attn_mask_type": attn_mask_type not in (AttnMaskType.causal, AttnMaskType.arbitrary)}
        if any(unsupported.values()):
            raise ValueError(f"SDPAttention: {[name for name, bad in unsupported.items() if bad]} not supported; "
                             f"use megatron-core's DotProductAttention for them")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, heads, d], key and value [sk, b, groups, d] -> context [sq, b, heads * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed_seq_params nor attention_bias: packed rows "
                             "come with a block-causal attention_mask")
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),  # [b, h, s, d]
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=attention_mask is None,
            dropout_p=self.attention_dropout.p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)
