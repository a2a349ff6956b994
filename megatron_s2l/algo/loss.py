"""The GRPO policy loss: clipped surrogate, KL to a reference, entropy bonus, importance correction.

Per response token t of sequence b (all [B, T]):

    ratio    = exp(logp - old)                                  the PPO ratio pi_theta / pi_old
    pg       = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    pg       = min(pg, -A dual_clip)          where A < 0       (dual clip, optional)
    pg      *= w                                                importance correction (below)
    loss_t   = pg + kl_coef * KL(logp, ref) - entropy_coef * H

Importance correction is against the behaviour policy that sampled the token (the explorer for
explorer tokens, the inference engine for learner tokens), with rho = exp(old - behaviour): TIS uses
w = min(rho, tis_cap); IcePop uses w = 1 where icepop_low <= rho <= icepop_high, else 0. Both are
detached (they reweight the gradient, they are not optimised) and touch only the policy term.

Aggregation uses totals over the whole optimizer mini-batch (all micro-batches, all DP ranks), so
the losses of its micro-batches *sum* to the mini-batch objective and gradients accumulate by sum:

    token-mean               sum_{b,t} loss_t / num_tokens
    seq-mean-token-mean      sum_b (mean_t loss_t) / num_sequences
    seq-mean-token-sum-norm  sum_{b,t} loss_t / (max_response_len * num_sequences)     (Dr.GRPO)

Metrics follow the same rule: every value is a sum (or, for keys ending in `_max`, a maximum) that is
combined exactly across micro-batches and ranks with `accumulate_metrics` / `all_reduce_metrics`,
and only `finalize_metrics` divides sums by their counts.
"""

from __future__ import annotations

from typing import Optional, get_args

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_s2l.constants import ImportanceCorrection, KLType, LossAggregation

KL_TYPES, AGGREGATIONS = get_args(KLType), get_args(LossAggregation)
IMPORTANCE_CORRECTIONS = get_args(ImportanceCorrection)

# exp() of a log-ratio beyond this overflows fp32 gradients; verl clamps at the same bound.
_LOG_RATIO_CLAMP = 20.0
_LOW_VAR_KL_CLAMP = 10.0

# Means reported by `finalize_metrics`: name -> (sum key, count key).
METRIC_MEANS = {
    "clip_frac_low": ("clip_low_tokens", "tokens"),
    "clip_frac_high": ("clip_high_tokens", "tokens"),
    "dual_clip_frac": ("dual_clip_tokens", "tokens"),
    "ratio_mean": ("ratio_sum", "tokens"),
    "approx_kl": ("approx_kl_sum", "tokens"),
    "entropy": ("entropy_sum", "tokens"),
    "kl": ("kl_sum", "tokens"),
    "explorer_advantage": ("explorer_advantage_sum", "explorer_sequences"),
    "learner_advantage": ("learner_advantage_sum", "learner_sequences"),
    "is_weight_mean": ("is_weight_sum", "tokens"),
    "is_rho_mean": ("is_rho_sum", "tokens"),
    "is_corrected_frac": ("is_corrected_tokens", "tokens"),
    "token_mult_prob_error": ("prob_error_sum", "learner_tokens"),
}


