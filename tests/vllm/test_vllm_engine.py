"""VLLMEngine on real vLLM (CPU): log-probs against HF transformers, in-place refit (eager and compiled engines)
against a fresh engine."""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")

from megatron_s2l.config import SamplingConfig  # noqa: E402
from megatron_s2l.rollout.engine import RolloutEngine  # noqa: E402
from megatron_s2l.rollout.vllm_engine import VLLMEngine  # noqa: E402
from megatron_s2l.types import Prompt  # noqa: E402
from tests.multiprocess import run_ranks  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402
from tests.vllm.conftest import engine_config, hf_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

EOS = 1
PROMPTS = [Prompt("a", [0, 5, 6, 7], "x"), Prompt("b", [0, 9, 10], "y"), Prompt("c", [0, 40, 41, 42, 43], "z")]
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=24)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Qwen3 checkpoints (tied embeddings) with different random weights; peaky init so that
    sampled continuations are not uniform noise."""
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(root / name, seed=seed, init_std=0.5) for name, seed in (("old", 0), ("new", 1))}


@pytest.fixture(scope="module", params=[True, False], ids=["eager", "compiled"])
def refitted(models, request):
    """An engine started on the old weights, refitted to the new ones by a test: eager, or compiled by
    torch.compile (what GPU configs run, with CUDA graphs), whose graphs must read the refitted weights."""
    engine = VLLMEngine(str(models["old"]), engine_config(refit_bucket_bytes=2**19, enforce_eager=request.param),
                        source="learner", model_id="learner", eos_token_id=EOS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def fresh(models):
    """An engine started on the new weights; records the trainer's next random draw around the start."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    engine = VLLMEngine(str(models["new"]), engine_config(), source="learner", model_id="learner", eos_token_id=EOS)
    engine.rng_draws = (expected, torch.rand(3))
    return engine


def test_sampled_logprobs_equal_hf_forward(fresh, models):
    samples = fresh.generate(PROMPTS, 2, SAMPLED, seed=5)
    assert isinstance(fresh, RolloutEngine)
    assert [len(s) for s in samples] == [2, 2, 2]
    for sample in (s for group in samples for s in group):
        expected = hf_logprobs(models["new"], sample.prompt_ids, sample.response_ids)
        torch.testing.assert_close(torch.tensor(sample.behaviour_logprobs), expected, atol=1e-4, rtol=0)
        assert sample.source == "learner" and sample.policy_id == "learner" and sample.reward is None
        assert sample.sampling == dataclasses.asdict(SAMPLED)
        assert (sample.finish_reason, len(sample.response_ids)) == ("length", 24) or (
            sample.finish_reason == "stop" and sample.response_ids[-1] == EOS)


def test_the_trainers_random_stream_is_untouched(fresh):
    expected, after_start = fresh.rng_draws
    assert torch.equal(after_start, expected)
    state = torch.get_rng_state()
    fresh.generate(PROMPTS, 2, SAMPLED, seed=1)
    fresh.generate(PROMPTS, 2, SAMPLED)
    assert torch.equal(torch.get_rng_state(), state)


def test_counts_per_prompt_and_seeds(fresh):
    first = fresh.generate(PROMPTS, [3, 0, 1], SAMPLED, seed=11)
    assert [len(s) for s in first] == [3, 0, 1]
    again = fresh.generate(PROMPTS[:1], 3, SAMPLED, seed=11)  # same seed, different batch: same draw
    assert [s.response_ids for s in again[0]] == [s.response_ids for s in first[0]]
    other = fresh.generate(PROMPTS[:1], 3, SAMPLED, seed=12)
    assert [s.response_ids for s in other[0]] != [s.response_ids for s in first[0]]
    assert len({tuple(s.response_ids) for s in first[0]}) == 3  # the n samples of one prompt differ
    assert fresh.generate(PROMPTS, 0, SAMPLED) == [[], [], []]


