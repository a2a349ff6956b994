"""Load and export a megatron-core GPTModel as Hugging Face tensors, over its TP/PP ranks.

The name/shape mapping is `learner.hf_mapping`; this module moves the tensors: each rank copies its own
shards in (`load_hf_weights`), and the model-parallel group gathers every tensor back out
(`export_hf_weights`, what the vLLM refit streams and `save_hf_dir` writes). Pipeline stages are mapped
through each layer's global `layer_number`, so any split of layers over stages (and virtual stages) works.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_s2l.config import ModelConfig
from megatron_s2l.learner.hf_config import hf_config
from megatron_s2l.learner.hf_mapping import (EMBEDDING, FINAL_NORM, OUTPUT, REPLICATED, VOCAB, WeightEntry,
                                             check_hf_state, full_shape, shard, to_hf, to_megatron, unshard,
                                             weight_map)
from megatron_s2l.learner.safetensors_io import write_safetensors


def _local_parameters(model_chunks: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by global name (layer indices made global through `layer_number`).

    The tied output layer of a last pipeline stage (a copy of the embedding) is returned under its own
    name `output_layer.weight` so callers can treat it apart.
    """
    params = {}
    for chunk in model_chunks:
        layer_numbers = [layer.layer_number for layer in chunk.decoder.layers]
        for name, param in chunk.named_parameters():
            if name.startswith("decoder.layers."):
                _, _, local, rest = name.split(".", 3)
                name = f"decoder.layers.{layer_numbers[int(local)] - 1}.{rest}"
            params[name] = param
    return params


def _check_model(params: Mapping[str, torch.nn.Parameter], entries: Mapping[str, WeightEntry],
                 cfg: ModelConfig, model_chunks: Sequence[torch.nn.Module]) -> None:
    """Refuse a model whose parameters are not the ones `cfg` describes (e.g. built from another config)."""
    expected = set()
    for chunk in model_chunks:
        if chunk.pre_process:
            expected.add(EMBEDDING)
        for layer in chunk.decoder.layers:
            prefix = f"decoder.layers.{layer.layer_number - 1}."
            expected |= {name for name in entries if name.startswith(prefix)}
        if chunk.post_process:
            expected.add(FINAL_NORM)
            if not cfg.tie_word_embeddings or not chunk.pre_process:  # tied: a separate copy only off stage 0
                expected.add(OUTPUT)
    unknown, missing = sorted(set(params) - expected), sorted(expected - set(params))
    if unknown or missing:
        raise ValueError(f"the Megatron model does not match the config (layer_spec={cfg.layer_spec!r}, "
                         f"qk_layernorm={cfg.qk_layernorm}, add_qkv_bias={cfg.add_qkv_bias}, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}): "
                         f"unexpected parameters {unknown[:6]}, missing parameters {missing[:6]}; build the "
                         f"model from the same ModelConfig")


def _vocab_rows(params: Mapping[str, torch.nn.Parameter], cfg: ModelConfig, tp: int) -> int | None:
    """The model's (padded) vocabulary rows, from its embedding or output layer (None on middle stages).

    Refuses a model with fewer rows than the HF vocabulary: its checkpoint is of another model.
    """
    shards = [params[name].shape[0] for name in (EMBEDDING, OUTPUT) if name in params]
    if not shards:
        return None
    rows = shards[0] * tp
    if rows < cfg.vocab_size:
        raise ValueError(f"the Megatron model has {rows} vocabulary rows but the HF config has vocab_size="
                         f"{cfg.vocab_size}: a model's padded vocabulary can only be larger; build the model "
                         f"with vocab_size=padded_vocab_size({cfg.vocab_size}, tp) (convert_hf_to_megatron.py "
                         f"--make-vocab-size-divisible-by N pads it), or use the config.json of the model the "
                         f"checkpoint came from")
    return rows


def _check_tp(cfg: ModelConfig, tp: int) -> None:
    for field_name in ("num_query_groups", "ffn_hidden_size"):
        if getattr(cfg, field_name) % tp:
            raise ValueError(f"{field_name}={getattr(cfg, field_name)} is not divisible by "
                             f"tensor_model_parallel_size={tp}: choose a TP size that divides it")



