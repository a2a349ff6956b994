"""The one configuration tree of megatron-s2l.

Every section is a dataclass whose fields carry their documentation as a comment. A config is built
from YAML (`S2LConfig.from_yaml`) or a dict, then overridden by dotted `key=value` pairs from the
command line, then validated once at start-up: `validate()` collects *every* error, each naming the
field, the value, what is accepted and what to change. Unknown keys are errors, never ignored ("did you
mean ...?" for near misses). `parse`/`parse_yaml` build a tree without stopping at the first mistake, so an
entry point reports the parse problems together with those of the values and of the paths the config
names (`rollout.checks.check_config` adds the checkpoints' weights and tokenizers).

Math modules never import this file: integrations unpack the section they need into keyword arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_s2l.constants import (AdvantageNorm, GroupMode, ImportanceCorrection, KLType, LossAggregation,
                                    OnBadPrompt, OnRewardError, PromptTemplate, ScheduleKind, TASK_OPS)


class ConfigError(ValueError):
    """Every problem found in a config (or a tool's arguments), one per line: what a user reads, no traceback.

    Entry points print it on the first rank and exit with status 2 (`megatron_s2l.console.run_main`).
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        if count == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{count} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing `problems`, if there are any."""
    if problems:
        raise ConfigError(problems)


ExplorerAllocation = Literal["fixed", "adaptive"]
ExplorerSource = Literal["online", "offline", "none"]
LayerSpec = Literal["local", "te"]
ParamsDType = Literal["float32", "bfloat16"]
Recompute = Literal["none", "selective", "full"]
# learner.recompute (see LearnerConfig) as the megatron-core TransformerConfig fields that carry it out
RECOMPUTE_FIELDS = {"none": {}, "selective": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
                    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]
EngineDType = Literal["auto", "float32", "bfloat16", "float16"]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


@dataclass
class ModelConfig:
    """Architecture of a Qwen3/Qwen2/Llama-style GPT and how Megatron builds it.

    Never a section of the YAML: the learner's is read from its checkpoint's config.json
    (`learner.hf_config.model_config_from_hf`) with `LearnerConfig`'s build settings; the CPU demo writes
    its family's in code.
    """

    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA: key/value heads; equal to num_attention_heads for MHA
    kv_channels: int = 32  # head_dim; vLLM's CPU attention needs one of 32, 64, 80, 96, 112, 128, ...
    vocab_size: int = 512
    max_position_embeddings: int = 512
    rotary_base: float = 1_000_000.0
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = True  # Qwen3: RMSNorm on q and k per head; Qwen2, Llama: False
    add_qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections; Qwen3, Llama: False
    tie_word_embeddings: bool = True
    layer_spec: LayerSpec = "local"  # see LearnerConfig
    params_dtype: ParamsDType = "float32"  # see LearnerConfig
    recompute: Recompute = "none"  # see LearnerConfig
    hf_path: Optional[str] = None  # the HF directory it was read from, if any

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                           "num_query_groups", "kv_channels", "vocab_size", "max_position_embeddings")
        if self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups:
            errors.append(f"{at}.num_query_groups={self.num_query_groups}: must divide "
                          f"{at}.num_attention_heads={self.num_attention_heads}")
        return errors


# ModelConfig's architecture fields, each with the config.json key it is read from (`learner.hf_config`).
# The learner's architecture is its checkpoint's, so the learner section refuses these keys.
HF_CONFIG_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                  "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                  "num_query_groups": "num_key_value_heads", "kv_channels": "head_dim", "vocab_size": "vocab_size",
                  "max_position_embeddings": "max_position_embeddings", "rotary_base": "rope_theta",
                  "norm_epsilon": "rms_norm_eps", "qk_layernorm": "model_type", "add_qkv_bias": "model_type",
                  "tie_word_embeddings": "tie_word_embeddings"}
# The families the learner's mapping covers: config.json's model_type -> the architecture class name written back.
HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@dataclass
class LearnerConfig:
    """The model being trained: what only the user can say. Its architecture (layers, widths, heads,
    vocabulary, rope, norms, tied embeddings) is read from hf_path's config.json, never written here."""

    hf_path: Optional[str] = None  # local HF directory: weights, config.json, tokenizer; never a hub id
    layer_spec: LayerSpec = "local"  # "te" needs Transformer Engine (GPU clusters)
    params_dtype: ParamsDType = "float32"  # bfloat16: BF16 weights, fp32 main params in the optimizer (GPU)
    recompute: Recompute = "none"  # activation recomputation in training passes, less memory for more compute:
    # "selective" keeps each layer's MLP activations (the largest; fused attention keeps little) out of memory
    # and recomputes them in the backward, "full" keeps only each layer's input and recomputes the whole layer
    # (about one more forward pass)


@dataclass
class ParallelConfig:
    """Megatron model parallelism; data parallelism is world_size / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False

    def validate(self, at: str) -> list[str]:
        return _positive(self, at, "tensor_model_parallel_size", "pipeline_model_parallel_size")


@dataclass
class SamplingConfig:
    """Sampling settings of one rollout engine."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k
    presence_penalty: float = 0.0
    max_new_tokens: int = 64

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "max_new_tokens")
        if self.temperature < 0:
            errors.append(f"{at}.temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            errors.append(f"{at}.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            errors.append(f"{at}.top_k={self.top_k}: must be -1 (off) or >= 1")
        return errors


@dataclass
class EngineConfig:
    """A colocated vLLM engine."""

    tensor_parallel_size: int = 1
    # CPU: explicit KV cache size (GPU: see gpu_memory_utilization). Size it to hold a step's sequences at once
    # (blocks of 128 tokens, one block kept back): what does not fit waits for a second wave of decoding
    kv_cache_memory_bytes: int = 128 * 2**20
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 512
    enforce_eager: bool = True  # false compiles the model (GPU: CUDA graphs; CPU: torch.compile, ~15% faster
    # decoding for ~20-25 s more start-up, bench/README.md): worth it for long runs
    seed: int = 0  # call k without an explicit seed samples with seed + k (per prompt: see rollout.engine)
    dtype: EngineDType = "auto"  # auto: the checkpoint's torch_dtype; float32 makes log-probs comparable to 1e-5
    logprobs_mode: LogprobsMode = "raw_logprobs"  # raw: the model's softmax (what the learner computes);
    # processed: after temperature/top-p/top-k, the distribution actually sampled from
    enable_sleep_mode: bool = True  # GPU: release weights/KV cache while training; no effect on CPU
    cpu_omp_threads_bind: Optional[str] = None  # CPU with TP>1: VLLM_CPU_OMP_THREADS_BIND, e.g. "0|1"
    refit_bucket_bytes: int = 512 * 2**20  # weight refit streams buckets of this size (slime: 512 MiB)
    on_long_prompt: OnBadPrompt = "drop"  # prompts longer than max_model_len - max_new_tokens: drop and count,
    # or error naming the prompt

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "tensor_parallel_size", "kv_cache_memory_bytes", "max_model_len",
                           "refit_bucket_bytes")
        if not 0 < self.gpu_memory_utilization <= 1:
            errors.append(f"{at}.gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        return errors


@dataclass
class ExplorerConfig:
    """The frozen smaller model that contributes G_w samples per prompt."""

    source: ExplorerSource = "online"  # online: a vLLM engine; offline: a pre-generated cache; none: plain GRPO
    hf_path: Optional[str] = None  # local HF directory of the explorer (online)
    cache_path: Optional[str] = None  # JSONL cache written by tools/generate_explorer_cache.py (offline)
    model_id: str = "explorer"  # recorded with every sample it produces
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95))

    def validate(self, at: str) -> list[str]:
        return self.engine.validate(f"{at}.engine") + self.sampling.validate(f"{at}.sampling")


