"""Convert a local Hugging Face Qwen3/Qwen2/Llama model into a Megatron-Core distributed checkpoint.

The checkpoint is written directly at the chosen TP x PP layout (one process per model-parallel rank)
as a model-only step-0 checkpoint that training resumes from (`checkpoint.load_dir`):

    torchrun --nproc_per_node=4 tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-8B \\
        --save-dir /ckpt/qwen3-8b --tp 2 --pp 2
    python tools/convert_hf_to_megatron.py --hf-dir /models/tiny --save-dir /ckpt/tiny      # TP=PP=1

A vocabulary that TP does not divide is padded with zero rows (`--make-vocab-size-divisible-by N` pads
to a multiple of N x TP, as Megatron-LM does); convert_megatron_to_hf.py removes the padding again.
`--backend bridge` uses Megatron-Bridge's AutoBridge instead (GPU clusters; its own checkpoint layout).
"""

from __future__ import annotations

import typing
from pathlib import Path

from megatron_s2l import console
from megatron_s2l.config import ConfigError, LayerSpec, ParallelConfig

if __name__ == "__main__":  # before Megatron and vLLM are imported: their import-time notices are filtered
    console.setup_from_argv()

from megatron_s2l.learner import convert  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and convert; errors are reported as one line naming the problem and the fix."""
    parser = convert.cli_parser(Path(__file__).name, __doc__, layout_help="of the written checkpoint")
    parser.add_argument("--hf-dir", required=True, help="local HF model directory (config.json + safetensors)")
    parser.add_argument("--save-dir", required=True, help="checkpoint root; iter_0000000/ and latest are written")
    parser.add_argument("--layer-spec", choices=typing.get_args(LayerSpec), default="local",
                        help="parameter names of the local or Transformer Engine layer spec")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=1, metavar="N",
                        help="pad the vocabulary (embedding and output rows) to a multiple of N x TP; 1 (default) "
                             "pads only when TP does not divide it; Megatron-LM and Bridge use 128")
    args = parser.parse_args(argv)

    def run() -> str:
        if args.backend == "bridge":
            if (args.tp, args.pp) != (1, 1):
                raise ConfigError("--backend bridge writes Megatron-Bridge's own unsharded layout (distributed "
                                  "checkpoints reshard on load): drop --tp/--pp")
            convert.bridge_hf_to_megatron(args.hf_dir, args.save_dir)
            return f"wrote {args.save_dir} (Megatron-Bridge)"
        parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        written = convert.hf_to_megatron(args.hf_dir, args.save_dir, parallel, layer_spec=args.layer_spec,
                                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        return f"wrote {written} (TP={args.tp}, PP={args.pp}, layer spec {args.layer_spec!r})"

    convert.run_cli(parser, run)


if __name__ == "__main__":
    main()
