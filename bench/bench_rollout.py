"""Rollout engines side by side: explorer vs learner generation throughput, and refit vs a disk reload.

Two tiny Qwen3-style models stand in for the explorer and the learner (random weights, float32, built
from configs). Both run as colocated in-process vLLM engines on this machine, one after the other:

  throughput: tokens/s of `generate` over the same prompts and sampling (median of --repeats calls);
              from it, the rollout compute of a whole S2L run relative to all-learner GRPO, per the
              schedule (explorer tokens cost explorer time), for the paper's G=16, T_mix=8 of 16 steps.
  refit:      the learner's weights streamed in memory through `VLLMEngine.update_weights` (buckets of
              --bucket-mb) against the disk route a restart-free trainer could otherwise take: write
              the same tensors as model.safetensors and let vLLM reload them in place from that file.
              The file is read back from the page cache, so the disk route is measured at its best.
Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rollout.py [--prompts 16] [--n 8] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from megatron_s2l.algo.schedule import group_split
from megatron_s2l.config import EngineConfig, SamplingConfig
from megatron_s2l.rollout.vllm_engine import VLLMEngine
from megatron_s2l.types import Prompt
from tests.tiny_models import write_tiny_model

SIZES = {  # head_dim 32 for vLLM's CPU attention
    "explorer": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4),
    "learner": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=16, num_kv_heads=4),
}


def throughput(engine: VLLMEngine, prompts: list[Prompt], n: int, sampling: SamplingConfig, repeats: int) -> float:
    """Median generated tokens per second over `repeats` calls, after one warm-up call."""
    engine.generate(prompts, n, sampling, seed=0)
    rates = []
    for k in range(repeats):
        start = time.perf_counter()
        out = engine.generate(prompts, n, sampling, seed=k + 1)
        rates.append(sum(len(s.response_ids) for group in out for s in group) / (time.perf_counter() - start))
    return statistics.median(rates)


def run_cost(explorer_per_token: float, group_size: int, t_mix: int, steps: int, mode: str) -> float:
    """Rollout cost of a run in learner-token units, relative to all-learner GRPO (G per prompt and step)."""
    cost = 0.0
    for step in range(1, steps + 1):
        g_w, g_s = group_split(step, group_size, t_mix, "linear", group_mode=mode)
        cost += g_w * explorer_per_token + g_s
    return cost / (group_size * steps)


def refit_rates(engine: VLLMEngine, weights: dict, scratch: Path, repeats: int) -> tuple[float, float, float]:
    """(in-memory MB/s, disk write+reload MB/s, of which reload only MB/s), medians over `repeats`."""
    from safetensors.torch import save_file

    megabytes = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
    stream, disk, reload = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights(iter(weights.items()))
        stream.append(megabytes / (time.perf_counter() - start))
        start = time.perf_counter()
        save_file(weights, str(scratch / "model.safetensors"))
        written = time.perf_counter()
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(scratch)})
        engine.llm.reset_prefix_cache()
        done = time.perf_counter()
        disk.append(megabytes / (done - start))
        reload.append(megabytes / (done - written))
    return statistics.median(stream), statistics.median(disk), statistics.median(reload)


def main() -> None:
    """Build both models, run both measurements, print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    prompts = [Prompt(f"p{i}", [0] + [3 + (7 * i + j) % 500 for j in range(16)], "") for i in range(args.prompts)]
    engine_cfg = EngineConfig(kv_cache_memory_bytes=256 * 2**20, max_model_len=256, dtype="float32",
                              refit_bucket_bytes=args.bucket_mb * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        rates, engines = {}, {}
        for role, size in SIZES.items():
            path = write_tiny_model(Path(tmp) / role, vocab_size=4096, seed=1, **size)
            engines[role] = VLLMEngine(str(path), engine_cfg, source=role, model_id=role, eos_token_id=1)
            rates[role] = throughput(engines[role], prompts, args.n, sampling, args.repeats)
        from safetensors.torch import load_file

        weights = load_file(str(Path(tmp) / "learner" / "model.safetensors"))
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        stream, disk, reload = refit_rates(engines["learner"], weights, scratch, args.repeats)
    megabytes = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
    print(f"generation ({args.prompts} prompts x {args.n} samples x <= {args.new_tokens} new tokens, float32, "
          f"1 thread):")
    for role in SIZES:
        print(f"  {role:8s} {rates[role]:8.0f} tokens/s")
    print(f"  explorer / learner throughput: {rates['explorer'] / rates['learner']:.2f}x")
    per_token = rates["learner"] / rates["explorer"]
    for mode in ("combined", "separate"):
        print(f"  S2L run (G=16, T_mix=8, 16 steps, {mode}) rollout time vs all-learner GRPO: "
              f"{run_cost(per_token, 16, 8, 16, mode):.2f}")
    print(f"refit of the learner ({megabytes:.0f} MiB, buckets of {args.bucket_mb} MiB):")
    print(f"  in memory, update_weights:      {stream:8.0f} MB/s")
    print(f"  safetensors write + reload:     {disk:8.0f} MB/s (reload alone {reload:.0f} MB/s)")
    print(f"  in-memory / disk route:         {stream / disk:.2f}x")


if __name__ == "__main__":
    main()