def test_stops_at_eos_and_keeps_it(fresh):
    greedy = fresh.generate(PROMPTS[:1], 1, GREEDY)[0][0].response_ids
    stop_token = greedy[3]
    first = greedy.index(stop_token)
    fresh.eos_token_id = stop_token
    try:
        sample = fresh.generate(PROMPTS[:1], 1, GREEDY)[0][0]
    finally:
        fresh.eos_token_id = EOS
    assert sample.response_ids == greedy[:first + 1]
    assert sample.finish_reason == "stop"


def test_long_prompts_dropped_or_rejected(fresh):
    too_long = Prompt("long", list(range(3, 3 + 128 - SAMPLED.max_new_tokens + 1)), "x")
    out = fresh.generate([too_long, PROMPTS[0]], 1, SAMPLED, seed=0)
    assert [len(s) for s in out] == [0, 1]  # the mixer counts the empty list as a dropped prompt
    strict = dataclasses.replace(fresh.cfg, on_long_prompt="error")
    fresh.cfg, lenient = strict, fresh.cfg
    try:
        with pytest.raises(ValueError, match="prompt 'long' has 105 tokens.*limit of 104"):
            fresh.generate([too_long], 1, SAMPLED)
    finally:
        fresh.cfg = lenient


def test_update_weights_equals_fresh_engine(refitted, fresh, models):
    from safetensors.torch import load_file

    before = refitted.generate(PROMPTS, 1, GREEDY)
    target = fresh.generate(PROMPTS, 1, GREEDY)
    assert [s[0].response_ids for s in before] != [s[0].response_ids for s in target]

    weights = load_file(str(models["new"] / "model.safetensors"))
    stats = refitted.update_weights(iter(weights.items()), version=7)
    assert stats["buckets"] > 1 and stats["bytes"] == sum(t.numel() * 4 for t in weights.values())

    atol = 1e-5 if refitted.cfg.enforce_eager else 5e-5  # compiled kernels fuse, so they round differently
    for sampling, n in ((GREEDY, 1), (SAMPLED, 3)):
        got = refitted.generate(PROMPTS, n, sampling, seed=3)
        want = fresh.generate(PROMPTS, n, sampling, seed=3)
        for g, w in zip((s for grp in got for s in grp), (s for grp in want for s in grp)):
            assert g.response_ids == w.response_ids
            torch.testing.assert_close(torch.tensor(g.behaviour_logprobs), torch.tensor(w.behaviour_logprobs),
                                       atol=atol, rtol=0)
            assert g.policy_id == "learner@7"


def test_update_missing_a_parameter_is_refused(refitted, models):
    from safetensors.torch import load_file

    weights = load_file(str(models["new"] / "model.safetensors"))
    partial = [(name, t) for name, t in weights.items() if name != "model.norm.weight"]
    with pytest.raises(ValueError, match=r"no tensor for 1 of the learner engine's parameters .*model.norm.weight"):
        refitted.update_weights(partial, version=8)
    assert refitted.version == 7


def _first_generation_compiles(rank: int, world_size: int, model_dir: str) -> dict:
    from torch._dynamo.utils import counters

    engine = VLLMEngine(model_dir, engine_config(), source="learner", model_id="learner", eos_token_id=EOS)
    engine.generate(PROMPTS, 2, SAMPLED, seed=0)  # asks for log-probs: vLLM ranks each sampled token
    return {name: dict(values) for name, values in counters.items()}


def test_an_eager_engine_compiles_nothing_with_inductor(models):
    """vLLM's sampler helpers run eagerly on CPU; only a fresh process shows it (they bind at import)."""
    counters, = run_ranks(_first_generation_compiles, 1, str(models["new"]), timeout=120)
    assert counters["frames"]["ok"] >= 1  # the helper still goes through torch.compile, with the eager backend
    assert "inductor" not in counters and "aot_autograd" not in counters
