"""Hugging Face safetensors directories on disk: a lazy reader and a sharded writer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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

