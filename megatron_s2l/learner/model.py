"""The learner model: Megatron-Core parallel state and a Qwen3/Qwen2/Llama-style `GPTModel` built from config.

`init_parallel` sets up tensor/pipeline/data parallel groups (gloo on CPU, NCCL on GPU) once per
process; `build_model` returns this rank's pipeline stage of the model. The local (pure megatron-core)
layer spec runs everywhere, its core attention fused by torch (`learner.attention`) and its SwiGLU one
product (`learner.mlp`); the Transformer Engine spec (`layer_spec="te"`) is imported only when asked.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import unwrap_model

from megatron_s2l.config import RECOMPUTE_FIELDS, FP8Config, ModelConfig, ParallelConfig
from megatron_s2l.learner.attention import SDPAttention
from megatron_s2l.learner.cpu_shims import on_cpu
from megatron_s2l.learner.fp8 import fp8_transformer_fields, require_transformer_engine
from megatron_s2l.learner.hf_mapping import padded_vocab_size
from megatron_s2l.learner.mlp import SwiGLUMLP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@on_cpu
def init_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Initialise torch.distributed (from torchrun's env, or a single process) and Megatron's groups.

    Idempotent for the same layout. Seeds Megatron's model-parallel RNG tracker so that TP ranks draw
    the same dropout masks where they must and different ones where they must not.
    """
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # a lone process: any free port
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"parallel.tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp} must "
                         f"divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (tp, pp):
            raise RuntimeError("Megatron parallel state is already initialised with another TP x PP layout")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(model: ModelConfig, parallel: ParallelConfig, fp8: FP8Config | None = None, *,
                       params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The megatron-core TransformerConfig of a Qwen3/Qwen2/Llama-style decoder (RMSNorm, SwiGLU, GQA, RoPE)."""
    if model.num_layers % parallel.pipeline_model_parallel_size:
        raise ValueError(f"learner.num_layers={model.num_layers} must be divisible by "
                         f"parallel.pipeline_model_parallel_size={parallel.pipeline_model_parallel_size}")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        layernorm_epsilon=model.norm_epsilon,
        normalization="RMSNorm",
        qk_layernorm=model.qk_layernorm,
        add_qkv_bias=model.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        **fp8_transformer_fields(fp8 or FP8Config(), model.layer_spec),
        **RECOMPUTE_FIELDS[model.recompute],
    )


def layer_spec(model: ModelConfig):
    """The transformer layer spec named by `model.layer_spec`."""
    if model.layer_spec == "te":
        require_transformer_engine("learner.layer_spec='te'")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.mlp = SwiGLUMLP
    return spec


@on_cpu
def build_model(model: ModelConfig, config: TransformerConfig) -> GPTModel:
    """This rank's pipeline stage of the GPT; `init_parallel` must have run.

    Logits stay vocab-parallel (`parallel_output=True`): log-probs are gathered from the shards, never
    from full-vocabulary logits. A vocabulary TP does not divide gets padding rows that the log-probs ignore.
    """
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=padded_vocab_size(model.vocab_size, parallel_state.get_tensor_model_parallel_world_size()),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
    )
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def attention_span(model: ModelConfig) -> float:
    """Row length T at which a packed position's block-masked attention (T keys: a score and a weighted value
    per key and head) costs as much as its position-wise work (the projections and the SwiGLU MLP, in
    multiply-adds per position); infinite for the TE spec, whose THD attention skips the masked blocks."""
    if model.layer_spec == "te":
        return math.inf
    h, q = model.hidden_size, model.num_attention_heads * model.kv_channels
    kv = model.num_query_groups * model.kv_channels
    return (2 * h * q + 2 * h * kv + 3 * h * model.ffn_hidden_size) / (2 * q)


@contextlib.contextmanager
def logits_only_at(model: torch.nn.Module, scored: torch.Tensor):
    """While active, the last stage computes only the hidden states at `scored` positions past the final
    layer's attention: that layer's MLP block, the final norm and the output layer.

    `scored`: bool, the model input's [b, s] layout (THD: [1, s]), True where a target is scored. The
    model then returns logits [1, N, V/TP] for the N scored positions in row-major order instead of
    [b, s, V/TP]: prompt and padding positions cost no vocabulary projection and no log-prob arithmetic,
    as TRL's `logits_to_keep` skips the prompt, and no final MLP either (the MLP and norms act on each
    position alone; the final attention still reads every position's keys and values). The selection
    moves back to the output layer's input where the final MLP cannot take it (`_final_mlp_selectable`).
    `model` may be wrapped (DDP); other stages run unchanged.
    """
    gpt = unwrap_model(model)
    output_layer = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if output_layer is None:
        yield
        return
    if output_layer.sequence_parallel:
        raise ValueError("logits_only_at: the output layer is sequence-parallel; its input is a shard of the "
                         "sequence, so positions cannot be selected before it gathers them")

    def select(hidden):  # [s, b, h] -> [N, 1, h]
        return hidden.transpose(0, 1)[scored.reshape(hidden.shape[1], hidden.shape[0])].unsqueeze(1)

    if _final_mlp_selectable(gpt):
        final = gpt.decoder.layers[-1]
        forward_mlp = final._forward_mlp  # an instance attribute shadows the method while active
        final._forward_mlp = lambda hidden, *args, **kwargs: forward_mlp(select(hidden), *args, **kwargs)
        restore = functools.partial(delattr, final, "_forward_mlp")
    else:
        restore = output_layer.register_forward_pre_hook(lambda _, args: (select(args[0]), *args[1:])).remove
    try:
        yield
    finally:
        restore()


def _final_mlp_selectable(gpt: GPTModel) -> bool:
    """Whether the final layer's MLP block may run on the scored positions alone: not under full-layer
    recomputation in training (the backward re-runs the layer after the selection is gone), nor in FP8
    (its GEMMs need token counts in multiples of 16), nor for a mixture of experts (the router's padding
    mask keeps the [b, s] layout)."""
    layers = gpt.decoder.layers
    return (len(layers) > 0 and not gpt.config.fp8 and not getattr(layers[-1], "is_moe_layer", False)
            and not (gpt.training and gpt.config.recompute_granularity == "full"))
