"""Convert a Megatron-Core distributed checkpoint (the latest under a directory) into an HF model directory.

Writes sharded safetensors, config.json and generation_config.json, and copies the tokenizer files of
`--tokenizer-dir`. Any TP x PP works for reading (checkpoints reshard on load); TP=PP=1 needs no torchrun:

    python tools/convert_megatron_to_hf.py --load-dir /ckpt/run1 --save-dir /models/run1-hf \\
        --tokenizer-dir /models/Qwen3-8B
    torchrun --nproc_per_node=2 tools/convert_megatron_to_hf.py --load-dir /ckpt/run1 --save-dir out --tp 2

Checkpoints written by convert_hf_to_megatron.py record their architecture; for training checkpoints
pass `--hf-config` (the config.json, or directory, of the model the run started from).
A vocabulary padded by the conversion (or by Megatron-LM/Bridge training) is cut back to the HF
config's `vocab_size` rows. `--backend bridge` uses Megatron-Bridge's AutoBridge instead (GPU clusters;
needs --hf-config).
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
    parser = convert.cli_parser(Path(__file__).name, __doc__, layout_help="to read the checkpoint with")
    parser.add_argument("--load-dir", required=True, help="checkpoint root holding 'latest' and iter_*/")
    parser.add_argument("--save-dir", required=True, help="output HF model directory")
    parser.add_argument("--hf-config", help="config.json (or its directory) of the model the checkpoint came from")
    parser.add_argument("--tokenizer-dir", help="copy tokenizer files (and generation_config.json) from here")
    parser.add_argument("--layer-spec", choices=typing.get_args(LayerSpec),
                        help="layer spec of the checkpoint (default: recorded in it, else 'local')")
    parser.add_argument("--dtype", choices=sorted(convert.DTYPES),
                        help="dtype of the written tensors (default: the original model's, else float32)")
    parser.add_argument("--max-shard-size-mb", type=float, default=5000, help="largest safetensors file")
    args = parser.parse_args(argv)

    def run() -> str:
        if args.backend == "bridge":
            if args.hf_config is None:
                raise ConfigError("--backend bridge needs --hf-config (the HF directory the checkpoint came from)")
            convert.bridge_megatron_to_hf(args.load_dir, args.save_dir, args.hf_config)
            return f"wrote {args.save_dir} (Megatron-Bridge)"
        parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
        written = convert.megatron_to_hf(
            args.load_dir, args.save_dir, parallel, hf_config_path=args.hf_config, layer_spec=args.layer_spec,
            tokenizer_dir=args.tokenizer_dir, max_shard_bytes=int(args.max_shard_size_mb * 2**20),
            dtype=convert.DTYPES[args.dtype] if args.dtype else None)
        return f"wrote {written}"

    convert.run_cli(parser, run)


if __name__ == "__main__":
    main()
