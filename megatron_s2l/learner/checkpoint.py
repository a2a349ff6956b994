"""Resumable checkpoints through `megatron.core.dist_checkpointing` (torch_dist format).

Layout: `<dir>/iter_0000007/` holds one checkpoint (the model's sharded tensors, optionally the optimizer's
sharded state, the frozen reference model, and a common `state` dict); `<dir>/latest` names the newest
complete one and is replaced atomically only after every rank has finished writing, so a crash mid-save
leaves the previous checkpoint as the latest. Checkpoints store global tensor shapes, so a run saved at
one TP x PP layout resumes at another (e.g. saved at TP=2, resumed at TP=1 x PP=2). Model-only
checkpoints (no optimizer, e.g. written by the HF converter) load too; the optimizer then starts fresh.

RNG states (python, numpy, torch CPU and CUDA) are those of global rank 0, restored on every rank: all
ranks seed alike, and Megatron's model-parallel RNG tracker is re-seeded by `init_parallel`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_s2l.learner.cpu_shims import on_cpu

LATEST = "latest"
_REFERENCE_PREFIX = "reference."  # the reference model's tensors, next to the policy's under the same names


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """The directory of the checkpoint of `step` under `root`."""
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> int | None:
    """The step recorded in `<root>/latest`, or None when there is no complete checkpoint."""
    path = Path(root) / LATEST
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8").strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a step number, found {text!r}; delete the file or point "
                         f"checkpoint.load_dir at another directory")
    return int(text)


@on_cpu
def save_checkpoint(save_dir: str | Path, step: int, learner_or_model_chunks, optimizer=None, *,
                    state: dict | None = None) -> Path:
    """Save a checkpoint of `step` (collective over all ranks) and make it the latest; returns its directory.

    `learner_or_model_chunks` is a `Learner` (its model, optimizer, LR schedule and reference are
    saved) or a list of this rank's megatron model chunks (with `optimizer`, or model-only). `state` is
    any picklable dict (schedule step, data position, ...); RNG states are added to it.
    """
    chunks, optimizer, scheduler, reference = _parts(learner_or_model_chunks, optimizer)
    root, target = Path(save_dir), checkpoint_dir(save_dir, step)
    if latest_step(root) == step:
        raise ValueError(f"save_checkpoint: {target} is already the latest checkpoint of {root}; "
                         f"save a later step or use another checkpoint.save_dir")
    if dist.get_rank() == 0:
        if target.exists():  # left by a crash mid-save: never the latest, safe to replace
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state_dict(chunks, optimizer, reference, is_loading=False)
    sharded["common"] = {"step": step, "state": dict(state or {}), "rng": _rng_states(),
                         "has_optimizer": optimizer is not None, "has_reference": reference is not None,
                         "scheduler": scheduler.state_dict() if scheduler is not None else None}
    dist_checkpointing.save(sharded, str(target))
    dist.barrier()  # every rank's shards are on disk before the checkpoint becomes the latest
    if dist.get_rank() == 0:
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(f"{step}\n", encoding="utf-8")
        os.replace(tmp, root / LATEST)
    dist.barrier()
    return target


@on_cpu
def load_checkpoint(load_dir: str | Path, learner_or_model_chunks, optimizer=None) -> tuple[int, dict] | None:
    """Load the latest complete checkpoint under `load_dir` into this rank's shards (collective).

    Returns `(step, state)`, or None when `load_dir` holds no checkpoint yet. Restores the model, the
    optimizer and LR schedule when the checkpoint has them (else they stay fresh), the reference model
    (from the checkpoint, or a copy of the loaded policy when the checkpoint has none) and RNG states.
    """
    step = latest_step(load_dir)
    if step is None:
        return None
    source = checkpoint_dir(load_dir, step)
    if not source.is_dir():
        raise ValueError(f"{Path(load_dir) / LATEST} names step {step}, but {source} does not exist; "
                         f"restore that directory or delete {LATEST} to start from scratch")
    chunks, optimizer, scheduler, reference = _parts(learner_or_model_chunks, optimizer)
    common = dist_checkpointing.load_common_state_dict(str(source))["common"]
    with_optimizer = optimizer is not None and common["has_optimizer"]
    with_reference = reference is not None and common["has_reference"]
    sharded = _sharded_state_dict(chunks, optimizer if with_optimizer else None,
                                  reference if with_reference else None, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(source))
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(index, len(chunks))])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and common["scheduler"] is not None:
            scheduler.load_state_dict(common["scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fresh optimizer: its main params follow the loaded weights
    if with_reference:
        for index, chunk in enumerate(reference):
            state_dict = loaded[f"reference{index}"]
            chunk.load_state_dict({key.removeprefix(_REFERENCE_PREFIX): value for key, value in state_dict.items()})
    elif reference is not None:
        learner_or_model_chunks.update_reference()
    _set_rng_states(common["rng"])
    return common["step"], common["state"]


def _parts(learner_or_model_chunks, optimizer):
    """(model chunks, optimizer, LR scheduler, reference chunks or None) of a Learner or a chunk list."""
    if hasattr(learner_or_model_chunks, "model_chunks"):  # a Learner
        learner = learner_or_model_chunks
        return (learner.model_chunks, optimizer or learner.optimizer, learner.scheduler,
                learner.reference_chunks or None)
    return list(learner_or_model_chunks), optimizer, None, None


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"  # Megatron-LM's names for one or several chunks


def _sharded_state_dict(chunks, optimizer, reference, *, is_loading: bool) -> dict:
    sharded = {_model_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded, is_loading=is_loading)
    for index, chunk in enumerate(reference or []):
        sharded[f"reference{index}"] = chunk.sharded_state_dict(prefix=_REFERENCE_PREFIX)
    return sharded


def _rng_states() -> dict:
    """Rank 0's RNG states, on every rank (common state must agree across ranks)."""
    states = [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}]
    dist.broadcast_object_list(states, src=0)
    return states[0]


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