@dataclass
class ScheduleConfig:
    """How the explorer's share of each group anneals (S2L-PO Algorithm 1)."""

    group_size: int = 8  # G: rollouts per prompt and step
    t_mix: int = 8  # steps with explorer samples; after it, plain on-policy GRPO
    kind: ScheduleKind = "linear"  # linear is the paper's alpha_i = 1 - (i-1)/(T_mix-1)
    constant_share: float = 0.5  # alpha for kind="constant"
    group_mode: GroupMode = "combined"  # combined: paper; separate: the authors' code (two optimizer steps)
    # fixed: every prompt gets G_w explorer samples (the paper); adaptive: the learner probes each prompt with
    # G - S samples, S = min(G_w, G // 2), and the explorer fills the S slots only of prompts whose probe
    # rewards are all equal, the learner those of the others (algo/allocation.py)
    allocation: ExplorerAllocation = "fixed"

    def validate(self, at: str) -> list[str]:
        errors = []
        if self.allocation == "adaptive" and self.group_mode != "combined":
            errors.append(f"{at}.allocation='adaptive' with {at}.group_mode={self.group_mode!r}: adaptive allocation "
                          f"adds explorer samples to the learner's groups, so it needs {at}.group_mode='combined' "
                          f"(or set {at}.allocation='fixed')")
        if self.group_size < 1:
            errors.append(f"{at}.group_size={self.group_size}: must be >= 1 (the paper uses 8 or 16)")
        if self.t_mix < 1:
            errors.append(f"{at}.t_mix={self.t_mix}: must be >= 1 (set {at}.kind or explorer.source='none' "
                          f"for plain GRPO); values above the number of steps are allowed")
        if not 0 <= self.constant_share <= 1:
            errors.append(f"{at}.constant_share={self.constant_share}: must be in [0, 1]")
        return errors


