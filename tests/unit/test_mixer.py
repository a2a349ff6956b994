"""S2LMixer: group composition per step against hand-computed schedules, rewards once per sample.

The engines here are a test double for the mixer only (the real engines are tested in tests/vllm).
"""

import pytest

from megatron_s2l.config import SamplingConfig, ScheduleConfig
from megatron_s2l.rollout.mixer import S2LMixer
from megatron_s2l.types import Prompt, Sample

PROMPTS = [Prompt("p0", [0, 3], "1"), Prompt("p1", [0, 4, 5], "2"), Prompt("p2", [0, 6], "3")]
# G=5, T_mix=3, linear: alpha = 1, 1/2, 0, 0 -> combined (G_w, G_s) = (5, 0), (3, 2), (0, 5), (0, 5);
# separate explorer-only groups of ceil(alpha*5) and learner-only groups of ceil((1-alpha)*5).
COMBINED = {1: (5, 0), 2: (3, 2), 3: (0, 5), 4: (0, 5)}
SEPARATE = {1: (5, 0), 2: (3, 3), 3: (0, 5), 4: (0, 5)}


class FakeEngine:
    """Returns `n` samples per prompt whose first response token encodes the draw; records calls."""

    def __init__(self, source, skip=()):
        self.source, self.skip, self.calls = source, set(skip), []

    def generate(self, prompts, n, sampling, *, seed=None):
        self.calls.append((n, sampling, seed))
        return [[] if p.prompt_id in self.skip else
                [Sample(p.prompt_id, p.prompt_ids, [len(self.calls), k], [-0.5, -0.25], self.source, self.source,
                        sampling={"temperature": sampling.temperature}) for k in range(n)]
                for p in prompts]


class RecordingScorer:
    """Rewards the parity of a response's second token; records every batch it scores."""

    def __init__(self):
        self.batches = []

    def score(self, prompts, samples):
        self.batches.append([(p.prompt_id, s.prompt_id, tuple(s.response_ids)) for p, s in zip(prompts, samples)])
        return [float(s.response_ids[1] % 2) for s in samples]


def make_mixer(mode, explorer=True, skip=()):
    scorer = RecordingScorer()
    engines = {"explorer": FakeEngine("explorer", skip) if explorer else None, "learner": FakeEngine("learner")}
    mixer = S2LMixer(ScheduleConfig(group_size=5, t_mix=3, kind="linear", group_mode=mode),
                     explorer=engines["explorer"], learner=engines["learner"],
                     explorer_sampling=SamplingConfig(temperature=0.7), learner_sampling=SamplingConfig(),
                     scorer=scorer, seed=9)
    return mixer, engines, scorer


def test_combined_groups_follow_the_schedule_every_step():
    mixer, engines, scorer = make_mixer("combined")
    for step, (g_w, g_s) in COMBINED.items():
        phases = mixer.phases(step)
        assert phases == [tuple(s for s, c in (("explorer", g_w), ("learner", g_s)) if c)]
        groups = mixer.rollout(step, PROMPTS, phases[0])
        assert [g.prompt_id for g in groups] == ["p0", "p1", "p2"]
        for group in groups:
            assert (group.count("explorer"), group.count("learner")) == (g_w, g_s)
            assert all(s.prompt_id == group.prompt_id for s in group.samples)
            explorer_temps = {s.sampling["temperature"] for s in group.samples if s.source == "explorer"}
            assert explorer_temps <= {0.7}
    # every sample scored exactly once, all samples of a rollout call in one batch: 3 prompts x 5 samples
    assert [len(batch) for batch in scorer.batches] == [3 * 5] * 4
    assert [n for n, _, _ in engines["explorer"].calls] == [5, 3]
    assert [n for n, _, _ in engines["learner"].calls] == [2, 5, 5]


def test_separate_groups_follow_the_schedule_every_step():
    mixer, engines, scorer = make_mixer("separate")
    for step, (g_w, g_s) in SEPARATE.items():
        phases = mixer.phases(step)
        assert phases == [(s,) for s, c in (("explorer", g_w), ("learner", g_s)) if c]
        for (source,), count in zip(phases, [c for c in (g_w, g_s) if c]):
            groups = mixer.rollout(step, PROMPTS, (source,))
            assert [g.prompt_id for g in groups] == ["p0", "p1", "p2"]
            assert all(len(g.samples) == count and g.count(source) == count for g in groups)
    assert [len(batch) for batch in scorer.batches] == [3 * 5, 3 * 3, 3 * 3, 3 * 5, 3 * 5]


def test_rewards_and_source_tags_are_kept():
    mixer, _, _ = make_mixer("combined")
    groups = mixer.rollout(2, PROMPTS, ("explorer", "learner"))
    for sample in groups[0].samples:
        assert sample.reward == float(sample.response_ids[1] % 2)
        assert sample.policy_id == sample.source
    assert groups[0].rewards == [0.0, 1.0, 0.0, 0.0, 1.0]  # explorer k=0,1,2 then learner k=0,1


def test_seeds_depend_on_step_only():
    mixer, engines, _ = make_mixer("combined")
    mixer.rollout(2, PROMPTS, ("explorer", "learner"))
    mixer.rollout(2, PROMPTS, ("explorer", "learner"))
    mixer.rollout(3, PROMPTS, ("learner",))
    seeds = [seed for _, _, seed in engines["learner"].calls]
    assert seeds[0] == seeds[1] != seeds[2]


