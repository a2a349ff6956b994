"""Hugging Face safetensors directories <-> Megatron-Core distributed checkpoints (the logic of tools/convert_*).

Both directions go through `learner.hf_weights` (the one mapping, as the vLLM refit) and
`learner.checkpoint` (the layout training resumes from). Tensors stream: HF -> Megatron reads one
safetensors tensor at a time (each rank only those of its own stage); Megatron -> HF holds at most one
output shard (`max_shard_bytes`) besides the model. Run with `torchrun --nproc_per_node=TP*PP` (or as
one process for TP=PP=1). The optional Megatron-Bridge backend (`AutoBridge`) is imported only when
asked for.

Vocabulary padding: HF -> Megatron pads the embedding and output rows to a multiple of TP (x
`make_vocab_size_divisible_by`, Megatron-LM's flag); Megatron -> HF reads the padded row count from the
checkpoint's own metadata and writes back the HF config's `vocab_size` rows. Nothing else records it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_s2l.config import ConfigError, LayerSpec, ModelConfig, ParallelConfig
from megatron_s2l.console import add_verbose_flag, exit_with_error
from megatron_s2l.constants import DEMO_TOKENIZER_FILE
from megatron_s2l.learner.checkpoint import checkpoint_dir, latest_step, load_checkpoint, save_checkpoint
from megatron_s2l.learner.cpu_shims import on_cpu
from megatron_s2l.learner.hf_config import model_config_from_hf
from megatron_s2l.learner.hf_mapping import EMBEDDING, padded_vocab_size
from megatron_s2l.learner.hf_weights import load_hf_weights, save_hf_dir
from megatron_s2l.learner.model import build_model, init_parallel, transformer_config
from megatron_s2l.learner.safetensors_io import read_hf_state

# Tokenizer files copied next to an exported model (whichever the tokenizer directory has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   DEMO_TOKENIZER_FILE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@on_cpu
def hf_to_megatron(hf_dir: str | Path, save_dir: str | Path, parallel: ParallelConfig, *,
                   layer_spec: LayerSpec = "local", make_vocab_size_divisible_by: int = 1) -> Path:
    """Convert the HF model in `hf_dir` into a model-only checkpoint (step 0) under `save_dir`.

    Collective: every one of the TP x PP ranks builds its stage at `parallel`'s layout, loads its shards
    and writes them, in float32 like the learner's parameters (bf16 weights convert exactly). The
    vocabulary is padded with zero rows to `padded_vocab_size(vocab_size, TP, make_vocab_size_divisible_by)`
    (1: only as far as TP needs; Megatron-LM and Bridge use 128). The checkpoint's state records the HF
    ModelConfig (true vocab_size) and the HF config/generation config, so `megatron_to_hf` can write the
    model back without the original directory.
    """
    hf_dir = Path(hf_dir)
    cfg = dataclasses.replace(model_config_from_hf(hf_dir), layer_spec=layer_spec)
    if latest_step(save_dir) is not None:
        raise ConfigError(f"--save-dir {save_dir} already holds a checkpoint (step {latest_step(save_dir)}); "
                          f"choose a new directory")
    if make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}: must be >= 1 (1 pads "
                          f"the vocabulary only to a multiple of --tp; Megatron-LM's default is 128)")
    padded = padded_vocab_size(cfg.vocab_size, parallel.tensor_model_parallel_size, make_vocab_size_divisible_by)
    model = _build(dataclasses.replace(cfg, vocab_size=padded), parallel)
    load_hf_weights([model], cfg, read_hf_state(hf_dir), progress=dist.get_rank() == 0)
    state = {"model_config": dataclasses.asdict(cfg), "hf_config": _read_json(hf_dir / "config.json"),
             "generation_config": _read_json(hf_dir / "generation_config.json")}
    return save_checkpoint(save_dir, 0, [model], state=state)


@on_cpu
def megatron_to_hf(load_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig, *,
                   hf_config_path: str | Path | None = None, layer_spec: LayerSpec | None = None,
                   tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
                   dtype: torch.dtype | None = None) -> Path:
    """Write the latest checkpoint under `load_dir` as an HF model directory `out_dir` (collective).

    The architecture comes from the checkpoint's state (checkpoints written by `hf_to_megatron`) or,
    for training checkpoints, from `hf_config_path` (the config.json of the model it started from);
    the layer spec from `layer_spec`, else the one recorded in the checkpoint, else "local". A padded
    vocabulary (any number of rows at least the HF `vocab_size`) is cut back to `vocab_size` rows.
    `dtype` defaults to the original config.json's (float32 when unknown), so a bf16 model converted
    there and back is bit-identical. Tokenizer files (and generation_config.json when the checkpoint
    has none) are copied from `tokenizer_dir` if given.
    """
    state = _saved_state(load_dir)
    cfg, original = _architecture(state, hf_config_path, load_dir)
    recorded_spec = state.get("model_config", {}).get("layer_spec", "local")
    cfg = dataclasses.replace(cfg, layer_spec=layer_spec or recorded_spec)
    rows = _checked_vocab_rows(load_dir, cfg.vocab_size, parallel.tensor_model_parallel_size,
                               hf_config_path or "the config recorded in the checkpoint")
    tokenizer_files = _tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir is not None else []
    dtype = dtype or DTYPES.get(original.get("dtype") or original.get("torch_dtype"), torch.float32)
    model = _build(dataclasses.replace(cfg, vocab_size=rows), parallel)
    load_checkpoint(load_dir, [model])
    generation = state.get("generation_config")
    if generation is None and tokenizer_dir is not None:
        generation = _read_json(Path(tokenizer_dir) / "generation_config.json")
    token_ids = {key: original[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in original}
    save_hf_dir([model], cfg, out_dir, family=original.get("model_type"), extra_config=token_ids,
                generation_config=generation, dtype=dtype, max_shard_bytes=max_shard_bytes,
                progress=dist.get_rank() == 0)
    if dist.get_rank() == 0:
        for file in tokenizer_files:
            shutil.copyfile(file, Path(out_dir) / file.name)
    return Path(out_dir)


def _build(cfg: ModelConfig, parallel: ParallelConfig):
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked before any process group starts
    if world != tp * pp:
        raise ConfigError(f"conversion runs on exactly TP x PP = {tp * pp} processes, found {world}: launch "
                          f"with torchrun --nproc_per_node={tp * pp} (or a plain python for TP=PP=1)")
    init_parallel(parallel, seed=0)
    return build_model(cfg, transformer_config(cfg, parallel))


def _saved_state(load_dir: str | Path) -> dict:
    """The `state` dict of the latest checkpoint under `load_dir`, read without building a model."""
    step = latest_step(load_dir)
    if step is None:
        raise ConfigError(f"{load_dir}: no checkpoint (no 'latest' file); pass the directory given to "
                          f"--save-dir of convert_hf_to_megatron.py or checkpoint.save_dir of a run")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(load_dir, step)))
    return common["common"]["state"]


def _checked_vocab_rows(load_dir: str | Path, vocab_size: int, tp: int, source) -> int:
    """The (padded) vocabulary rows of the latest checkpoint under `load_dir`, from its tensor metadata.

    Refuses fewer rows than the HF `vocab_size` (read from `source`) and a count that `tp` cannot split.
    """
    ckpt = checkpoint_dir(load_dir, latest_step(load_dir))
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    rows = metadata[EMBEDDING].global_shape[0]
    if rows < vocab_size:
        raise ConfigError(f"{load_dir}: the checkpoint's vocabulary has {rows} rows but {source} says "
                          f"vocab_size={vocab_size}; a checkpoint pads its HF model's vocabulary, never cuts it: "
                          f"pass --hf-config with the config.json of the model this checkpoint came from")
    if rows % tp:
        raise ConfigError(f"{load_dir}: the checkpoint's {rows} vocabulary rows cannot be split over --tp {tp}; "
                          f"read it with a --tp that divides {rows} (e.g. --tp 1: checkpoints reshard on load)")
    return rows


def _architecture(state: Mapping, hf_config_path, load_dir) -> tuple[ModelConfig, dict]:
    """(ModelConfig, original config.json dict or {}) from `hf_config_path` or the checkpoint's state."""
    if hf_config_path is not None:
        path = Path(hf_config_path)
        return model_config_from_hf(path), _read_json(path / "config.json" if path.is_dir() else path)
    if "model_config" in state:
        return ModelConfig(**state["model_config"]), state.get("hf_config") or {}
    raise ConfigError(f"{load_dir}: the checkpoint does not record its architecture (it was not written by "
                      f"convert_hf_to_megatron.py); pass --hf-config with the config.json of the model it "
                      f"started from")


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    """The tokenizer files to copy, checked before any conversion work starts."""
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise ConfigError(f"--tokenizer-dir {tokenizer_dir}: none of {list(TOKENIZER_FILES)} found; pass the "
                          f"directory of the original HF model (or of its tokenizer)")
    return files


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- the two CLIs (tools/convert_*.py)

