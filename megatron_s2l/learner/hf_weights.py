"""The one mapping between Hugging Face Qwen3/Llama checkpoints and megatron-core's GPTModel.

Checkpoint conversion (tools/convert_*.py through `learner.convert`) and the vLLM refit
(`rollout.refit`) both go through this module, so the two can never disagree.

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
them into the following linear as `layer_norm_weight`). Pipeline stages are mapped through each
layer's global `layer_number`, so any split of layers over stages (and virtual stages) works.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_s2l.config import ModelConfig

# model_type in config.json -> the architecture class name written back.
HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}

# How a megatron tensor is built from its HF tensors and split over tensor-parallel ranks.
# VOCAB: column-parallel over the (possibly padded) vocabulary rows, the embedding and the output layer.
REPLICATED, VOCAB, ROW, QKV, FC1 = "replicated", "vocab", "row", "qkv", "fc1"

# Per-layer parameters: megatron suffix (local spec) -> (HF suffixes, layout). TE renames the two pre-norms.
_LAYER = {
    "input_layernorm.weight": (("input_layernorm.weight",), REPLICATED),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), QKV),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), REPLICATED),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), REPLICATED),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), ROW),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), REPLICATED),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), ROW),
}
_QK_NORMS = {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}  # Qwen3 only
_TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
EMBEDDING, _FINAL_NORM = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight"
_OUTPUT = "output_layer.weight"


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
            if suffix in _QK_NORMS and not cfg.qk_layernorm:
                continue
            name = _TE_NAMES.get(suffix, suffix) if cfg.layer_spec == "te" else suffix
            entries.append(WeightEntry(f"decoder.layers.{layer}.{name}",
                                       tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes),
                                       shapes[suffix], layout))
    entries.append(WeightEntry(_FINAL_NORM, ("model.norm.weight",), ((hidden,),), REPLICATED))
    if not cfg.tie_word_embeddings:
        entries.append(WeightEntry(_OUTPUT, ("lm_head.weight",), ((vocab, hidden),), VOCAB))
    return entries


# ---------------------------------------------------------------- tensor layouts (pure)

def to_megatron(layout: str, hf: Sequence[torch.Tensor], num_query_groups: int) -> torch.Tensor:
    """Fuse the HF tensors of one entry into the full (unsharded) megatron tensor."""
    if layout == QKV:
        q, k, v = hf  # [h*d, H], [G*d, H], [G*d, H]
        hidden = q.shape[-1]
        per_group = [t.reshape(num_query_groups, -1, hidden) for t in (q, k, v)]  # [G, rows/G, H] each
        return torch.cat(per_group, dim=1).reshape(-1, hidden)  # [G*(h/G+2)*d, H]
    if layout == FC1:
        return torch.cat(hf, dim=0)  # [2F, H]: gate then up
    (tensor,) = hf
    return tensor


def to_hf(layout: str, full: torch.Tensor, num_attention_heads: int, num_query_groups: int) -> tuple[torch.Tensor, ...]:
    """Split a full megatron tensor back into its HF tensors (the inverse of `to_megatron`)."""
    if layout == QKV:
        hidden = full.shape[-1]
        head_dim = full.shape[0] // (num_attention_heads + 2 * num_query_groups)
        q_rows = num_attention_heads // num_query_groups * head_dim
        grouped = full.reshape(num_query_groups, q_rows + 2 * head_dim, hidden)  # [G, (h/G+2)*d, H]
        q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
        return tuple(t.reshape(-1, hidden) for t in (q, k, v))  # [h*d, H], [G*d, H], [G*d, H]
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


def _full_shape(entry: WeightEntry) -> tuple[int, ...]:
    rows = sum(s[0] for s in entry.hf_shapes) if entry.layout in (QKV, FC1) else entry.hf_shapes[0][0]
    return (rows, *entry.hf_shapes[0][1:])


# ---------------------------------------------------------------- config.json <-> ModelConfig

def model_config_from_hf(path: str | Path) -> ModelConfig:
    """ModelConfig of a local HF Qwen3 or Llama checkpoint (a directory with config.json, or the file).

    Raises ValueError naming the file and field for architectures this mapping cannot represent.
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(f"{config_file}: no such file; expected a local Hugging Face model directory "
                         f"with config.json (hub ids are not downloaded)")
    cfg = model_config_from_dict(json.loads(config_file.read_text()), str(config_file))
    return dataclasses.replace(cfg, hf_path=str(config_file.parent))


