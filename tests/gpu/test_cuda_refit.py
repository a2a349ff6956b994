"""CUDA-IPC bucket refit between two processes on one GPU: exact weights, and its throughput in GB/s.

The sender streams ~2 GiB of bf16 weights in `engine.refit_bucket_bytes` buckets through
`rollout.refit.encode_bucket(..., "cuda_ipc")` (one flat buffer and one IPC handle per bucket); the
receiver decodes each bucket and copies it into its own preallocated weights, as an engine does, then
acknowledges so that the sender may free the bucket. The limit is a device-to-device copy of the same
bytes within one process: both figures are printed (run with `-s`), only correctness is asserted (a
timed assertion would be flaky). The round trip of IPC handles itself is tests/gpu/test_refit_ipc.py.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

from megatron_s2l.config import EngineConfig
from megatron_s2l.rollout.refit import decode_bucket, encode_bucket, iter_buckets

pytestmark = pytest.mark.gpu

LAYERS, HIDDEN = 16, 4096  # 16 x (4096 x 4096 + 4096 x 1024 + 4096) bf16: 0.625 GiB per refit
REFITS = 3  # the first opens the IPC mappings (slow); the others are timed


def weights(device) -> list[tuple[str, torch.Tensor]]:
    """Deterministic bf16 weights (several shapes, a vector included) on `device`."""
    g = torch.Generator(device=device).manual_seed(0)
    named = []
    for layer in range(LAYERS):
        for suffix, shape in (("proj.weight", (HIDDEN, HIDDEN)), ("kv.weight", (HIDDEN // 4, HIDDEN)),
                              ("norm.weight", (HIDDEN,))):
            named.append((f"layers.{layer}.{suffix}",
                          torch.randn(shape, generator=g, device=device).to(torch.bfloat16)))
    return named


def _receiver(requests, replies):
    """The engine side: copy every bucket into preallocated weights, acknowledge, finally share them back."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    dest = {name: torch.empty_like(tensor) for name, tensor in weights(device)}
    while (payload := requests.get()) is not None:
        for name, tensor in decode_bucket(payload, device):
            dest[name].copy_(tensor)
        torch.cuda.synchronize()  # the sender frees the bucket once acknowledged
        replies.put("ok")
    replies.put({name: reduce_tensor(tensor) for name, tensor in dest.items()})
    requests.get()  # keep `dest` alive until the sender has compared it


def refit_once(source, requests, replies, bucket_bytes: int) -> float:
    """Stream `source` to the receiver bucket by bucket; seconds until the last bucket is acknowledged."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for bucket in iter_buckets(source, bucket_bytes):
        requests.put(encode_bucket(bucket, "cuda_ipc"))
        assert replies.get(timeout=120) == "ok"
    return time.perf_counter() - start


def device_copy_seconds(source) -> float:
    """Time of one device-to-device copy of every tensor of `source` (median of 5, after a warm-up)."""
    dest = [torch.empty_like(tensor) for _, tensor in source]
    times = []
    for _ in range(6):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for target, (_, tensor) in zip(dest, source):
            target.copy_(tensor)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times[1:])[2]


def test_cuda_ipc_refit_is_exact_and_reports_throughput():
    source = weights(torch.device("cuda", 0))
    nbytes = sum(tensor.numel() * tensor.element_size() for _, tensor in source)
    bucket_bytes = EngineConfig().refit_bucket_bytes
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(requests, replies))
    proc.start()
    try:
        seconds = [refit_once(source, requests, replies, bucket_bytes) for _ in range(REFITS)]
        requests.put(None)
        shared = replies.get(timeout=120)
        for name, tensor in source:
            rebuild, args = shared[name]
            assert torch.equal(rebuild(*args), tensor), name
        copy = device_copy_seconds(source)
        ipc = min(seconds[1:])
        print(f"\nCUDA IPC refit of {nbytes / 2**30:.2f} GiB in {bucket_bytes / 2**20:.0f} MiB buckets: "
              f"{nbytes / ipc / 1e9:.1f} GB/s (first refit {nbytes / seconds[0] / 1e9:.1f} GB/s); "
              f"device-to-device copy {nbytes / copy / 1e9:.1f} GB/s (bytes copied once); "
              f"refit / copy = {copy / ipc:.2f}")
        requests.put(None)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