@dataclass
class AdvantageConfig:
    """Group-relative advantages over each (combined) group."""

    norm: AdvantageNorm = "std"  # std: GRPO; none: Dr.GRPO (mean-centred only)
    eps: float = 1e-6
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    filter_truncated: bool = False  # DAPO overlong filtering: responses cut at max_new_tokens (finish_reason
    # "length") get no loss; they still count in their group's advantages

    def validate(self, at: str) -> list[str]:
        return [] if self.eps > 0 else [f"{at}.eps={self.eps}: must be > 0"]


@dataclass
class RewardConfig:
    """How samples are scored (`algo.reward_scorer`; a reward function's signature: `algo/reward_pool.py`)."""

    # math: the built-in check (the last \boxed{} against the ground truth, math-verify when needed); or your
    # function, "package.module:function" or "path/to/file.py:function", called by keyword with the arguments it
    # names of response (or solution_str), ground_truth, data_source, prompt, extra (the row's other fields),
    # extra_info (verl's), returning a number or {"score": number, ...more numbers, logged as reward_info/<name>}
    function: str = "math"
    by_data_source: dict = field(default_factory=dict)  # data_source -> function (as `function`) for rows of
    # that source; other rows use `function`
    timeout_s: float = 5.0  # per reward call; a math check past it scores 0 (counted: reward_info/timed_out)
    workers: int = 0  # reward calls run at once, each in its own process; 0: min(4, CPUs)
    on_error: OnRewardError = "raise"  # your function raises, runs past timeout_s or returns no number: raise
    # stops the step with the prompt id and traceback; zero scores the sample 0 (reward_info/failed, timed_out)
    overlong_buffer: int = 0  # DAPO soft overlong penalty: a response in the last overlong_buffer tokens before
    # max_new_tokens loses up to overlong_penalty_factor, linearly in its length; 0: off
    overlong_penalty_factor: float = 1.0

    def validate(self, at: str) -> list[str]:
        errors = []
        specs = {f"{at}.function": self.function}
        if not isinstance(self.by_data_source, dict):
            errors.append(f"{at}.by_data_source={self.by_data_source!r}: must be a mapping data_source -> function")
        else:
            specs.update({f"{at}.by_data_source.{source}": spec for source, spec in self.by_data_source.items()})
        for where, spec in specs.items():
            target, _, name = spec.rpartition(":") if isinstance(spec, str) else ("", "", "")
            if spec != "math" and not (target and name):
                errors.append(f"{where}={spec!r}: must be 'math' (built-in), 'package.module:function' or "
                              f"'path/to/file.py:function'")
        if self.timeout_s <= 0:
            errors.append(f"{at}.timeout_s={self.timeout_s}: must be > 0 (seconds per reward call)")
        if self.workers < 0:
            errors.append(f"{at}.workers={self.workers}: must be >= 0 (0: sized to the machine)")
        if self.overlong_buffer < 0 or self.overlong_penalty_factor < 0:
            errors.append(f"{at}.overlong_buffer={self.overlong_buffer}, overlong_penalty_factor="
                          f"{self.overlong_penalty_factor}: both must be >= 0 (overlong_buffer=0: no penalty)")
        return errors


