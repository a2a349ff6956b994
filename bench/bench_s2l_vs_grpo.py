"""S2L-PO against GRPO on the CPU demo: reward and held-out accuracy per step and per rollout FLOP.

Methods, all from examples/configs/demo.yaml with the same seeds, steps, prompts and group size:

  s2l_combined  S2L-PO as in the paper: explorer + learner samples in one group, explorer share annealed
                1 -> 0 over the first half of the run (schedule.t_mix = steps // 2)
  s2l_separate  the authors' code: an explorer phase then a learner phase per step (two optimizer steps)
  s2l_tis       s2l_combined with truncated importance sampling against the behaviour policy: an explorer
                token's weight is min(pi_old / pi_explorer, loss.tis_cap) (verl's decoupled mode)
  s2l_adaptive  combined groups with adaptive allocation (schedule.allocation=adaptive): the learner probes every
                prompt with G - S samples, S = min(ceil(alpha * G), G // 2); the explorer fills the S slots of
                the prompts whose probe rewards are all equal, the learner those of the others
  grpo          plain on-policy GRPO (explorer.source=none)
  grpo_hot      GRPO sampling the learner at --hot-temperature (the paper's token-level diversity baseline);
                it trains at that temperature but is evaluated at the demo's, like every other method

Every (method, seed) runs `megatron_s2l.loop.train` in a fresh process (Megatron's parallel state and the
vLLM engines are per process). Held-out pass@1 is measured before training (step 0) and every
`logging.eval_interval` steps by the loop itself. Rollout compute counts training rollouts only:
2 x (matmul parameters) FLOPs per token, for each sampled response token and for each prompt once per
engine and group (vLLM's prefix cache shares a prompt between the samples of a group); explorer tokens
cost the explorer's parameters. Attention FLOPs are left out (sequences are short).

Usage: .venv/bin/python bench/bench_s2l_vs_grpo.py [--seeds 1 2] [--steps 16] [--methods ...] [--out DIR]
       [--family DIR] [--min-wraps N] [key=value overrides of the demo config]
--min-wraps N trains and evaluates only on problems with at least N wrap-around steps, where the demo learner's
tutor taught it wrong (its blind spot): the regime of the paper, in which the learner's own groups rarely hold
a correct sample.
Writes results.json, results.md and results.png into --out (one JSON per run under runs/ as well). A run
whose JSON is already there with the same steps, temperature and overrides is reused, so an interrupted
bench resumes, and more seeds can be added later to the same --out; --summary-only summarises what is there
(several benches with different --seeds may write into one --out at the same time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "examples" / "configs" / "demo.yaml"
METHODS = {
    "s2l_combined": ["schedule.group_mode=combined"],
    "s2l_separate": ["schedule.group_mode=separate"],
    "s2l_tis": ["schedule.group_mode=combined", "loss.importance_correction=tis"],
    "s2l_adaptive": ["schedule.group_mode=combined", "schedule.allocation=adaptive"],
    "grpo": ["explorer.source=none"],
    "grpo_hot": ["explorer.source=none"],
}


class MeteredRollout:
    """The loop's rollout hook, counting the tokens each source generated and prefilled per step."""

    def __init__(self, phase):
        self.phase = phase
        self.tokens: dict[int, dict[str, dict[str, int]]] = {}  # step -> source -> {"response", "prompt"}

    def phases(self, step: int):
        """The wrapped hook's phases of `step`."""
        return self.phase.phases(step)

    def rollout(self, step: int, prompts, sources):
        """The wrapped hook's groups, after adding their tokens to `self.tokens[step]`."""
        groups = self.phase.rollout(step, prompts, sources)
        for group in groups:
            seen = set()
            for sample in group.samples:
                count = self.tokens.setdefault(step, {}).setdefault(sample.source, {"response": 0, "prompt": 0})
                count["response"] += len(sample.response_ids)
                if sample.source not in seen:  # one prefill per engine and group
                    count["prompt"] += len(sample.prompt_ids)
                    seen.add(sample.source)
        return groups

    def release_memory(self) -> None:
        """The wrapped hook's engines sleep."""
        self.phase.release_memory()

    def sync_weights(self, named_tensors, *, changed: bool) -> None:
        """Refit the wrapped hook's learner engine."""
        self.phase.sync_weights(named_tensors, changed=changed)

    def generate(self, prompts, n, sampling, *, seed=None):
        """The wrapped hook's learner samples (held-out evaluation: not counted as rollout compute)."""
        return self.phase.generate(prompts, n, sampling, seed=seed)

    def metrics(self, step: int) -> dict[str, float]:
        """The wrapped hook's rollout metrics of `step`."""
        return self.phase.metrics(step)


