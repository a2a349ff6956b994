"""pass@k of a model on benchmark files: k samples per problem, the training reward as verifier.

    results = evaluate_model_dir("models/learner", {"heldout": "heldout.jsonl"}, "eval/learner", k=16,
                                 sampling=sampling_preset("nothink", max_new_tokens=64), engine=EngineConfig())
    write_comparison({"explorer": explorer_results, "learner": results}, "eval/")

Each problem gets k samples from a `RolloutEngine` (vLLM for model directories), the samples are scored
by a `Scorer` (the reward GRPO trains on; by default the built-in math check of `algo.reward_scorer`), a
sample with a positive reward counts as correct, and pass@1..pass@k are the means over problems of the
unbiased estimator (`algo.passk`). Samples are drawn with a fixed seed per problem, so the
numbers do not depend on batching or on interruptions.

An output directory holds
    settings.json   model, sampling settings, k, seed, template, reward: what the numbers mean
    samples.jsonl   one line per finished problem (rewards, responses); problems found here are
                    skipped when the same evaluation runs again, so an interrupted run resumes
    results.json    pass@1..pass@k and the mean reward per benchmark
    results.md      the same as a table;   passk.png   the pass@k curves
`write_comparison` plots several models' curves on one figure (explorer vs learner of one family).

`evaluate_prompts` + `passk_summary` are the in-memory pieces for periodic evaluation during training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from megatron_s2l.algo.passk import pass_at_k_curve
from megatron_s2l.algo.reward_scorer import RewardScorer
from megatron_s2l.config import ConfigError, EngineConfig, RewardConfig, SamplingConfig
from megatron_s2l.data.prompts import load_prompts
from megatron_s2l.data.tokenizer import load_tokenizer
from megatron_s2l.rollout.engine import RolloutEngine
from megatron_s2l.rollout.mixer import Scorer, reward_scorer
from megatron_s2l.types import Prompt

# Sampling presets (max_new_tokens is set per run). nothink: the paper's evaluation setting (Qwen3's
# recommended non-thinking sampling); think: the authors' thinking-mode setting.
PRESETS = {"nothink": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5},
           "think": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "presence_penalty": 0.0}}
SETTINGS_FILE, SAMPLES_FILE = "settings.json", "samples.jsonl"
RESULTS_JSON, RESULTS_TABLE, RESULTS_PLOT = "results.json", "results.md", "passk.png"


@dataclass
class ProblemResult:
    """The k samples of one problem, verified."""

    benchmark: str
    prompt_id: str
    ground_truth: str
    rewards: list[float]
    responses: list[str]
    finish_reasons: list[str]
    verify_timeouts: int = 0

    @property
    def correct(self) -> int:
        return sum(r > 0 for r in self.rewards)


def sampling_preset(name: str, max_new_tokens: int) -> SamplingConfig:
    """The SamplingConfig of a preset ("nothink", "think") with `max_new_tokens`."""
    if name not in PRESETS:
        raise ValueError(f"sampling preset {name!r}: accepted values are {sorted(PRESETS)}")
    return SamplingConfig(max_new_tokens=max_new_tokens, **PRESETS[name])


def report_ks(k: int) -> list[int]:
    """The k values shown in tables: powers of two below k, and k itself."""
    ks = [1 << i for i in range(k.bit_length()) if 1 << i < k]
    return ks + [k]


def evaluate_prompts(engine: RolloutEngine, prompts: list[Prompt], *, k: int, sampling: SamplingConfig,
                     decode: Callable[[list[int]], str], scorer: Scorer, seed: int,
                     benchmark: str = "eval") -> list[ProblemResult]:
    """Draw k samples per prompt from `engine` (seeded per prompt) and score them all in one `scorer` call."""
    groups = engine.generate(prompts, k, sampling, seed=seed)
    for prompt, samples in zip(prompts, groups):
        if len(samples) != k:
            raise ValueError(f"{benchmark}: prompt {prompt.prompt_id!r} got {len(samples)} samples instead of "
                             f"k={k} (the engine dropped it: is it longer than max_model_len - max_new_tokens? "
                             f"raise the engine's max_model_len)")
    rewards = scorer.score([p for p in prompts for _ in range(k)], [s for samples in groups for s in samples])
    results = []
    for i, (prompt, samples) in enumerate(zip(prompts, groups)):
        results.append(ProblemResult(benchmark=benchmark, prompt_id=prompt.prompt_id,
                                     ground_truth=prompt.ground_truth, rewards=rewards[i * k:(i + 1) * k],
                                     responses=[decode(s.response_ids) for s in samples],
                                     finish_reasons=[s.finish_reason for s in samples],
                                     verify_timeouts=int(sum(s.reward_info.get("timed_out", 0) for s in samples))))
    return results


def passk_summary(results: list[ProblemResult], k: int) -> dict:
    """pass@1..pass@k (unbiased, averaged over problems), mean reward and counts of one benchmark."""
    rewards = [r for res in results for r in res.rewards]
    curve = pass_at_k_curve(((len(res.rewards), res.correct) for res in results), range(1, k + 1))
    return {"num_problems": len(results), "samples_per_problem": k,
            "pass@k": {str(j): value for j, value in curve.items()},
            "mean_reward": sum(rewards) / len(rewards),
            "truncated_fraction": sum(f == "length" for res in results for f in res.finish_reasons) / len(rewards),
            "verify_timeouts": sum(res.verify_timeouts for res in results)}


def evaluate(engine: RolloutEngine, benchmarks: Mapping[str, list[Prompt]], out_dir: str | Path, *, k: int,
             sampling: SamplingConfig, decode: Callable[[list[int]], str], settings: dict, seed: int = 0,
             chunk_size: int = 64, scorer: Optional[Scorer] = None) -> dict:
    """Evaluate every benchmark's prompts with `engine` into `out_dir` (resumable) and write the reports.

    `settings` (model name, template, ...) is recorded with k, sampling and seed; rerunning into a
    directory evaluated with other settings is refused. Returns the results.json content.
    """
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k={k}, chunk_size={chunk_size}: both must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "k": k, "seed": seed, "sampling": dataclasses.asdict(sampling)}
    _check_settings(out / SETTINGS_FILE, settings)
    done = _read_samples(out / SAMPLES_FILE)
    scorer = scorer or RewardScorer(decode)
    with open(out / SAMPLES_FILE, "a", encoding="utf-8") as log:
        for name, prompts in benchmarks.items():
            todo = [p for p in prompts if (name, p.prompt_id) not in done]
            for start in range(0, len(todo), chunk_size):
                for result in evaluate_prompts(engine, todo[start:start + chunk_size], k=k, sampling=sampling,
                                               decode=decode, scorer=scorer, seed=seed, benchmark=name):
                    log.write(json.dumps(dataclasses.asdict(result), ensure_ascii=False) + "\n")
                    done[name, result.prompt_id] = result
                log.flush()
                os.fsync(log.fileno())
    results = {"model": settings.get("model", ""), "settings": settings, "benchmarks": {
        name: passk_summary([done[name, p.prompt_id] for p in prompts], k) for name, prompts in benchmarks.items()}}
    (out / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    label = results["model"] or out.name
    (out / RESULTS_TABLE).write_text(passk_table({label: results}), encoding="utf-8")
    plot_passk({label: results}, out / RESULTS_PLOT)
    return results


def evaluate_model_dir(model_dir: str | Path, benchmark_files: Mapping[str, str | Path], out_dir: str | Path, *,
                       k: int, sampling: SamplingConfig, engine: EngineConfig, template: str = "chat",
                       max_prompt_length: int = 512, on_bad_prompt: str = "error", seed: int = 0,
                       label: Optional[str] = None, tokenizer_dir: str | Path | None = None,
                       reward: Optional[RewardConfig] = None) -> dict:
    """Serve an HF model directory with vLLM and `evaluate` it on benchmark files (JSONL or verl Parquet).

    The tokenizer comes from `tokenizer_dir` or the model directory (the demo's sentencepiece model or
    the directory's HF tokenizer); `template` is a `DataConfig.prompt_template` value; `reward` (a config's
    section, part of the recorded settings; default: the math check) scores the samples.
    """
    from megatron_s2l.rollout.vllm_engine import VLLMEngine  # vLLM is heavy: only when a model is served

    reward = reward or RewardConfig()
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    benchmarks = {name: load_prompts(path, tokenizer, template=template, max_prompt_length=max_prompt_length,
                                     on_bad_prompt=on_bad_prompt).prompts
                  for name, path in benchmark_files.items()}
    label = label or Path(model_dir).name
    settings = {"model": label, "model_dir": str(model_dir), "template": template,
                "benchmark_files": {name: str(path) for name, path in benchmark_files.items()},
                "reward": dataclasses.asdict(reward)}
    scorer = reward_scorer(reward, tokenizer.decode)
    served = VLLMEngine(str(model_dir), engine, source="learner", model_id=label, eos_token_id=tokenizer.eos_id)
    try:
        return evaluate(served, benchmarks, out_dir, k=k, sampling=sampling, decode=tokenizer.decode,
                        settings=settings, seed=seed, scorer=scorer)
    finally:  # now, not whenever the garbage collector finds it: its teardown resets vLLM's process groups,
        served.close()  # which would break the next engine (the next model of a --compare) mid-run
        scorer.close()


def passk_table(results: Mapping[str, dict]) -> str:
    """A Markdown table: one row per (benchmark, model), pass@k columns at `report_ks`, in percent."""
    k = min(r["settings"]["k"] for r in results.values())
    ks = report_ks(k)
    lines = ["| benchmark | model | problems | " + " | ".join(f"pass@{j}" for j in ks) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for benchmark in _benchmarks(results):
        for label, res in results.items():
            summary = res["benchmarks"].get(benchmark)
            if summary is not None:
                cells = " | ".join(f"{100 * summary['pass@k'][str(j)]:.1f}" for j in ks)
                lines.append(f"| {benchmark} | {label} | {summary['num_problems']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_passk(results: Mapping[str, dict], path: str | Path) -> Path:
    """pass@k curves (percent over k, log2 axis), one panel per benchmark, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = _benchmarks(results)
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.6), squeeze=False)
    for ax, benchmark in zip(axes[0], benchmarks):
        for label, res in results.items():
            summary = res["benchmarks"].get(benchmark)
            if summary is not None:
                ks = sorted(int(j) for j in summary["pass@k"])
                ax.plot(ks, [100 * summary["pass@k"][str(j)] for j in ks], marker=".", label=label)
        ax.set_xscale("log", base=2)
        ax.set(title=benchmark, xlabel="k", ylabel="pass@k (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_comparison(results: Mapping[str, dict], out_dir: str | Path) -> dict[str, Path]:
    """compare.json, compare.md and compare.png of several models' results (label -> results.json content)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "table": out / "compare.md", "plot": out / "compare.png"}
    paths["json"].write_text(json.dumps(dict(results), indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(passk_table(results), encoding="utf-8")
    plot_passk(results, paths["plot"])
    return paths


def _benchmarks(results: Mapping[str, dict]) -> list[str]:
    return list(dict.fromkeys(b for res in results.values() for b in res["benchmarks"]))


def _check_settings(path: Path, settings: dict) -> None:
    """Record the settings, or refuse to mix results with those already recorded in this directory."""
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in recorded.keys() | settings.keys()
                         if key != "benchmark_files" and recorded.get(key) != settings.get(key))
        if changed:
            raise ConfigError(f"{path.parent} holds results evaluated with other settings ({', '.join(changed)} "
                              f"differ: recorded {[recorded.get(c) for c in changed]}, now "
                              f"{[settings.get(c) for c in changed]}): use another output directory or the "
                              f"recorded settings")
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _read_samples(path: Path) -> dict[tuple[str, str], ProblemResult]:
    """Finished problems of an earlier run; a last line cut off by a crash is removed from the file."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)
    done = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            result = ProblemResult(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{path}:{number}: not a result line ({e}); the file is damaged: delete it to "
                              f"evaluate from scratch") from None
        done[result.benchmark, result.prompt_id] = result
    return done
