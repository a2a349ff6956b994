"""The GRPO loss, its gradients and metrics against values worked out by hand."""

import dataclasses
import inspect
import math

import pytest
import torch

from megatron_s2l.algo.loss import (accumulate_metrics, finalize_metrics, grpo_loss, kl_divergence)
from megatron_s2l.config import LossConfig

# Plain PPO: no KL, no entropy, no correction; each test switches on what it checks.
PLAIN = dataclasses.asdict(LossConfig()) | dict(kl_coef=0.0)


def _loss(logprobs, old, advantages, mask, **kwargs):
    """grpo_loss with single-batch totals unless given; returns loss, metrics, d loss / d logprobs."""
    logprobs = logprobs.clone().requires_grad_()
    totals = dict(num_tokens=int(mask.sum()), num_sequences=mask.shape[0], max_response_len=mask.shape[1])
    options = PLAIN | totals | kwargs
    loss, metrics = grpo_loss(logprobs, old, advantages, mask, **options)
    loss.backward()
    return loss.item(), {k: v.item() for k, v in metrics.items()}, logprobs.grad


def _from_ratios(ratios):
    """Log-probs whose ratio to an old policy of zeros is `ratios`."""
    return torch.tensor(ratios).log(), torch.zeros(len(ratios), len(ratios[0]))


def test_keywords_are_the_loss_config_fields():
    params = inspect.signature(grpo_loss).parameters
    options = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    assert options - {"num_tokens", "num_sequences", "max_response_len"} == {f.name for f in
                                                                             dataclasses.fields(LossConfig)}


def test_clipped_surrogate_both_branches():
    # seq 0, A = +1, ratios 1.0, 1.5, 0.5: pg = -min(r, clip(r)) = -1, -1.2 (clip high, no grad), -0.5
    # seq 1, A = -2, ratios 1.1, 0.7, (1.3 masked): pg = max(2r, 2 clip(r)) = 2.2, 1.6 (clip low, no grad)
    logprobs, old = _from_ratios([[1.0, 1.5, 0.5], [1.1, 0.7, 1.3]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss, metrics, grad = _loss(logprobs, old, torch.tensor([1.0, -2.0]), mask)
    assert loss == pytest.approx((-1 - 1.2 - 0.5 + 2.2 + 1.6) / 5)
    # d pg / d logp = d pg / d r * r: -A r where not clipped, 0 where clipped; / 5 tokens
    expected = torch.tensor([[-1.0, 0.0, -0.5], [2.2, 0.0, 0.0]]) / 5
    torch.testing.assert_close(grad, expected)
    assert metrics["clip_low_tokens"] == 1 and metrics["clip_high_tokens"] == 1 and metrics["tokens"] == 5
    assert metrics["ratio_sum"] == pytest.approx(4.8) and metrics["ratio_max"] == pytest.approx(1.5)
    assert metrics["approx_kl_sum"] == pytest.approx(-math.log(1.5 * 0.5 * 1.1 * 0.7), rel=1e-6)


def test_clip_higher():
    logprobs, old = _from_ratios([[1.25, 1.4]])
    loss, metrics, grad = _loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool),
                                clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-(1.25 + 1.28) / 2)  # 1.25 is inside [0.8, 1.28], 1.4 is clipped
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 2, 0.0]]))
    assert metrics["clip_high_tokens"] == 1


def test_dual_clip_bounds_negative_advantages():
    # A = -1, ratios 4 and 2, c = 3: pg = max(r, clip(r)) = 4, 2; dual clip min(pg, 3) = 3 (no grad), 2
    logprobs, old = _from_ratios([[4.0, 2.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, metrics, grad = _loss(logprobs, old, torch.tensor([-1.0]), mask, dual_clip=3.0)
    assert loss == pytest.approx(2.5) and metrics["dual_clip_tokens"] == 1
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0]]))
    loss, _, grad = _loss(logprobs, old, torch.tensor([-1.0]), mask)
    assert loss == pytest.approx(3.0)
    torch.testing.assert_close(grad, torch.tensor([[2.0, 1.0]]))
    # positive advantages are untouched by the dual clip
    loss, _, _ = _loss(logprobs, old, torch.tensor([1.0]), mask, dual_clip=3.0)
    assert loss == pytest.approx(-1.2)