def cli_parser(prog: str, doc: str, *, layout_help: str) -> argparse.ArgumentParser:
    """The converter CLIs' parser with their shared --tp/--pp/--backend options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help=f"tensor-parallel size {layout_help}")
    parser.add_argument("--pp", type=int, default=1, help=f"pipeline-parallel size {layout_help}")
    parser.add_argument("--backend", choices=["native", "bridge"], default="native",
                        help="native: megatron-s2l's Qwen3/Qwen2/Llama mapping; bridge: Megatron-Bridge's AutoBridge "
                             "(GPU clusters, Bridge's own checkpoint layout)")
    add_verbose_flag(parser)
    return parser


def run_cli(parser: argparse.ArgumentParser, convert: Callable[[], str]) -> None:
    """Run a converter CLI's `convert` (returning what to print) and report on global rank 0.

    A ConfigError (the converters' refusals of their inputs, each naming the file or flag and the fix) exits
    with status 2 and that one line, printed on the first rank; other errors keep their traceback.
    """
    try:
        message = convert()
    except ConfigError as err:
        exit_with_error(parser.prog, err)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- Megatron-Bridge backend (GPU clusters)

def _auto_bridge():
    try:
        from megatron.bridge import AutoBridge
    except ImportError as err:
        raise ConfigError(f"--backend bridge needs Megatron-Bridge, which cannot be imported here ({err}); "
                          f"install megatron-bridge on a CUDA machine (NeMo/NGC containers ship it) or use "
                          f"the default --backend native") from err
    return AutoBridge


def bridge_hf_to_megatron(hf_dir: str | Path, save_dir: str | Path) -> None:
    """HF -> Megatron with Megatron-Bridge's AutoBridge (its own checkpoint layout, for Bridge training)."""
    _auto_bridge().import_ckpt(hf_model_id=str(hf_dir), megatron_path=str(save_dir))


def bridge_megatron_to_hf(load_dir: str | Path, out_dir: str | Path, hf_config_path: str | Path) -> None:
    """Megatron -> HF with AutoBridge; `hf_config_path` is the HF directory the checkpoint came from."""
    _auto_bridge().from_hf_pretrained(str(hf_config_path)).export_ckpt(megatron_path=str(load_dir),
                                                                      hf_path=str(out_dir))
