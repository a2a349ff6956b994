"""Activation recomputation (`learner.recompute`): memory held for the backward and train-step time, one process.

Three Learners with the same weights (local layer spec, FP32, TP=1) train on the same RL-like batch (see
bench_packing.py: prompts of 32-96 tokens, log-normal responses) with recomputation off, selective (each
layer's MLP) and full (each whole layer). Printed per side: the most MiB autograd saves in one micro-batch's
training forward (counted through saved-tensor hooks: the activations held until its backward, which
recomputation shrinks) and the median time of `Learner.train` (one optimizer step on the whole batch),
alternating the sides in every repeat, with ratios to the side without recomputation.
Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/bench_recompute.py [--groups 4] [--group-size 8] [--repeats 3]
       [--micro-batch-size 8] [--hidden 256] [--layers 4] [--vocab 8192]
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from bench_packing import job_configs, job_parser, make_batch, timed

from megatron_s2l.config import FP8Config, LossConfig, ParallelConfig
from megatron_s2l.learner.step import Learner

MODES = ("none", "selective", "full")


def saved_for_backward_mib(learner: Learner, batch) -> float:
    """The most MiB autograd saves in one model forward of `learner.train(batch)`: what a micro-batch holds
    until its backward (distinct storages, counted through saved-tensor hooks)."""
    totals = []
    forward = learner._forward

    def counting_forward(model, micro):
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward(model, micro)
        totals.append(sum(saved.values()))
        return output

    learner._forward = counting_forward
    try:
        learner.train(batch)
    finally:
        del learner._forward
    return max(totals) / 2**20


def main() -> None:
    args = job_parser(__doc__.splitlines()[0]).parse_args()
    model, optim = job_configs(args)
    sides = {mode: Learner(dataclasses.replace(model, recompute=mode), ParallelConfig(), optim,
                           LossConfig(kl_coef=0.0), FP8Config(), seed=args.seed, with_reference=False)
             for mode in MODES}
    for learner in list(sides.values())[1:]:
        learner.model_chunks[0].load_state_dict(sides["none"].model_chunks[0].state_dict())
    batch = make_batch(args)
    batch.old_logprobs = sides["none"].logprobs(batch)
    print(f"batch: {batch.size} sequences, {int(batch.tokens.numel())} token slots; model {args.layers} layers x "
          f"{args.hidden}, vocab {args.vocab}; micro-batches of {args.micro_batch_size}; "
          f"{torch.get_num_threads()} threads")
    saved = {mode: saved_for_backward_mib(learner, batch) for mode, learner in sides.items()}
    times = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, learner in sides.items():
            times[mode].append(timed(lambda: learner.train(batch)))
    train = {mode: statistics.median(values) for mode, values in times.items()}
    print(f"{'recompute':10} {'saved MiB':>10} {'x none':>7} {'train s':>8} {'x none':>7}")
    for mode in MODES:
        print(f"{mode:10} {saved[mode]:>10.0f} {saved[mode] / saved['none']:>7.3f} {train[mode]:>8.3f} "
              f"{train[mode] / train['none']:>7.3f}")


if __name__ == "__main__":
    main()
