"""The Learner with Transformer Engine layers (BF16, FP8) against the local-spec FP32 Learner, on one GPU.

Both sides start from the same tiny random HF checkpoint (tests/tiny_models.py, through
`Learner.load_hf`), so any difference is numerical. The reference is the local-spec Learner in FP32,
whose equality with a plain-torch single process is shown on CPU by tests/distributed/test_learner.py.

Sizes satisfy TE's FP8 GEMM constraints (every GEMM dimension a multiple of 16): hidden 256, FFN 768,
head_dim 64, and every micro-batch spans 4 x 64 tokens (each row is scored up to its last position).
Single GPU, TP=1: a TP=2 run needs two GPUs (run_ranks with NCCL cannot share one device).

Tolerances (first estimates; each test prints its measured errors, run with `-s` to record them):
- TE FP32 (the Learner's own precision): the same math through other kernels; TE's GEMMs and
  attention may use TF32 (10-bit mantissa, ~1e-3 relative): log-probs 1e-2 absolute, gradients 2e-2
  relative (norm of the difference over the norm of the reference, per tensor).
- TE BF16 parameters (8-bit mantissa, ~4e-3 relative per rounding, accumulated over 2 layers): log-probs
  0.1 absolute and 2e-2 mean, gradients 8e-2 relative. Basis: the local spec in BF16 on CPU gives 4.2e-2,
  9.1e-3 and 3.3e-2 on this model and batch (measured 2026-11-25).
- FP8 (E4M3 forward, E5M2 gradients in the hybrid format: 3- and 2-bit mantissas) on the transformer
  layers' GEMMs only: log-probs 0.3 absolute and 6e-2 mean, gradients 0.35 relative and a cosine
  similarity >= 0.95 per tensor. Delayed scaling scales by the amax history, which is empty on the
  first pass: the test runs one forward first so that the compared pass has real scales.
The reference log-probs must spread (std > 0.2 nats) for these absolute bounds to mean anything.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_s2l.types import TrainBatch
from tests.tiny_models import write_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.te]

ROWS, LENGTH, GROUPS = 8, 65, 2  # inputs of 64 tokens; 2 groups of 4 -> one optimizer step, two micro-batches
OPTIM = OptimConfig(lr=1e-4, clip_grad=0.0, mini_batch_prompts=GROUPS, micro_batch_size=4, logprob_chunk_size=0)
LOSS = LossConfig(kl_coef=0.0, entropy_coef=0.01)
SEED = 3
# the docstring's tolerances per precision (compare()'s keyword bounds)
FP32_BOUNDS = dict(logprob_max=1e-2, logprob_mean=2e-3, grad_rel=2e-2, grad_cos=0.999)
FP8_BOUNDS = dict(logprob_max=0.3, logprob_mean=6e-2, grad_rel=0.35, grad_cos=0.95)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[ModelConfig, str]:
    """A 2-layer Qwen3-style checkpoint with FP8-friendly sizes, and its ModelConfig (local spec)."""
    from megatron_s2l.learner.hf_config import model_config_from_hf

    path = write_tiny_model(tmp_path_factory.mktemp("te") / "hf", vocab_size=1024, hidden_size=256,
                            intermediate_size=768, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                            init_std=0.05, seed=SEED)
    return model_config_from_hf(path), str(path)


def make_batch(vocab_size: int) -> TrainBatch:
    """8 rows of 65 tokens: prompts of 4-11 tokens, each response runs to the end (T = 64 per micro-batch)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab_size, (ROWS, LENGTH), generator=g)  # [B, L]
    mask = torch.zeros(ROWS, LENGTH - 1, dtype=torch.bool)  # [B, L-1]
    for row in range(ROWS):
        mask[row, 3 + row:] = True
    return TrainBatch(tokens=tokens, response_mask=mask,
                      behaviour_logprobs=-torch.rand(ROWS, LENGTH - 1, generator=g) * mask,  # [B, L-1]
                      is_explorer=torch.arange(ROWS) % 2 == 0,
                      group_index=torch.arange(ROWS) // (ROWS // GROUPS), rewards=torch.zeros(ROWS),
                      advantages=torch.randn(ROWS, generator=g))