def matmul_params(hf_path: str) -> int:
    """Parameters a token's forward multiplies with: all but the embedding lookup, plus a tied lm_head."""
    from megatron_s2l.learner.safetensors_io import read_hf_state

    state = read_hf_state(hf_path)
    names = set(state)
    total = sum(math.prod(state.shape(n)) for n in names)
    return total if "lm_head.weight" not in names else total - math.prod(state.shape("model.embed_tokens.weight"))


def run_one(method: str, seed: int, steps: int, hot_temperature: float, overrides: list[str], out: Path) -> dict:
    """Worker: train one method with one seed in this process; write and return its per-step record."""
    from megatron_s2l.config import S2LConfig
    from megatron_s2l.data.tokenizer import load_tokenizer
    from megatron_s2l.demo import prepare_demo
    from megatron_s2l.learner.model import init_parallel
    from megatron_s2l.loop import build_rollout_phase, check_config, train

    cfg = S2LConfig.from_yaml(DEMO_CONFIG, [
        f"seed={seed}", f"train_steps={steps}", f"schedule.t_mix={max(1, steps // 2)}", "checkpoint.save_dir=null",
        "logging.tensorboard_dir=null", *METHODS[method], *overrides])
    if cfg.learner.hf_path is None:  # the cached demo family, built on first use
        cfg = prepare_demo(cfg)
    cfg = check_config(cfg)
    sampled = cfg
    if method == "grpo_hot":
        sampled = dataclasses.replace(cfg, learner_sampling=dataclasses.replace(cfg.learner_sampling,
                                                                               temperature=hot_temperature))
    init_parallel(cfg.parallel, cfg.seed)  # before the engines: an in-process vLLM must find the job's group
    tokenizer = load_tokenizer(cfg.learner.hf_path)
    rollout = MeteredRollout(build_rollout_phase(sampled, tokenizer))
    started = time.time()
    result = train(cfg, rollout)
    record = {
        "method": method, "seed": seed, "steps": steps, "seconds": round(time.time() - started, 1),
        "settings": run_settings(steps, hot_temperature, overrides),
        "params": {"learner": matmul_params(cfg.learner.hf_path), "explorer": matmul_params(cfg.explorer.hf_path)},
        "initial_eval": result.initial_eval, "history": result.history,
        "tokens": {str(step): by_source for step, by_source in sorted(rollout.tokens.items())},
    }
    path = out / "runs" / f"{method}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return record


def run_settings(steps: int, hot_temperature: float, overrides: list[str]) -> dict:
    """What, besides method and seed, decides a run's outcome: a saved run is reused only if these match."""
    return {"steps": steps, "hot_temperature": hot_temperature, "overrides": list(overrides)}


def saved_run(path: Path, settings: dict) -> dict | None:
    """The record at `path` if an earlier (perhaps interrupted) bench run wrote it with the same settings."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("settings") == settings else None


def blind_spot_prompts(out: Path, min_wraps: int, num_eval: int) -> list[str]:
    """Overrides that train and evaluate on problems with >= `min_wraps` wrap-around steps, the demo learner's
    blind spot: its training prompts filtered, and `num_eval` new held-out problems, none of them seen in
    the family's pretraining (written as JSONL under `out`)."""
    from megatron_s2l.config import S2LConfig
    from megatron_s2l.data.task import generate_problems, task_splits, wrap_count, write_jsonl

    data = S2LConfig.from_yaml(DEMO_CONFIG).data
    spec = data.task
    train, held_out = task_splits(spec, seed=data.seed)
    fresh = generate_problems(20 * num_eval, spec, seed=data.seed + 2, prefix="blind",
                              exclude=[p.question for p in train + held_out])
    hard_eval = [p for p in fresh if wrap_count(p, spec.modulus) >= min_wraps][:num_eval]
    if len(hard_eval) < num_eval:
        raise ValueError(f"--min-wraps {min_wraps}: only {len(hard_eval)} of {len(fresh)} new problems have that many "
                         f"wrap-arounds; lower it")
    train_path = write_jsonl([p for p in train if wrap_count(p, spec.modulus) >= min_wraps], out / "blind_train.jsonl")
    eval_path = write_jsonl(hard_eval, out / "blind_eval.jsonl")
    return [f"data.train_path={train_path}", f"data.eval_path={eval_path}"]