@dataclass
class LossConfig:
    """The GRPO objective; field names are the keyword arguments of `algo.loss.grpo_loss`."""

    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.2  # ratio upper bound 1 + clip_high (clip-higher: e.g. 0.28)
    dual_clip: Optional[float] = None  # c > 1 bounds the loss for negative advantages
    kl_coef: float = 0.001  # weight of KL(pi_theta || pi_ref) per token; > 0 needs the reference model
    kl_type: KLType = "low_var_kl"  # verl's estimators; low_var_kl is k3 clamped to [-10, 10]
    entropy_coef: float = 0.0  # entropy bonus weight (0: the paper)
    aggregation: LossAggregation = "token-mean"  # seq-mean-token-sum-norm is Dr.GRPO
    importance_correction: ImportanceCorrection = "none"  # against the behaviour policy (explorer or engine)
    tis_cap: float = 2.0  # TIS: token weight min(pi_old / pi_behaviour, tis_cap)
    icepop_low: float = 0.5  # IcePop: tokens with pi_old / pi_behaviour outside [low, high] get no gradient
    icepop_high: float = 2.0

    def validate(self, at: str) -> list[str]:
        errors = []
        if not 0 <= self.clip_low < 1:
            errors.append(f"{at}.clip_low={self.clip_low}: must be in [0, 1) (ratio floor is 1 - clip_low)")
        if self.clip_high < 0:
            errors.append(f"{at}.clip_high={self.clip_high}: must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            errors.append(f"{at}.dual_clip={self.dual_clip}: must be > 1 or null (off)")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            errors.append(f"{at}.kl_coef/entropy_coef: must be >= 0")
        if self.tis_cap <= 0:
            errors.append(f"{at}.tis_cap={self.tis_cap}: must be > 0")
        if not 0 <= self.icepop_low < 1 < self.icepop_high:
            errors.append(f"{at}.icepop_low/icepop_high=({self.icepop_low}, {self.icepop_high}): "
                          f"need 0 <= low < 1 < high")
        return errors


LRDecayStyle = Literal["constant", "linear", "cosine"]


@dataclass
class OptimConfig:
    """The learner's optimizer (megatron-core Adam), LR schedule and batching."""

    lr: float = 1e-5  # peak learning rate
    min_lr: float = 0.0  # floor of the decay
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to lr
    lr_decay_steps: int = 0  # optimizer steps over which lr decays to min_lr (incl. warmup); ignored if constant
    lr_decay_style: LRDecayStyle = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0
    ppo_epochs: int = 1
    mini_batch_prompts: int = 4  # prompts per optimizer step (all their samples)
    micro_batch_size: int = 4  # sequences per forward/backward (packed rows with pack_sequences)
    logprob_micro_batch_size: int = 0  # the same for the forward-only passes (reference and old log-probs):
    # they keep no activations for a backward, so they can take more at once; 0: micro_batch_size
    logprob_chunk_size: int = 1024  # tokens per vocab-parallel log-prob chunk: the fp32 scratch is about
    # chunk x vocab/TP floats; 0: a whole micro-batch at once
    pack_sequences: bool = False  # pack several sequences into each row instead of padding every sequence
    # to the micro-batch's longest (block-diagonal attention; THD PackedSeqParams with the TE layer spec);
    # micro_batch_size then counts packed rows
    pack_row_tokens: int = 0  # token budget of one packed row (a longer sequence gets a row of its own);
    # 0: chosen per batch shard between its longest sequence L and 2L, weighing padding slots against the
    # attention longer rows cost, with micro-batches of at most micro_batch_size x L token slots (never
    # more than padded micro-batches hold)

    @property
    def logprob_micro_batch(self) -> int:
        """Sequences (packed rows) per micro-batch of the forward-only log-prob passes."""
        return self.logprob_micro_batch_size or self.micro_batch_size

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "lr", "ppo_epochs", "mini_batch_prompts", "micro_batch_size")
        if self.logprob_micro_batch_size < 0:
            errors.append(f"{at}.logprob_micro_batch_size={self.logprob_micro_batch_size}: must be >= 0 "
                          f"(0: {at}.micro_batch_size)")
        if self.logprob_chunk_size < 0:
            errors.append(f"{at}.logprob_chunk_size={self.logprob_chunk_size}: must be >= 0 (0: no chunking)")
        if self.pack_row_tokens < 0:
            errors.append(f"{at}.pack_row_tokens={self.pack_row_tokens}: must be >= 0 (0: chosen per batch)")
        if not 0 <= self.min_lr <= self.lr:
            errors.append(f"{at}.min_lr={self.min_lr}: must be in [0, {at}.lr={self.lr}]")
        if self.lr_warmup_steps < 0:
            errors.append(f"{at}.lr_warmup_steps={self.lr_warmup_steps}: must be >= 0")
        if self.lr_decay_style != "constant" and self.lr_decay_steps <= self.lr_warmup_steps:
            errors.append(f"{at}.lr_decay_steps={self.lr_decay_steps}: lr_decay_style={self.lr_decay_style!r} "
                          f"needs more decay steps than {at}.lr_warmup_steps={self.lr_warmup_steps} "
                          f"(or set {at}.lr_decay_style='constant')")
        if self.clip_grad < 0:
            errors.append(f"{at}.clip_grad={self.clip_grad}: must be >= 0 (0 disables clipping)")
        return errors


