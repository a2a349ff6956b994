"""Per-prompt explorer allocation: explorer samples only where the learner's own samples carry no signal.

The paper gives every prompt the same G_w = ceil(alpha_i * G) explorer samples. Under `adaptive`
allocation every group still holds G samples, but the learner probes first: it draws G - S samples for
every prompt, with S = min(G_w, floor(G / 2)) slots left open (`probe_split`). A prompt whose probe
rewards differ already has a GRPO gradient, and the learner fills its S slots too (a plain GRPO group);
a prompt whose probe rewards are all equal (all fail, or all succeed) has none, and the explorer fills its
S slots. The schedule's annealing bounds the explorer (S <= G_w, none after T_mix); the cap at half the
group keeps at least G/2 learner samples on every prompt, enough to judge its signal.

Rollout compute is at most GRPO's: every prompt gets G samples, and an explorer sample costs no more than
a learner one (the explorer is the smaller model). The price is latency: while S > 0 a step has three
generation rounds one after the other (the probe, then the explorer's and the learner's fills).
The explorer's samples are off-policy exactly as in fixed allocation, so TIS/IcePop weight them the same way;
DAPO dynamic sampling afterwards drops the groups that stay all-equal even with explorer samples. Separate
groups are refused at start-up: the explorer phase would have to be rolled out after the learner's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_s2l.algo.advantages import dynamic_sampling_mask


def probe_split(group_size: int, explorer_budget: int) -> tuple[int, int]:
    """(learner probe, open slots) of a group of `group_size` whose schedule allows `explorer_budget`
    (G_w) explorer samples: the slots are min(G_w, floor(G / 2)), the probe the rest of the group."""
    if group_size < 1 or explorer_budget < 0:
        raise ValueError(f"group_size={group_size}, explorer_budget={explorer_budget}: need G >= 1 and G_w >= 0")
    slots = min(explorer_budget, group_size // 2)
    return group_size - slots, slots


def adaptive_explorer_counts(learner_rewards: Tensor, prompt_index: Tensor, num_prompts: int,
                             budget: int) -> Tensor:
    """Return [num_prompts] long: explorer samples for each prompt under adaptive allocation.

    learner_rewards: [N] float, the rewards of the learner's probe; prompt_index: [N] long in
    0..num_prompts-1, each sample's prompt. A prompt whose learner rewards are all equal (compared exactly,
    as GRPO's zero-variance groups) gets `budget` (the step's open slots); a prompt whose rewards differ gets 0,
    and so does a prompt with no learner sample (one the engine dropped: there is nothing to train on).
    """
    if learner_rewards.shape != prompt_index.shape or learner_rewards.dim() != 1:
        raise ValueError(f"learner_rewards {tuple(learner_rewards.shape)} and prompt_index "
                         f"{tuple(prompt_index.shape)} must be 1-D of the same length")
    if budget < 0:
        raise ValueError(f"budget={budget}: must be >= 0 (explorer samples per prompt)")
    has_samples = torch.zeros(num_prompts, dtype=torch.bool)  # [P]
    has_signal = torch.zeros(num_prompts, dtype=torch.bool)  # [P]
    if learner_rewards.numel():
        has_samples[prompt_index] = True
        differs = dynamic_sampling_mask(learner_rewards, prompt_index)  # [N] True where the prompt's rewards differ
        has_signal[prompt_index[differs]] = True
    return torch.where(has_samples & ~has_signal, budget, 0).long()  # [P]


def explorer_usage(is_explorer: Tensor, group_index: Tensor) -> tuple[float, int]:
    """(explorer share of the samples, number of groups holding an explorer sample) of a batch.

    is_explorer: [N] bool; group_index: [N] long. The share is the one actually used, below the schedule's
    alpha under adaptive allocation; each prompt has at most one group with explorer samples in either
    group mode, so the count is the prompts that got explorer samples.
    """
    if not is_explorer.numel():
        return 0.0, 0
    return float(is_explorer.float().mean()), int(group_index[is_explorer].unique().numel())