def learner(model: ModelConfig, hf_path: str, fp8: FP8Config = FP8Config()):
    """A TP=1 Learner loaded from the HF checkpoint at `hf_path`."""
    from megatron_s2l.learner.safetensors_io import read_hf_state
    from megatron_s2l.learner.step import Learner

    built = Learner(model, ParallelConfig(), OPTIM, LOSS, fp8, seed=SEED, with_reference=False)
    built.load_hf(read_hf_state(hf_path))
    return built


def local_names(model_chunk) -> dict[str, torch.nn.Parameter]:
    """Parameters by local-spec name (TE fuses the pre-norms into the next linear as `layer_norm_weight`)."""
    from megatron_s2l.learner.hf_mapping import TE_NAMES

    renames = {te: local for local, te in TE_NAMES.items()}
    params = {}
    for name, param in model_chunk.named_parameters():
        for te_suffix, local_suffix in renames.items():
            if name.endswith(te_suffix):
                name = name.removesuffix(te_suffix) + local_suffix
        params[name] = param
    return params


def gradients(trained) -> dict[str, torch.Tensor]:
    """The reduced gradients of the last optimizer step (DDP's fp32 main_grad), by local-spec name."""
    return {name: param.main_grad.detach().float().cpu() for name, param in local_names(trained.model_chunks[0]).items()}


@pytest.fixture(scope="module")
def reference(hf_model) -> dict:
    """Local-spec FP32 Learner: log-probs, one GRPO step's metrics and gradients."""
    model, path = hf_model
    batch = make_batch(model.vocab_size)
    ref = learner(model, path)
    logprobs = ref.logprobs(batch)  # [B, L-1]
    spread = logprobs[batch.response_mask].std().item()
    assert spread > 0.2, f"reference log-probs barely vary (std {spread:.3f}): the comparison would be vacuous"
    metrics = ref.train(dataclasses.replace(batch, old_logprobs=logprobs))
    grads = gradients(ref)
    assert all(grad.norm() > 0 for grad in grads.values()), "a reference gradient is zero: nothing to compare"
    return {"batch": batch, "logprobs": logprobs, "metrics": metrics, "grads": grads}


def compare(name: str, reference: dict, model: ModelConfig, path: str, fp8: FP8Config, *, warm_up: bool,
            logprob_max: float, logprob_mean: float, grad_rel: float, grad_cos: float) -> None:
    """Run a TE Learner on the reference batch and check log-probs, loss, grad norm and every gradient."""
    batch, mask = reference["batch"], reference["batch"].response_mask
    te = learner(dataclasses.replace(model, layer_spec="te"), path, fp8)
    if warm_up:
        te.logprobs(batch)
    logprobs = te.logprobs(batch)  # [B, L-1]
    diff = (logprobs - reference["logprobs"])[mask].abs()
    # the same old log-probs on both sides: the objectives differ only through the policy's numerics
    metrics = te.train(dataclasses.replace(batch, old_logprobs=reference["logprobs"]))
    grads, errors = gradients(te), {}
    assert grads.keys() == reference["grads"].keys()
    for key, ref_grad in reference["grads"].items():
        rel = ((grads[key] - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12)).item()
        cos = torch.nn.functional.cosine_similarity(grads[key].flatten(), ref_grad.flatten(), dim=0).item()
        errors[key] = (rel, cos)
    worst_rel = max(errors.items(), key=lambda item: item[1][0])
    worst_cos = min(errors.items(), key=lambda item: item[1][1])
    print(f"\n{name}: log-probs max {diff.max():.3e} mean {diff.mean():.3e}; loss {metrics['loss']:.6f} vs "
          f"{reference['metrics']['loss']:.6f}; grad_norm {metrics['grad_norm']:.6f} vs "
          f"{reference['metrics']['grad_norm']:.6f}; worst grad rel {worst_rel}; worst cos {worst_cos}")
    assert diff.max() <= logprob_max and diff.mean() <= logprob_mean, (diff.max(), diff.mean())
    assert metrics["loss"] == pytest.approx(reference["metrics"]["loss"], rel=grad_rel, abs=1e-3)
    assert metrics["grad_norm"] == pytest.approx(reference["metrics"]["grad_norm"], rel=grad_rel)
    assert worst_rel[1][0] <= grad_rel and worst_cos[1][1] >= grad_cos, (worst_rel, worst_cos)


def test_te_fp32_learner_matches_local_spec(hf_model, reference):
    model, path = hf_model
    compare("TE FP32", reference, model, path, FP8Config(), warm_up=False, **FP32_BOUNDS)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed", "blockwise", "mxfp8"])