def rollout_flops(record: dict) -> list[float]:
    """Cumulative training-rollout FLOPs after each step."""
    total, out = 0.0, []
    for step in range(1, record["steps"] + 1):
        for source, count in record["tokens"].get(str(step), {}).items():
            total += 2 * record["params"][source] * (count["response"] + count["prompt"])
        out.append(total)
    return out


def learner_reward(metrics: dict) -> float:
    """Mean reward of the learner's own samples in a step (what the learner itself achieves)."""
    for key in ("reward/learner", "learner_phase/reward/learner"):
        if key in metrics:
            return metrics[key]
    return float("nan")


def evals(record: dict) -> list[tuple[int, float]]:
    """(step, held-out pass@1) from step 0 on."""
    points = [(0, record["initial_eval"]["eval/pass@1"])]
    points += [(i + 1, m["eval/pass@1"]) for i, m in enumerate(record["history"]) if "eval/pass@1" in m]
    return points


def summarise(records: list[dict]) -> dict:
    """Per method: seed means of the per-step curves and of the run totals."""
    by_method: dict[str, list[dict]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)
    summary = {}
    for method, runs in by_method.items():
        steps = runs[0]["steps"]
        flops = [rollout_flops(r) for r in runs]
        eval_points = [evals(r) for r in runs]
        tail = max(1, steps // 4)
        per_run = {
            "final_pass@1": [e[-1][1] for e in eval_points],
            "delta_pass@1": [e[-1][1] - e[0][1] for e in eval_points],
            "tail_reward": [statistics.mean(m["reward/mean"] for m in r["history"][-tail:]) for r in runs],
            "tail_learner_reward": [statistics.mean(learner_reward(m) for m in r["history"][-tail:]) for r in runs],
            "rollout_tflops": [f[-1] / 1e12 for f in flops],
            "explorer_share_used": [statistics.mean(m.get("rollout/explorer_share", 0.0) for m in r["history"])
                                    for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
        summary[method] = {
            "seeds": [r["seed"] for r in runs],
            "reward_per_step": _mean_curve([[m["reward/mean"] for m in r["history"]] for r in runs]),
            "learner_reward_per_step": _mean_curve([[learner_reward(m) for m in r["history"]] for r in runs]),
            "cumulative_tflops": _mean_curve([[x / 1e12 for x in f] for f in flops]),
            "pass@1_steps": [s for s, _ in eval_points[0]],
            "pass@1": _mean_curve([[v for _, v in e] for e in eval_points]),
            "final_pass@1_per_seed": [e[-1][1] for e in eval_points],
            **{k: _mean_sd(v) for k, v in per_run.items()},
        }
        s = summary[method]
        s["delta_pass@1_per_tflop"] = s["delta_pass@1"][0] / s["rollout_tflops"][0]
        s["reward_sum_per_tflop"] = sum(s["reward_per_step"]) / s["rollout_tflops"][0]
    return summary


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [statistics.mean(values) for values in zip(*curves)]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(summary: dict) -> str:
    """The Markdown tables of the run totals (mean ± sd over seeds; s.e. = sd / sqrt(seeds)) and of held-out
    pass@1 per step and per seed."""
    grpo_tflops = summary["grpo"]["rollout_tflops"][0] if "grpo" in summary else float("nan")
    rows = ["| method | seeds | held-out pass@1 step 0 -> end | Δ pass@1 | Δ pass@1 s.e. | train reward (last quarter) | "
            "learner-sample reward (last quarter) | explorer share used | rollout TFLOP | rollout compute / GRPO | "
            "Δ pass@1 per rollout TFLOP | Σ step reward per rollout TFLOP | wall s/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        rows.append(f"| {method} | {len(s['seeds'])} | {s['pass@1'][0]:.3f} -> {s['pass@1'][-1]:.3f} | "
                    f"{_pm(s['delta_pass@1'])} | {s['delta_pass@1'][1] / math.sqrt(len(s['seeds'])):.3f} | "
                    f"{_pm(s['tail_reward'])} | {_pm(s['tail_learner_reward'])} | "
                    f"{s['explorer_share_used'][0]:.3f} | {_pm(s['rollout_tflops'], '.2f')} | "
                    f"{s['rollout_tflops'][0] / grpo_tflops:.2f} | {s['delta_pass@1_per_tflop']:.4f} | "
                    f"{s['reward_sum_per_tflop']:.3f} | {s['seconds'][0]:.0f} |")
    seeds = sorted({seed for s in summary.values() for seed in s["seeds"]})
    steps = next(iter(summary.values()))["pass@1_steps"]
    rows += ["", "| method | " + " | ".join(f"step {k}" for k in steps) + " | "
             + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "|---|" + "---|" * (len(steps) + len(seeds))]
    for method, s in summary.items():
        final = dict(zip(s["seeds"], s["final_pass@1_per_seed"]))
        rows.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in s["pass@1"]) + " | "
                    + " | ".join(f"{final[seed]:.3f}" if seed in final else "" for seed in seeds) + " |")
    return "\n".join(rows)


def _pm(pair: tuple[float, float], fmt: str = ".3f") -> str:
    return f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"


def plot(summary: dict, path: Path) -> None:
    """Training reward per step, held-out pass@1 per step and per cumulative rollout TFLOP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for method, s in summary.items():
        steps = range(1, len(s["reward_per_step"]) + 1)
        axes[0].plot(steps, s["reward_per_step"], label=f"{method} (seeds {', '.join(map(str, s['seeds']))})")
        axes[1].plot(s["pass@1_steps"], s["pass@1"], marker="o", label=method)
        flops_at = [0.0] + [s["cumulative_tflops"][k - 1] for k in s["pass@1_steps"][1:]]
        axes[2].plot(flops_at, s["pass@1"], marker="o", label=method)
    for ax, (x, y) in zip(axes, [("step", "training reward (all rollout samples)"), ("step", "held-out pass@1"),
                                 ("training-rollout TFLOP", "held-out pass@1")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("S2L-PO vs GRPO on the CPU demo (mean over each method's seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _free_port() -> int:
    """A free local port for a worker's single-process group (other jobs on the node may hold the default)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--hot-temperature", type=float, default=1.3, help="grpo_hot's sampling temperature")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_s2l_vs_grpo"))
    parser.add_argument("--family", type=Path, help="a demo family built elsewhere (python -m megatron_s2l.demo "
                        "--out DIR); default: the cached runs/demo_family/<hash>, built if missing")
    parser.add_argument("--min-wraps", type=int, default=0,
                        help="train and evaluate only on problems with at least this many wrap-around steps (the "
                             "demo learner's blind spot; the held-out set is then 200 new such problems)")
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the runs already saved in --out, leaving out the missing ones (a bench cut short)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. prompts_per_step=8")
    args = parser.parse_args(argv)
    if args.family:
        args.overrides = [f"learner.hf_path={args.family / 'learner'}", f"explorer.hf_path={args.family / 'explorer'}",
                          *args.overrides]
    if args.min_wraps and not args.worker:
        args.overrides = [*blind_spot_prompts(args.out, args.min_wraps, num_eval=200), *args.overrides]
    if args.worker:
        run_one(args.worker[0], int(args.worker[1]), args.steps, args.hot_temperature, args.overrides, args.out)
        return
    records = []
    settings = run_settings(args.steps, args.hot_temperature, args.overrides)
    for seed in args.seeds:  # seeds outer: a cut-short run still has every method for the first seeds
        for method in args.methods:
            path = args.out / "runs" / f"{method}_seed{seed}.json"
            if (record := saved_run(path, settings)) is not None:  # a rerun after a crash redoes only what is missing
                records.append(record)
                print(f"{method} seed {seed}: reused {path}", flush=True)
                continue
            if args.summary_only:
                print(f"{method} seed {seed}: missing, left out", flush=True)
                continue
            started = time.time()
            subprocess.run([sys.executable, __file__, "--worker", method, str(seed), "--steps", str(args.steps),
                            "--hot-temperature", str(args.hot_temperature), "--out", str(args.out), *args.overrides],
                           check=True, cwd=REPO,
                           env=os.environ | {"PYTHONPATH": str(REPO), "MASTER_PORT": str(_free_port())})
            records.append(json.loads(path.read_text()))
            print(f"{method} seed {seed}: {time.time() - started:.0f} s", flush=True)
    if not records:
        sys.exit(f"no run in {args.out / 'runs'} matches --methods, --seeds, --steps and the overrides given: "
                 f"pass those of the runs to summarise")
    summary = summarise(records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "summary": summary}, indent=1))
    (args.out / "results.md").write_text(table(summary) + "\n")
    plot(summary, args.out / "results.png")
    print(table(summary))


if __name__ == "__main__":  # workers re-run this file
    main()