def model_config_from_dict(hf: Mapping, source: str = "config.json") -> ModelConfig:
    """ModelConfig of the parsed config.json `hf` of a Qwen3 or Llama model; `source` names it in errors."""
    family = hf.get("model_type")
    if family not in HF_ARCHITECTURES:
        raise ValueError(f"{source}: model_type={family!r} (architectures={hf.get('architectures')}) is "
                         f"not supported; accepted: {sorted(HF_ARCHITECTURES)} "
                         f"(use --backend bridge for other architectures)")
    unsupported = {"hidden_act": ("silu", hf.get("hidden_act", "silu")),
                   "attention_bias": (False, hf.get("attention_bias", False)),
                   "mlp_bias": (False, hf.get("mlp_bias", False)),
                   "use_sliding_window": (False, hf.get("use_sliding_window", False)),
                   "rope type": ("default", _rope(hf)[1])}
    for field_name, (accepted, value) in unsupported.items():
        if value != accepted:
            raise ValueError(f"{source}: {field_name}={value!r} is not supported by the megatron-s2l "
                             f"mapping (accepted: {accepted!r}); convert with --backend bridge instead")
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}; a {family} config.json needs {list(_REQUIRED)}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=float(_rope(hf)[0]),
        norm_epsilon=hf["rms_norm_eps"],
        qk_layernorm=family == "qwen3",
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
             "max_position_embeddings", "rms_norm_eps")