@dataclass
class FP8Config:
    """FP8 through Transformer Engine (GPU only)."""

    enabled: bool = False
    recipe: FP8Recipe = "tensorwise"

    def validate(self, at: str) -> list[str]:
        return []


@dataclass(frozen=True)
class TaskConfig:
    """The synthetic demo task (`data.task`): chains of arithmetic mod `modulus`, their difficulty and splits."""

    modulus: int = 10  # every result is reduced modulo this; a random guess is right 1/modulus of the time
    min_ops: int = 3  # fewest operations in a chain
    max_ops: int = 5  # most operations in a chain (longer chains compound per-step errors)
    ops: str = "+-"  # the operations a chain draws from, a selection of "+-*"
    max_addend: int = 3  # addends and subtrahends are drawn from 1..max_addend (small steps learn fast on CPU)
    mul_max: int = 9  # multipliers are drawn from 2..mul_max (when ops has "*")
    num_train: int = 20000  # training problems (pretraining texts and RL prompts)
    num_eval: int = 200  # held-out problems, disjoint from training

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "num_train", "num_eval")
        if self.modulus < 2:
            errors.append(f"{at}.modulus={self.modulus}: must be >= 2 (10 for single digits)")
        if not 1 <= self.min_ops <= self.max_ops:
            errors.append(f"{at}.min_ops={self.min_ops}, {at}.max_ops={self.max_ops}: need 1 <= min_ops <= max_ops")
        if self.mul_max < 2:
            errors.append(f"{at}.mul_max={self.mul_max}: must be >= 2")
        if self.max_addend < 1:
            errors.append(f"{at}.max_addend={self.max_addend}: must be >= 1")
        if not self.ops or set(self.ops) - set(TASK_OPS):
            errors.append(f"{at}.ops={self.ops!r}: must be a non-empty selection of {TASK_OPS!r}")
        return errors


