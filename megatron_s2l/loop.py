"""The S2L-PO training loop: rollout -> rewards -> advantages -> ref log-probs -> PPO -> refit -> save.

`train(cfg)` is the whole product on any layout (one CPU process, torchrun on CPU, multi-node GPU). It reads
top to bottom; the pieces it calls are the rollout hook (`rollout/phase.py`), the learner
(`learner/step.py`), the math (`algo/`) and checkpoints (`learner/checkpoint.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_s2l.algo.advantages import dynamic_sampling_mask, group_advantages, source_means
from megatron_s2l.algo.allocation import explorer_usage
from megatron_s2l.algo.overlong import overlong
from megatron_s2l.algo.reward_scorer import reward_info_means
from megatron_s2l.config import S2LConfig
from megatron_s2l.console import say
from megatron_s2l.data.prompts import PromptStream, prompts_from_config
from megatron_s2l.data.tokenizer import PromptTokenizer, load_tokenizer
from megatron_s2l.evaluation.passk_eval import evaluate_prompts, passk_summary
from megatron_s2l.learner.checkpoint import load_checkpoint, save_checkpoint
from megatron_s2l.learner.hf_config import model_config_from_hf
from megatron_s2l.learner.hf_weights import export_hf_weights
from megatron_s2l.learner.safetensors_io import read_hf_state
from megatron_s2l.learner.step import Learner
from megatron_s2l.rollout.checks import check_config
from megatron_s2l.rollout.colocation import Colocation
from megatron_s2l.rollout.explorer_cache import ExplorerCache
from megatron_s2l.rollout.mixer import S2LMixer, Scorer, reward_scorer
from megatron_s2l.rollout.phase import RolloutHook, RolloutPhase
from megatron_s2l.rollout.vllm_engine import VLLMEngine
from megatron_s2l.types import Prompt, TrainBatch


@dataclass
class TrainResult:
    """What a run leaves behind: the per-step metrics (also in TensorBoard) and the last step trained."""

    last_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    initial_eval: dict[str, float] = field(default_factory=dict)  # held-out pass@k before step 1 (fresh runs)


def train(cfg: S2LConfig, rollout: RolloutHook | None = None) -> TrainResult:
    """Run S2L-PO per `cfg`; `rollout` replaces the default rollout phase (online/offline explorer + vLLM learner)."""
    cfg = check_config(cfg)
    tokenizer = load_tokenizer(cfg.learner.hf_path)
    scorer = reward_scorer(cfg.reward, tokenizer.decode)
    stream = PromptStream(prompts_from_config(cfg.data, tokenizer, "train").prompts, seed=cfg.data.seed)
    learner = build_learner(cfg)
    start = _resume(cfg, learner, stream)
    rollout = rollout or build_rollout_phase(cfg, tokenizer, scorer)
    if start > 1:  # the engine was started from the initial weights
        rollout.sync_weights(export_hf_weights(learner.model_chunks, learner.model_config), changed=True)
    held_out = prompts_from_config(cfg.data, tokenizer, "eval").prompts if cfg.logging.eval_interval else []
    writer = _tensorboard(cfg)
    result = TrainResult(last_step=start - 1)
    if held_out and start == 1:  # the baseline every later evaluation is read against
        result.initial_eval = evaluate_learner(cfg, rollout, held_out, tokenizer, scorer, step=0)
        _log(writer, 0, result.initial_eval)
        say(evaluation_line(cfg, 0, result.initial_eval, len(held_out)))
    bar = tqdm(range(start, cfg.train_steps + 1), desc="S2L-PO", initial=start - 1, total=cfg.train_steps,
               disable=not _is_first_rank())
    for step in bar:
        metrics = train_step(cfg, step, stream.next_batch(cfg.prompts_per_step), rollout, learner, tokenizer.pad_id)
        if held_out and step % cfg.logging.eval_interval == 0:
            metrics.update(evaluate_learner(cfg, rollout, held_out, tokenizer, scorer, step))
            say(evaluation_line(cfg, step, metrics, len(held_out)))
        result.history.append(metrics)
        result.last_step = step
        if step % cfg.logging.log_interval == 0:
            _log(writer, step, metrics)
        bar.set_postfix(progress_fields(metrics))
        if _should_save(cfg, step):
            save_checkpoint(cfg.checkpoint.save_dir, step, learner, state={"prompts": stream.state_dict()})
    if writer:
        writer.close()
    return result


def train_step(cfg: S2LConfig, step: int, prompts: list[Prompt], rollout: RolloutHook, learner: Learner,
               pad_id: int) -> dict:
    """One S2L-PO iteration: per phase, rollout -> advantages -> ref log-probs -> PPO (takes old ones) -> refit.

    Combined groups make one phase; separate groups an explorer phase then a learner phase (rolled out
    after the first update), whose metrics are prefixed with the phase's source.
    """
    metrics: dict[str, float] = {}
    phases = rollout.phases(step)
    rewards = []
    for sources in phases:
        timer = _Timer()
        groups = rollout.rollout(step, prompts, sources)
        if prompts and not groups:
            raise RuntimeError(all_dropped_message(cfg, step, rollout.metrics(step)))
        rollout.release_memory()
        phase = {"time/rollout": timer.lap(),
                 "rollout/tokens": float(sum(len(s.response_ids) for g in groups for s in g.samples))}
        phase["rollout/tokens_per_s"] = phase["rollout/tokens"] / max(phase["time/rollout"], 1e-9)
        phase.update(reward_info_means([s for g in groups for s in g.samples]))
        batch = TrainBatch.from_groups(groups, pad_id=pad_id)
        rewards.append(batch.rewards)
        batch, advantage_metrics = with_advantages(batch, cfg)
        phase.update(advantage_metrics)
        changed = False  # the learner's weights: an optimizer step changes them
        if batch.size:  # old log-probs: the learner takes them in `train`, where no pass is redundant
            if cfg.loss.kl_coef > 0:
                batch.ref_logprobs = learner.logprobs(batch, reference=True)
            phase["time/logprobs"] = timer.lap()
            trained = learner.train(batch, max_response_len=cfg.learner_sampling.max_new_tokens)
            phase.update({f"train/{k}": v for k, v in trained.items()})
            phase["time/train"] = timer.lap()
            changed = trained["optimizer_steps"] > 0
        # lazy: the export starts only if the engine needs the weights (changed, or dropped while asleep)
        rollout.sync_weights(export_hf_weights(learner.model_chunks, learner.model_config), changed=changed)
        phase["time/refit"] = timer.lap()
        prefix = f"{sources[0]}_phase/" if len(phases) > 1 else ""
        metrics.update({prefix + k: float(v) for k, v in phase.items()})
    metrics["reward/mean"] = float(torch.cat(rewards).mean())  # over every rollout of the step
    return metrics | rollout.metrics(step)


def with_advantages(batch: TrainBatch, cfg: S2LConfig) -> tuple[TrainBatch, dict[str, float]]:
    """Group-relative advantages of the rewards (with DAPO's soft overlong penalty when on); DAPO dynamic
    sampling drops groups of equal rewards, overlong filtering drops truncated responses."""
    metrics = {"reward/mean": float(batch.rewards.mean()),
               "rollout/truncated_fraction": float(batch.truncated.float().mean())}
    metrics.update({f"reward/{k}": float(v) for k, v in source_means(batch.rewards, batch.is_explorer).items()})
    max_lengths = torch.where(batch.is_explorer, cfg.explorer.sampling.max_new_tokens,
                              cfg.learner_sampling.max_new_tokens)  # [B]
    shaped = overlong(batch.rewards, batch.response_mask.sum(1), max_lengths, batch.truncated,
                      buffer=cfg.reward.overlong_buffer, factor=cfg.reward.overlong_penalty_factor,
                      filter_truncated=cfg.advantage.filter_truncated)
    batch.rewards = shaped.rewards  # [B]
    if cfg.reward.overlong_buffer:
        metrics["reward/overlong_penalty"] = float(shaped.penalty.mean())
    result = group_advantages(batch.rewards, batch.group_index, norm=cfg.advantage.norm, eps=cfg.advantage.eps)
    batch.advantages = result.advantages  # [B]
    metrics["advantage/zero_variance_groups"] = result.zero_variance_groups
    metrics.update({f"advantage/{k}": float(v) for k, v in source_means(batch.advantages, batch.is_explorer).items()})
    share, groups_with_explorer = explorer_usage(batch.is_explorer, batch.group_index)
    metrics |= {"rollout/explorer_share": share, "rollout/prompts_with_explorer": groups_with_explorer}
    keep = shaped.keep  # [B]
    if cfg.advantage.dynamic_sampling:
        varied = dynamic_sampling_mask(batch.rewards, batch.group_index)  # [B] groups whose rewards differ
        metrics["advantage/dropped_samples"] = int((~varied).sum())
        keep = keep & varied
    if cfg.advantage.filter_truncated:
        metrics["advantage/filtered_truncated"] = int((~shaped.keep).sum())
    return (batch if keep.all() else batch.select(keep)), metrics


def build_learner(cfg: S2LConfig) -> Learner:
    """The Megatron learner of `cfg`, its architecture read from `learner.hf_path`'s config.json and its weights
    from the same directory (with a reference copy when the loss has a KL term); it starts Megatron's process
    groups, so build it before the engines."""
    model = dataclasses.replace(model_config_from_hf(cfg.learner.hf_path), layer_spec=cfg.learner.layer_spec,
                                params_dtype=cfg.learner.params_dtype, recompute=cfg.learner.recompute)
    learner = Learner(model, cfg.parallel, cfg.optim, cfg.loss, cfg.fp8, seed=cfg.seed,
                      with_reference=cfg.loss.kl_coef > 0)
    learner.load_hf(read_hf_state(cfg.learner.hf_path))
    return learner


def build_rollout_phase(cfg: S2LConfig, tokenizer: PromptTokenizer, scorer: Scorer | None = None) -> RolloutPhase:
    """The default hook: the learner's vLLM engine (refit after every update), the explorer, online or cached,
    and `scorer` (default: the one the `reward` section describes)."""
    learner_engine = VLLMEngine(cfg.learner.hf_path, cfg.learner_engine, source="learner", model_id="learner",
                                eos_token_id=tokenizer.eos_id)
    explorer = None
    if cfg.explorer.source == "online":
        explorer = VLLMEngine(cfg.explorer.hf_path, cfg.explorer.engine, source="explorer",
                              model_id=cfg.explorer.model_id, eos_token_id=tokenizer.eos_id)
    elif cfg.explorer.source == "offline":
        explorer = ExplorerCache(cfg.explorer.cache_path, seed=cfg.seed)
    mixer = S2LMixer(cfg.schedule, explorer=explorer, learner=learner_engine, explorer_sampling=cfg.explorer.sampling,
                     learner_sampling=cfg.learner_sampling,
                     scorer=scorer or reward_scorer(cfg.reward, tokenizer.decode), seed=cfg.seed)
    colocation = Colocation(learner_engine, explorer if cfg.explorer.source == "online" else None)
    return RolloutPhase(mixer, colocation, engine_tp=cfg.learner_engine.tensor_parallel_size)


def evaluate_learner(cfg: S2LConfig, rollout: RolloutHook, prompts: list[Prompt], tokenizer: PromptTokenizer,
                     scorer: Scorer, step: int) -> dict[str, float]:
    """pass@1..k of the learner's engine on the held-out prompts (`logging.eval_*`)."""
    if cfg.logging.eval_max_problems:
        prompts = prompts[:cfg.logging.eval_max_problems]
    k = cfg.logging.eval_samples
    results = evaluate_prompts(rollout, prompts, k=k, sampling=cfg.learner_sampling, decode=tokenizer.decode,
                               scorer=scorer, seed=cfg.seed + step)
    summary = passk_summary(results, k)
    return {f"eval/pass@{j}": v for j, v in summary["pass@k"].items()} | {"eval/mean_reward": summary["mean_reward"]}


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """The progress bar's summary of a step: reward, explorer share, KL, and dropped prompts when any."""
    fields = {"reward": f"{metrics['reward/mean']:.3f}",
              "explorer": f"{metrics.get('schedule/explorer_share', 0.0):.2f}",
              "kl": f"{metrics.get('train/kl', 0.0):.4f}"}
    if metrics.get("rollout/dropped_prompts"):
        fields["dropped"] = f"{metrics['rollout/dropped_prompts']:.0f}"
    return fields


def all_dropped_message(cfg: S2LConfig, step: int, metrics: dict[str, float]) -> str:
    """Why a phase of `step` has no group at all: which engine dropped the prompts and which limit to raise."""
    limits = {"learner": ("learner_engine", cfg.learner_engine, "learner_sampling", cfg.learner_sampling),
              "explorer": ("explorer.engine", cfg.explorer.engine, "explorer.sampling", cfg.explorer.sampling)}
    reasons = []
    for source, (engine_at, engine, sampling_at, sampling) in limits.items():
        dropped = metrics.get(f"rollout/dropped_prompts/{source}", 0)
        if dropped:
            reasons.append(f"the {source} engine dropped {dropped:.0f} (prompts longer than {engine_at}.max_model_len="
                           f"{engine.max_model_len} minus {sampling_at}.max_new_tokens={sampling.max_new_tokens}: "
                           f"raise {engine_at}.max_model_len or lower data.max_prompt_length="
                           f"{cfg.data.max_prompt_length})")
    return (f"step {step}: every prompt of the phase was dropped, nothing to train on: "
            + ("; ".join(reasons) or "the rollout hook returned no groups") + ".")


def evaluation_line(cfg: S2LConfig, step: int, metrics: dict[str, float], held_out: int) -> str:
    """The console's line for one held-out evaluation."""
    problems = min(held_out, cfg.logging.eval_max_problems or held_out)
    return (f"evaluation at step {step}: held-out pass@1 {metrics['eval/pass@1']:.3f} "
            f"({problems} problems x {cfg.logging.eval_samples} samples)")


def _resume(cfg: S2LConfig, learner: Learner, stream: PromptStream) -> int:
    """Load the latest complete checkpoint under `checkpoint.load_dir`, if any; return the first step to run."""
    loaded = load_checkpoint(cfg.checkpoint.load_dir, learner) if cfg.checkpoint.load_dir else None
    if loaded is None:
        return 1
    step, state = loaded
    if "prompts" in state:  # absent from model-only checkpoints (the HF converter's)
        stream.load_state_dict(state["prompts"])
    return step + 1


def _should_save(cfg: S2LConfig, step: int) -> bool:
    interval = cfg.checkpoint.save_interval
    return cfg.checkpoint.save_dir is not None and (step == cfg.train_steps or (interval > 0 and step % interval == 0))


def _is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _tensorboard(cfg: S2LConfig):
    if cfg.logging.tensorboard_dir is None or not _is_first_rank():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(cfg.logging.tensorboard_dir)


def _log(writer, step: int, metrics: dict[str, float]) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if math.isfinite(value):
            writer.add_scalar(key, value, step)
    writer.flush()


class _Timer:
    """Seconds since the previous lap."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
