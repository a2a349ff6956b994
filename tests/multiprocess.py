"""Run a function on N real gloo ranks (spawned processes) with a hard timeout.

`run_ranks(fn, world_size, *args)` starts `world_size` processes, initialises a gloo process group
in each, calls `fn(rank, world_size, *args)` and returns the per-rank results in rank order. A rank
that raises fails the call with its traceback; a hang kills every rank and fails after `timeout` s.
`fn` must be importable at module level (spawned processes re-import it). Ranks may start child
processes (the dist-checkpoint writer forks) and may return tensors: they travel by value.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp


class _ByValue:
    """A tensor sent as a numpy array: torch's queue would share its storage through the rank, which has
    exited by the time the parent reads the result."""

    def __init__(self, tensor):
        self.array, self.dtype = tensor.detach().cpu().float().numpy() if tensor.dtype == torch.bfloat16 \
            else tensor.detach().cpu().numpy(), tensor.dtype


def _map(obj, fn):
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return fn(obj)


def _pack(obj):
    return _map(obj, lambda x: _ByValue(x) if isinstance(x, torch.Tensor) else x)


def _unpack(obj):
    return _map(obj, lambda x: torch.from_numpy(x.array).to(x.dtype) if isinstance(x, _ByValue) else x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, True, _pack(fn(rank, world_size, *args))))
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    # not daemonic: a rank may fork (checkpoint writers); the finally below kills stragglers instead
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs = {}
    try:
        while len(outputs) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__}: no result from ranks "
                                   f"{sorted(set(range(world_size)) - set(outputs))} within {timeout} s")
            if not ok:
                raise RuntimeError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            outputs[rank] = _unpack(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(world_size)]