@dataclass
class DataConfig:
    """Prompt files (train_path, eval_path) or the synthetic demo task (task)."""

    train_path: Optional[str] = None  # JSONL or verl-style Parquet; None: the synthetic demo task
    eval_path: Optional[str] = None  # held-out prompts; None: the demo task's held-out split
    # chat: the tokenizer's chat template; qwen3-base: literal ChatML (the authors' training prompt);
    # qwen3-base-nothink: ChatML + " /no_think" (the paper's nothink evaluation); raw: the text as is
    prompt_template: PromptTemplate = "chat"
    max_prompt_length: int = 128  # tokens after the template; longer prompts are bad rows
    on_bad_prompt: OnBadPrompt = "error"  # error: stop with file and line; drop: skip and count
    seed: int = 0  # prompt order (epoch shuffles) and the demo task's problems
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self, at: str) -> list[str]:
        return _positive(self, at, "max_prompt_length") + self.task.validate(f"{at}.task")


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    save_interval: int = 0  # steps between saves; 0: only at the end
    load_dir: Optional[str] = None  # resume from the latest complete checkpoint here

    def validate(self, at: str) -> list[str]:
        return [] if self.save_interval >= 0 else [f"{at}.save_interval={self.save_interval}: must be >= 0"]


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    log_interval: int = 1
    eval_interval: int = 0  # steps between held-out evaluations; 0: never
    eval_samples: int = 8  # k: samples per held-out problem; pass@1..k are logged
    eval_max_problems: int = 0  # held-out problems per evaluation (the first ones); 0: all

    def validate(self, at: str) -> list[str]:
        errors = _positive(self, at, "log_interval", "eval_samples")
        if self.eval_interval < 0 or self.eval_max_problems < 0:
            errors.append(f"{at}.eval_interval={self.eval_interval}, eval_max_problems={self.eval_max_problems}: "
                          f"must be >= 0 (0: never / all problems)")
        return errors


