"""The Megatron-Core learner at TP=2, PP=2, TP2xPP2 and DP=2 against a single-process reference.

The reference is computed independently in one process from the TP=1 model: plain `log_softmax` on
full-vocabulary logits, `grpo_loss` on each whole mini-batch at once, `clip_grad_norm_` and
`torch.optim.AdamW`. It also writes the model as a model-only checkpoint, which every layout loads (so
the weights are identical, resharded by dist_checkpointing). One spawn per layout checks log-probs,
reference log-probs, the first step's loss, entropy, KL, gradient norm and every gradient shard, and
the five-call training curve (ten optimizer steps: five groups, two per mini-batch). The log-prob passes
cut 4-row micro-batches, training 3-row ones.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_s2l.types import TrainBatch
from tests.multiprocess import run_ranks

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=2, num_query_groups=2,
                    kv_channels=32, vocab_size=96, max_position_embeddings=64)
OPTIM = OptimConfig(lr=1e-2, clip_grad=1.0, mini_batch_prompts=2, micro_batch_size=3, logprob_micro_batch_size=4)
LOSS = LossConfig(kl_coef=0.05, kl_type="k3", entropy_coef=0.01)
GROUP_SIZES = (2, 3, 2, 1, 2)  # 5 groups: mini-batches of 2, 2, 1 groups; at DP=2 one rank gets no group
CALLS = 5
SEED = 7
TIMEOUT = 240


def make_batch(seed: int = 0) -> TrainBatch:
    """10 sequences of length 14: prompts of 3-5 tokens, responses of 2-9 tokens, then padding."""
    g = torch.Generator().manual_seed(seed)
    rows, length = sum(GROUP_SIZES), 14
    tokens = torch.randint(3, MODEL.vocab_size, (rows, length), generator=g)  # [B, L]
    mask = torch.zeros(rows, length - 1, dtype=torch.bool)  # [B, L-1]
    for row in range(rows):
        prompt = 3 + row % 3
        response = 2 + (row * 5) % 8
        mask[row, prompt - 1:prompt - 1 + response] = True
        tokens[row, prompt + response:] = 2  # pad
    group_index = torch.repeat_interleave(torch.arange(len(GROUP_SIZES)), torch.tensor(GROUP_SIZES))  # [B]
    return TrainBatch(tokens=tokens, response_mask=mask,
                      behaviour_logprobs=-torch.rand(rows, length - 1, generator=g) * mask,
                      is_explorer=torch.arange(rows) % 3 == 0, group_index=group_index,
                      rewards=torch.zeros(rows), advantages=torch.randn(rows, generator=g))


def mini_batch_rows(batch: TrainBatch) -> list[torch.Tensor]:
    """Row indices of each mini-batch (whole groups, `OPTIM.mini_batch_prompts` at a time)."""
    groups = batch.group_index.unique()
    return [torch.isin(batch.group_index, groups[i:i + OPTIM.mini_batch_prompts]).nonzero().flatten()
            for i in range(0, len(groups), OPTIM.mini_batch_prompts)]


def full_logprobs(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch on the TP=1 model: log-probs and entropy [B, L-1] from full-vocabulary logits."""
    inputs = tokens[:, :-1]  # [B, L-1]
    logits = model(inputs, torch.arange(inputs.shape[1]).expand_as(inputs), None).float()  # [B, L-1, V]
    log_softmax = torch.log_softmax(logits, dim=-1)  # [B, L-1, V]
    logprobs = log_softmax.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    return logprobs, -(log_softmax.exp() * log_softmax).sum(-1)


