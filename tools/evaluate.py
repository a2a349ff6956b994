"""pass@k of one model, or several compared on one plot, on benchmark files (JSONL or verl Parquet).

    python tools/evaluate.py --model models/learner --bench heldout=data/heldout.jsonl --k 16 --out eval/learner
    python tools/evaluate.py --compare explorer=models/explorer learner=models/learner \\
        --bench aime24=data/aime24.jsonl --bench math500=data/math500.parquet --k 16 --out eval/family

A model is an HF directory, or a Megatron checkpoint directory (holding `latest`), which is first
converted to <out>/<label>/hf with tools/convert_megatron_to_hf.py (training checkpoints need
--hf-config). Sampling defaults to the paper's nothink preset (temperature 0.7, top-p 0.8, top-k 20,
presence penalty 1.5); any field can be overridden. Samples are scored by the built-in math check, or
by the `reward:` section of a training config (--reward-config run.yaml: your functions, by data
source, with their time limit and error policy), so pass@k counts what training rewards. Results go to <out> (one model) or <out>/<label>
(each compared model) plus <out>/compare.{json,md,png}; rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from megatron_s2l import console
from megatron_s2l.config import (ConfigError, EngineConfig, EngineDType, OnBadPrompt, PromptTemplate, RewardConfig,
                                  S2LConfig, SamplingConfig)

if __name__ == "__main__":  # before Megatron and vLLM are imported: their import-time notices are filtered
    console.setup_from_argv()

from megatron_s2l.evaluation.passk_eval import (PRESETS, evaluate_model_dir, passk_table,  # noqa: E402
                                               sampling_preset, write_comparison)
from megatron_s2l.rollout.checks import reward_function_problems  # noqa: E402

CONVERTER = Path(__file__).resolve().parent / "convert_megatron_to_hf.py"


def parse_args(argv):
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--model", help="model directory (HF or Megatron checkpoint)")
    models.add_argument("--compare", nargs="+", metavar="[LABEL=]DIR", help="several models on one plot")
    p.add_argument("--bench", action="append", required=True, metavar="[NAME=]FILE",
                   help="benchmark file (repeatable); NAME defaults to the file name without extension")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    p.add_argument("--k", type=int, default=16, help="samples per problem; pass@1..pass@k are reported")
    p.add_argument("--preset", choices=sorted(PRESETS), default="nothink")
    for field in ("temperature", "top_p", "presence_penalty"):
        p.add_argument(f"--{field.replace('_', '-')}", type=float, help=f"override the preset's {field}")
    p.add_argument("--top-k", type=int, help="override the preset's top_k (-1: off)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--template", choices=typing.get_args(PromptTemplate), default="chat",
                   help="prompt template (qwen3-base-nothink: the paper's evaluation prompt)")
    p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts are bad rows")
    p.add_argument("--on-bad-prompt", choices=typing.get_args(OnBadPrompt), default="error")
    p.add_argument("--tokenizer-dir", help="tokenizer directory when the model directory has none")
    p.add_argument("--hf-config", help="Megatron training checkpoints: config.json of the model they started from")
    p.add_argument("--reward-config", metavar="YAML",
                   help="a training config whose reward section scores the samples (default: the math check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size")
    p.add_argument("--dtype", choices=typing.get_args(EngineDType), default="auto")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-mb", type=int, default=256, help="CPU only: KV cache size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    console.add_verbose_flag(p)
    return p.parse_args(argv)


def _named(items: list[str], what: str) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        name = name if sep else Path(path).stem if what == "--bench" else Path(path).name
        if name in named:
            raise ConfigError(f"{what} {item!r}: the name {name!r} is used twice; give NAME=PATH")
        named[name] = path
    return named


def _hf_dir(model_dir: str, out: Path, hf_config: str | None, tokenizer_dir: str | None) -> str:
    """An HF directory for `model_dir`: itself, or its conversion when it is a Megatron checkpoint."""
    if not (Path(model_dir) / "latest").is_file():
        return model_dir
    target = out / "hf"
    if not (target / "config.json").is_file():
        command = [sys.executable, str(CONVERTER), "--load-dir", model_dir, "--save-dir", str(target)]
        command += ["--hf-config", hf_config] if hf_config else []
        command += ["--tokenizer-dir", tokenizer_dir] if tokenizer_dir else []
        subprocess.run(command, check=True)
    return str(target)


def reward_section(path: str | None) -> RewardConfig:
    """The `reward` section of the config at `path` (only that section is read and checked)."""
    if path is None:
        return RewardConfig()
    cfg, problems = S2LConfig.parse_yaml(path)
    problems = [p for p in problems if p.startswith("reward")]
    problems += cfg.reward.validate("reward") + reward_function_problems(cfg.reward)
    if problems:
        raise ConfigError([f"--reward-config {path}: {p}" for p in problems])
    return cfg.reward


def main(argv: list[str] | None = None) -> None:
    """Evaluate and print the pass@k table; user errors are reported as one line (exit status 2)."""
    args = parse_args(argv)
    try:
        overrides = {f: getattr(args, f) for f in ("temperature", "top_p", "top_k", "presence_penalty")
                     if getattr(args, f) is not None}
        sampling = dataclasses.replace(sampling_preset(args.preset, args.max_new_tokens), **overrides)
        errors = sampling.validate("sampling")
        if errors:
            raise ConfigError(errors)
        reward = reward_section(args.reward_config)
        engine = EngineConfig(tensor_parallel_size=args.tp, dtype=args.dtype, max_model_len=args.max_model_len,
                              kv_cache_memory_bytes=args.kv_cache_mb * 2**20, seed=args.seed,
                              gpu_memory_utilization=args.gpu_memory_utilization, on_long_prompt="error")
        benches = _named(args.bench, "--bench")
        models = _named(args.compare, "--compare") if args.compare else {Path(args.model).name: args.model}
        results = {}
        for label, model_dir in models.items():
            out = Path(args.out) / label if args.compare else Path(args.out)
            results[label] = evaluate_model_dir(
                _hf_dir(model_dir, out, args.hf_config, args.tokenizer_dir), benches, out, k=args.k,
                sampling=sampling, engine=engine, template=args.template, max_prompt_length=args.max_prompt_length,
                on_bad_prompt=args.on_bad_prompt, seed=args.seed, label=label, tokenizer_dir=args.tokenizer_dir,
                reward=reward)
    except (ConfigError, FileNotFoundError, subprocess.CalledProcessError) as err:  # the inputs' refusals
        console.exit_with_error("evaluate.py", err)
    if args.compare:
        paths = write_comparison(results, args.out)
        print(f"wrote {paths['table']}, {paths['plot']}")
    print(passk_table(results), end="")


if __name__ == "__main__":
    main()
