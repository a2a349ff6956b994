"""Run a function on N real gloo ranks (spawned processes) with a hard timeout.

`run_ranks(fn, world_size, *args)` starts `world_size` processes, initialises a gloo process group
in each, calls `fn(rank, world_size, *args)` and returns the per-rank results in rank order. A rank
that raises fails the call with its traceback; a hang kills every rank and fails after `timeout` s.
`fn` must be importable at module level (spawned processes re-import it).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


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
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
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
            outputs[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(world_size)]