def load_hf_weights(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig,
                    state: Mapping[str, torch.Tensor], *, progress: bool = False) -> None:
    """Copy this rank's tensor/pipeline-parallel shards of the HF tensors `state` into `model_chunks`.

    `state` maps HF names to full tensors and is read one tensor at a time (pass a lazy mapping to
    stream from disk). Every rank checks names and shapes first and refuses any mismatch. Not a
    collective: each rank reads only the tensors of its own stage.
    """
    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    _check_tp(cfg, tp)
    check_hf_state(cfg, state)
    entries = {entry.megatron: entry for entry in weight_map(cfg)}
    params = _local_parameters(model_chunks)
    _check_model(params, entries, cfg, model_chunks)
    vocab_rows = _vocab_rows(params, cfg, tp)
    items = list(params.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="loading HF tensors", unit="tensor")
    for name, param in items:
        entry = entries[EMBEDDING] if name == OUTPUT and cfg.tie_word_embeddings else entries[name]
        full = to_megatron(entry.layout, [state[hf_name] for hf_name in entry.hf], cfg.num_query_groups)
        local = shard(entry.layout, full, tp_rank, tp, padded_rows=vocab_rows)
        if local.shape != param.shape:
            raise ValueError(f"{name}: the HF tensors give a TP shard of shape {list(local.shape)} but the "
                             f"model's parameter has {list(param.shape)}; build the model from this config")
        with torch.no_grad():
            param.copy_(local)


def export_hf_weights(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model, one tensor at a time, identically on every rank.

    A collective over the tensor- and pipeline-parallel groups: every rank of the model-parallel group
    must consume the whole generator. Each megatron tensor is all-gathered over TP on the stage that
    holds it, broadcast to the other stages, and split into its HF tensors, so peak extra memory is one
    fused tensor. Tensors keep the parameters' dtype and device. A padded vocabulary is cut back to
    `cfg.vocab_size` rows (the HF model's), so what the refit sends vLLM never has padding.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    _check_tp(cfg, tp)
    entries = weight_map(cfg)
    params = _local_parameters(model_chunks)
    _check_model(params, {e.megatron: e for e in entries}, cfg, model_chunks)
    _vocab_rows(params, cfg, tp)
    if cfg.tie_word_embeddings:
        params.pop(OUTPUT, None)  # a last stage's copy of the embedding: exported once, as the embedding
    owners = _pipeline_owners(set(params), pp)
    sample = next(iter(params.values()))
    for entry in entries:
        if owners[entry.megatron] == parallel_state.get_pipeline_model_parallel_rank():
            full = _gather_tp(entry.layout, params[entry.megatron].detach(), tp, cfg.vocab_size)
        else:
            full = torch.empty(full_shape(entry), dtype=sample.dtype, device=sample.device)
        if pp > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            dist.broadcast(full, src=dist.get_global_rank(group, owners[entry.megatron]), group=group)
        yield from zip(entry.hf, to_hf(entry.layout, full, cfg.num_attention_heads, cfg.num_query_groups))
        del full


def _gather_tp(layout: str, local: torch.Tensor, tp: int, vocab_size: int) -> torch.Tensor:
    """The full tensor of this rank's shard `local`, a vocabulary cut to its first `vocab_size` rows."""
    if tp == 1 or layout == REPLICATED:
        return local[:vocab_size] if layout == VOCAB else local
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return unshard(layout, shards, vocab_size=vocab_size)


def _pipeline_owners(names: set[str], pp: int) -> dict[str, int]:
    """Global parameter name -> the pipeline rank holding it (one small object all-gather)."""
    if pp == 1:
        return dict.fromkeys(names, 0)
    per_stage: list = [None] * pp
    dist.all_gather_object(per_stage, sorted(names), group=parallel_state.get_pipeline_model_parallel_group())
    return {name: stage for stage, stage_names in enumerate(per_stage) for name in stage_names}


def save_hf_dir(model_chunks: Sequence[torch.nn.Module], cfg: ModelConfig, out_dir: str | Path, *,
                family: str | None = None, extra_config: Mapping | None = None,
                generation_config: Mapping | None = None, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """Write the model as an HF directory (safetensors, config.json, generation_config.json); collective.

    Every rank must call it (the export gathers over TP/PP); global rank 0 writes. `extra_config` adds
    config.json fields this mapping does not own (token ids); `generation_config` defaults to the token
    ids of the config; `dtype` to the parameters' dtype.
    """
    out_dir = Path(out_dir)
    weights = export_hf_weights(model_chunks, cfg)
    if dist.get_rank() != 0:
        for _ in weights:  # the export is collective: every rank walks it
            pass
        dist.barrier()
        return out_dir
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, total=sum(len(e.hf) for e in weight_map(cfg)), desc="writing HF tensors", unit="tensor")
    dtype = dtype or next(model_chunks[0].parameters()).dtype
    write_safetensors(weights, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)
    config = hf_config(cfg, family) | dict(extra_config or {})
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if generation_config is None:  # HF's own default: the token ids of the model config
        generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(dict(generation_config), indent=2) + "\n")
    dist.barrier()
    return out_dir