def test_without_explorer_is_plain_grpo():
    mixer, engines, _ = make_mixer("combined", explorer=False)
    for step in (1, 2, 5):
        assert mixer.phases(step) == [("learner",)] and mixer.explorer_share(step) == 0.0
        groups = mixer.rollout(step, PROMPTS, ("learner",))
        assert [len(g.samples) for g in groups] == [5, 5, 5]
    with pytest.raises(ValueError, match="no explorer"):
        mixer.rollout(1, PROMPTS, ("explorer",))


def test_prompts_an_engine_dropped_get_no_group_and_are_counted():
    mixer, _, scorer = make_mixer("combined", skip={"p1"})
    groups = mixer.rollout(2, PROMPTS, ("explorer", "learner"))
    assert [g.prompt_id for g in groups] == ["p0", "p2"]
    assert mixer.metrics == {"rollout/dropped_prompts": 1, "rollout/dropped_prompts/explorer": 1}
    assert [pid for pid, _, _ in scorer.batches[0]] == ["p0"] * 5 + ["p2"] * 5
    mixer.rollout(3, PROMPTS, ("learner",))  # a new call starts its own counts
    assert mixer.metrics == {"rollout/dropped_prompts": 0}


def test_each_sample_is_scored_against_its_own_prompt():
    mixer, _, scorer = make_mixer("combined")
    mixer.rollout(2, PROMPTS, ("explorer", "learner"))
    assert all(prompt_id == sample_prompt_id for prompt_id, sample_prompt_id, _ in scorer.batches[0])
    assert [pid for pid, _, _ in scorer.batches[0]] == ["p0"] * 5 + ["p1"] * 5 + ["p2"] * 5


def test_a_scorer_that_loses_samples_is_an_error():
    mixer, _, scorer = make_mixer("combined")
    scorer.score = lambda prompts, samples: [0.0] * (len(samples) - 1)
    with pytest.raises(ValueError, match="returned 14 rewards for 15 samples"):
        mixer.rollout(2, PROMPTS, ("explorer", "learner"))


def test_unknown_source_is_rejected():
    mixer, _, _ = make_mixer("separate")
    with pytest.raises(ValueError, match="accepted sources"):
        mixer.rollout(1, PROMPTS, ("teacher",))


def make_adaptive_mixer(learner_skip=()):
    """G=5, T_mix=3 adaptive: p0's samples all fail, p1's alternate, p2's all succeed (for both sources)."""
    calls = []

    class Recording(FakeEngine):
        def generate(self, prompts, n, sampling, *, seed=None):
            calls.append((self.source, [p.prompt_id for p in prompts], n, seed))
            return super().generate(prompts, n, sampling, seed=seed)

    class ByPrompt(RecordingScorer):
        def score(self, prompts, samples):
            parity = super().score(prompts, samples)
            return [{"p0": 0.0, "p1": r, "p2": 1.0}[p.prompt_id] for p, r in zip(prompts, parity)]

    scorer = ByPrompt()
    mixer = S2LMixer(ScheduleConfig(group_size=5, t_mix=3, kind="linear", allocation="adaptive"),
                     explorer=Recording("explorer"), learner=Recording("learner", learner_skip),
                     explorer_sampling=SamplingConfig(temperature=0.7), learner_sampling=SamplingConfig(),
                     scorer=scorer, seed=9)
    return mixer, calls, scorer


def test_adaptive_fills_open_slots_from_the_explorer_only_for_prompts_without_learner_signal():
    mixer, calls, scorer = make_adaptive_mixer()
    # G_w = ceil(alpha * 5) = 5, 3, 0 at steps 1-3; open slots S = min(G_w, 5 // 2) = 2, 2, 0; probe 5 - S
    for step, slots in {1: 2, 2: 2, 3: 0}.items():
        assert mixer.split(step) == (slots, 5 - slots)
        phases = mixer.phases(step)
        assert phases == [("explorer", "learner") if slots else ("learner",)]
        groups = mixer.rollout(step, PROMPTS, phases[0])
        assert [g.prompt_id for g in groups] == ["p0", "p1", "p2"]
        assert [(g.count("explorer"), g.count("learner")) for g in groups] == [(slots, 5 - slots), (0, 5),
                                                                               (slots, 5 - slots)]
        assert groups[0].rewards == [0.0] * 5 and groups[2].rewards == [1.0] * 5
    seed = lambda step: 9 * 1_000_003 + step  # noqa: E731
    # the learner's fill of p1 is seeded by the complement of the step seed: other draws than its probe's
    assert calls == [("learner", ["p0", "p1", "p2"], 3, seed(1)), ("explorer", ["p0", "p2"], 2, seed(1)),
                     ("learner", ["p1"], 2, ~seed(1)),
                     ("learner", ["p0", "p1", "p2"], 3, seed(2)), ("explorer", ["p0", "p2"], 2, seed(2)),
                     ("learner", ["p1"], 2, ~seed(2)),
                     ("learner", ["p0", "p1", "p2"], 5, seed(3))]
    # the probe is scored before the explorer is asked, every sample once
    assert [len(batch) for batch in scorer.batches] == [3 * 3, 3 * 2, 3 * 3, 3 * 2, 3 * 5]
    assert mixer.metrics == {"rollout/dropped_prompts": 0}


def test_adaptive_asks_no_explorer_for_a_prompt_the_learner_engine_dropped():
    mixer, calls, _ = make_adaptive_mixer(learner_skip={"p0"})
    groups = mixer.rollout(1, PROMPTS, ("explorer", "learner"))
    assert [g.prompt_id for g in groups] == ["p1", "p2"]
    assert mixer.metrics == {"rollout/dropped_prompts": 1, "rollout/dropped_prompts/learner": 1}
    assert calls[1][:2] == ("explorer", ["p2"])