def sharded_grads(module) -> list[tuple[str, tuple, torch.Tensor]]:
    """(key, global slice, gradient piece) of every sharded parameter of a megatron module."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    pieces = []
    for item in nested_values(module.sharded_state_dict()):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or not isinstance(item.data, torch.nn.Parameter):
            continue
        grad = getattr(item.data, "main_grad", None)
        grad = item.data.grad if grad is None else grad
        built = dataclasses.replace(item, data=grad.detach().clone())
        for tensor in nested_values(built.build()) if isinstance(built, ShardedTensorFactory) else [built]:
            pieces.append((tensor.key, tensor.global_slice(), tensor.data))
    return pieces


def _reference(rank, world_size, checkpoint_dir):
    """One process, TP=1: plain-torch reference values, the model-only checkpoint, and the TP=1 Learner."""
    from megatron_s2l.algo.loss import grpo_loss
    from megatron_s2l.learner.checkpoint import save_checkpoint
    from megatron_s2l.learner.model import build_model, init_parallel, transformer_config

    init_parallel(ParallelConfig(), SEED)
    model = build_model(MODEL, transformer_config(MODEL, ParallelConfig()))
    save_checkpoint(checkpoint_dir, 0, [model])
    batch = make_batch()
    with torch.no_grad():
        old, _ = full_logprobs(model, batch.tokens)
    max_len = int(batch.response_mask.sum(1).max())
    adam = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.adam_beta1, OPTIM.adam_beta2),
                             eps=1e-8, weight_decay=0.0)
    curve, first = [], None
    for _ in range(CALLS):
        losses = []
        for rows in mini_batch_rows(batch):
            adam.zero_grad()
            logprobs, entropy = full_logprobs(model, batch.tokens[rows])
            loss, metrics = grpo_loss(
                logprobs, old[rows], batch.advantages[rows], batch.response_mask[rows],
                num_tokens=int(batch.response_mask[rows].sum()), num_sequences=len(rows), max_response_len=max_len,
                ref_logprobs=old[rows], behaviour_logprobs=batch.behaviour_logprobs[rows], entropy=entropy,
                is_explorer=batch.is_explorer[rows], **dataclasses.asdict(LOSS))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.clip_grad)
            if first is None:
                tokens = metrics["tokens"]
                first = {"loss": loss.item(), "grad_norm": norm.item(), "grads": sharded_grads(model),
                         "entropy": (metrics["entropy_sum"] / tokens).item(), "kl": (metrics["kl_sum"] / tokens).item()}
            adam.step()
            losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
    with torch.no_grad():
        final, _ = full_logprobs(model, batch.tokens)
    learner_run = _learner_checks(checkpoint_dir, ParallelConfig())
    return {"old": old, "final": final, "curve": curve, "first": first, "learner": learner_run}


def _loaded_learner(checkpoint_dir, parallel: ParallelConfig):
    from megatron_s2l.learner.checkpoint import load_checkpoint
    from megatron_s2l.learner.step import Learner

    learner = Learner(MODEL, parallel, OPTIM, LOSS, FP8Config(), seed=SEED, with_reference=True)
    assert load_checkpoint(checkpoint_dir, learner) == (0, {})  # model-only: fresh optimizer
    return learner


def _learner_checks(checkpoint_dir, parallel: ParallelConfig) -> dict:
    """Load the reference weights into Learners at `parallel` and run what every layout reports."""
    batch = make_batch()
    probe = _loaded_learner(checkpoint_dir, parallel)  # one step on the first mini-batch, for its gradient
    first = batch.select(mini_batch_rows(batch)[0])
    first.old_logprobs = first.ref_logprobs = probe.logprobs(first)
    first_metrics = probe.train(first, max_response_len=int(batch.response_mask.sum(1).max()))
    grads = sharded_grads(probe.model_chunks[0])

    learner = _loaded_learner(checkpoint_dir, parallel)
    batch.old_logprobs = learner.logprobs(batch)
    batch.ref_logprobs = learner.logprobs(batch, reference=True)
    calls = [learner.train(batch) for _ in range(CALLS)]
    final = learner.logprobs(batch)
    poisoned = dataclasses.replace(batch, advantages=torch.full_like(batch.advantages, float("nan")))
    skipped = learner.train(poisoned)
    after_skip = learner.logprobs(batch)
    sft = [learner.sft_step(batch.tokens, batch.response_mask) for _ in range(2)]
    return {"old": batch.old_logprobs, "ref": batch.ref_logprobs, "first": first_metrics, "grads": grads,
            "calls": calls, "final": final, "skipped": skipped, "after_skip": after_skip, "sft": sft}


def _layout(rank, world_size, checkpoint_dir, tp, pp):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return _learner_checks(checkpoint_dir, parallel)


def _data_parallel(rank, world_size, checkpoint_dir):
    """DP=2 with Adam, then with the distributed optimizer, in one spawn."""
    return [_learner_checks(checkpoint_dir, ParallelConfig(use_distributed_optimizer=distributed))
            for distributed in (False, True)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference_model")
    return path, run_ranks(_reference, 1, str(path), timeout=TIMEOUT)[0]


def check_layout(ref: dict, runs: list[dict], *, grads: bool = True) -> None:
    """Compare every rank's results with the single-process reference."""
    batch = make_batch()
    where = batch.response_mask  # the positions the Learner scores
    for run in runs:  # every rank holds the same full tensors and metrics
        torch.testing.assert_close(run["old"][where], ref["old"][where], rtol=0, atol=2e-5)
        torch.testing.assert_close(run["ref"][where], ref["old"][where], rtol=0, atol=2e-5)
        assert not run["old"][~where].any()  # no logits outside the responses: never scored
        first = run["first"]
        assert (first["optimizer_steps"], first["skipped_steps"]) == (1, 0)
        for name in ("loss", "grad_norm", "entropy", "kl"):
            assert first[name] == pytest.approx(ref["first"][name], rel=1e-4, abs=1e-6), name
        if grads:
            for key, index, piece in run["grads"]:
                expected = _reference_piece(ref["first"]["grads"], key, index, piece.shape)
                torch.testing.assert_close(piece, expected, rtol=1e-4, atol=1e-6, msg=f"gradient of {key}")
        assert [(c["optimizer_steps"], c["skipped_steps"]) for c in run["calls"]] == [(3, 0)] * CALLS
        torch.testing.assert_close(torch.tensor([c["loss"] for c in run["calls"]]), torch.tensor(ref["curve"]),
                                   rtol=0, atol=5e-5)
        # after 15 Adam steps at lr 1e-2, fp32 rounding of differently ordered sums grows to ~1e-4
        torch.testing.assert_close(run["final"][where], ref["final"][where], rtol=2e-4, atol=1e-4)
        assert (run["skipped"]["skipped_steps"], run["skipped"]["optimizer_steps"]) == (3, 0)
        assert torch.equal(run["after_skip"], run["final"])  # NaN never reached the weights
        # sft_step: token-mean cross-entropy of the current weights, then one step lowers it
        assert run["sft"][0] == pytest.approx(-ref["final"][batch.response_mask].mean().item(), rel=1e-4)
        assert run["sft"][1] < run["sft"][0]
    assert ref["curve"][-1] < ref["curve"][0] - 0.05  # the curve moves: the comparison is not vacuous


