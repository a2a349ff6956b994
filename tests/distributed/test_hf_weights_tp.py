"""HF -> Megatron logits and HF -> Megatron -> HF weights at TP=1, TP=2 and PP=2, against HF transformers.

Six tiny random models (Qwen3, Qwen2 with random q/k/v biases and Llama, tied and untied embeddings, GQA
with 4 query heads over 2 key/value groups) are loaded with `load_hf_weights` on real gloo ranks; the Megatron logits must equal
the HF transformers forward (fp32, 1e-5) and `export_hf_weights` must give back every HF tensor
bit-identical, on every rank.
"""

import pytest
import torch

from tests.multiprocess import run_ranks

MODELS = [("qwen3", True), ("qwen3", False), ("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False)]
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (TP, PP) on 2 ranks; TP=1 x PP=1 runs data-parallel
BATCH, SEQ = 2, 12


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """(path, HF logits [B, T, V], HF state) per model; init_std 0.1 gives logits of order 1."""
    import transformers
    from safetensors.torch import load_file

    from tests.tiny_models import write_tiny_model  # imported here: spawned ranks need no transformers

    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    models = []
    for i, (family, tied) in enumerate(MODELS):
        path = write_tiny_model(root / f"{family}_{tied}", family=family, tie_word_embeddings=tied,
                                init_std=0.1, seed=i)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = hf(tokens).logits  # [B, T, V]
        models.append((str(path), logits, load_file(path / "model.safetensors")))
    return tokens, models


def _megatron_logits(model, tokens):
    """Full-vocabulary logits [B, T, V] on the last stage (None elsewhere); activations pass stage to stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)  # [B, T]
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)  # [T, B, H]
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(tokens, position_ids, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())  # [T, B, H]
        return None
    shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)  # [B, T, V]


def _convert_and_run(rank, world_size, tokens, paths):
    """Per layout, per model: (logits [B, T, V] or None off the last stage, exported HF tensors)."""
    from megatron.core import parallel_state

    from megatron_s2l.config import ParallelConfig
    from megatron_s2l.learner.hf_config import model_config_from_hf
    from megatron_s2l.learner.hf_weights import export_hf_weights, load_hf_weights
    from megatron_s2l.learner.model import build_model, init_parallel, transformer_config
    from safetensors.torch import load_file

    results = {}
    for tp, pp in LAYOUTS:  # one spawn for every layout: starting ranks costs more than the checks
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        init_parallel(parallel, seed=0)
        for path in paths:
            cfg = model_config_from_hf(path)
            model = build_model(cfg, transformer_config(cfg, parallel))
            load_hf_weights([model], cfg, load_file(f"{path}/model.safetensors"))
            logits = _megatron_logits(model, tokens)
            exported = {name: tensor.clone().numpy() for name, tensor in export_hf_weights([model], cfg)}
            results[tp, pp, path] = (None if logits is None else logits.numpy(), exported)
        results[tp, pp, "refusals"] = _refusals(model, cfg, load_file(f"{path}/model.safetensors"), tp)
        parallel_state.destroy_model_parallel()
    return results


def _refusals(model, cfg, state, tp):
    """The error messages of loading into a model of another architecture, and of a config whose vocabulary
    disagrees with the checkpoint's."""
    import dataclasses

    from megatron_s2l.learner.hf_weights import load_hf_weights

    messages = []
    qk_norms = {f"model.layers.{i}.self_attn.{norm}.weight": torch.ones(cfg.kv_channels)
                for i in range(cfg.num_layers) for norm in ("q_norm", "k_norm")}
    other_family = dataclasses.replace(cfg, qk_layernorm=not cfg.qk_layernorm)
    other_state = (state | qk_norms if other_family.qk_layernorm
                   else {k: v for k, v in state.items() if k not in qk_norms})
    for wrong, wrong_state in ((other_family, other_state), (dataclasses.replace(cfg, vocab_size=511), state)):
        try:
            load_hf_weights([model], wrong, wrong_state)
        except ValueError as err:
            messages.append(str(err))
    return messages


@pytest.mark.distributed
def test_megatron_matches_hf_and_round_trips(hf_models):
    tokens, models = hf_models
    per_rank = run_ranks(_convert_and_run, 2, tokens, [m[0] for m in models], timeout=300)
    for tp, pp in LAYOUTS:
        for path, hf_logits, hf_state in models:
            outputs = [results[tp, pp, path] for results in per_rank]
            with_logits = [logits for logits, _ in outputs if logits is not None]
            assert len(with_logits) == (2 if pp == 1 else 1), (tp, pp)  # every last-stage rank has them
            assert hf_logits.abs().mean() > 0.1  # logits large enough for 1e-5 to be a real test
            for logits in with_logits:
                torch.testing.assert_close(torch.from_numpy(logits), hf_logits, rtol=0, atol=1e-5,
                                           msg=lambda m: f"TP={tp} PP={pp} {path}: {m}")
            for rank, (_, exported) in enumerate(outputs):
                assert list(exported) == list(outputs[0][1]), "the collective yields one order on all ranks"
                assert exported.keys() == hf_state.keys(), path
                for name, tensor in hf_state.items():
                    assert torch.equal(torch.from_numpy(exported[name]), tensor), \
                        f"TP={tp} PP={pp} {path} rank {rank}: {name}"
        for results in per_rank:
            wrong_model, odd_vocab = results[tp, pp, "refusals"]
            assert "the Megatron model does not match the config" in wrong_model
            assert "self_attention.q_layernorm.weight" in wrong_model  # names what differs
            # a config that disagrees with its checkpoint's vocabulary (TP padding is tested in test_convert.py)
            assert "model.embed_tokens.weight has shape [512, 128] but the config describes [511, 128]" in odd_vocab
