"""Vocab-parallel log-probs vs gather-then-log_softmax at TP=2: peak memory per rank and time.

Two gloo processes each hold half of a Qwen3-sized vocabulary (151,936) of bf16 logits for a few
thousand tokens, as the learner's output layer leaves them. Each method runs as training does
(forward + backward to the local logits) and as old/reference log-probs do (forward only):

  naive:          all_gather the shards to [N, V], fp32 log_softmax, gather the targets; backward
                  through the full tensor and keep this rank's slice of the gradient.
  vocab-parallel: megatron_s2l.algo.logprobs.vocab_parallel_logprobs with --chunk tokens at a time.

Peak memory is the process's resident high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs right before each method) minus its resident size at that moment, so the
inputs both methods share are not counted. Times are the median of --repeats runs after that one.
Usage: .venv/bin/python bench/bench_logprobs.py [--tokens 2048] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs

TP = 2


def _resident_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def _naive(shard: torch.Tensor, targets: torch.Tensor, backward: bool) -> torch.Tensor:
    """Gather the full vocabulary on every rank, then plain log_softmax."""
    gathered = [torch.empty_like(shard) for _ in range(TP)]
    dist.all_gather(gathered, shard.detach())
    full = torch.cat(gathered, dim=-1).requires_grad_(backward)  # [N, V]
    logp = full.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    if backward:
        logp.sum().backward()  # every TP rank computes the same loss; each keeps its own slice
        rank, width = dist.get_rank(), shard.shape[-1]
        return full.grad[:, rank * width:(rank + 1) * width].clone()  # [N, V_local]
    return logp


def _vocab_parallel(shard: torch.Tensor, targets: torch.Tensor, backward: bool, chunk: int) -> torch.Tensor:
    local = shard.detach().requires_grad_(backward)  # [N, V_local]
    logp, _ = vocab_parallel_logprobs(local.unsqueeze(0), targets.unsqueeze(0), group=dist.group.WORLD,
                                      vocab_start=dist.get_rank() * shard.shape[-1], chunk_size=chunk)
    if backward:
        logp.sum().backward()
        return local.grad
    return logp.squeeze(0)


def _run(method: str, shard, targets, backward: bool, chunk: int):
    with torch.set_grad_enabled(backward):
        if method == "naive":
            return _naive(shard, targets, backward)
        return _vocab_parallel(shard, targets, backward, chunk)


def _rank(rank: int, args: argparse.Namespace, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    gen = torch.Generator().manual_seed(rank)
    width = args.vocab // TP
    shard = torch.randn(args.tokens, width, generator=gen, dtype=torch.bfloat16) * 3  # [N, V_local]
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(0))  # [N]
    results = {}
    for backward in (True, False):
        outputs = {}
        for method in ("naive", "vocab-parallel"):
            dist.barrier()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
            before = _resident_mib("VmRSS")
            outputs[method] = _run(method, shard, targets, backward, args.chunk)
            peak = _resident_mib("VmHWM") - before
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                _run(method, shard, targets, backward, args.chunk)
                times.append(time.perf_counter() - start)
            results[f"{'train' if backward else 'forward'}/{method}"] = (peak, statistics.median(times))
        torch.testing.assert_close(outputs["vocab-parallel"].float(), outputs["naive"].float(), atol=2e-3,
                                   rtol=1e-2)  # both methods compute the same thing
    Path(out_dir, f"{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk of the vocab-parallel path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    # glibc otherwise keeps freed large blocks in its heap (its mmap threshold grows after big frees), and
    # resident memory would then miss the allocations of a later method; the spawned ranks read this at start.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    with tempfile.TemporaryDirectory() as out_dir:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_rank, args=(args, port, out_dir), nprocs=TP)
        per_rank = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(TP)]

    shard_mib = args.tokens * (args.vocab // TP) * 2 / 2**20
    chunk_mib = args.chunk * (args.vocab // TP) * 4 / 2**20
    print(f"TP={TP} gloo, {args.tokens} tokens, vocab {args.vocab}, bf16 logits ({shard_mib:.0f} MiB per rank), "
          f"chunk {args.chunk} tokens (one fp32 chunk: {chunk_mib:.0f} MiB), {args.threads} thread(s) per rank")
    print(f"{'pass':8} {'naive MiB':>10} {'vp MiB':>8} {'mem ratio':>9}  {'naive s':>8} {'vp s':>7} {'speed-up':>8}")
    for phase in ("train", "forward"):
        # the worst rank of each method
        naive_mem = max(r[f"{phase}/naive"][0] for r in per_rank)
        vp_mem = max(r[f"{phase}/vocab-parallel"][0] for r in per_rank)
        naive_s = max(r[f"{phase}/naive"][1] for r in per_rank)
        vp_s = max(r[f"{phase}/vocab-parallel"][1] for r in per_rank)
        print(f"{phase:8} {naive_mem:10.0f} {vp_mem:8.0f} {vp_mem / naive_mem:9.3f}  {naive_s:8.3f} {vp_s:7.3f} "
              f"{naive_s / vp_s:7.2f}x")
    print(f"goal: vp MiB <= naive MiB / {TP} + chunk, and speed-up >= 1")


if __name__ == "__main__":
    main()
