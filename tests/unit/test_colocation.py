"""The engines' sleep/wake/refit order around training, driven by the real `loop.train_step` and `RolloutPhase`.

`RecordingEngine` keeps the state a vLLM engine with sleep mode keeps (memory released per tag, weights
dropped by a level-2 sleep) and logs only what would reach vLLM; `generate` fails unless the engine is whole.
The learner is a stand-in whose optimizer steps per `train` call are scripted.
"""

import pytest
import torch

from megatron_s2l import loop
from megatron_s2l.config import S2LConfig
from megatron_s2l.rollout.colocation import Colocation
from megatron_s2l.rollout.mixer import S2LMixer
from megatron_s2l.rollout.phase import RolloutPhase
from megatron_s2l.types import Prompt, Sample

PROMPTS = [Prompt("p0", [5, 6], "1"), Prompt("p1", [5, 7, 8], "2")]


class RecordingEngine:
    """A sleep-mode engine that appends (source, event, detail) to a shared log."""

    def __init__(self, source, log, sleep_mode=True, drop=()):
        self.source, self.log, self.sleep_mode, self.drop = source, log, sleep_mode, set(drop)
        self.asleep, self.weights_dropped = set(), False

    def sleep(self, level):
        if self.sleep_mode and not self.asleep:
            self.log.append((self.source, "sleep", level))
            self.asleep, self.weights_dropped = {"weights", "kv_cache"}, level == 2

    def wake(self, tags=None):
        waking = self.asleep & set(tags if tags is not None else self.asleep)
        if waking:
            self.log.append((self.source, "wake", tuple(sorted(waking))))
            self.asleep -= waking

    def update_weights(self, named_tensors, *, version=None):
        assert "weights" not in self.asleep, "weights are loaded into woken weight memory"
        items = list(named_tensors)
        self.log.append((self.source, "update", version))
        self.weights_dropped = False
        return {"bytes": float(sum(t.numel() * t.element_size() for _, t in items)), "buckets": 1.0}

    def generate(self, prompts, n, sampling, *, seed=None):
        assert not self.asleep and not self.weights_dropped, f"{self.source} generated while asleep"
        self.log.append((self.source, "generate", len(prompts)))
        counts = [n] * len(prompts) if isinstance(n, int) else n
        return [[] if p.prompt_id in self.drop else
                [Sample(p.prompt_id, p.prompt_ids, [9, k % 3], [-0.5, -0.5], self.source, self.source)
                 for k in range(c)] for p, c in zip(prompts, counts)]


class SecondTokenScorer:
    """Reward 1 when the response's second token is 0 (every third sample): groups with varied rewards."""

    def score(self, prompts, samples):
        return [float(s.response_ids[1] == 0) for s in samples]


class ScriptedLearner:
    """`train` takes the scripted number of optimizer steps; log-probs are zeros."""

    def __init__(self, steps_per_call):
        self.steps_per_call, self.model_chunks, self.model_config = list(steps_per_call), [], None

    def logprobs(self, batch, reference=False):
        return torch.zeros(batch.tokens.shape[0], batch.tokens.shape[1] - 1)  # [B, L-1]

    def train(self, batch, *, max_response_len=None):
        return {"loss": 0.0, "optimizer_steps": float(self.steps_per_call.pop(0))}


@pytest.fixture
def exports(monkeypatch):
    """How often the learner's weights were actually exported (the loop hands over a lazy generator)."""
    started = []

    def export(chunks, model):
        started.append(1)
        yield "w", torch.ones(4)

    monkeypatch.setattr(loop, "export_hf_weights", export)
    return started


def build(mode, *, sleep_mode=True, drop=(), explorer=True):
    log = []
    cfg = S2LConfig.from_dict({"schedule": {"group_size": 4, "t_mix": 3, "group_mode": mode},
                               "loss": {"kl_coef": 0.0}, "optim": {"mini_batch_prompts": 2}})
    engines = {"learner": RecordingEngine("learner", log, sleep_mode, drop),
               "explorer": RecordingEngine("explorer", log, sleep_mode) if explorer else None}
    mixer = S2LMixer(cfg.schedule, explorer=engines["explorer"], learner=engines["learner"],
                     explorer_sampling=cfg.explorer.sampling, learner_sampling=cfg.learner_sampling,
                     scorer=SecondTokenScorer(), seed=0)
    return cfg, RolloutPhase(mixer, Colocation(engines["learner"], engines["explorer"])), log