def kl_divergence(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str) -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens (verl's definitions).

    k1: logp - ref. k3: exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0). low_var_kl: k3 with the
    log-ratio clamped to [-20, 20] and the result clamped to [-10, 10], robust to outlier tokens.
    """
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type={kl_type!r}: accepted values are {list(KL_TYPES)}")
    log_ratio = ref_logprobs - logprobs  # [B, T]
    if kl_type == "low_var_kl":
        log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    kl = log_ratio.exp() - log_ratio - 1  # [B, T]
    return kl.clamp(-_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP) if kl_type == "low_var_kl" else kl


def _check_options(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, aggregation,
                   importance_correction, tis_cap, icepop_low, icepop_high, ref_logprobs, behaviour_logprobs,
                   entropy) -> None:
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type={kl_type!r}: accepted values are {list(KL_TYPES)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: accepted values are {list(AGGREGATIONS)}")
    if importance_correction not in IMPORTANCE_CORRECTIONS:
        raise ValueError(f"importance_correction={importance_correction!r}: accepted values are "
                         f"{list(IMPORTANCE_CORRECTIONS)}")
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: need 0 <= clip_low < 1 and clip_high >= 0")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip={dual_clip}: must be > 1 or None (off)")
    if importance_correction == "tis" and tis_cap <= 0:
        raise ValueError(f"tis_cap={tis_cap}: must be > 0")
    if importance_correction == "icepop" and not 0 <= icepop_low < 1 < icepop_high:
        raise ValueError(f"icepop_low={icepop_low}, icepop_high={icepop_high}: need 0 <= low < 1 < high")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs: run the learner with a reference model, or "
                         f"set loss.kl_coef=0")
    if importance_correction != "none" and behaviour_logprobs is None:
        raise ValueError(f"importance_correction={importance_correction!r} needs behaviour_logprobs (the "
                         f"sampling engine's per-token log-probs), or set loss.importance_correction='none'")
    if entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy: compute log-probs with "
                         f"with_entropy=True, or set loss.entropy_coef=0")


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str, num_tokens: int, num_sequences: int,
               max_response_len: int) -> Tensor:
    """Reduce masked per-token values [B, T] to this micro-batch's share of the mini-batch objective."""
    masked = per_token * mask  # [B, T]
    if aggregation == "token-mean":
        return masked.sum() / num_tokens
    if aggregation == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1).clamp(min=1)  # [B] a sequence without tokens contributes 0
        return (masked.sum(dim=-1) / lengths).sum() / num_sequences
    return masked.sum() / (max_response_len * num_sequences)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, num_tokens: int,
              num_sequences: int, max_response_len: int, ref_logprobs: Optional[Tensor] = None,
              behaviour_logprobs: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
              is_explorer: Optional[Tensor] = None, clip_low: float, clip_high: float,
              dual_clip: Optional[float], kl_coef: float, kl_type: str, entropy_coef: float, aggregation: str,
              importance_correction: str, tis_cap: float, icepop_low: float,
              icepop_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Return this micro-batch's GRPO loss (0-dim, differentiable) and its metrics.

    logprobs: [B, T] under the policy being optimised; old_logprobs / ref_logprobs /
    behaviour_logprobs: [B, T] of the policy before this step's updates / the frozen reference / the
    policy that sampled each token; entropy: [B, T]; advantages: [B] one per sequence; mask: [B, T]
    bool, True on response tokens; is_explorer: [B] bool (None: all learner). num_tokens and
    num_sequences count the whole optimizer mini-batch (every micro-batch on every DP rank), so
    micro-batch losses sum to the mini-batch loss; max_response_len is Dr.GRPO's constant length.
    The keyword options are the fields of `megatron_s2l.config.LossConfig` (see the module docstring).
    Metrics: 0-dim detached tensors, sums and `_max` maxima (combine with `accumulate_metrics`,
    `all_reduce_metrics`, then `finalize_metrics`).
    """
    _check_options(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, aggregation,
                   importance_correction, tis_cap, icepop_low, icepop_high, ref_logprobs, behaviour_logprobs,
                   entropy)
    if num_tokens < 1 or num_sequences < 1 or max_response_len < 1:
        raise ValueError(f"num_tokens={num_tokens}, num_sequences={num_sequences}, max_response_len="
                         f"{max_response_len}: each must be >= 1 (mini-batch totals)")
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape \
            or advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, mask "
                         f"{tuple(mask.shape)}, advantages {tuple(advantages.shape)}: expected [B, T] x 3 and [B]")
    mask_f = mask.float()  # [B, T]
    adv = advantages.float().unsqueeze(-1)  # [B, 1]
    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    ratio = log_ratio.exp()  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)  # [B, T]
    pg = torch.maximum(unclipped, clipped)  # [B, T]
    metrics = {}
    if dual_clip is not None:
        bound = -adv * dual_clip  # [B, 1] positive where A < 0
        dual = (adv < 0) & (pg > bound)  # [B, T]
        pg = torch.where(dual, bound.expand_as(pg), pg)  # [B, T]
        metrics["dual_clip_tokens"] = (dual & mask).sum()

    weight = None
    if behaviour_logprobs is not None:
        rho = (old_logprobs - behaviour_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp().detach()
        if importance_correction == "tis":
            weight = rho.clamp(max=tis_cap)  # [B, T]
            corrected = rho > tis_cap  # [B, T]
        elif importance_correction == "icepop":
            corrected = (rho < icepop_low) | (rho > icepop_high)  # [B, T]
            weight = (~corrected).float()  # [B, T]
        else:
            corrected = torch.zeros_like(mask)  # [B, T]
        metrics["is_rho_sum"] = (rho * mask_f).sum()
        metrics["is_rho_max"] = (rho * mask_f).max() if rho.numel() else rho.new_zeros(())
        metrics["is_corrected_tokens"] = (corrected & mask).sum()
        if weight is not None:
            metrics["is_weight_sum"] = (weight * mask_f).sum()
            pg = pg * weight

    per_token = pg  # [B, T]
    norm = dict(mask=mask_f, aggregation=aggregation, num_tokens=num_tokens, num_sequences=num_sequences,
                max_response_len=max_response_len)
    metrics["pg_loss"] = _aggregate(pg, **norm).detach()
    if ref_logprobs is not None:
        kl = kl_divergence(logprobs, ref_logprobs, kl_type)  # [B, T]
        per_token = per_token + kl_coef * kl
        metrics["kl_sum"] = (kl * mask_f).sum()
        metrics["kl_loss"] = _aggregate(kl, **norm).detach()
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        metrics["entropy_sum"] = (entropy * mask_f).sum()
    loss = _aggregate(per_token, **norm)

    metrics.update(_policy_metrics(ratio, log_ratio, adv, mask, mask_f, clip_low, clip_high))
    metrics.update(_source_metrics(advantages, mask_f, is_explorer, old_logprobs, behaviour_logprobs))
    metrics["loss"] = loss.detach()
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def _policy_metrics(ratio, log_ratio, adv, mask, mask_f, clip_low, clip_high) -> dict[str, Tensor]:
    """Clip counts (tokens whose gradient the clip removes), ratio stats, approx KL to old (k1)."""
    low = (adv < 0) & (ratio < 1 - clip_low)  # [B, T]
    high = (adv > 0) & (ratio > 1 + clip_high)  # [B, T]
    return {
        "tokens": mask_f.sum(),
        "clip_low_tokens": (low & mask).sum(),
        "clip_high_tokens": (high & mask).sum(),
        "ratio_sum": (ratio * mask_f).sum(),
        "ratio_max": (ratio * mask_f).max() if ratio.numel() else ratio.new_zeros(()),  # ratio > 0
        "approx_kl_sum": (-log_ratio * mask_f).sum(),
    }


def _source_metrics(advantages, mask_f, is_explorer, old_logprobs, behaviour_logprobs) -> dict[str, Tensor]:
    """Per-source token counts and advantage sums; NeMo-RL's token_mult_prob_error on learner tokens."""
    explorer = torch.zeros_like(advantages, dtype=torch.bool) if is_explorer is None else is_explorer  # [B]
    tokens = mask_f.sum(dim=-1)  # [B]
    out = {}
    for name, rows in (("explorer", explorer), ("learner", ~explorer)):
        out[f"{name}_tokens"] = tokens[rows].sum()
        out[f"{name}_sequences"] = rows.sum()
        out[f"{name}_advantage_sum"] = advantages.float()[rows].sum()
    if behaviour_logprobs is not None:
        # exp(|old - behaviour|) is 1 where trainer and engine agree; explorer tokens differ by design.
        error = (old_logprobs - behaviour_logprobs).abs().exp() * mask_f  # [B, T]
        out["prob_error_sum"] = error[~explorer].sum()
    return out


