"""The rollout contract from a user's side: the README's own-loop block, and `train` with a hook of one's own.

The README's "Using the hook in your own Megatron loop" block is read from README.md and executed in a fresh
process (Megatron's parallel state is per process) with `config_path` pointing at a tiny-family config: 3 steps,
T_mix=3, G=4, 2 prompts per step. Random models never write a boxed answer, so the real math reward is 0
everywhere and every group has zero variance; an entropy bonus still moves the weights, so each step takes an
optimizer step and refits the learner's engine.

`AnswerKeyHook` is a `RolloutHook` that is not `RolloutPhase` (no vLLM at all): it writes boxed answers that
are right for every other sample, so `train` with held-out evaluation on must report pass@1 = 1/2 and
pass@2 = 1 through the loop's own verifier, and it checks that the loop hands it the learner's weights after
every optimizer step and nothing else.
"""

from __future__ import annotations

import re

import pytest

from megatron_s2l.types import RolloutGroup, Sample
from tests.e2e.conftest import REPO, tiny_config, write_config
from tests.multiprocess import run_ranks

pytestmark = pytest.mark.e2e


def readme_loop() -> str:
    """The Python block under the README's "Using the hook in your own Megatron loop" heading."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Using the hook in your own Megatron loop")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_readme_loop(rank: int, world_size: int, config_path: str) -> list[dict]:
    namespace = {"config_path": config_path}
    exec(compile(readme_loop(), "README.md", "exec"), namespace)
    return namespace["history"]


@pytest.mark.vllm
def test_readme_own_loop_runs(tiny_family, tmp_path):
    cfg = tiny_config(tiny_family, train_steps=3, loss={"kl_coef": 0.1, "entropy_coef": 0.05})
    history = run_ranks(_run_readme_loop, 1, str(write_config(cfg, tmp_path / "run.yaml")), timeout=240)[0]

    assert [m["schedule/explorer_share"] for m in history] == [1.0, 0.5, 0.0]  # 1 - (i-1)/(T_mix-1)
    assert [m["reward/mean"] for m in history] == [0.0, 0.0, 0.0]
    assert [m["advantage/zero_variance_groups"] for m in history] == [2, 2, 2]
    assert [m["rollout/tokens"] > 0 for m in history] == [True] * 3
    assert [m["rollout/dropped_prompts"] for m in history] == [0, 0, 0]
    assert [m["train/optimizer_steps"] for m in history] == [1, 1, 1]
    assert [m["refit/bytes"] > 0 for m in history] == [True] * 3  # one refit per optimizer step


class AnswerKeyHook:
    """Group sample k answers right iff k is even; held-out sample k likewise. Records what the loop asks."""

    def __init__(self, tokenizer, group_size: int):
        self.tokenizer, self.group_size = tokenizer, group_size
        self.calls: list[tuple] = []
        self.refit_bytes: list[int] = []

    def _samples(self, prompt, n: int) -> list[Sample]:
        samples = []
        for k in range(n):
            answer = prompt.ground_truth if k % 2 == 0 else f"{prompt.ground_truth}1"
            ids = self.tokenizer.encode(f"\\boxed{{{answer}}}")
            samples.append(Sample(prompt.prompt_id, prompt.prompt_ids, ids, [-1.0] * len(ids), "learner", "key",
                                  reward=float(k % 2 == 0)))
        return samples

    def phases(self, step):
        return [("learner",)]

    def rollout(self, step, prompts, sources):
        self.calls.append(("rollout", step))
        return [RolloutGroup(p.prompt_id, self._samples(p, self.group_size)) for p in prompts]

    def release_memory(self):
        self.calls.append(("release",))

    def sync_weights(self, named_tensors, *, changed):
        self.calls.append(("sync", changed))
        if changed:
            self.refit_bytes.append(sum(t.numel() * t.element_size() for _, t in named_tensors))

    def generate(self, prompts, n, sampling, *, seed=None):
        self.calls.append(("generate", len(prompts), n))
        return [self._samples(p, n) for p in prompts]

    def metrics(self, step):
        return {"hook/refits": float(len(self.refit_bytes))}


def _train_with_own_hook(rank: int, world_size: int, config_path: str):
    from megatron_s2l.config import S2LConfig
    from megatron_s2l.data.tokenizer import load_tokenizer
    from megatron_s2l.loop import train

    cfg = S2LConfig.from_yaml(config_path)
    hook = AnswerKeyHook(load_tokenizer(cfg.learner.hf_path), cfg.schedule.group_size)
    result = train(cfg, hook)
    return result.initial_eval, result.history, hook.calls, hook.refit_bytes


def test_train_with_a_hook_of_ones_own_and_evaluation_on(tiny_family, tmp_path):
    from megatron_s2l.learner.safetensors_io import read_hf_state

    cfg = tiny_config(tiny_family, train_steps=2, explorer={"source": "none"}, loss={"kl_coef": 0.0},
                      logging={"eval_interval": 1, "eval_samples": 2, "eval_max_problems": 3})
    initial, history, calls, refit_bytes = run_ranks(
        _train_with_own_hook, 1, str(write_config(cfg, tmp_path / "run.yaml")), timeout=240)[0]

    expected_eval = {"eval/pass@1": 0.5, "eval/pass@2": 1.0, "eval/mean_reward": 0.5}
    assert initial == expected_eval
    assert [{k: m[k] for k in expected_eval} for m in history] == [expected_eval] * 2
    assert [m["reward/mean"] for m in history] == [0.5, 0.5]
    assert [m["train/optimizer_steps"] for m in history] == [1, 1]  # 2 prompts = one mini-batch
    assert [m["hook/refits"] for m in history] == [1, 2]
    assert calls == [("generate", 3, 2),
                     ("rollout", 1), ("release",), ("sync", True), ("generate", 3, 2),
                     ("rollout", 2), ("release",), ("sync", True), ("generate", 3, 2)]
    state = read_hf_state(tiny_family["learner"])
    assert refit_bytes == [sum(state[name].numel() * state[name].element_size() for name in state)] * 2