def test_combined_steps_sleep_after_rollout_and_wake_weights_refit_kv_in_that_order(exports):
    cfg, rollout, log = build("combined")
    learner = ScriptedLearner([1, 0, 1])  # step 2 takes no optimizer step (e.g. a non-finite loss)
    shares = []
    for step in (1, 2, 3):  # alpha = 1, 1/2, 0: explorer only, both, learner only
        log.append(("loop", "step", step))
        shares.append(loop.train_step(cfg, step, PROMPTS, rollout, learner, pad_id=0)["schedule/explorer_share"])
    rollout.generate(PROMPTS, 2, cfg.learner_sampling, seed=1)  # held-out evaluation after step 3
    assert shares == [1.0, 0.5, 0.0]
    assert log == [
        ("loop", "step", 1),
        ("explorer", "generate", 2),
        ("learner", "sleep", 2), ("explorer", "sleep", 1),
        ("learner", "wake", ("weights",)), ("learner", "update", 1), ("learner", "wake", ("kv_cache",)),
        ("loop", "step", 2),
        ("explorer", "wake", ("kv_cache", "weights")),
        ("explorer", "generate", 2), ("learner", "generate", 2),
        ("learner", "sleep", 2), ("explorer", "sleep", 1),
        # no optimizer step, but the engine dropped its weights: they are loaded back, same version
        ("learner", "wake", ("weights",)), ("learner", "update", 1), ("learner", "wake", ("kv_cache",)),
        ("loop", "step", 3),
        ("learner", "generate", 2),  # the explorer is not needed any more and stays asleep
        ("learner", "sleep", 2),
        ("learner", "wake", ("weights",)), ("learner", "update", 2), ("learner", "wake", ("kv_cache",)),
        ("learner", "generate", 2),
    ]
    assert len(exports) == 3


def test_separate_mode_refits_between_its_two_phases(exports):
    cfg, rollout, log = build("separate")
    metrics = loop.train_step(cfg, 2, PROMPTS, rollout, ScriptedLearner([1, 1]), pad_id=0)
    assert log == [
        ("explorer", "generate", 2),
        ("learner", "sleep", 2), ("explorer", "sleep", 1),
        ("learner", "wake", ("weights",)), ("learner", "update", 1), ("learner", "wake", ("kv_cache",)),
        ("learner", "generate", 2),  # the learner phase samples the weights of the explorer phase's update
        ("learner", "sleep", 2),
        ("learner", "wake", ("weights",)), ("learner", "update", 2), ("learner", "wake", ("kv_cache",)),
    ]
    assert metrics["refit/bytes"] == 2 * 16  # two loads of one float32 [4] tensor, summed over the step
    assert metrics["rollout/dropped_prompts"] == 0


def test_without_sleep_mode_no_refit_and_no_export_without_an_optimizer_step(exports):
    cfg, rollout, log = build("combined", sleep_mode=False)
    metrics = loop.train_step(cfg, 2, PROMPTS, rollout, ScriptedLearner([0]), pad_id=0)
    assert exports == [] and metrics["refit/bytes"] == 0
    assert [event for _, event, _ in log] == ["generate", "generate"]
    loop.train_step(cfg, 3, PROMPTS, rollout, ScriptedLearner([2]), pad_id=0)
    assert exports == [1] and log[-1] == ("learner", "update", 1)


def test_an_engine_that_dropped_its_weights_refuses_to_serve_until_refitted():
    log = []
    engine = RecordingEngine("learner", log)
    colocation = Colocation(engine)
    colocation.release()
    with pytest.raises(RuntimeError, match="call sync_weights"):
        colocation.wake_for(("learner",))
    assert colocation.refit(iter([("w", torch.ones(2))]), changed=False)["bytes"] == 8
    colocation.wake_for(("learner",))
    assert log == [("learner", "sleep", 2), ("learner", "wake", ("weights",)), ("learner", "update", 0),
                   ("learner", "wake", ("kv_cache",))]


def test_dropped_prompts_are_logged_and_a_step_that_drops_all_stops_naming_the_limit(exports):
    cfg, rollout, _ = build("combined", explorer=False, drop={"p1"})
    metrics = loop.train_step(cfg, 1, PROMPTS, rollout, ScriptedLearner([1]), pad_id=0)
    assert metrics["rollout/dropped_prompts"] == 1 and metrics["rollout/dropped_prompts/learner"] == 1
    assert loop.progress_fields(metrics)["dropped"] == "1"
    cfg, rollout, _ = build("combined", explorer=False, drop={"p0", "p1"})
    with pytest.raises(RuntimeError, match=r"learner engine dropped 2 .*raise learner_engine\.max_model_len"):
        loop.train_step(cfg, 1, PROMPTS, rollout, ScriptedLearner([1]), pad_id=0)


def _rollout_alone_in_a_process_group(rank, world_size):
    """One process with a (gloo) process group, as the learner starts: the collectives a rollout ran."""
    import torch.distributed as dist

    gathers = []
    gather = dist.all_gather_object
    dist.all_gather_object = lambda *args, **kwargs: gathers.append(args) or gather(*args, **kwargs)
    _, rollout, _ = build("combined", explorer=False)
    groups = rollout.rollout(3, PROMPTS, rollout.phases(3)[0])
    return len(gathers), [group.prompt_id for group in groups]


def test_a_single_process_job_gathers_no_rollouts():
    """Gloo's all-gather copies on its own thread even for one rank; the OpenMP team that leaves there makes
    libgomp throttle its spin-waits, and every parallel op of the process waits to wake a thread."""
    from tests.multiprocess import run_ranks

    assert run_ranks(_rollout_alone_in_a_process_group, 1, timeout=120) == [(0, ["p0", "p1"])]