@dataclass
class S2LConfig:
    """The root of the tree."""

    seed: int = 1234
    train_steps: int = 16
    prompts_per_step: int = 8
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    learner_engine: EngineConfig = field(default_factory=EngineConfig)
    learner_sampling: SamplingConfig = field(default_factory=SamplingConfig)
    explorer: ExplorerConfig = field(default_factory=ExplorerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def problems(self, check_files: bool = True) -> list[str]:
        """Every problem of the tree's values and, with `check_files`, of the paths it names."""
        errors = _validate_tree(self, "")
        errors += _positive(self, "", "train_steps", "prompts_per_step")
        if self.seed < 0:  # seeds numpy's generators (PPO epoch order), which take only non-negative seeds
            errors.append(f"seed={self.seed}: must be >= 0")
        limits = {"learner_sampling": self.learner_sampling.max_new_tokens}
        if self.explorer.source != "none":
            limits["explorer.sampling"] = self.explorer.sampling.max_new_tokens
        errors += [f"reward.overlong_buffer={self.reward.overlong_buffer}: must be below {at}.max_new_tokens={limit} "
                   f"(the penalty covers the last overlong_buffer tokens before it)"
                   for at, limit in limits.items() if self.reward.overlong_buffer >= limit]
        if self.optim.mini_batch_prompts > 0 and self.prompts_per_step % self.optim.mini_batch_prompts:
            errors.append(f"optim.mini_batch_prompts={self.optim.mini_batch_prompts}: must divide "
                          f"prompts_per_step={self.prompts_per_step}")
        errors += self._engine_length_errors()
        return errors + (_path_problems(self) if check_files else [])

    def validate(self, check_files: bool = True) -> "S2LConfig":
        """Check the whole tree (and, with `check_files`, that the paths it names exist); raise one ConfigError
        listing every problem, else return self."""
        raise_problems(self.problems(check_files))
        return self

    def _engine_length_errors(self) -> list[str]:
        """Each engine must hold the longest prompt plus its own generation budget, or it drops prompts."""
        engines = [("learner_engine", self.learner_engine, "learner_sampling", self.learner_sampling)]
        if self.explorer.source == "online":
            engines.append(("explorer.engine", self.explorer.engine, "explorer.sampling", self.explorer.sampling))
        return [f"{at}.max_model_len={engine.max_model_len}: must hold data.max_prompt_length="
                f"{self.data.max_prompt_length} plus {sampling_at}.max_new_tokens={sampling.max_new_tokens}; raise it "
                f"to {self.data.max_prompt_length + sampling.max_new_tokens} or lower one of the two"
                for at, engine, sampling_at, sampling in engines
                if engine.max_model_len < self.data.max_prompt_length + sampling.max_new_tokens]

    @classmethod
    def parse(cls, data: Any) -> tuple["S2LConfig", list[str]]:
        """Build the tree from a mapping, collecting every unknown key and wrong type instead of stopping at
        the first; a field with a problem keeps its default. Returns the tree and the problems."""
        problems: list[str] = []
        return _build(cls, {} if data is None else data, "", problems), problems

    @classmethod
    def parse_yaml(cls, path: str | Path, overrides: list[str] = ()) -> tuple["S2LConfig", list[str]]:
        """`parse` of a YAML file with `a.b.c=value` overrides (values parsed as YAML) applied on top."""
        data, override_problems = _apply_overrides(_read_yaml(path), overrides)
        cfg, build_problems = cls.parse(data)
        return cfg, override_problems + build_problems

    @classmethod
    def from_dict(cls, data: dict, check_files: bool = True) -> "S2LConfig":
        """Build the tree; a parse problem raises one ConfigError with every problem of the mapping (and of
        the values and, with `check_files`, paths of what could be built). Call `validate()` on the result."""
        return _parsed(*cls.parse(data), check_files)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] = (), check_files: bool = True) -> "S2LConfig":
        """`from_dict` of a YAML file with `a.b.c=value` overrides (values parsed as YAML) applied on top."""
        return _parsed(*cls.parse_yaml(path, overrides), check_files)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parsed(cfg: S2LConfig, problems: list[str], check_files: bool) -> S2LConfig:
    """`cfg`, or one ConfigError with the parse `problems` and those of what could be built."""
    if problems:
        raise ConfigError(problems + cfg.problems(check_files))
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `dotted.key=yaml_value` set; one ConfigError names every bad one."""
    data, problems = _apply_overrides(data, overrides)
    raise_problems(problems)
    return data


def _apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    import copy

    data, problems = copy.deepcopy(data), []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected dotted.key=value, e.g. schedule.t_mix=4")
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            problems.append(f"override {item!r}: {'.'.join(parents)!r} is not a section")
        else:
            try:
                node[leaf] = yaml.safe_load(raw)
            except yaml.YAMLError as err:
                problems.append(f"override {item!r}: the value is not valid YAML ({_one_line(err)})")
    return data, problems


def _read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; a file that cannot be read raises a ConfigError (nothing else is known)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file (pass an existing YAML to --config, e.g. "
                          f"examples/configs/demo.yaml)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory, not a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({_one_line(err)})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections, got "
                          f"{type(data).__name__}")
    return data or {}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _build(cls, data: Any, at: str, problems: list[str]):
    """An instance of the dataclass `cls` from `data`; unknown keys and wrong values go to `problems` (with a
    "did you mean" for near misses) and leave the field at its default."""
    if not isinstance(data, dict):
        problems.append(f"{at or 'config'}={data!r}: expected a section (a mapping of {cls.__name__} fields)")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        path = f"{at}.{name}" if at else str(name)
        if cls is LearnerConfig and name in HF_CONFIG_KEYS:
            problems.append(_architecture_problem(path, value, data.get("hf_path")))
        elif name not in names:
            what = "section" if not at else "key"
            problems.append(f"{path}: unknown {what}"
                            + (_close_match(str(name), names) or f"; accepted: {', '.join(names)}"))
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, path, problems)
        else:
            try:
                kwargs[name] = _coerce(hints[name], value, path)
            except ConfigError as err:
                problems.extend(err.problems)
    return cls(**kwargs)


def _architecture_problem(at: str, value: Any, hf_path: Any) -> str:
    """An architecture key in the learner section: it states what the checkpoint's config.json says."""
    key = HF_CONFIG_KEYS[at.rsplit(".", 1)[1]]
    config_json = Path(str(hf_path)) / "config.json"
    there = ""
    try:
        hf = json.loads(config_json.read_text(encoding="utf-8"))
        there = f", which has {key}={hf.get(key, (hf.get('rope_parameters') or {}).get(key))!r}"
    except (OSError, ValueError, AttributeError):  # no readable config.json: the path checks report it
        pass
    source = config_json if hf_path else "the config.json in learner.hf_path"
    return f"{at}={value!r}: the learner's architecture is read from {source}{there}; remove {at} from the config"


