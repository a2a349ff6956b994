"""Weight refit: stream the learner's HF-named tensors into its rollout engine in buckets.

The learner exports full HF-named tensors (`learner.hf_weights.export_hf_weights`, gathered over TP
and PP); `iter_buckets` groups them into buckets of about `bucket_bytes` so that only one bucket is in
flight, and `encode_bucket` / `decode_bucket` carry a bucket to the engine's worker:

- "direct": the worker lives in this process (TP=1): tensors are passed by reference, no copy.
- "bytes": CPU worker processes (TP>1 on CPU): one safetensors blob per bucket (vLLM's RPC cannot
  pickle tensors).
- "cuda_ipc": GPU worker processes: the bucket is flattened into one uint8 CUDA tensor and one IPC
  handle crosses per bucket (per-tensor handles are several times slower, see NeMo-RL).

When to refit, and the wake order around it, is `rollout.colocation`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

TRANSPORTS = ("direct", "bytes", "cuda_ipc")
STORAGE_DEVICE_ARG = 6  # position of `storage_device` in torch's rebuild_cuda_tensor arguments (an internal)


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group (name, tensor) pairs, in order, into lists of at most `bucket_bytes` bytes.

    A tensor larger than `bucket_bytes` forms a bucket of its own. The input is consumed lazily.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes}: must be >= 1 (engine.refit_bucket_bytes)")
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def encode_bucket(bucket: list[tuple[str, torch.Tensor]], transport: str):
    """Package a bucket for the engine's workers over `transport` (one of TRANSPORTS)."""
    if transport == "direct":
        return ("direct", bucket)
    if transport == "bytes":
        from safetensors.torch import save

        return ("bytes", save({name: t.detach().contiguous() for name, t in bucket}))
    if transport == "cuda_ipc":
        from torch.multiprocessing.reductions import reduce_tensor

        meta = [(name, t.dtype, tuple(t.shape)) for name, t in bucket]
        flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])  # [bytes]
        return ("cuda_ipc", meta, reduce_tensor(flat))
    raise ValueError(f"transport={transport!r}: accepted values are {list(TRANSPORTS)}")


def decode_bucket(payload, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Unpack what `encode_bucket` produced into (name, tensor) pairs on the receiving side."""
    kind = payload[0]
    if kind == "direct":
        return payload[1]
    if kind == "bytes":
        from safetensors.torch import load

        return list(load(payload[1]).items())
    assert kind == "cuda_ipc", kind
    _, meta, (rebuild, args) = payload
    args = list(args)
    args[STORAGE_DEVICE_ARG] = device.index if device.index is not None else torch.cuda.current_device()  # this GPU
    flat = rebuild(*args)  # [bytes], shared with the sender until the RPC returns
    tensors, offset = [], 0
    for name, dtype, shape in meta:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        tensors.append((name, flat[offset:offset + nbytes].view(dtype).view(shape)))
        offset += nbytes
    return tensors
