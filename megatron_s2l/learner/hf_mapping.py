"""The one name/shape mapping between Hugging Face Qwen3/Qwen2/Llama tensors and megatron-core's GPTModel.

Pure torch: which HF tensors make each megatron parameter, how they fuse, and how a fused tensor splits
over tensor-parallel ranks. Checkpoint conversion (`learner.convert`) and the vLLM refit (`rollout.refit`)
both reach it through `learner.hf_weights`, so the two can never disagree.

Layout of megatron-core's fused tensors (per transformer layer):
- `linear_qkv.weight` [G * (h/G + 2) * d, H]: for each of the G query groups, its h/G query heads, then
  its key head, then its value head (d = head_dim). Column-parallel: TP rank r holds groups
  [r*G/TP, (r+1)*G/TP), a contiguous block of rows, so sharding is a plain split of the fused tensor.
- `linear_fc1.weight` [2F, H]: gate rows then up rows. Column-parallel: rank r holds its slice of the
  gate rows followed by its slice of the up rows (each half is split separately).
- Row-parallel `linear_proj` / `linear_fc2` split their input dimension (dim 1); the embedding and the
  output layer split the vocabulary (dim 0); norms are replicated.
- Vocabulary padding: Megatron's embedding and output layer may have more rows than the HF vocabulary
  (`padded_vocab_size`: a multiple of TP, or of TP x `make_vocab_size_divisible_by` as Megatron-LM and
  Bridge pad). The padded row count is read from the model's own parameters, so no config records it:
  loading appends zero rows, exporting drops them, and HF (and vLLM, through the refit) only ever see
  the true `vocab_size` rows. Log-probs leave the padded columns out (`vocab_parallel_logprobs(vocab_size=)`).
The local and Transformer Engine layer specs differ only in where the two pre-norms live (TE fuses
them into the following linear as `layer_norm_weight`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megatron_s2l.config import ModelConfig

# How a megatron tensor is built from its HF tensors and split over tensor-parallel ranks.
# VOCAB: column-parallel over the (possibly padded) vocabulary rows, the embedding and the output layer.
REPLICATED, VOCAB, ROW, QKV, FC1 = "replicated", "vocab", "row", "qkv", "fc1"

# Per-layer parameters: megatron suffix (local spec) -> (HF suffixes, layout). TE renames the two pre-norms.
_LAYER = {
    "input_layernorm.weight": (("input_layernorm.weight",), REPLICATED),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), QKV),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                        "self_attn.v_proj.bias"), QKV),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), REPLICATED),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), REPLICATED),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), ROW),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), REPLICATED),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), ROW),
}
_QK_NORMS = {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}  # Qwen3 only
_QKV_BIAS = "self_attention.linear_qkv.bias"  # Qwen2 only
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
EMBEDDING, FINAL_NORM = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


@dataclass(frozen=True)
class WeightEntry:
    """One megatron parameter (its global name, i.e. with global layer numbers) and its HF tensors."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    layout: str


def weight_map(cfg: ModelConfig) -> list[WeightEntry]:
    """Every parameter of the full model in canonical order (embedding, layers, final norm, output)."""
    hidden, d, ffn, vocab = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {
        "input_layernorm.weight": ((hidden,),),
        "self_attention.linear_qkv.weight": ((q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden)),
        "self_attention.linear_qkv.bias": ((q_rows,), (kv_rows,), (kv_rows,)),
        "self_attention.q_layernorm.weight": ((d,),),
        "self_attention.k_layernorm.weight": ((d,),),
        "self_attention.linear_proj.weight": ((hidden, q_rows),),
        "pre_mlp_layernorm.weight": ((hidden,),),
        "mlp.linear_fc1.weight": ((ffn, hidden), (ffn, hidden)),
        "mlp.linear_fc2.weight": ((hidden, ffn),),
    }
    entries = [WeightEntry(EMBEDDING, ("model.embed_tokens.weight",), ((vocab, hidden),), VOCAB)]
    for layer in range(cfg.num_layers):
        for suffix, (hf_suffixes, layout) in _LAYER.items():
            if (suffix in _QK_NORMS and not cfg.qk_layernorm) or (suffix == _QKV_BIAS and not cfg.add_qkv_bias):
                continue
            name = TE_NAMES.get(suffix, suffix) if cfg.layer_spec == "te" else suffix
            entries.append(WeightEntry(f"decoder.layers.{layer}.{name}",
                                       tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes),
                                       shapes[suffix], layout))
    entries.append(WeightEntry(FINAL_NORM, ("model.norm.weight",), ((hidden,),), REPLICATED))
    if not cfg.tie_word_embeddings:
        entries.append(WeightEntry(OUTPUT, ("lm_head.weight",), ((vocab, hidden),), VOCAB))
    return entries


def to_megatron(layout: str, hf: Sequence[torch.Tensor], num_query_groups: int) -> torch.Tensor:
    """Fuse the HF tensors of one entry into the full (unsharded) megatron tensor."""
    if layout == QKV:
        q, k, v = hf  # [h*d, H], [G*d, H], [G*d, H] (biases: [h*d], [G*d], [G*d])
        rest = q.shape[1:]  # (H,), or () for biases
        per_group = [t.reshape(num_query_groups, -1, *rest) for t in (q, k, v)]  # [G, rows/G, H] each
        return torch.cat(per_group, dim=1).reshape(-1, *rest)  # [G*(h/G+2)*d, H]
    if layout == FC1:
        return torch.cat(hf, dim=0)  # [2F, H]: gate then up
    (tensor,) = hf
    return tensor