def test_te_fp8_learner_close_to_reference(hf_model, reference, recipe):
    major, minor = torch.cuda.get_device_capability()
    if recipe == "blockwise" and (major, minor) < (9, 0):
        pytest.skip(f"fp8.recipe='blockwise' needs compute capability >= 9.0 (Hopper); this GPU has {major}.{minor}")
    if recipe == "mxfp8" and major < 10:
        pytest.skip(f"fp8.recipe='mxfp8' needs compute capability >= 10.0 (Blackwell); this GPU has {major}.{minor}")
    model, path = hf_model
    compare(f"FP8 {recipe}", reference, model, path, FP8Config(enabled=True, recipe=recipe),
            warm_up=recipe == "delayed", **FP8_BOUNDS)


@pytest.mark.parametrize("recompute, fp8", [("selective", FP8Config()), ("full", FP8Config()),
                                            ("full", FP8Config(enabled=True, recipe="tensorwise"))],
                         ids=["selective", "full", "full-fp8"])
def test_te_learner_with_recomputation_keeps_its_bounds(hf_model, reference, recompute, fp8):
    """`learner.recompute` through TE layers (megatron-core's TE checkpointing under FP8) changes no math:
    the bounds of the same precision without recomputation hold (on CPU the step is bit-identical:
    tests/distributed/test_recompute.py)."""
    model, path = hf_model
    compare(f"TE {'FP8' if fp8.enabled else 'FP32'}, recompute {recompute}", reference,
            dataclasses.replace(model, recompute=recompute), path, fp8, warm_up=False,
            **(FP8_BOUNDS if fp8.enabled else FP32_BOUNDS))


def test_te_bf16_model_close_to_reference(hf_model, reference):
    """BF16 parameters through model.py (the Learner itself trains FP32 parameters): log-probs, loss, grads."""
    from megatron.core import parallel_state

    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
    from megatron_s2l.algo.loss import grpo_loss
    from megatron_s2l.learner.hf_weights import load_hf_weights
    from megatron_s2l.learner.model import build_model, transformer_config
    from megatron_s2l.learner.safetensors_io import read_hf_state

    model, path = hf_model
    te_model = dataclasses.replace(model, layer_spec="te")
    gpt = build_model(te_model, transformer_config(te_model, ParallelConfig(), params_dtype=torch.bfloat16))
    load_hf_weights([gpt], te_model, read_hf_state(path))
    batch, mask = reference["batch"], reference["batch"].response_mask.cuda()
    tokens = batch.tokens.cuda()
    inputs = tokens[:, :-1]  # [B, L-1]
    logits = gpt(inputs, torch.arange(inputs.shape[1], device="cuda").expand_as(inputs), None)  # [B, L-1, V] bf16
    logprobs, entropy = vocab_parallel_logprobs(logits, tokens[:, 1:], with_entropy=True,
                                                group=parallel_state.get_tensor_model_parallel_group())  # [B, L-1]
    diff = (logprobs.detach().cpu() - reference["logprobs"])[batch.response_mask].abs()
    loss, _ = grpo_loss(logprobs, reference["logprobs"].cuda(), batch.advantages.cuda(), mask,
                        num_tokens=int(mask.sum()), num_sequences=ROWS, max_response_len=int(mask.sum(1).max()),
                        behaviour_logprobs=batch.behaviour_logprobs.cuda(), entropy=entropy,
                        is_explorer=batch.is_explorer.cuda(), **dataclasses.asdict(LOSS))
    loss.backward()
    grads = {name: param.grad.float().cpu() for name, param in local_names(gpt).items()}
    rel = {key: ((grads[key] - ref).norm() / ref.norm().clamp_min(1e-12)).item()
           for key, ref in reference["grads"].items()}
    worst = max(rel.items(), key=lambda item: item[1])
    print(f"\nTE BF16: log-probs max {diff.max():.3e} mean {diff.mean():.3e}; loss {loss.item():.6f} vs "
          f"{reference['metrics']['loss']:.6f}; worst grad rel {worst}")
    assert diff.max() <= 0.1 and diff.mean() <= 2e-2, (diff.max(), diff.mean())
    assert loss.item() == pytest.approx(reference["metrics"]["loss"], rel=8e-2, abs=1e-3)
    assert worst[1] <= 8e-2, worst