def _reference_piece(pieces, key: str, index: tuple, shape) -> torch.Tensor:
    """The slice `index` of the reference gradient `key`, assembled from its TP=1 pieces."""
    matching = [(i, p) for k, i, p in pieces if k == key]
    global_shape = [0] * len(index)
    for i, p in matching:
        for axis, part in enumerate(i):
            end = part + 1 if isinstance(part, int) else part.stop
            global_shape[axis] = max(global_shape[axis], end)
    full = torch.zeros(global_shape)
    for i, p in matching:
        full[i] = p
    return full[index].reshape(shape)


@pytest.mark.distributed
def test_tp1_learner_matches_plain_torch(reference):
    _, ref = reference
    check_layout(ref, [ref["learner"]])


@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_way_model_parallel_matches_reference(reference, tp, pp):
    path, ref = reference
    check_layout(ref, run_ranks(_layout, 2, str(path), tp, pp, timeout=TIMEOUT))


@pytest.mark.distributed
def test_tp2_pp2_matches_reference(reference):
    path, ref = reference
    check_layout(ref, run_ranks(_layout, 4, str(path), 2, 2, timeout=TIMEOUT))


@pytest.mark.distributed
def test_data_parallel_matches_reference(reference):
    """DP=2: the third mini-batch has one group, so one rank runs a fully masked micro-batch."""
    path, ref = reference
    adam, distributed_adam = zip(*run_ranks(_data_parallel, 2, str(path), timeout=TIMEOUT))
    check_layout(ref, adam)
    # the distributed optimizer reduce-scatters: each rank's buffer holds only its shard of the gradient
    check_layout(ref, distributed_adam, grads=False)


def test_fp8_without_transformer_engine_fails_at_start_up():
    """FP8 needs TE layers and TE itself; both are refused before any process group exists."""
    from megatron_s2l.learner.step import Learner

    with pytest.raises(ValueError, match="learner.layer_spec='te'"):
        Learner(MODEL, ParallelConfig(), OPTIM, LOSS, FP8Config(enabled=True), seed=SEED, with_reference=False)
    te_model = dataclasses.replace(MODEL, layer_spec="te")
    with pytest.raises(RuntimeError, match="needs Transformer Engine"):
        Learner(te_model, ParallelConfig(), OPTIM, LOSS, FP8Config(enabled=True), seed=SEED, with_reference=False)