def to_hf(layout: str, full: torch.Tensor, num_attention_heads: int, num_query_groups: int) -> tuple[torch.Tensor, ...]:
    """Split a full megatron tensor back into its HF tensors (the inverse of `to_megatron`)."""
    if layout == QKV:
        rest = full.shape[1:]  # (H,), or () for biases
        head_dim = full.shape[0] // (num_attention_heads + 2 * num_query_groups)
        q_rows = num_attention_heads // num_query_groups * head_dim
        grouped = full.reshape(num_query_groups, q_rows + 2 * head_dim, *rest)  # [G, (h/G+2)*d, H]
        q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
        return tuple(t.reshape(-1, *rest) for t in (q, k, v))  # [h*d, H], [G*d, H], [G*d, H]
    if layout == FC1:
        return tuple(full.chunk(2, dim=0))  # gate [F, H], up [F, H]
    return (full,)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 1) -> int:
    """`vocab_size` rounded up to a multiple of `tensor_parallel_size` x `divisible_by` (Megatron-LM's
    `--make-vocab-size-divisible-by` rule): the embedding rows of a Megatron model of that vocabulary."""
    if vocab_size < 1 or tensor_parallel_size < 1 or divisible_by < 1:
        raise ValueError(f"vocab_size={vocab_size}, tensor_parallel_size={tensor_parallel_size}, "
                         f"make_vocab_size_divisible_by={divisible_by}: each must be >= 1")
    multiple = tensor_parallel_size * divisible_by
    return -(-vocab_size // multiple) * multiple


def shard(layout: str, full: torch.Tensor, rank: int, size: int, *, padded_rows: int | None = None) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s slice of a full megatron tensor (of `size` ranks).

    VOCAB tensors are split as a vocabulary of `padded_rows` rows (default: `full`'s rows padded to a
    multiple of `size`), the rows past `full`'s being zero: each rank gets `padded_rows / size` rows.
    """
    if layout == REPLICATED:
        return full
    if layout == VOCAB:
        padded_rows = padded_rows or padded_vocab_size(full.shape[0], size)
        assert padded_rows % size == 0 and padded_rows >= full.shape[0], (padded_rows, size, full.shape)
        per_rank = padded_rows // size
        local = full[rank * per_rank:(rank + 1) * per_rank]  # [<= per_rank, H]: short on the padded end
        return torch.nn.functional.pad(local, (0, 0, 0, per_rank - local.shape[0]))  # [per_rank, H]
    if layout == ROW:
        return full.chunk(size, dim=1)[rank]
    if layout == FC1:
        return torch.cat([half.chunk(size, dim=0)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(size, dim=0)[rank]  # QKV: query groups are contiguous rows


def unshard(layout: str, shards: Sequence[torch.Tensor], *, vocab_size: int | None = None) -> torch.Tensor:
    """The full megatron tensor from every tensor-parallel rank's slice, in rank order.

    VOCAB tensors keep their first `vocab_size` rows (default: all): the padding is dropped.
    """
    if layout == REPLICATED:
        return shards[0]
    if layout == VOCAB:
        return torch.cat(shards, dim=0)[:vocab_size]  # [V, H]
    if layout == ROW:
        return torch.cat(shards, dim=1)
    if layout == FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)  # gates, then ups
    return torch.cat(shards, dim=0)


def full_shape(entry: WeightEntry) -> tuple[int, ...]:
    rows = sum(s[0] for s in entry.hf_shapes) if entry.layout in (QKV, FC1) else entry.hf_shapes[0][0]
    return (rows, *entry.hf_shapes[0][1:])


def check_hf_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor], source: str = "the HF state") -> None:
    """Refuse an HF state whose names or shapes differ from what `cfg` describes.

    Only names and shapes are read (the lazy mapping of `read_hf_state` loads nothing).
    """
    expected = {name: shape for entry in weight_map(cfg) for name, shape in zip(entry.hf, entry.hf_shapes)}
    present = {name for name in state if not name.endswith("rotary_emb.inv_freq")}  # a buffer old exports kept
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if unexpected == ["lm_head.weight"] and cfg.tie_word_embeddings:
        raise ValueError(f"{source} has lm_head.weight but its config says tie_word_embeddings=true: the "
                         f"checkpoint is untied; set tie_word_embeddings=false in its config.json")
    if missing or unexpected:
        raise ValueError(f"{source} does not match a model with {cfg.num_layers} layers (qk_layernorm="
                         f"{cfg.qk_layernorm}, tie_word_embeddings={cfg.tie_word_embeddings}): "
                         f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        got = tuple(_shape_of(state, name))
        if got != shape:
            raise ValueError(f"{source}: tensor {name} has shape {list(got)} but the config describes "
                             f"{list(shape)}; the checkpoint and its config.json disagree")


def _shape_of(state: Mapping[str, torch.Tensor], name: str) -> Sequence[int]:
    shape_fn = getattr(state, "shape", None)  # lazy mappings report shapes without loading the tensor
    return shape_fn(name) if callable(shape_fn) else state[name].shape

