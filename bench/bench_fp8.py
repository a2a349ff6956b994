"""Learner train-step time with Transformer Engine layers in BF16 vs FP8 on one GPU: ratio, tokens/s, MFU.

A Qwen3-1.7B-shaped model (28 layers, hidden 2048, FFN 6144, 16 query / 8 key-value heads of 128,
vocabulary 151,936, tied embeddings: 1.72B parameters) with random weights trains on random sequences
of --seq tokens, --micro-batches micro-batches of --micro-batch-size sequences per optimizer step.
One step is what `learner.step.Learner` runs: megatron's forward-backward schedule over the
micro-batches, vocab-parallel log-probs (chunked) and the GRPO loss on the last stage, megatron DDP
(fp32 gradient buffers) and megatron's Adam. The Learner itself keeps FP32 parameters, so the step is
assembled here from the same pieces (`learner.model`, `algo.logprobs`, `algo.loss`, megatron-core) with
BF16 parameters and FP32 main weights, the usual mixed-precision setup; FP8 differs only in
`fp8_transformer_fields` (the GEMMs of the transformer layers run in FP8, the output layer stays BF16).

Model FLOPs per token: 6 * parameters (the tied embedding counted once, for the output GEMM) plus
causal attention 6 * layers * seq * heads * head_dim (QK^T and AV, forward 2 x 2 FLOPs each over
seq / 2 keys on average, backward twice the forward). MFU is against the dense H100 SXM peaks:
989 TFLOP/s BF16, 1979 TFLOP/s FP8. Times are the median of --steps steps after --warmup steps.
Usage (on a CUDA machine with Transformer Engine): python bench/bench_fp8.py [--layers 28] [--seq 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time

import torch

from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, ParallelConfig

PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100 SXM, dense


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=6144)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8, help="key-value heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (a multiple of 16 for FP8)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "delayed", "blockwise", "mxfp8"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per log-prob chunk (optim.logprob_chunk_size)")
    return parser.parse_args()


def flops_per_token(model: ModelConfig, params: int, seq: int) -> float:
    """Training FLOPs per token: 6 * parameters + causal attention (see the module docstring)."""
    return 6.0 * params + 6.0 * model.num_layers * seq * model.num_attention_heads * model.kv_channels


def build(model: ModelConfig, fp8: FP8Config):
    """BF16 model (TE layers) in megatron DDP with megatron's mixed-precision Adam: (ddp, optimizer, #params)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_s2l.learner.model import build_model, transformer_config

    config = transformer_config(model, ParallelConfig(), fp8, params_dtype=torch.bfloat16)
    config.finalize_model_grads_func = finalize_model_grads
    gpt = build_model(model, config)
    params = sum(p.numel() for p in gpt.parameters())
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True, clip_grad=1.0), [ddp])
    return ddp, optimizer, params


def train_step(ddp, optimizer, micro: list[dict], chunk: int) -> None:
    """One optimizer step over `micro` through megatron's schedule, as Learner._step_on runs it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
    from megatron_s2l.algo.loss import grpo_loss

    loss_kwargs = dataclasses.asdict(LossConfig(kl_coef=0.0))
    num_tokens = sum(int(batch["mask"].sum()) for batch in micro)

    def loss_fn(batch, logits):
        logprobs, entropy = vocab_parallel_logprobs(logits, batch["targets"], chunk_size=chunk,
                                                    with_entropy=True)  # [m, T] each
        loss, _ = grpo_loss(logprobs, batch["old"], batch["advantages"], batch["mask"], num_tokens=num_tokens,
                            num_sequences=len(micro) * batch["tokens"].shape[0],
                            max_response_len=batch["tokens"].shape[1], entropy=entropy, **loss_kwargs)
        return loss * len(micro), {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"]  # [m, T]
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [m, T]
        return model(tokens, positions, None), functools.partial(loss_fn, batch)

    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                                num_microbatches=len(micro), seq_length=micro[0]["tokens"].shape[1],
                                micro_batch_size=micro[0]["tokens"].shape[0], forward_only=False)
    optimizer.step()


def random_micro_batches(args, vocab: int) -> list[dict]:
    """Random sequences with every position scored (GRPO inputs: old log-probs, advantages)."""
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(args.micro_batches):
        tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq + 1), generator=g)  # [m, T+1]
        batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],  # [m, T] each
                 "mask": torch.ones(args.micro_batch_size, args.seq, dtype=torch.bool),  # [m, T]
                 "old": torch.full((args.micro_batch_size, args.seq), -math.log(vocab)),  # [m, T] uniform policy
                 "advantages": torch.randn(args.micro_batch_size, generator=g)}  # [m]
        micro.append({name: value.cuda() for name, value in batch.items()})
    return micro


def measure(model: ModelConfig, fp8: FP8Config, args) -> tuple[float, int]:
    """Median seconds per optimizer step and the parameter count."""
    ddp, optimizer, params = build(model, fp8)
    micro = random_micro_batches(args, model.vocab_size)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(ddp, optimizer, micro, args.chunk)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {'fp8 ' + fp8.recipe if fp8.enabled else 'bf16':>16}: steps {[round(t, 3) for t in times]} s, "
          f"peak memory {peak:.1f} GiB", flush=True)
    del ddp, optimizer, micro
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return statistics.median(times), params


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print(f"bench_fp8: needs a CUDA GPU (torch {torch.__version__} sees none); nothing measured. "
              f"See tests/gpu/README.md for the device recipe.")
        return 1
    from megatron_s2l.learner.fp8 import require_transformer_engine
    from megatron_s2l.learner.model import init_parallel

    try:
        require_transformer_engine("bench_fp8 (TE layers, FP8)")
    except RuntimeError as err:
        print(f"bench_fp8: {err}\nNothing measured; tests/gpu/README.md says how to build Transformer Engine.")
        return 1
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                        num_attention_heads=args.heads, num_query_groups=args.groups, kv_channels=args.head_dim,
                        vocab_size=args.vocab, max_position_embeddings=args.seq, layer_spec="te")
    init_parallel(ParallelConfig(), seed=0)
    tokens = args.micro_batches * args.micro_batch_size * args.seq
    print(f"bench_fp8 on {torch.cuda.get_device_name()}: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"{tokens} tokens per step")
    bf16_s, params = measure(model, FP8Config(), args)
    fp8_s, _ = measure(model, FP8Config(enabled=True, recipe=args.recipe), args)
    flops = flops_per_token(model, params, args.seq) * tokens
    print(f"parameters {params / 1e9:.2f}B, model FLOPs per step {flops / 1e12:.1f} TFLOP")
    print(f"{'mode':>16} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU bf16 peak':>14} {'MFU own peak':>13}")
    for name, seconds, peak in (("bf16", bf16_s, PEAK_TFLOPS["bf16"]), (f"fp8 {args.recipe}", fp8_s, PEAK_TFLOPS["fp8"])):
        achieved = flops / seconds / 1e12
        print(f"{name:>16} {seconds:>8.3f} {tokens / seconds:>10.0f} {achieved:>8.1f} "
              f"{achieved / PEAK_TFLOPS['bf16']:>14.1%} {achieved / peak:>13.1%}")
    print(f"step time bf16 / fp8 = {bf16_s / fp8_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