def test_kl_estimators():
    logp = torch.tensor([[-1.0, -2.0, -1.0, -1.0]]).requires_grad_()
    ref = torch.tensor([[-1.5, -1.0, 14.0, -31.0]])  # ref - logp = -0.5, 1, 15, -30
    k1 = kl_divergence(logp, ref, "k1")
    k3 = kl_divergence(logp, ref, "k3")
    low = kl_divergence(logp, ref, "low_var_kl")
    torch.testing.assert_close(k1, torch.tensor([[0.5, -1.0, -15.0, 30.0]]))
    # exp(d) - d - 1: e^-0.5 - 0.5 = 0.1065307, e - 2 = 0.7182818, e^15 - 16, e^-30 + 29
    torch.testing.assert_close(k3, torch.tensor([[0.1065307, 0.7182818, math.exp(15) - 16, 29.0]]))
    # low_var_kl clamps the result to [-10, 10] (and the log-ratio to [-20, 20])
    torch.testing.assert_close(low, torch.tensor([[0.1065307, 0.7182818, 10.0, 10.0]]))
    (grad,) = torch.autograd.grad(low.sum(), logp)
    # d/d logp (exp(ref - logp) - (ref - logp) - 1) = 1 - exp(ref - logp); 0 where clamped
    torch.testing.assert_close(grad, torch.tensor([[1 - math.exp(-0.5), 1 - math.e, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="kl_type='k2'"):
        kl_divergence(logp, ref, "k2")


@pytest.mark.parametrize("kl_type, per_token", [("k1", [0.5, -1.0]), ("k3", [0.1065307, 0.7182818]),
                                                ("low_var_kl", [0.1065307, 0.7182818])])
def test_kl_term_in_the_loss(kl_type, per_token):
    logp = torch.tensor([[-1.0, -2.0]])
    loss, metrics, _ = _loss(logp, logp.clone(), torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool),
                             ref_logprobs=torch.tensor([[-1.5, -1.0]]), kl_coef=0.1, kl_type=kl_type)
    assert loss == pytest.approx(0.1 * sum(per_token) / 2, rel=1e-6)
    assert metrics["kl_sum"] == pytest.approx(sum(per_token), rel=1e-6)


def test_entropy_bonus():
    entropy = torch.tensor([[2.0, 4.0]]).requires_grad_()
    logp = torch.zeros(1, 2)
    loss, metrics = grpo_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2, dtype=torch.bool), num_tokens=2,
                              num_sequences=1, max_response_len=2, entropy=entropy, **PLAIN | dict(entropy_coef=0.01))
    loss.backward()
    assert loss.item() == pytest.approx(-0.03) and metrics["entropy_sum"].item() == 6.0
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.005, -0.005]]))


@pytest.mark.parametrize("aggregation, expected", [
    ("token-mean", (-3 + 2) / 4),  # every token counts once
    ("seq-mean-token-mean", (-1 + 2) / 2),  # mean per sequence, then over sequences
    ("seq-mean-token-sum-norm", (-3 + 2) / (4 * 2)),  # Dr.GRPO: token sums / (max_response_len * sequences)
])
def test_aggregations(aggregation, expected):
    # ratio 1: pg = -A per token; seq 0 (A=1) has 3 tokens, seq 1 (A=-2) one.
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss, _, _ = _loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1.0, -2.0]), mask,
                       aggregation=aggregation)
    assert loss == pytest.approx(expected)


def _random_batch(seed, batch=6, seq=5):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq, generator=gen) * 3
    return dict(logprobs=old + 0.3 * torch.randn(batch, seq, generator=gen), old=old,
                advantages=torch.randn(batch, generator=gen), mask=torch.rand(batch, seq, generator=gen) > 0.3,
                ref=old + 0.2 * torch.randn(batch, seq, generator=gen),
                behaviour=old + 0.5 * torch.randn(batch, seq, generator=gen),
                entropy=torch.rand(batch, seq, generator=gen) * 2,
                is_explorer=torch.tensor([True, False] * (batch // 2)))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("correction", ["none", "tis", "icepop"])
def test_micro_batches_sum_to_the_mini_batch(aggregation, correction):
    data = _random_batch(seed=7)
    options = PLAIN | dict(aggregation=aggregation, importance_correction=correction, kl_coef=0.05,
                           entropy_coef=0.01, dual_clip=3.0, num_tokens=int(data["mask"].sum()),
                           num_sequences=6, max_response_len=5)

    def run(rows):
        logprobs = data["logprobs"][rows].clone().requires_grad_()
        loss, metrics = grpo_loss(logprobs, data["old"][rows], data["advantages"][rows], data["mask"][rows],
                                  ref_logprobs=data["ref"][rows], behaviour_logprobs=data["behaviour"][rows],
                                  entropy=data["entropy"][rows], is_explorer=data["is_explorer"][rows], **options)
        loss.backward()
        return loss, metrics, logprobs.grad

    full_loss, full_metrics, full_grad = run(slice(0, 6))
    loss_a, metrics_a, grad_a = run(slice(0, 2))
    loss_b, metrics_b, grad_b = run(slice(2, 6))
    torch.testing.assert_close(loss_a + loss_b, full_loss)
    torch.testing.assert_close(torch.cat([grad_a, grad_b]), full_grad)
    combined = finalize_metrics(accumulate_metrics(metrics_a, metrics_b))
    assert combined == pytest.approx(finalize_metrics(full_metrics), rel=1e-5, abs=1e-6)


def test_tis_weights_are_capped_and_detached():
    # rho = exp(old - behaviour) = 1, 3, 0.5; cap 2 -> w = 1, 2, 0.5; A = 1, ratio 1: pg = -w
    old = torch.zeros(1, 3)
    behaviour = torch.tensor([[0.0, -math.log(3), math.log(2)]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics, grad = _loss(old.clone(), old, torch.tensor([1.0]), mask, behaviour_logprobs=behaviour,
                                importance_correction="tis", tis_cap=2.0)
    assert loss == pytest.approx(-3.5 / 3)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -2.0, -0.5]]) / 3)
    assert metrics["is_corrected_tokens"] == 1 and metrics["is_weight_sum"] == pytest.approx(3.5)
    assert metrics["is_rho_sum"] == pytest.approx(4.5) and metrics["is_rho_max"] == pytest.approx(3.0)


def test_icepop_masks_tokens_outside_the_band():
    # rho = 1, 3, 0.5 with band [0.5, 2]: the token with rho 3 is masked, 0.5 is kept (inclusive)
    old = torch.zeros(1, 3)
    behaviour = torch.tensor([[0.0, -math.log(3), math.log(2)]])
    loss, metrics, grad = _loss(old.clone(), old, torch.tensor([1.0]), torch.ones(1, 3, dtype=torch.bool),
                                behaviour_logprobs=behaviour, importance_correction="icepop", icepop_low=0.5,
                                icepop_high=2.0)
    assert loss == pytest.approx(-2 / 3) and metrics["is_corrected_tokens"] == 1
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0, -1.0]]) / 3)