def _rope(hf: Mapping) -> tuple[float, str]:
    """(theta, rope type) from a transformers 5 `rope_parameters` or a legacy `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return params.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_type


def hf_family(cfg: ModelConfig) -> str:
    """The HF family whose architecture `cfg` is: qk-layernorm means Qwen3, none means Llama."""
    return "qwen3" if cfg.qk_layernorm else "llama"


def hf_config(cfg: ModelConfig, family: str | None = None) -> dict:
    """The config.json contents of `cfg` as an HF `family` model (default: `hf_family(cfg)`).

    Writes the rope base both as transformers 5 `rope_parameters` and as the legacy `rope_theta`, so
    older transformers and vLLM releases read the same model.
    """
    family = family or hf_family(cfg)
    if family not in HF_ARCHITECTURES:
        raise ValueError(f"family={family!r}: accepted values are {sorted(HF_ARCHITECTURES)}")
    if cfg.qk_layernorm != (family == "qwen3"):
        raise ValueError(f"family={family!r} does not match qk_layernorm={cfg.qk_layernorm}: Qwen3 has "
                         f"q/k norms and Llama has none; pass family={hf_family(cfg)!r}")
    config = {
        "architectures": [HF_ARCHITECTURES[family]],
        "model_type": family,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    config.update({"use_sliding_window": False, "sliding_window": None} if family == "qwen3" else {"mlp_bias": False})
    return config


# ---------------------------------------------------------------- the model's own parameters

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
            expected.add(_FINAL_NORM)
            if not cfg.tie_word_embeddings or not chunk.pre_process:  # tied: a separate copy only off stage 0
                expected.add(_OUTPUT)
    unknown, missing = sorted(set(params) - expected), sorted(expected - set(params))
    if unknown or missing:
        raise ValueError(f"the Megatron model does not match the config (layer_spec={cfg.layer_spec!r}, "
                         f"qk_layernorm={cfg.qk_layernorm}, tie_word_embeddings={cfg.tie_word_embeddings}): "
                         f"unexpected parameters {unknown[:6]}, missing parameters {missing[:6]}; build the "
                         f"model from the same ModelConfig")


def _vocab_rows(params: Mapping[str, torch.nn.Parameter], cfg: ModelConfig, tp: int) -> int | None:
    """The model's (padded) vocabulary rows, from its embedding or output layer (None on middle stages).

    Refuses a model with fewer rows than the HF vocabulary: its checkpoint is of another model.
    """
    shards = [params[name].shape[0] for name in (EMBEDDING, _OUTPUT) if name in params]
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


# ---------------------------------------------------------------- load / export

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
        raise ValueError(f"{source} does not match a {hf_family(cfg)} model with {cfg.num_layers} layers "
                         f"(tie_word_embeddings={cfg.tie_word_embeddings}): missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name, shape in expected.items():
        got = tuple(_shape_of(state, name))
        if got != shape:
            raise ValueError(f"{source}: tensor {name} has shape {list(got)} but the config describes "
                             f"{list(shape)}; the checkpoint and its config.json disagree")


def _shape_of(state: Mapping[str, torch.Tensor], name: str) -> Sequence[int]:
    shape_fn = getattr(state, "shape", None)  # lazy mappings report shapes without loading the tensor
    return shape_fn(name) if callable(shape_fn) else state[name].shape


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
        entry = entries[EMBEDDING] if name == _OUTPUT and cfg.tie_word_embeddings else entries[name]
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
        params.pop(_OUTPUT, None)  # a last stage's copy of the embedding: exported once, as the embedding
    owners = _pipeline_owners(set(params), pp)
    sample = next(iter(params.values()))
    for entry in entries:
        if owners[entry.megatron] == parallel_state.get_pipeline_model_parallel_rank():
            full = _gather_tp(entry.layout, params[entry.megatron].detach(), tp, cfg.vocab_size)
        else:
            full = torch.empty(_full_shape(entry), dtype=sample.dtype, device=sample.device)
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


# ---------------------------------------------------------------- HF directories on disk

INDEX = "model.safetensors.index.json"


def read_hf_state(path: str | Path) -> Mapping[str, torch.Tensor]:
    """A lazy read-only mapping HF name -> tensor over the (possibly sharded) safetensors of `path`.

    Nothing is loaded until a tensor is indexed, and then only that tensor: pass it to
    `load_hf_weights` to stream a checkpoint one tensor at a time.
    """
    return _SafetensorsState(path)


class _SafetensorsState(Mapping):
    """A lazy, read-only mapping HF name -> tensor over a (possibly sharded) safetensors directory.

    Indexing loads that one tensor; `shape(name)` reads only the header.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_files = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_files.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.path}: no *.safetensors files and no {INDEX}; expected a Hugging Face "
                                 f"model directory saved with safe_serialization (convert .bin files first)")
            self._files = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        if name in self._files:
                            raise ValueError(f"{self.path}: tensor {name} is in both {self._files[name].name} "
                                             f"and {file.name}; remove the stray file")
                        self._files[name] = file

    def _open(self, name: str):
        # Opened per access: a handle kept open would keep every page it touched mapped (resident).
        file = self._files[name]
        if not file.is_file():
            raise ValueError(f"{self.path / INDEX} maps {name} to {file.name}, which does not exist")
        return safe_open(file, framework="pt")

    def __getitem__(self, name: str) -> torch.Tensor:
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        """The shape of tensor `name`, read from the file header without loading the tensor."""
        with self._open(name) as handle:
            return handle.get_slice(name).get_shape()

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def write_safetensors(named_tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, *,
                      max_shard_bytes: int, dtype: torch.dtype | None = None) -> list[Path]:
    """Write a stream of (name, tensor) as HF safetensors shards of at most `max_shard_bytes` each.

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` with an index.
    Holds one shard in memory at a time; replaces the model files of an earlier export in `out_dir`.
    Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX]:  # a previous export's shards
        stale.unlink(missing_ok=True)
    parts, shard, shard_bytes, total_bytes = [], {}, 0, 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            parts.append(_write_part(shard, out_dir / f"model-part{len(parts):05d}.safetensors.tmp"))
            shard, shard_bytes = {}, 0
        shard[name], shard_bytes, total_bytes = tensor, shard_bytes + size, total_bytes + size
    if shard:
        parts.append(_write_part(shard, out_dir / f"model-part{len(parts):05d}.safetensors.tmp"))
    files, index = [], {}
    for i, (part, names) in enumerate(parts):  # the shard count is known only now: name the files
        name = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        files.append(part.replace(out_dir / name))
        index.update(dict.fromkeys(names, name))
    if len(parts) > 1:
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": index},
                                                indent=2))
    return files


def _write_part(tensors: dict[str, torch.Tensor], path: Path) -> tuple[Path, list[str]]:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors)


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