def _odd_vocab_learner(rank, world_size, hf_dir):
    """A Learner at TP=2 on a 301-id HF model: 302 embedding rows, log-probs over the 301 real ids."""
    from megatron_s2l.learner.hf_config import model_config_from_hf
    from megatron_s2l.learner.safetensors_io import read_hf_state
    from megatron_s2l.learner.step import Learner

    learner = Learner(model_config_from_hf(hf_dir), ParallelConfig(tensor_model_parallel_size=2), OPTIM, LOSS,
                      FP8Config(), seed=SEED, with_reference=False)
    learner.load_hf(read_hf_state(hf_dir))
    batch = make_batch()
    return learner.logprobs(batch), learner.model_chunks[0].embedding.word_embeddings.weight.shape[0]


@pytest.mark.distributed
def test_learner_scores_only_the_real_ids_of_a_vocabulary_tp_does_not_divide(tmp_path):
    import transformers

    from tests.tiny_models import write_tiny_model

    hf_dir = write_tiny_model(tmp_path / "odd", vocab_size=301, hidden_size=64, intermediate_size=96, num_heads=2,
                              num_kv_heads=2, init_std=0.1)
    batch = make_batch()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        log_softmax = torch.log_softmax(hf(batch.tokens[:, :-1]).logits, dim=-1)  # [B, L-1, 301]
    expected = log_softmax.gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    mask = batch.response_mask
    for logprobs, rows_per_rank in run_ranks(_odd_vocab_learner, 2, str(hf_dir), timeout=TIMEOUT):
        assert rows_per_rank == 151  # 302 rows over TP=2: one padding row on the last rank
        torch.testing.assert_close(logprobs[mask], expected[mask], rtol=0, atol=1e-5)


def _logits_at_scored_positions(rank, world_size):
    """One Learner model's full logits and its logits under `logits_only_at`, and what the output layer and
    the final MLP saw; then what they see in training under full-layer recomputation."""
    from megatron_s2l.learner.model import logits_only_at
    from megatron_s2l.learner.step import Learner

    def inputs_seen(learner):
        seen = {"output": [], "final_mlp": []}
        gpt = learner.model_chunks[0]
        for name, module in (("output", gpt.output_layer), ("final_mlp", gpt.decoder.layers[-1].mlp)):
            module.register_forward_hook(lambda _, args, out, name=name: seen[name].append(tuple(args[0].shape)))
        return seen

    learner = Learner(MODEL, ParallelConfig(), OPTIM, LOSS, FP8Config(), seed=SEED, with_reference=False)
    model = learner.ddp_chunks[0]  # wrapped in DDP, as the schedule passes it
    batch = make_batch()
    tokens = batch.tokens[:, :-1]  # [B, L-1]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    seen = inputs_seen(learner)
    with torch.no_grad():
        full = model(tokens, positions, None)  # [B, L-1, V]
        with logits_only_at(model, batch.response_mask):
            selected = model(tokens, positions, None)  # [1, N, V]
        after = model(tokens, positions, None)
    recomputing = Learner(dataclasses.replace(MODEL, recompute="full"), ParallelConfig(), OPTIM, LOSS, FP8Config(),
                          seed=SEED, with_reference=False)
    seen_recomputing = inputs_seen(recomputing)
    model = recomputing.ddp_chunks[0].train()
    with logits_only_at(model, batch.response_mask):
        model(tokens, positions, None).sum().backward()
    return full, selected, after, seen, seen_recomputing


@pytest.mark.distributed
def test_logits_only_at_projects_only_the_scored_positions():
    full, selected, after, seen, seen_recomputing = run_ranks(_logits_at_scored_positions, 1, timeout=TIMEOUT)[0]
    mask = make_batch().response_mask
    n = int(mask.sum())
    assert 0 < n < mask.numel()
    every, scored = (mask.shape[1], mask.shape[0], MODEL.hidden_size), (n, 1, MODEL.hidden_size)
    # the final MLP and the output layer received the N scored hidden states only, and the selection is
    # gone afterwards; under full recomputation in training the final MLP sees every position (in the
    # forward and again in the backward's recomputation) and the output layer the scored ones
    assert seen == {"output": [every, scored, every], "final_mlp": [every, scored, every]}
    assert seen_recomputing == {"output": [scored], "final_mlp": [every, every]}
    assert selected.shape == (1, n, full.shape[-1])
    torch.testing.assert_close(selected[0], full[mask], rtol=0, atol=1e-5)  # row-major order of the mask
    assert torch.equal(after, full)
