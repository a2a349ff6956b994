"""Learner train-step and log-prob time with padded vs packed micro-batches (`optim.pack_sequences`), one process.

A batch of --groups x --group-size sequences with the spread of RL rollouts: prompts of 32-96 tokens,
response lengths log-normal (median --median-response, sigma 0.8, clipped to 8..--max-response), so a
few long responses set the padded length of their micro-batch. Padded: --micro-batch-size sequences per
micro-batch, trimmed to the longest. Packed: the `pack_row_tokens=0` default, rows of the budget between the
longest sequence L of the batch and 2L that costs least (padding slots against the attention of longer
rows, `packing.cheapest_packing`), micro-batches of at most --micro-batch-size x L slots, never more than a
padded one holds; "packed, rows of L": rows of at most L, --micro-batch-size rows per micro-batch (the rule
before the budget was chosen per batch). All sides run the same Learner (local layer spec, FP32, TP=1) on the
same weights; each measurement alternates padded and packed so drift on a shared machine hits both.
With --logprob-micro-batch-size N, two more sides run only the log-prob pass, cut into micro-batches of N
sequences (padded) or N rows (packed) through `optim.logprob_micro_batch_size`: the forward-only passes keep
no activations, so they can take more at once than training.

Printed: token slots computed (padding included) and useful tokens, time of `Learner.logprobs` and of
`Learner.train` (one optimizer step on the whole batch: forward, backward, Adam), tokens/s counting
only real tokens, and packed / padded ratios. Times are medians over --repeats after one warm-up.
Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/bench_packing.py [--groups 4] [--group-size 8] [--hidden 256]
       [--micro-batch-size 8] [--logprob-micro-batch-size N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_s2l.learner.step import Learner
from megatron_s2l.types import TrainBatch


def job_parser(description: str) -> argparse.ArgumentParser:
    """The command line of the batch, model and repeats (shared with bench_recompute.py)."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in (("groups", 4), ("group-size", 8), ("median-response", 96), ("max-response", 512),
                          ("micro-batch-size", 8), ("layers", 4), ("hidden", 256), ("vocab", 8192), ("repeats", 3),
                          ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser


def job_configs(args: argparse.Namespace) -> tuple[ModelConfig, OptimConfig]:
    """The model (local layer spec, FP32) and the optimizer settings of `args`."""
    model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                        num_attention_heads=args.hidden // 64, num_query_groups=max(1, args.hidden // 128),
                        kv_channels=64, vocab_size=args.vocab, max_position_embeddings=2048)
    return model, OptimConfig(lr=1e-6, mini_batch_prompts=args.groups, micro_batch_size=args.micro_batch_size)


def make_batch(args: argparse.Namespace) -> TrainBatch:
    """Random tokens with RL-like prompt and response lengths (see the module docstring)."""
    g = torch.Generator().manual_seed(args.seed)
    rows = args.groups * args.group_size
    prompts = torch.randint(32, 97, (rows,), generator=g)  # [B]
    responses = (args.median_response * torch.exp(0.8 * torch.randn(rows, generator=g))).round()  # [B]
    responses = responses.long().clamp(8, args.max_response)  # [B]
    length = int((prompts + responses).max())
    tokens = torch.randint(3, args.vocab, (rows, length), generator=g)  # [B, L]
    mask = torch.zeros(rows, length - 1, dtype=torch.bool)  # [B, L-1]
    for row, (prompt, response) in enumerate(zip(prompts.tolist(), responses.tolist())):
        mask[row, prompt - 1:prompt - 1 + response] = True
        tokens[row, prompt + response:] = 2  # pad
    return TrainBatch(tokens=tokens, response_mask=mask, behaviour_logprobs=torch.zeros(rows, length - 1),
                      is_explorer=torch.zeros(rows, dtype=torch.bool),
                      group_index=torch.arange(rows) // args.group_size, rewards=torch.zeros(rows),
                      advantages=torch.randn(rows, generator=g))


def token_slots(learner: Learner, batch: TrainBatch) -> int:
    """Positions the model computes in a log-prob pass over `batch` (real tokens plus padding)."""
    micro = learner._micro_batches(batch.tokens, batch.response_mask, {}, learner.optim_config.logprob_micro_batch)
    return sum(part["tokens"].numel() for part in micro)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = job_parser(__doc__.splitlines()[0])
    parser.add_argument("--logprob-micro-batch-size", type=int, default=0, help="0: no log-prob-only sides")
    args = parser.parse_args()
    model, optim = job_configs(args)
    batch = make_batch(args)
    longest = batch.tokens.shape[1] - 1  # the longest sequence, through its last response token
    trains = {"padded": optim, "packed": dataclasses.replace(optim, pack_sequences=True),
              "packed, rows of L": dataclasses.replace(optim, pack_sequences=True, pack_row_tokens=longest)}
    # log-prob-only sides, each against the training side it cuts differently (training ignores the setting)
    bases = {f"{name}, log-prob micro-batch {args.logprob_micro_batch_size}": name
             for name in trains if args.logprob_micro_batch_size}
    layouts = trains | {name: dataclasses.replace(trains[base], logprob_micro_batch_size=args.logprob_micro_batch_size)
                        for name, base in bases.items()}
    sides = {name: Learner(model, ParallelConfig(), config, LossConfig(kl_coef=0.0), FP8Config(), seed=args.seed,
                           with_reference=False) for name, config in layouts.items()}
    padded = sides["padded"]
    for learner in list(sides.values())[1:]:
        learner.model_chunks[0].load_state_dict(padded.model_chunks[0].state_dict())
    batch.old_logprobs = padded.logprobs(batch)
    lengths = torch.where(batch.response_mask, torch.arange(batch.response_mask.shape[1]), 0).max(1).values + 1
    useful = int(lengths.sum())
    print(f"batch: {batch.size} sequences, {useful} tokens (longest {int(lengths.max())}, median "
          f"{int(lengths.median())}); model {args.layers} layers x {args.hidden}, vocab {args.vocab}; "
          f"{torch.get_num_threads()} threads")
    times = {name: {"logprobs": [], **({"train": []} if name in trains else {})} for name in sides}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, learner in sides.items():
            for kind, run in (("logprobs", learner.logprobs), ("train", learner.train)):
                if kind in times[name]:
                    seconds = timed(lambda: run(batch))
                    if repeat:
                        times[name][kind].append(seconds)
    width = max(len(name) for name in sides)
    print(f"{'':{width}} {'token slots':>12} {'pad frac':>9} {'logprobs s':>11} {'train s':>9} {'train tok/s':>12}")
    medians = {}
    for name, learner in sides.items():
        slots = token_slots(learner, batch)
        medians[name] = {kind: statistics.median(values) for kind, values in times[name].items()}
        train = f"{medians[name]['train']:>9.3f} {useful / medians[name]['train']:>12.0f}" if name in trains else ""
        print(f"{name:{width}} {slots:>12} {1 - useful / slots:>9.3f} {medians[name]['logprobs']:>11.3f} {train}")
    for name in ("packed, rows of L", "packed"):
        print(f"{name} / padded: token slots {token_slots(sides[name], batch) / token_slots(padded, batch):.3f}, "
              f"logprobs time {medians[name]['logprobs'] / medians['padded']['logprobs']:.3f}, "
              f"train time {medians[name]['train'] / medians['padded']['train']:.3f}")
    for name, base in bases.items():
        print(f"{name} / {base}: logprobs time {medians[name]['logprobs'] / medians[base]['logprobs']:.3f}")


if __name__ == "__main__":
    main()
