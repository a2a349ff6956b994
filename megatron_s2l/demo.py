"""The CPU demo's model family: a tokenizer and two Qwen3-style sizes pretrained on the synthetic task.

No model hub: `build_family` trains a sentencepiece tokenizer on the task's text, pretrains a small
explorer and a larger learner with Megatron-Core (token-mean cross-entropy on worked solutions), writes
both as HF directories that vLLM serves, and measures their pass@k curves on the held-out split. The
result is cached under a directory named by the family's settings, so later runs reuse it;
`prepare_demo` points a config at it.

The paper's premise is that the smaller sibling's pass@k catches up with and crosses the larger one's as
k grows: the large model is more accurate per sample but its mistakes are confident and systematic,
while the small one errs at random. Two tiny models trained for minutes cannot acquire that contrast by
scale alone, so the demo builds it in through what each is taught (`data.task.Tutor`): the learner's
worked solutions are nearly clean except for a blind spot (wrap-around steps written off by one 90% of
the time), the explorer's have random slips everywhere. The family's pass@k table and plot show the
resulting curves; S2L-PO then lets the learner learn the wrap-around steps from the explorer's samples.

Run alone with `python -m megatron_s2l.demo [--out DIR]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_s2l import console
from megatron_s2l.config import (DataConfig, EngineConfig, FP8Config, LossConfig, ModelConfig, OptimConfig,
                                  ParallelConfig, S2LConfig, SamplingConfig, TaskConfig)

if __name__ == "__main__":  # the family build prepare_demo starts: quiet before Megatron and vLLM are imported
    console.setup_from_argv()

from megatron_s2l.constants import DEMO_TOKENIZER_FILE, PromptTemplate  # noqa: E402
from megatron_s2l.data.prompts import task_prompts  # noqa: E402
from megatron_s2l.data.task import Tutor, pretraining_examples, task_splits  # noqa: E402
from megatron_s2l.data.tokenizer import Tokenizer, render_prompt, train_tokenizer  # noqa: E402
from megatron_s2l.evaluation.passk_eval import evaluate, write_comparison  # noqa: E402
from megatron_s2l.learner.hf_weights import save_hf_dir  # noqa: E402
from megatron_s2l.learner.step import Learner  # noqa: E402
from megatron_s2l.rollout.vllm_engine import VLLMEngine  # noqa: E402

FAMILY_ROOT = Path("runs/demo_family")
DONE, SPEC, PRETRAIN_LOG = "family.json", "spec.json", "pretrain.json"


def _size(layers: int, hidden: int, heads: int, groups: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=3 * hidden, num_attention_heads=heads,
                       num_query_groups=groups, kv_channels=32, vocab_size=512, max_position_embeddings=256)


@dataclass(frozen=True)
class Member:
    """One size of the family, how long it is pretrained and who writes its worked solutions."""

    model: ModelConfig
    steps: int
    lr: float
    seed: int
    tutor: Tutor = Tutor()


@dataclass(frozen=True)
class FamilySpec:
    """Everything that defines the demo family; its hash names the cache directory."""

    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = 0  # draws the task's problems (data.seed)
    prompt_template: PromptTemplate = "chat"  # how questions are rendered in pretraining and evaluation
    explorer: Member = field(default_factory=lambda: Member(_size(2, 128, 4, 2), steps=400, lr=2e-3, seed=1,
                                                            tutor=Tutor(slip_rate=0.35)))
    learner: Member = field(default_factory=lambda: Member(_size(4, 256, 8, 4), steps=300, lr=2e-3, seed=2,
                                                           tutor=Tutor(slip_rate=0.05, wrap_error_rate=0.9)))
    batch_size: int = 32
    passk_samples: int = 32  # samples per held-out problem for the pass@k curves

    def key(self) -> str:
        spec = dataclasses.asdict(self)
        for member in ("explorer", "learner"):
            del spec[member]["model"]["recompute"]  # trades memory for time, same weights: the same family
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def of(cls, data: DataConfig) -> "FamilySpec":
        """The family trained on the task `data` describes (its other fields, such as the prompt files, do not
        shape the family and leave its cache key alone)."""
        return cls(task=data.task, seed=data.seed, prompt_template=data.prompt_template)

    @classmethod
    def from_dict(cls, spec: dict) -> "FamilySpec":
        members = {name: Member(**dict(spec[name], model=ModelConfig(**spec[name]["model"]),
                                       tutor=Tutor(**spec[name]["tutor"])))
                   for name in ("explorer", "learner")}
        return cls(**dict(spec, task=TaskConfig(**spec["task"]), **members))


def family_dir(spec: FamilySpec, root: Path = FAMILY_ROOT) -> Path:
    return root / spec.key()


def build_family(spec: FamilySpec, out: Path) -> Path:
    """Build the tokenizer and both models into `out` (single process); returns `out`.

    Resumable: a model directory appears only once complete (written aside, then renamed), and a rerun
    keeps the tokenizer and every finished model and evaluation.
    """
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train, _ = task_splits(spec.task, seed=spec.seed)
    if not (out / DEMO_TOKENIZER_FILE).exists():
        texts = (p.question + " " + p.solution for p in train)
        train_tokenizer(texts, vocab_size=spec.learner.model.vocab_size).save(out)
    tokenizer = Tokenizer.load(out)

    def render(question: str) -> str:
        return render_prompt([{"role": "user", "content": question}], spec.prompt_template, tokenizer)

    for name, member in (("explorer", spec.explorer), ("learner", spec.learner)):
        if (out / name).exists():
            continue
        examples = pretraining_examples(train, tokenizer, render, modulus=spec.task.modulus, tutor=member.tutor,
                                        seed=member.seed)
        learner, loss = pretrain(member, examples, spec.batch_size, tokenizer.pad_id, desc=f"pretrain {name}")
        partial = out / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        save_hf_dir(learner.model_chunks, member.model, partial)
        tokenizer.save(partial)
        (partial / PRETRAIN_LOG).write_text(json.dumps({"final_loss": loss, "steps": member.steps}))
        partial.rename(out / name)
    curves = family_passk(spec, out, tokenizer)
    summary = {"spec": dataclasses.asdict(spec), "seconds": round(time.time() - started, 1),
               "final_loss": {name: json.loads((out / name / PRETRAIN_LOG).read_text())["final_loss"]
                              for name in ("explorer", "learner")},
               "pass@k": {name: result["benchmarks"]["held_out"]["pass@k"] for name, result in curves.items()}}
    (out / DONE).write_text(json.dumps(summary, indent=2))
    return out


def family_passk(spec: FamilySpec, out: Path, tokenizer: Tokenizer) -> dict[str, dict]:
    """pass@1..k of both models on the held-out split, sampled as the explorer samples during training;
    writes passk/compare.{json,md,png} (the figure behind the method) and returns the results."""
    _, held_out = task_splits(spec.task, seed=spec.seed)
    benchmark = {"held_out": task_prompts(held_out, tokenizer, template=spec.prompt_template)}
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=48)
    engine = EngineConfig(max_model_len=160, kv_cache_memory_bytes=64 * 2**20, dtype="float32")
    results = {}
    for name in ("explorer", "learner"):
        served = VLLMEngine(str(out / name), engine, source="learner", model_id=name, eos_token_id=tokenizer.eos_id)
        results[name] = evaluate(served, benchmark, out / "passk" / name, k=spec.passk_samples, sampling=sampling,
                                 decode=tokenizer.decode, settings={"model": name})
        served.close()  # before the next engine starts: a late teardown would reset that engine's groups
    paths = write_comparison(results, out / "passk")
    print(paths["table"].read_text())
    return results


def pretrain(member: Member, examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
             desc: str) -> tuple[Learner, float]:
    """Supervised pretraining on (prompt, completion) pairs, loss on the completions; returns the last loss."""
    optim = OptimConfig(lr=member.lr, min_lr=member.lr / 10, lr_warmup_steps=member.steps // 10,
                        lr_decay_steps=member.steps, lr_decay_style="cosine", weight_decay=0.01,
                        micro_batch_size=batch_size)
    learner = Learner(member.model, ParallelConfig(), optim, LossConfig(kl_coef=0.0), FP8Config(), seed=member.seed,
                      with_reference=False)
    rng = random.Random(member.seed)
    bar = tqdm(range(member.steps), desc=desc)
    loss = float("nan")
    for _ in bar:
        tokens, mask = collate(rng.sample(examples, batch_size), pad_id)
        loss = learner.sft_step(tokens, mask)
        bar.set_postfix(loss=f"{loss:.3f}")
    return learner, loss


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, L] and the next-token loss mask [B, L-1] over each completion."""
    length = max(len(p) + len(c) for p, c in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros(len(examples), length - 1, dtype=torch.bool)  # [B, L-1]
    for row, (prompt, completion) in enumerate(examples):
        tokens[row, :len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        mask[row, len(prompt) - 1:len(prompt) + len(completion) - 1] = True
    return tokens, mask


def prepare_demo(cfg: S2LConfig, spec: FamilySpec | None = None, timeout_s: float = 3600) -> S2LConfig:
    """`cfg` with the learner and explorer pointed at the cached demo family, built first if missing.

    Under torchrun the first rank builds it in a clean single-process child (Megatron's groups of the
    training job are not set up yet) while the others wait for it.
    """
    spec = spec or FamilySpec.of(cfg.data)
    out = family_dir(spec)
    if (out / DONE).exists():
        console.say(f"demo family: {out} (cached; pass@k curves in {out / 'passk' / 'compare.md'})")
    else:
        console.say(f"demo family: building {out} (a tokenizer, two models and their pass@k curves; minutes, once)")
        if console.is_first_rank():
            out.mkdir(parents=True, exist_ok=True)
            (out / SPEC).write_text(json.dumps(dataclasses.asdict(spec), indent=2))
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            subprocess.run([sys.executable, "-m", "megatron_s2l.demo", "--spec", str(out / SPEC), "--out", str(out)],
                           check=True, env=env)
        else:
            _wait_for(out / DONE, timeout_s)
    return dataclasses.replace(
        cfg,
        learner=dataclasses.replace(cfg.learner, hf_path=str(out / "learner")),
        explorer=dataclasses.replace(cfg.explorer, hf_path=str(out / "explorer")),
    )


def _wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s: did the first rank fail to build the "
                               f"demo family? Build it alone with `python -m megatron_s2l.demo`")
        time.sleep(2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the CPU demo's model family")
    parser.add_argument("--spec", type=Path, help="a FamilySpec as JSON (default: FamilySpec())")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/demo_family/<settings hash>)")
    console.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    spec = FamilySpec.from_dict(json.loads(args.spec.read_text())) if args.spec else FamilySpec()
    print(build_family(spec, args.out or family_dir(spec)))


if __name__ == "__main__":
    console.run_main(main, "python -m megatron_s2l.demo")