def _close_match(name: str, options) -> str:
    """"; did you mean 'x'?" for the closest of `options`, or "" when none is close."""
    close = difflib.get_close_matches(name, [str(o) for o in options], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(hint, value, at: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{at}={value!r}: accepted values are {list(args)}{_close_match(str(value), args)}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, at)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not
                                                (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{at}={value!r}: expected {hint.__name__}")
    return value


def _path_problems(cfg: S2LConfig) -> list[str]:
    """Paths the tree names that are empty or do not exist: everything about files that can be known before
    a model is loaded (the loop adds what needs the models' own code, such as tokenizer agreement)."""
    problems = _model_dir_problems("learner.hf_path", cfg.learner.hf_path,
                                   "set it to the learner's local HF directory (convert a Megatron checkpoint "
                                   "with tools/convert_megatron_to_hf.py), or run the demo without --config")
    if not problems:
        problems = _learner_family_problems(cfg.learner.hf_path)
    explorer = cfg.explorer
    if explorer.source == "online":
        problems += _model_dir_problems("explorer.hf_path", explorer.hf_path,
                                        "source='online' needs the explorer's local HF directory (or set "
                                        "explorer.source='offline' with explorer.cache_path)")
    if explorer.source == "offline":
        problems += _file_problems("explorer.cache_path", explorer.cache_path, "source='offline' needs a cache "
                                   "file (write one with tools/generate_explorer_cache.py)")
    for name in ("train_path", "eval_path"):
        if getattr(cfg.data, name) is not None:
            problems += _file_problems(f"data.{name}", getattr(cfg.data, name), "")
    load_dir, save_dir = cfg.checkpoint.load_dir, cfg.checkpoint.save_dir
    same_as_save = save_dir is not None and Path(load_dir or "").resolve() == Path(save_dir).resolve()
    if load_dir is not None and not Path(load_dir).is_dir() and not same_as_save:
        problems.append(f"checkpoint.load_dir={load_dir!r}: no such directory (point it at a checkpoint root "
                        f"holding 'latest'; a load_dir equal to save_dir may be absent on the first run)")
    return problems


def _model_dir_problems(at: str, path: Optional[str], when_empty: str) -> list[str]:
    if not path:
        return [f"{at} is empty: {when_empty}"]
    if not Path(path).is_dir():
        return [f"{at}={path!r}: no such directory (expected a local HF model directory with config.json and "
                f"*.safetensors)"]
    if not (Path(path) / "config.json").is_file():
        return [f"{at}={path!r}: config.json is missing (copy the whole HF model directory)"]
    return []


def _learner_family_problems(path: str) -> list[str]:
    """A learner checkpoint of a family the learner's mapping does not cover (the explorer may be any family)."""
    try:
        family = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):  # unreadable: check_hf_checkpoint reports the file
        return []
    if family in HF_ARCHITECTURES:
        return []
    return [f"learner.hf_path={path!r}: its config.json has model_type={family!r}; the learner trains "
            f"{', '.join(sorted(HF_ARCHITECTURES))} models (any family vLLM serves can be the explorer)"]


def _file_problems(at: str, path: Optional[str], when_empty: str) -> list[str]:
    if not path:
        return [f"{at} is empty: {when_empty}"]
    return [] if Path(path).is_file() else [f"{at}={path!r}: no such file"]


def _validate_tree(node, at: str) -> list[str]:
    errors = []
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        path = f"{at}.{f.name}" if at else f.name
        if dataclasses.is_dataclass(child) and hasattr(child, "validate"):
            errors += child.validate(path)
    return errors


def _positive(node, at: str, *names: str) -> list[str]:
    return [f"{at + '.' if at else ''}{n}={getattr(node, n)}: must be > 0"
            for n in names if not getattr(node, n) > 0]
