"""CUDA IPC refit transport: one handle per flat bucket, rebuilt in another process (needs a GPU)."""

import pytest
import torch
import torch.multiprocessing as mp

from megatron_s2l.rollout.refit import decode_bucket, encode_bucket

pytestmark = pytest.mark.gpu


def _receive(payload, results):
    tensors = decode_bucket(payload, torch.device("cuda", 0))
    results.put([(name, t.cpu()) for name, t in tensors])


def test_cuda_ipc_bucket_round_trips_across_processes():
    bucket = [("a.weight", torch.randn(64, 32, device="cuda")),
              ("b.bias", torch.randn(7, device="cuda").to(torch.bfloat16)),
              ("c", torch.randn(16, 16, device="cuda").t())]  # non-contiguous
    payload = encode_bucket(bucket, "cuda_ipc")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_receive, args=(payload, results))
    proc.start()
    received = dict(results.get(timeout=120))
    proc.join(timeout=60)
    assert proc.exitcode == 0
    for name, tensor in bucket:
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor.cpu())