def test_correction_is_off_by_default_but_mismatch_is_measured():
    old = torch.zeros(2, 2)
    behaviour = torch.tensor([[-0.1, 0.2], [-1.0, 1.0]])
    loss, metrics, _ = _loss(old.clone(), old, torch.tensor([1.0, 1.0]), torch.ones(2, 2, dtype=torch.bool),
                             behaviour_logprobs=behaviour, is_explorer=torch.tensor([False, True]))
    assert loss == pytest.approx(-1.0) and "is_weight_sum" not in metrics
    # token_mult_prob_error over the learner's own tokens: exp(|old - behaviour|) = e^0.1, e^0.2
    summary = finalize_metrics(accumulate_metrics({}, {k: torch.tensor(v) for k, v in metrics.items()}))
    assert summary["token_mult_prob_error"] == pytest.approx((math.exp(0.1) + math.exp(0.2)) / 2, rel=1e-6)
    assert summary["is_rho_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.2) + math.e + math.exp(-1)) / 4,
                                                   rel=1e-6)


def test_per_source_metrics():
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    _, metrics, _ = _loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([0.5, -1.0, 2.0]), mask,
                          is_explorer=torch.tensor([True, False, True]))
    assert metrics["explorer_tokens"] == 5 and metrics["learner_tokens"] == 1
    summary = finalize_metrics({k: torch.tensor(v) for k, v in metrics.items()})
    assert summary["explorer_advantage"] == pytest.approx(1.25) and summary["learner_advantage"] == -1.0


def test_means_over_no_learner_tokens_are_left_out():
    # An explorer-only step (alpha = 1): no learner tokens, so no trainer/engine mismatch to report.
    old = torch.zeros(2, 2)
    _, metrics, _ = _loss(old.clone(), old, torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool),
                          behaviour_logprobs=torch.full((2, 2), -0.5), is_explorer=torch.tensor([True, True]))
    summary = finalize_metrics({k: torch.tensor(v) for k, v in metrics.items()})
    assert "token_mult_prob_error" not in summary and "learner_advantage" not in summary
    assert summary["explorer_advantage"] == 0.0 and summary["learner_tokens"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_coef=0.1), "kl_coef=0.1 needs ref_logprobs"),
    (dict(importance_correction="tis"), "needs behaviour_logprobs"),
    (dict(entropy_coef=0.1), "entropy_coef=0.1 needs"),
    (dict(aggregation="sum"), "aggregation='sum'.*token-mean"),
    (dict(kl_type="k2"), "kl_type='k2'"),
    (dict(clip_low=1.0), "clip_low=1.0"),
    (dict(dual_clip=0.5), "dual_clip=0.5"),
    (dict(num_tokens=0), "num_tokens=0"),
])
def test_bad_options_name_the_field(kwargs, match):
    logp = torch.zeros(1, 2)
    options = PLAIN | dict(num_tokens=2, num_sequences=1, max_response_len=2) | kwargs
    with pytest.raises(ValueError, match=match):
        grpo_loss(logp, logp, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), **options)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"expected \[B, T\] x 3 and \[B\]"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2), torch.ones(1, 2, dtype=torch.bool),
                  num_tokens=2, num_sequences=1, max_response_len=2, **PLAIN)
