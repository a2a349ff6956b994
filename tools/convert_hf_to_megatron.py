"""Convert a local Hugging Face Qwen3/Llama model into a Megatron-Core distributed checkpoint.

The checkpoint is written directly at the chosen TP x PP layout (one process per model-parallel rank)
as a model-only step-0 checkpoint that training resumes from (`checkpoint.load_dir`):

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-8B \\
        --save-dir /ckpt/qwen3-8b --tp 2 --pp 2
    python tools/convert_hf_to_megatron.py --hf-dir /models/tiny --save-dir /ckpt/tiny      # TP=PP=1

`--backend bridge` uses Megatron-Bridge's AutoBridge instead (GPU clusters; its own checkpoint layout).
"""

from __future__ import annotations

import argparse
import typing

import torch.distributed as dist

from megatron_s2l.config import LayerSpec, ParallelConfig
from megatron_s2l.learner import convert


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and convert; errors are reported as one line naming the problem and the fix."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    parser.add_argument("--save-dir", required=True, help="checkpoint root; iter_0000000/ and latest are written")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    parser.add_argument("--layer-spec", choices=typing.get_args(LayerSpec), default="local",
                        help="parameter names of the local or Transformer Engine layer spec")
    parser.add_argument("--backend", choices=["native", "bridge"], default="native",
                        help="native: megatron-s2l's Qwen3/Llama mapping; bridge: Megatron-Bridge's AutoBridge "
                             "(GPU clusters, Bridge's own checkpoint layout)")
    args = parser.parse_args(argv)
    try:
        if args.backend == "bridge":
            if (args.tp, args.pp) != (1, 1):
                raise ValueError("--backend bridge writes Megatron-Bridge's own unsharded layout (distributed "
                                 "checkpoints reshard on load): drop --tp/--pp")
            convert.bridge_hf_to_megatron(args.hf_dir, args.save_dir)
            return
        parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        written = convert.hf_to_megatron(args.hf_dir, args.save_dir, parallel, layer_spec=args.layer_spec)
    except (ValueError, RuntimeError) as err:
        parser.exit(2, f"convert_hf_to_megatron: error: {err}\n")
    if dist.get_rank() == 0:
        print(f"wrote {written} (TP={args.tp}, PP={args.pp}, layer spec {args.layer_spec!r})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
