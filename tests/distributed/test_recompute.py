"""`learner.recompute` trades activation memory for compute without changing a training step.

The same weights and batch train one step with recomputation off, selective (each layer's MLP) and full
(each whole layer), on real gloo ranks at TP=1, TP=2 and PP=2: the loss, gradient norm and every gradient
shard equal the run without recomputation, and the tensors autograd saves during the training forward
(counted through saved-tensor hooks, the memory held until the backward) shrink: selective below the
run without, full below a fifth of it. A config's `learner.recompute` reaches megatron-core's TransformerConfig
through `loop.build_learner`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig
from tests.distributed.test_learner import GROUP_SIZES, MODEL, SEED, make_batch, sharded_grads
from tests.multiprocess import run_ranks

MODES = ("none", "selective", "full")
TIMEOUT = 240


def _one_step_each(rank, world_size, tp, pp):
    """Per mode: (loss, grad_norm, gradient shards, MiB saved for backward during the training forward)."""
    from megatron_s2l.learner.step import Learner

    saved = {}
    forward = Learner._forward

    def counting_forward(self, model, micro):
        def pack(tensor):
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return forward(self, model, micro)

    Learner._forward = counting_forward
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    optim = OptimConfig(lr=1e-2, mini_batch_prompts=len(GROUP_SIZES), micro_batch_size=len(make_batch().tokens))
    out, weights = {}, None
    for mode in MODES:
        learner = Learner(dataclasses.replace(MODEL, recompute=mode), parallel, optim, LossConfig(kl_coef=0.0),
                          FP8Config(), seed=SEED, with_reference=False)
        if weights is None:  # copies: the first step updates the parameters in place
            weights = {name: value.clone() if torch.is_tensor(value) else value
                       for name, value in learner.model_chunks[0].state_dict().items()}
        learner.model_chunks[0].load_state_dict(weights)
        saved.clear()
        metrics = learner.train(make_batch())
        out[mode] = (metrics["loss"], metrics["grad_norm"], sharded_grads(learner.model_chunks[0]),
                     sum(saved.values()) / 2**20)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_recomputation_changes_memory_not_the_step(tp, pp):
    for run in run_ranks(_one_step_each, tp * pp, tp, pp, timeout=TIMEOUT):
        loss, grad_norm, grads, saved = run["none"]
        assert loss != 0 and grad_norm > 0
        for mode in ("selective", "full"):
            other_loss, other_norm, other_grads, other_saved = run[mode]
            assert (other_loss, other_norm) == pytest.approx((loss, grad_norm), rel=0, abs=1e-6), mode
            assert [(key, index) for key, index, _ in other_grads] == [(key, index) for key, index, _ in grads]
            for (key, _, mine), (_, _, theirs) in zip(other_grads, grads):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=f"{mode}: gradient of {key}")
        assert run["selective"][3] < saved
        assert run["full"][3] < saved / 5


def _built_recompute(rank, world_size, model_dir):
    from megatron_s2l.config import S2LConfig
    from megatron_s2l.loop import build_learner

    cfg = S2LConfig.from_dict({"learner": {"hf_path": model_dir, "recompute": "selective"},
                               "explorer": {"source": "none"}})
    config = build_learner(cfg).transformer_config
    return config.recompute_granularity, config.recompute_modules


@pytest.mark.distributed
def test_the_learner_section_reaches_megatron_core(tmp_path):
    from tests.tiny_models import write_tiny_model

    model_dir = str(write_tiny_model(tmp_path / "model"))
    assert run_ranks(_built_recompute, 1, model_dir, timeout=TIMEOUT) == [("selective", ["mlp"])]
