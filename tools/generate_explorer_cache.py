"""Generate the explorer's rollouts for a prompt set into a resumable JSONL cache (the authors' offline mode).

The explorer, its engine and sampling settings, and the prompt file come from the run's config, so the
cache matches what `explorer.source=offline` later expects:

    python tools/generate_explorer_cache.py --config run.yaml --out explorer.jsonl --n 32
    python tools/generate_explorer_cache.py --config run.yaml explorer.sampling.temperature=0.7 --out c.jsonl

Rerunning the same command after a crash keeps the complete prompts and generates the rest. Prompts can
also be given already tokenised (`--prompt-ids`: JSONL of {prompt_id, prompt_ids, ground_truth});
without a tokenizer pass `--eos-token-id` and `--no-reward`.
"""

from __future__ import annotations

import argparse
import json

from megatron_s2l.config import ConfigError, S2LConfig
from megatron_s2l.types import Prompt


def read_prompt_ids(path: str) -> list[Prompt]:
    """Prompts from a JSONL of {prompt_id, prompt_ids, ground_truth} objects."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(Prompt(str(row["prompt_id"]), [int(t) for t in row["prompt_ids"]],
                                      str(row.get("ground_truth", ""))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line_no}: expected {{prompt_id, prompt_ids, ground_truth}} "
                                 f"({err!r})") from None
    return prompts


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, start the explorer engine and write (or complete) the cache."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config (explorer.*, data.*)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. explorer.engine.seed=1")
    parser.add_argument("--out", required=True, help="JSONL cache to write or complete")
    parser.add_argument("--n", type=int, default=32, help="rollouts per prompt (the authors used 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per engine call")
    parser.add_argument("--prompt-ids", help="pre-tokenised prompts instead of data.train_path")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: explorer.hf_path)")
    parser.add_argument("--eos-token-id", type=int, help="stop token (default: the tokenizer's eos)")
    parser.add_argument("--no-reward", action="store_true", help="store reward=null (no tokenizer needed)")
    args = parser.parse_args(argv)
    try:
        cfg = S2LConfig.from_yaml(args.config, args.overrides).validate()
        stats = generate(cfg, args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        parser.exit(2, f"generate_explorer_cache: error: {err}\n")
    print(f"{args.out}: {stats['written']} prompts written, {stats['skipped']} already complete, "
          f"{stats['dropped']} dropped (too long) of {stats['prompts']}")


def generate(cfg: S2LConfig, args: argparse.Namespace) -> dict[str, int]:
    """Build prompts, reward function and engine from `cfg` and the CLI options; write the cache."""
    from megatron_s2l.algo.rewards import math_reward
    from megatron_s2l.data.prompts import load_prompts
    from megatron_s2l.data.tokenizer import load_tokenizer
    from megatron_s2l.rollout.explorer_cache import write_explorer_cache
    from megatron_s2l.rollout.vllm_engine import VLLMEngine

    explorer = cfg.explorer
    needs_tokenizer = not (args.prompt_ids and args.no_reward and args.eos_token_id is not None)
    tokenizer = load_tokenizer(args.tokenizer or explorer.hf_path) if needs_tokenizer else None
    if args.prompt_ids:
        prompts = read_prompt_ids(args.prompt_ids)
    elif cfg.data.train_path is None:
        raise ValueError("data.train_path is empty: give the prompt file in the config or pass --prompt-ids")
    else:
        prompts = load_prompts(cfg.data.train_path, tokenizer, template=cfg.data.prompt_template,
                               max_prompt_length=cfg.data.max_prompt_length,
                               on_bad_prompt=cfg.data.on_bad_prompt).prompts

    def reward_fn(prompt: Prompt, response_ids: list[int]) -> float:
        return math_reward(tokenizer.decode(response_ids), prompt.ground_truth)

    eos = args.eos_token_id if args.eos_token_id is not None else tokenizer.eos_id
    engine = VLLMEngine(explorer.hf_path, explorer.engine, source="explorer", model_id=explorer.model_id,
                        eos_token_id=eos)
    return write_explorer_cache(engine, prompts, args.out, n=args.n, sampling=explorer.sampling,
                                explorer_id=explorer.model_id, reward_fn=None if args.no_reward else reward_fn,
                                seed=explorer.engine.seed, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
