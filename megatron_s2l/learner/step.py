"""The GRPO learner on Megatron-Core: log-probs and optimizer steps under TP, PP and DP.

Everything goes through megatron-core's own pieces: `build_model` (GPTModel) wrapped in megatron DDP,
`get_megatron_optimizer` (Adam, grad clipping, optional distributed optimizer), `OptimizerParamScheduler`
and `get_forward_backward_func` (no pipelining at PP=1, 1F1B at PP>1). Per-token log-probs come from the
vocab-parallel logits on the last pipeline stage (`algo.logprobs`), projected at the response positions only
(`model.logits_only_at`), the loss from `algo.loss.grpo_loss`.

Data layout: every rank passes the same full batch. Rows are sharded over data-parallel ranks (by whole groups
for training), each shard is cut into micro-batches of `optim.micro_batch_size` sequences
(`optim.logprob_micro_batch_size` in the forward-only log-prob passes) trimmed to their longest masked
position. With `optim.pack_sequences` each sequence is cut at its own last masked position instead and several
share a row (`learner.packing`): micro-batches of `optim.micro_batch_size` packed rows, attention kept within
each sequence by a block-diagonal mask (local layer spec) or THD `PackedSeqParams` (Transformer Engine spec);
log-probs are unpacked to one row per sequence before any loss, so the loss code never sees packing. Losses
are scaled so that the gradient equals the single-process gradient of the whole mini-batch objective whatever
the micro-batching, packing and DP size. PPO epochs after the first visit the mini-batches' groups in a new
order drawn from the Learner's seed and its optimizer-step count (restored with a checkpoint, so a resumed run
reshuffles alike).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from megatron_s2l.algo.loss import accumulate_metrics, all_reduce_metrics, finalize_metrics, grpo_loss
from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_s2l.learner.cpu_shims import on_cpu
from megatron_s2l.learner.hf_weights import load_hf_weights
from megatron_s2l.learner.model import attention_span, build_model, init_parallel, logits_only_at, transformer_config
from megatron_s2l.learner.packing import (block_causal_mask, cheapest_packing, cu_seqlens, pack, plan_packing,
                                             segment_ids, unpack)
from megatron_s2l.types import TrainBatch

# tensors by name ("rows": the shard rows it holds; "packing": a PackedMicroBatch when packed)
MicroBatch = dict[str, Any]


class Learner:
    """This rank's part of the policy (and optional frozen reference), its optimizer and LR schedule.

    Collective: every rank of the job constructs it and calls each method with the same arguments.
    """

    @on_cpu
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, loss: LossConfig,
                 fp8: FP8Config, *, seed: int, with_reference: bool):
        if optim.pack_sequences and model.layer_spec == "te" and model.params_dtype == "float32":
            raise ValueError("optim.pack_sequences=True with learner.layer_spec='te' and learner.params_dtype="
                             "'float32': Transformer Engine's packed (THD) attention has only bf16/fp16 backends; "
                             "set learner.params_dtype='bfloat16', or optim.pack_sequences=false")
        # Built before any process group so that an impossible FP8/TE request fails at once.
        params_dtype = getattr(torch, model.params_dtype)
        self.transformer_config = transformer_config(model, parallel, fp8, params_dtype=params_dtype)
        init_parallel(parallel, seed)
        self.model_config, self.optim_config, self.seed = model, optim, seed
        self.loss_kwargs = dataclasses.asdict(loss)
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        self.transformer_config.variable_seq_lengths = True  # micro-batches are trimmed to their own length (PP p2p)
        self.device = torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        policy = build_model(model, self.transformer_config)
        self.model_chunks = [policy]
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   use_distributed_optimizer=parallel.use_distributed_optimizer)
        self.ddp_chunks = [DistributedDataParallel(self.transformer_config, ddp_config, policy)]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", bf16=params_dtype == torch.bfloat16, lr=optim.lr, min_lr=optim.min_lr,
                            weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            clip_grad=optim.clip_grad, use_distributed_optimizer=parallel.use_distributed_optimizer),
            self.ddp_chunks)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr,
            min_lr=optim.min_lr, lr_warmup_steps=optim.lr_warmup_steps,
            lr_decay_steps=max(optim.lr_decay_steps, optim.lr_warmup_steps + 1), lr_decay_style=optim.lr_decay_style,
            start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=1, wd_incr_style="constant")
        self.reference_chunks = []
        if with_reference:
            reference = build_model(model, self.transformer_config)
            reference.requires_grad_(False)
            self.reference_chunks = [reference]
            self.update_reference()

    @on_cpu
    def load_hf(self, state: Mapping[str, torch.Tensor]) -> None:
        """Start from HF weights (`state`: HF names -> full tensors): policy, optimizer copies and reference."""
        load_hf_weights(self.model_chunks, self.model_config, state)
        self.optimizer.reload_model_params()  # main (fp32) copies of bf16 params were taken at construction
        if self.reference_chunks:
            self.update_reference()

    @on_cpu
    def update_reference(self) -> None:
        """Copy the policy's current weights into the frozen reference (at start, or to refresh it)."""
        if not self.reference_chunks:
            raise ValueError("update_reference: this Learner was built with with_reference=False")
        for reference, policy in zip(self.reference_chunks, self.model_chunks):
            reference.load_state_dict(policy.state_dict())

    @on_cpu
    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs [B, L-1] fp32 of `batch.tokens` under the policy (or the reference).

        The same full tensor is returned on every rank. Positions outside `batch.response_mask` are 0:
        never scored, and the model projects no logits there.
        """
        if reference and not self.reference_chunks:
            raise ValueError("logprobs(reference=True): this Learner was built with with_reference=False")
        chunks = self.reference_chunks if reference else self.ddp_chunks
        for chunk in chunks:
            chunk.eval()
        rows = _data_parallel_rows(batch.size)
        micro = self._micro_batches(batch.tokens[rows], batch.response_mask[rows], {},
                                    self.optim_config.logprob_micro_batch)
        # a replica with no rows (batch smaller than DP) skips the schedule: its model-parallel peers do too
        outputs = self._schedule(chunks, micro, self._logprob_output, forward_only=True) if micro else []
        local = torch.zeros(len(rows), batch.tokens.shape[1] - 1, device=self.device)  # [b, L-1]
        if parallel_state.is_pipeline_last_stage():
            for part, logprobs in zip(micro, outputs):  # [m, T] each
                local[part["rows"], :logprobs.shape[1]] = logprobs
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(local, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return _gather_data_parallel_rows(local, batch.size).cpu()

    @on_cpu
    def train(self, batch: TrainBatch, *, max_response_len: int | None = None) -> dict[str, float]:
        """PPO epochs over mini-batches of `optim.mini_batch_prompts` groups, one optimizer step each.

        `batch.advantages` must be set (and `ref_logprobs` when the loss has a KL term). Old log-probs
        are `batch.old_logprobs` when set; when None the learner takes them itself (`_old_logprobs`),
        without a forward pass of its own for the mini-batch whose update is exactly on-policy.
        `max_response_len` is Dr.GRPO's constant (pass the generation budget; default: the longest
        response in `batch`). Epoch 0 takes the groups in batch order; every later epoch in a new order
        (`_epoch_group_order`). Returns the metrics of `algo.loss` plus `grad_norm`, averaged over the
        optimizer steps taken, the last `lr`, `skipped_steps` (steps whose loss or gradient was not
        finite: no update), `optimizer_steps` and `old_logprob_rows` (rows it scored in a separate pass).
        """
        if batch.advantages is None:
            raise ValueError("Learner.train: batch.advantages must be set (compute advantages first)")
        if self.loss_kwargs["kl_coef"] > 0 and batch.ref_logprobs is None:
            raise ValueError(f"Learner.train: loss.kl_coef={self.loss_kwargs['kl_coef']} needs batch.ref_logprobs "
                             f"(Learner.logprobs(batch, reference=True)), or set loss.kl_coef=0")
        max_response_len = max_response_len or max(1, int(batch.response_mask.sum(1).max()))
        totals: dict[str, float] = {}
        steps = skipped = 0
        shuffle_seed = (self.seed, self.scheduler.num_steps)  # drawn before this call's steps: resumes alike
        in_pass_rows = torch.zeros(batch.size, dtype=torch.bool)  # [B]
        scored_rows = 0
        if batch.old_logprobs is None:
            batch, in_pass_rows = self._old_logprobs(batch)
            scored_rows = int((~in_pass_rows).sum())
        for epoch in range(self.optim_config.ppo_epochs):
            order = _epoch_group_order(batch.group_index, epoch, shuffle_seed)
            for index, mini_batch in enumerate(_mini_batches(batch, order, self.optim_config.mini_batch_prompts)):
                if epoch == index == 0 and in_pass_rows.any():
                    mini_batch.old_logprobs = None  # taken from its own training pass (`_grpo_output`)
                metrics = self._step_on(mini_batch, functools.partial(self._grpo_output,
                                                                      max_response_len=max_response_len))
                if metrics is None:
                    skipped += 1
                    continue
                steps += 1
                totals = {name: totals.get(name, 0.0) + value for name, value in metrics.items()}
        averaged = {name: value / steps for name, value in totals.items()}
        return averaged | {"lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": float(skipped),
                           "optimizer_steps": float(steps), "old_logprob_rows": float(scored_rows)}

    def _old_logprobs(self, batch: TrainBatch) -> tuple[TrainBatch, torch.Tensor]:
        """`batch` with the log-probs of the policy before any update, and the rows [B] bool that get them
        from their own training pass instead of a separate forward.

        With one PPO epoch the first mini-batch is updated by the very weights that would score it, so its
        training pass's detached log-probs are its old log-probs (ratio exactly 1): only the rows of later
        mini-batches are scored here, before the first update changes the weights. With several epochs
        every row is revisited after updates, so every row is scored here.
        """
        in_pass = torch.zeros(batch.size, dtype=torch.bool)  # [B]
        if self.optim_config.ppo_epochs == 1:
            # epoch 0 keeps batch order
            first_groups = batch.group_index.unique()[:self.optim_config.mini_batch_prompts]
            in_pass = torch.isin(batch.group_index, first_groups)  # [B]
        old = torch.zeros(batch.response_mask.shape)  # [B, L-1]
        if not in_pass.all():
            old[~in_pass] = self.logprobs(batch.select(~in_pass))
        return dataclasses.replace(batch, old_logprobs=old), in_pass

    @on_cpu
    def sft_step(self, tokens: torch.Tensor, loss_mask: torch.Tensor) -> float:
        """One optimizer step of token-mean cross-entropy on `tokens` [B, L] where `loss_mask` [B, L-1].

        Every rank passes the same full batch. Returns the loss (nan if the step was skipped).
        """
        rows = torch.arange(tokens.shape[0])
        # each sequence is its own group, so DP shards are balanced by sequences
        batch = TrainBatch(tokens=tokens, response_mask=loss_mask.bool(), group_index=rows,
                           behaviour_logprobs=torch.zeros(loss_mask.shape),  # [B, L-1] unused by the CE loss
                           is_explorer=torch.zeros(len(rows), dtype=torch.bool), rewards=torch.zeros(len(rows)))
        metrics = self._step_on(batch, self._cross_entropy_output)
        return math.nan if metrics is None else metrics["loss"]

    # -- one optimizer step ---------------------------------------------------------------------------

    def _step_on(self, mini_batch: TrainBatch, output_fn: Callable) -> dict[str, float] | None:
        """Forward/backward this rank's DP shard of `mini_batch` and step; None if the step was skipped."""
        for chunk in self.ddp_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        rows = _group_shard(mini_batch.group_index)
        # A rank without groups still runs one fully masked micro-batch: the DP gradient reduction is a
        # collective every rank must join, and a masked row adds exactly zero.
        mask = mini_batch.response_mask[rows] if len(rows) else torch.zeros_like(mini_batch.response_mask[:1])
        rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)
        extras = {"old_logprobs": mini_batch.old_logprobs, "ref_logprobs": mini_batch.ref_logprobs,
                  "behaviour_logprobs": mini_batch.behaviour_logprobs, "advantages": mini_batch.advantages,
                  "is_explorer": mini_batch.is_explorer}
        extras = {name: value[rows] for name, value in extras.items() if value is not None}
        micro = self._micro_batches(mini_batch.tokens[rows], mask, extras, self.optim_config.micro_batch_size)
        # The schedule divides each micro-batch loss by the number of micro-batches and DDP averages
        # gradients over DP ranks; multiplying both back makes the micro-batch losses plain summands of
        # the mini-batch objective (grpo_loss is normalised by the global token/sequence counts).
        scale = len(micro) * parallel_state.get_data_parallel_world_size()
        totals = {"num_tokens": max(1, int(mini_batch.response_mask.sum())), "num_sequences": mini_batch.size}
        outputs = self._schedule(self.ddp_chunks, micro, functools.partial(output_fn, scale=scale, **totals),
                                 forward_only=False)
        metrics = _reduce_metrics(outputs)
        # fp32 optimizers never check for inf/nan: look at the loss and the reduced gradient buffers here
        local_ok = math.isfinite(metrics["loss"]) and all(
            bool(torch.isfinite(buffer.grad_data).all()) for chunk in self.ddp_chunks for buffer in chunk.buffers)
        ok = torch.tensor([float(local_ok)], device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            for chunk in self.ddp_chunks:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            return None
        _, grad_norm, _ = self.optimizer.step()
        if self.optim_config.clip_grad == 0:  # megatron computes the norm only to clip
            grad_norm = self.optimizer.get_grad_norm()
        self.scheduler.step(increment=1)
        return metrics | {"grad_norm": float(grad_norm)}

    # -- per-micro-batch outputs on the last pipeline stage ---------------------------------------------

    def _token_logprobs(self, micro: MicroBatch, logits: torch.Tensor, with_entropy: bool = False):
        """Log-probs (and entropy) [m, T] of the micro-batch targets from vocab-parallel `logits` [1, N, V/TP]
        at its N scored positions (`_forward`), 0 elsewhere, aligned with `micro["mask"]`; packed micro-batches
        are placed on their [R, T] rows and returned unpacked, one row per sequence.
        """
        targets, scored = micro["targets"], micro["scored"]  # [m, T] or packed [R, T]
        vocab_start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]  # equal shards
        logprobs, entropy = vocab_parallel_logprobs(
            logits.reshape(1, -1, logits.shape[-1]), targets[scored].unsqueeze(0),  # [1, N, V/TP], [1, N]
            vocab_start=vocab_start, vocab_size=self.model_config.vocab_size, with_entropy=with_entropy,
            group=parallel_state.get_tensor_model_parallel_group(),
            chunk_size=self.optim_config.logprob_chunk_size or None)

        def per_position(values):  # [1, N] -> [m, T] (packed: [R, T] -> unpacked [m, T]), 0 where not scored
            placed = values.new_zeros(targets.shape).masked_scatter(scored, values)
            packing = micro.get("packing")
            return placed if packing is None else unpack(placed, packing, micro["mask"].shape[1])

        return per_position(logprobs), None if entropy is None else per_position(entropy)

    def _logprob_output(self, micro: MicroBatch, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        # forward-only schedules call this with non_loss_data=True and store what it returns
        logprobs, _ = self._token_logprobs(micro, logits)  # [m, T]
        return logprobs

    def _grpo_output(self, micro: MicroBatch, logits: torch.Tensor, *, scale: int, num_tokens: int,
                     num_sequences: int, max_response_len: int):
        logprobs, entropy = self._token_logprobs(micro, logits, with_entropy=True)  # [m, T] each
        old_logprobs = micro.get("old_logprobs", logprobs.detach())  # [m, T]; absent where the update is on-policy
        loss, metrics = grpo_loss(logprobs, old_logprobs, micro["advantages"], micro["mask"],
                                  num_tokens=num_tokens, num_sequences=num_sequences,
                                  max_response_len=max_response_len, ref_logprobs=micro.get("ref_logprobs"),
                                  behaviour_logprobs=micro["behaviour_logprobs"], entropy=entropy,
                                  is_explorer=micro["is_explorer"], **self.loss_kwargs)
        return loss * scale, metrics  # metrics are detached copies: the schedule divides the loss in place

    def _cross_entropy_output(self, micro: MicroBatch, logits: torch.Tensor, *, scale: int, num_tokens: int,
                              num_sequences: int):
        logprobs, _ = self._token_logprobs(micro, logits)  # [m, T]
        loss = -(logprobs * micro["mask"]).sum() / num_tokens  # this micro-batch's share of the token mean
        return loss * scale, {"loss": loss.detach().clone()}

    # -- plumbing ---------------------------------------------------------------------------------------

    def _micro_batches(self, tokens: torch.Tensor, mask: torch.Tensor, extras: dict[str, torch.Tensor],
                       size: int) -> list[MicroBatch]:
        """Split rows into micro-batches, each trimmed to its last masked position (at least one token).

        Padded: `size` consecutive rows. Packed: the sequences of `size` packed rows (`plan_packing`),
        with the packed model inputs and the plan that unpacks the outputs.
        """
        positions = torch.arange(mask.shape[1])  # [L-1]
        lengths = torch.where(mask, positions, 0).max(1).values + 1  # [b] through each row's last masked token
        if self.optim_config.pack_sequences:
            budget = self.optim_config.pack_row_tokens
            plans = (plan_packing(lengths, budget, size) if budget
                     else cheapest_packing(lengths, size, attention_span(self.model_config)))
            parts = [(plan.sequences, plan) for plan in plans]
        else:
            parts = [(torch.arange(start, min(start + size, len(lengths))), None)
                     for start in range(0, len(lengths), size)]
        micro = []
        for rows, plan in parts:
            length = int(lengths[rows].max())
            rows_mask = mask[rows, :length]  # [m, T]
            batch = {"rows": rows, "tokens": tokens[rows, :length], "targets": tokens[rows, 1:length + 1],  # [m, T]
                     "mask": rows_mask, "scored": rows_mask}
            batch.update({name: value[rows, :length] if value.dim() == 2 else value[rows]
                          for name, value in extras.items()})
            if plan is not None:
                batch |= {"tokens": pack(batch["tokens"], plan), "targets": pack(batch["targets"], plan),  # [R, T]
                          "positions": pack(positions[:length].expand(len(rows), length), plan),  # [R, T]
                          "scored": pack(batch["mask"], plan),  # [R, T]
                          "packing": plan}
            micro.append({name: value.to(self.device) for name, value in batch.items()})
        return micro

    def _forward(self, model, micro: MicroBatch) -> torch.Tensor:
        """The model on one micro-batch (padded rows, or packed rows kept apart per sequence): on the last
        stage, logits [1, N, V/TP] at its N scored positions (`micro["scored"]`) only."""
        tokens = micro["tokens"]  # [m, T] or packed [R, T]
        packing = micro.get("packing")
        with logits_only_at(model, micro["scored"]):
            if packing is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [m, T]
                return model(tokens, positions, None)
            if self.model_config.layer_spec == "te":
                return _forward_thd(model, tokens, micro["positions"], segment_ids(packing))
            # megatron-core's local attention refuses PackedSeqParams but honours an explicit mask
            return model(tokens, micro["positions"], block_causal_mask(segment_ids(packing)))

    def _schedule(self, chunks: list, micro: list[MicroBatch], output_fn: Callable, *, forward_only: bool) -> list:
        """Run megatron's forward(-backward) schedule; returns the last stage's per-micro-batch outputs."""

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            return self._forward(model, batch), functools.partial(output_fn, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=chunks, num_microbatches=len(micro),
            seq_length=max(batch["tokens"].shape[1] for batch in micro),
            micro_batch_size=max(batch["tokens"].shape[0] for batch in micro), forward_only=forward_only,
            collect_non_loss_data=forward_only)


def _data_parallel_rows(size: int) -> torch.Tensor:
    """The rows of a `size`-row batch this DP rank computes log-probs for (contiguous, balanced)."""
    shards = torch.arange(size).tensor_split(parallel_state.get_data_parallel_world_size())
    return shards[parallel_state.get_data_parallel_rank()]


def _gather_data_parallel_rows(local: torch.Tensor, size: int) -> torch.Tensor:
    """All-gather per-rank [b_r, ...] row shards (as split by `_data_parallel_rows`) into [size, ...]."""
    world = parallel_state.get_data_parallel_world_size()
    if world == 1:
        return local
    counts = [len(shard) for shard in torch.arange(size).tensor_split(world)]
    padded = local.new_zeros((max(counts), *local.shape[1:]))  # gloo's all_gather needs equal shapes
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=parallel_state.get_data_parallel_group())
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


