"""Per-prompt explorer allocation: explorer samples only where the learner's own group carries no signal.

The paper gives every prompt the same G_w = ceil(alpha_i * G) explorer samples. Under `adaptive`
allocation the learner draws its full group of G first; a prompt whose learner rewards differ already has
a GRPO gradient and trains on those alone, while a prompt whose learner rewards are all equal (all fail,
or all succeed) has none and gets the step's G_w explorer samples on top of its G learner ones. The
schedule's annealing still bounds the explorer: after T_mix no prompt gets any.

What follows from it (the mixer's docstring has the rollout side): a group is G or G + G_w samples; the
learner's rollouts are GRPO's and the explorer's come on top, for the prompts without signal only. The
explorer's samples are off-policy exactly as in fixed allocation, so TIS/IcePop weight them the same way;
DAPO dynamic sampling afterwards drops the groups that stay all-equal even with explorer samples. Separate
groups are refused at start-up: the explorer phase would have to be rolled out before the learner's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_s2l.algo.advantages import dynamic_sampling_mask


def adaptive_explorer_counts(learner_rewards: Tensor, prompt_index: Tensor, num_prompts: int,
                             budget: int) -> Tensor:
    """Return [num_prompts] long: explorer samples for each prompt under adaptive allocation.

    learner_rewards: [N] float, the rewards of the learner samples drawn so far; prompt_index: [N] long in
    0..num_prompts-1, each sample's prompt. A prompt whose learner rewards are all equal (compared exactly,
    as GRPO's zero-variance groups) gets `budget` (the step's G_w); a prompt whose rewards differ gets 0,
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