def accumulate_metrics(total: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    """Combine two metric dicts exactly: keys ending in `_max` by maximum, every other key by sum."""
    out = dict(total)
    for key, value in new.items():
        if key not in out:
            out[key] = value
        elif key.endswith("_max"):
            out[key] = torch.maximum(out[key], value)
        else:
            out[key] = out[key] + value
    return out


def all_reduce_metrics(metrics: dict[str, Tensor], group: Optional[dist.ProcessGroup] = None) -> dict[str, Tensor]:
    """Combine metric dicts across the ranks of `group` (sums and maxima, as `accumulate_metrics`).

    Every rank must pass the same keys (grpo_loss gives the same keys for the same options). A group of
    one rank returns `metrics` without communicating (on CPU a gloo call costs a thread hand-off).
    """
    if dist.get_world_size(group) == 1:
        return metrics
    keys = sorted(metrics)
    sums = [k for k in keys if not k.endswith("_max")]
    maxes = [k for k in keys if k.endswith("_max")]
    out = {}
    for names, op in ((sums, dist.ReduceOp.SUM), (maxes, dist.ReduceOp.MAX)):
        if names:
            stacked = torch.stack([metrics[k].float() for k in names])  # [K]
            dist.all_reduce(stacked, op=op, group=group)
            out.update(zip(names, stacked.unbind()))
    return out


def finalize_metrics(metrics: dict[str, Tensor]) -> dict[str, float]:
    """Turn combined sums into the reported values: the means of METRIC_MEANS, then every loss, count and
    maximum as is. A mean over nothing (no learner tokens in an explorer-only step) is left out, as
    `source_means` does: a 0 would read as a measurement (a prob error of 0 cannot happen)."""
    out = {}
    for name, (total, count) in METRIC_MEANS.items():
        if total in metrics and float(metrics[count]):
            out[name] = float(metrics[total]) / float(metrics[count])
    sums = {total for total, _ in METRIC_MEANS.values()}
    out.update({k: float(v) for k, v in metrics.items() if k not in sums})
    return out