def _forward_thd(model, tokens: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Packed rows [R, T] through Transformer Engine attention as one THD sequence of R*T tokens.

    Every segment (a sequence or a row's padding tail) is its own attention window and RoPE restarts
    at each (megatron applies it per `cu_seqlens`). Returns what the model returns: on the last stage,
    logits [1, R*T, V/TP], or [1, N, V/TP] under `logits_only_at`.
    """
    bounds, longest = cu_seqlens(segments)  # [S+1] int32
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return model(tokens.reshape(1, -1), positions.reshape(1, -1), None, packed_seq_params=params)


def _epoch_group_order(group_index: torch.Tensor, epoch: int, seed: tuple[int, int]) -> torch.Tensor:
    """The groups of `group_index` [B] in the order PPO epoch `epoch` visits them.

    Epoch 0: ascending (batch order). Later epochs: a permutation drawn from (`seed`, `epoch`) alone,
    the same on every rank and after a resume.
    """
    groups = group_index.unique()  # sorted
    if epoch == 0:
        return groups
    permutation = np.random.default_rng([*seed, epoch]).permutation(len(groups))
    return groups[torch.from_numpy(permutation)]


def _mini_batches(batch: TrainBatch, order: torch.Tensor, prompts: int) -> list[TrainBatch]:
    """Mini-batches of `prompts` whole groups each, taken in `order` (the last one may hold fewer)."""
    return [batch.select(torch.isin(batch.group_index, order[start:start + prompts]))
            for start in range(0, len(order), prompts)]


def _group_shard(group_index: torch.Tensor) -> torch.Tensor:
    """Rows of this DP rank: the groups are split into contiguous, balanced runs of whole groups."""
    groups = group_index.unique()
    mine = groups.tensor_split(parallel_state.get_data_parallel_world_size())[parallel_state.get_data_parallel_rank()]
    return torch.isin(group_index, mine).nonzero().flatten()


def _reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Combine per-micro-batch metrics exactly over micro-batches and DP ranks; the same dict on every rank."""
    metrics = None
    if parallel_state.is_pipeline_last_stage():
        combined = functools.reduce(accumulate_metrics, outputs)  # tensors on the device: NCCL reduces them
        metrics = finalize_metrics(all_reduce_metrics(combined, group=parallel_state.get_data_parallel_group()))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    shared = [metrics]
    dist.broadcast_object_list(shared, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return shared[0]
