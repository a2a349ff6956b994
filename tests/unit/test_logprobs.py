"""Vocab-parallel log-probs and entropy on one shard, against plain torch log_softmax on full logits."""

import pytest
import torch

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs


def reference(logits, targets):
    """Log-probs and entropy from the full-vocabulary log_softmax (float64)."""
    logsm = logits.double().log_softmax(-1)  # [B, T, V]
    return logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def _inputs(dtype=torch.float32, batch=3, seq=7, vocab=50, scale=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    grads = torch.randn(2, batch, seq, generator=gen, dtype=torch.float64)  # upstream grads for logp, H
    return logits, targets, grads


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 21, 1000])
def test_values_and_gradients_match_log_softmax(chunk_size):
    logits, targets, (g_logp, g_entropy) = _inputs()
    ours = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(ours, targets, chunk_size=chunk_size, with_entropy=True)
    (logp * g_logp + entropy * g_entropy).sum().backward()

    ref = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference(ref, targets)
    (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (3, 7)
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=2e-6, rtol=1e-5)


def test_without_entropy_gradient_is_onehot_minus_softmax():
    logits, targets, (g_logp, _) = _inputs(seed=1)
    ours = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(ours, targets, chunk_size=5)
    assert entropy is None
    (logp * g_logp).sum().backward()
    probs = logits.double().softmax(-1)  # [B, T, V]
    onehot = torch.nn.functional.one_hot(targets, logits.shape[-1]).double()  # [B, T, V]
    torch.testing.assert_close(ours.grad.double(), (onehot - probs) * g_logp.unsqueeze(-1), atol=2e-6, rtol=1e-5)


def test_entropy_of_uniform_and_peaked_logits():
    uniform = torch.zeros(1, 2, 8)
    logp, entropy = vocab_parallel_logprobs(uniform, torch.tensor([[0, 7]]), with_entropy=True)
    torch.testing.assert_close(entropy, torch.full((1, 2), torch.log(torch.tensor(8.0)).item()))
    torch.testing.assert_close(logp, torch.full((1, 2), -torch.log(torch.tensor(8.0)).item()))
    peaked = torch.tensor([[[1000.0, 0.0, -1000.0]]])  # exp overflows without the max shift
    logp, entropy = vocab_parallel_logprobs(peaked, torch.tensor([[0]]), with_entropy=True)
    assert logp.item() == 0.0 and entropy.item() == pytest.approx(0.0, abs=1e-30)


def test_low_precision_logits_compute_in_fp32_and_return_grad_in_their_dtype():
    logits, targets, (g_logp, g_entropy) = _inputs(dtype=torch.bfloat16, vocab=300, seed=2)
    ours = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(ours, targets, chunk_size=8, with_entropy=True)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = logits.double().requires_grad_()  # the same bf16 values, exactly representable in float64
    ref_logp, ref_entropy = reference(ref, targets)
    (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()
    assert logp.dtype == torch.float32 and ours.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-2, rtol=1e-2)  # bf16 rounding of grads


def test_shard_offset_and_unowned_targets():
    logits, targets, _ = _inputs(vocab=10, seed=3)
    shifted, _ = vocab_parallel_logprobs(logits, targets + 100, vocab_start=100)
    plain, _ = vocab_parallel_logprobs(logits, targets)
    torch.testing.assert_close(shifted, plain)
    with pytest.raises(ValueError, match=r"targets \[10\].*not in the vocabulary"):
        vocab_parallel_logprobs(logits, torch.full_like(targets, 10))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab_parallel_logprobs(logits, targets, vocab_start=5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_padded_columns_are_outside_the_softmax(chunk_size):
    # 37 real ids padded to 48 columns; the padding holds large logits that would dominate a plain softmax.
    logits, targets, (g_logp, g_entropy) = _inputs(vocab=37, seed=5)
    padded = torch.cat([logits, torch.full((3, 7, 11), 30.0)], dim=-1).requires_grad_()  # [B, T, 48]
    logp, entropy = vocab_parallel_logprobs(padded, targets, vocab_size=37, chunk_size=chunk_size,
                                            with_entropy=True)
    (logp * g_logp + entropy * g_entropy).sum().backward()
    ref = logits.double().requires_grad_()
    ref_logp, ref_entropy = reference(ref, targets)
    (ref_logp * g_logp + ref_entropy * g_entropy).sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(padded.grad[..., :37].double(), ref.grad, atol=2e-6, rtol=1e-5)
    assert torch.equal(padded.grad[..., 37:], torch.zeros(3, 7, 11))
    with pytest.raises(ValueError, match=r"targets \[40\]: not in the vocabulary"):  # a padded id is no token
        vocab_parallel_logprobs(padded, torch.full_like(targets, 40), vocab_size=37)


def test_a_group_of_one_is_a_single_shard():
    # A real (size-1) process group must take the no-communication path, not a collective.
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        pytest.skip("needs torch.distributed and no process group in this test process")
    logits, targets, _ = _inputs(seed=4)
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = torch.distributed.new_group([0])
        grouped, _ = vocab_parallel_logprobs(logits, targets, group=group)
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(grouped.double(), reference(logits, targets)[0], atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=torch.zeros(2, 3)), r"expected logits \[B, T, V_local\]"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), r"targets \(2, 4\)"),
    (dict(targets=torch.zeros(2, 3)), "torch.long"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(vocab_start=-1), "vocab_start=-1"),
    (dict(vocab_size=0), "vocab_size=0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(logits=torch.zeros(2, 3, 5), targets=torch.zeros(2, 3, dtype=torch.long)) | kwargs
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprobs(args.pop("logits"), args.pop("targets"), **args)
