"""Streaming HF <-> Megatron conversion vs whole-state conversion: peak extra memory and time (TP=1).

A random Llama-style model (default about 90M parameters, 360 MB in fp32) is written as HF safetensors;
then, in one process holding the Megatron model:

  load  streaming: load_hf_weights(model, read_hf_state(dir)), one tensor read at a time.
        whole:     safetensors.torch.load_file(dir/model.safetensors) first, then load_hf_weights.
  export streaming: walk export_hf_weights (one full tensor alive at a time), as the refit does.
        whole:      materialise every exported tensor in a dict first.

Peak memory is the process's resident high-water mark (Linux VmHWM, reset through /proc/self/clear_refs
right before each method) minus its resident size at that moment. Times are one run each.
Usage (from the repository root): .venv/bin/python -m bench.bench_hf_weights [--hidden 768] [--layers 8]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_s2l.config import ParallelConfig
from megatron_s2l.learner.hf_config import model_config_from_hf
from megatron_s2l.learner.hf_weights import export_hf_weights, load_hf_weights
from megatron_s2l.learner.model import build_model, init_parallel, transformer_config
from megatron_s2l.learner.safetensors_io import read_hf_state
from tests.tiny_models import write_tiny_model


def _resident_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def _measure(fn) -> tuple[float, float]:
    """(peak extra resident MiB, seconds) of calling fn."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    base = _resident_mib("VmRSS")
    start = time.perf_counter()
    fn()
    return _resident_mib("VmHWM") - base, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(tmp, family="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                intermediate_size=int(args.hidden * 8 / 3) // 64 * 64, num_layers=args.layers,
                                num_heads=args.hidden // 64, num_kv_heads=args.hidden // 256, head_dim=64,
                                tie_word_embeddings=False)
        cfg = model_config_from_hf(path)
        init_parallel(ParallelConfig(), seed=0)
        model = build_model(cfg, transformer_config(cfg, ParallelConfig()))
        model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        largest_mib = max(p.numel() * p.element_size() for p in model.parameters()) / 2**20

        def load_whole():
            state = load_file(path / "model.safetensors")
            load_hf_weights([model], cfg, state)

        def export_whole():
            exported = {name: tensor.clone() for name, tensor in export_hf_weights([model], cfg)}
            assert len(exported) > 0

        def export_streaming():
            for _, tensor in export_hf_weights([model], cfg):
                tensor.sum()  # a consumer touching each tensor once, as the refit's copy does

        results = {"load streaming": _measure(lambda: load_hf_weights([model], cfg, read_hf_state(path))),
                   "load whole": _measure(load_whole),
                   "export streaming": _measure(export_streaming),
                   "export whole": _measure(export_whole)}
    print(f"model {model_mib:.0f} MiB fp32 ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}); largest tensor {largest_mib:.0f} MiB")
    for name, (peak, seconds) in results.items():
        print(f"{name:17s} peak extra {peak:7.1f} MiB ({peak / model_mib:.2f} x model)  {seconds:6.2f} s")
    for kind in ("load", "export"):
        (peak_s, time_s), (peak_w, time_w) = results[f"{kind} streaming"], results[f"{kind} whole"]
        print(f"{kind}: streaming / whole peak memory {peak_s / peak_w:.2f}, time {time_s / time_w:.2f}")


if __name__ == "__main__":
    main()
