"""Trainer/engine agreement after a refit: the Megatron learner's log-probs on the tokens a refitted vLLM
engine sampled equal the engine's behaviour log-probs (float32, 1e-4), and differ before the refit.

This is the mismatch NeMo-RL users hit (stale or mis-mapped weights in the rollout engine). The learner
takes two SFT steps so that its weights differ from the HF directory both were started from; the refit
streams them through `export_hf_weights` and `Colocation.refit`, the one mapping used in training.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from megatron_s2l.config import FP8Config, LossConfig, OptimConfig, ParallelConfig, SamplingConfig  # noqa: E402
from megatron_s2l.types import Prompt, RolloutGroup, TrainBatch  # noqa: E402
from tests.multiprocess import run_ranks  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402
from tests.vllm.conftest import engine_config  # noqa: E402

pytestmark = pytest.mark.vllm

EOS, PAD = 1, 2
PROMPTS = [Prompt("a", [0, 5, 6, 7], "x"), Prompt("b", [0, 9, 10], "y"), Prompt("c", [0, 40, 41, 42, 43], "z")]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=16)


def _learner_logprobs(learner, samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The learner's log-probs on `samples` with the engine's behaviour log-probs and the response mask."""
    groups = [RolloutGroup(prompt.prompt_id, [dataclasses.replace(s, reward=0.0) for s in group])
              for prompt, group in zip(PROMPTS, samples)]
    batch = TrainBatch.from_groups(groups, pad_id=PAD)
    return learner.logprobs(batch), batch.behaviour_logprobs, batch.response_mask  # [B, L-1] each


def _refit_agreement(rank, world_size, paths):
    """Rank body: for each model dir, learner and engine on it, two SFT steps, log-prob gaps before and
    after the refit. One process for all models (start-up dominates); engines are closed at the end
    only, since closing an in-process engine tears down the default process group."""
    engines = []
    results = [_refit_one(path, engines) for path in paths]
    for engine in engines:
        engine.close()
    return results


def _refit_one(path, engines):
    """One model: the |learner - engine| log-prob gaps on response tokens before and after the refit."""
    from megatron_s2l.learner.hf_config import model_config_from_hf
    from megatron_s2l.learner.hf_weights import export_hf_weights
    from megatron_s2l.learner.safetensors_io import read_hf_state
    from megatron_s2l.learner.step import Learner
    from megatron_s2l.rollout.colocation import Colocation
    from megatron_s2l.rollout.vllm_engine import VLLMEngine

    cfg = model_config_from_hf(path)
    learner = Learner(cfg, ParallelConfig(), OptimConfig(lr=1e-2, micro_batch_size=4), LossConfig(kl_coef=0.0),
                      FP8Config(), seed=0, with_reference=False)
    state = read_hf_state(path)
    learner.load_hf(state)
    engine = VLLMEngine(str(path), engine_config(refit_bucket_bytes=2**19), source="learner", model_id="learner",
                        eos_token_id=EOS)
    engines.append(engine)
    tokens = torch.randint(3, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))  # [B, L]
    mask = torch.ones(4, 23, dtype=torch.bool)  # [B, L-1]
    losses = [learner.sft_step(tokens, mask) for _ in range(2)]

    stale, stale_behaviour, stale_mask = _learner_logprobs(learner, engine.generate(PROMPTS, 2, SAMPLING, seed=3))
    stats = Colocation(engine).refit(export_hf_weights(learner.model_chunks, cfg), changed=True)
    fresh, behaviour, fresh_mask = _learner_logprobs(learner, engine.generate(PROMPTS, 2, SAMPLING, seed=3))
    return {"losses": losses, "refit_bytes": stats["bytes"], "hf_bytes": sum(state[n].numel() * 4 for n in state),
            "before": (stale - stale_behaviour)[stale_mask].abs(),  # [N]
            "after": (fresh - behaviour)[fresh_mask].abs()}  # [N]


def test_learner_logprobs_equal_engine_logprobs_after_refit(tmp_path):
    paths = [write_tiny_model(tmp_path / name, family=family, tie_word_embeddings=tied, init_std=0.5)
             for name, family, tied in (("tied", "qwen3", True), ("untied", "qwen3", False),
                                        ("qwen2_untied", "qwen2", False))]  # Qwen2: q/k/v biases
    results, = run_ranks(_refit_agreement, 1, paths, timeout=360)
    for path, result in zip(paths, results):
        print(f"{path.name}: max |learner - engine| before refit {result['before'].max():.3g}, "
              f"after {result['after'].max():.3g} over {result['after'].numel()} tokens")
        assert result["losses"][1] < result["losses"][0]  # the SFT steps moved the weights
        assert result["refit_bytes"] == result["hf_bytes"]  # every weight of the checkpoint (lm_head when untied)
        assert result["after"].numel() > 16 and result["after"].max() < 1e-4
        assert result["before"].max() > 1e-2  # a stale engine is caught by the same comparison
