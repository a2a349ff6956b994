"""The HF <-> megatron-core mapping without processes: configs, fused layouts, TP shards, names, refusals.

Expected layouts are written out by hand here; the distributed tests check the same mapping against HF
transformers logits.
"""

import dataclasses
import json

import pytest
import torch

from megatron_s2l.config import ModelConfig
from megatron_s2l.learner.hf_config import hf_config, model_config_from_dict, model_config_from_hf
from megatron_s2l.learner.hf_mapping import (FC1, QKV, REPLICATED, ROW, VOCAB, check_hf_state, padded_vocab_size,
                                             shard, to_hf, to_megatron, unshard, weight_map)
from megatron_s2l.learner.safetensors_io import read_hf_state, write_safetensors
from tests.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {(family, tied): write_tiny_model(root / f"{family}_{tied}", family=family, tie_word_embeddings=tied,
                                             num_heads=8, num_kv_heads=2, rope_theta=5e5)
            for family in ("qwen3", "llama") for tied in (True, False)}


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_model_config_from_hf(tiny, family, tied):
    cfg = model_config_from_hf(tiny[family, tied])
    assert cfg == ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=384, num_attention_heads=8,
                              num_query_groups=2, kv_channels=32, vocab_size=512, max_position_embeddings=512,
                              rotary_base=5e5, norm_epsilon=1e-6, qk_layernorm=family == "qwen3",
                              tie_word_embeddings=tied, hf_path=str(tiny[family, tied]))


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_hf_config_round_trips_through_transformers(tiny, tmp_path, family):
    import transformers

    cfg = dataclasses.replace(model_config_from_hf(tiny[family, False]), hf_path=None)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, family)))
    assert model_config_from_hf(tmp_path) == dataclasses.replace(cfg, hf_path=str(tmp_path))
    parsed = transformers.AutoConfig.from_pretrained(tmp_path)
    original = transformers.AutoConfig.from_pretrained(tiny[family, False])
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "rope_parameters"):
        assert getattr(parsed, key) == getattr(original, key), key


def test_legacy_rope_theta_and_default_head_dim():
    hf = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 96,
          "num_attention_heads": 2, "vocab_size": 10, "max_position_embeddings": 8, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "rope_scaling": None}
    cfg = model_config_from_dict(hf)
    assert (cfg.rotary_base, cfg.kv_channels, cfg.num_query_groups, cfg.tie_word_embeddings) == (5e5, 32, 2, False)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope type='llama3'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_architectures_are_refused(tiny, change, message):
    hf = json.loads((tiny["llama", True] / "config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        model_config_from_dict(hf, "some/config.json")


def test_missing_config_field_and_family_mismatch(tiny):
    hf = json.loads((tiny["qwen3", True] / "config.json").read_text())
    del hf["vocab_size"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['vocab_size'\]"):
        model_config_from_dict(hf)
    with pytest.raises(ValueError, match="Llama neither; pass family='qwen3'"):
        hf_config(ModelConfig(qk_layernorm=True), "llama")
    with pytest.raises(ValueError, match="Qwen2 q/k/v biases and Llama neither; pass family='qwen2'"):
        hf_config(ModelConfig(qk_layernorm=False, add_qkv_bias=True), "qwen3")


def test_qwen2_reads_as_qkv_biases_without_qk_norms(tmp_path):
    path = write_tiny_model(tmp_path / "qwen2", family="qwen2", tie_word_embeddings=False)
    cfg = model_config_from_hf(path)
    assert (cfg.add_qkv_bias, cfg.qk_layernorm, cfg.tie_word_embeddings, cfg.kv_channels) == (True, False, False, 32)
    biases = [e for e in weight_map(cfg) if e.megatron.endswith("linear_qkv.bias")]
    assert [(e.megatron, e.hf, e.hf_shapes) for e in biases[:1]] == [(
        "decoder.layers.0.self_attention.linear_qkv.bias",
        ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
         "model.layers.0.self_attn.v_proj.bias"), ((128,), (64,), (64,)))]
    assert len(biases) == 2 and not any("layernorm" in e.megatron and "self_attention" in e.megatron
                                        for e in weight_map(cfg))
    check_hf_state(cfg, read_hf_state(path))  # every tensor the checkpoint has, and no other
    hf = json.loads((path / "config.json").read_text()) | {"head_dim": 64}
    with pytest.raises(ValueError, match="head_dim=64 is not hidden_size / num_attention_heads = 128 / 4"):
        model_config_from_dict(hf)
    assert model_config_from_dict(hf_config(cfg)) == dataclasses.replace(cfg, hf_path=None)


def test_qkv_biases_are_interleaved_per_query_group_like_the_weights():
    q, k, v = torch.tensor([0., 0, 1, 1, 2, 2, 3, 3]), torch.tensor([10., 10, 11, 11]), torch.tensor([20., 20, 21, 21])
    fused = to_megatron(QKV, [q, k, v], num_query_groups=2)  # head_dim 2: 4 query heads, 2 groups
    assert fused[::2].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert shard(QKV, fused, 1, 2)[::2].tolist() == [2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(to_hf(QKV, fused, 4, 2), (q, k, v)))


def test_qkv_is_interleaved_per_query_group():
    # 4 query heads over 2 groups, head_dim 2, hidden 3: every row says which head it belongs to.
    d, hidden = 2, 3
    q = torch.arange(4).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # heads 0..3
    k = 10 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # groups 10, 11
    v = 20 + torch.arange(2).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # groups 20, 21
    fused = to_megatron(QKV, [q, k, v], num_query_groups=2)
    heads = fused[::d, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]  # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert shard(QKV, fused, 1, 2)[::d, 0].tolist() == [2, 3, 11, 21]  # TP rank 1 holds group 1 whole
    assert all(torch.equal(a, b) for a, b in zip(to_hf(QKV, fused, 4, 2), (q, k, v)))


def test_fc1_shards_split_gate_and_up_separately():
    gate, up = torch.arange(4.0)[:, None], 10 + torch.arange(4.0)[:, None]  # [F=4, H=1]
    fused = to_megatron(FC1, [gate, up], num_query_groups=1)
    assert shard(FC1, fused, 0, 2).flatten().tolist() == [0, 1, 10, 11]
    assert shard(FC1, fused, 1, 2).flatten().tolist() == [2, 3, 12, 13]
    assert torch.equal(torch.cat(to_hf(FC1, fused, 1, 1)), torch.cat([gate, up]))


@pytest.mark.parametrize("layout,expected_shard_shape", [
    (VOCAB, (4, 6)), (ROW, (8, 2)), (QKV, (4, 6)), (FC1, (4, 6)), (REPLICATED, (8, 6))])
def test_shards_reassemble(layout, expected_shard_shape):
    full = torch.randn(8, 6)
    shards = [shard(layout, full, rank, 2 if layout != ROW else 3) for rank in range(2 if layout != ROW else 3)]
    assert shards[0].shape == expected_shard_shape
    assert torch.equal(unshard(layout, shards), full)
    assert layout == REPLICATED or not torch.equal(shards[0], shards[1])


def test_padded_vocab_size_follows_megatron_lm():
    # Megatron-LM's _vocab_size_with_padding: up to a multiple of make_vocab_size_divisible_by x TP.
    assert [padded_vocab_size(301, tp) for tp in (1, 2, 4)] == [301, 302, 304]
    assert [padded_vocab_size(151936, tp, 128) for tp in (1, 4, 8)] == [151936, 152064, 152576]  # Qwen3
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=0: each must be >= 1"):
        padded_vocab_size(301, 2, 0)


def test_vocab_shards_pad_with_zero_rows_and_unshard_drops_them():
    full = torch.arange(1.0, 6.0)[:, None].expand(-1, 2)  # [V=5, H=2], rows 1..5
    shards = [shard(VOCAB, full, rank, 2, padded_rows=8) for rank in range(2)]  # 8 rows: 4 per rank
    assert shards[0][:, 0].tolist() == [1, 2, 3, 4] and shards[1][:, 0].tolist() == [5, 0, 0, 0]
    assert torch.equal(unshard(VOCAB, shards, vocab_size=5), full)
    assert shard(VOCAB, full, 1, 4, padded_rows=8)[:, 0].tolist() == [3, 4]  # 2 per rank, no padding here
    assert shard(VOCAB, full, 3, 4, padded_rows=8).abs().sum() == 0  # a shard of padding only
    assert shard(VOCAB, full, 1, 2)[:, 0].tolist() == [4, 5, 0]  # default: padded to a multiple of TP (6)


def test_te_and_local_specs_differ_only_in_the_pre_norm_names():
    local, te = weight_map(ModelConfig(num_layers=2)), weight_map(ModelConfig(num_layers=2, layer_spec="te"))
    renamed = {a.megatron: b.megatron for a, b in zip(local, te) if a.megatron != b.megatron}
    assert renamed == {
        "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.pre_mlp_layernorm.weight": "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.1.input_layernorm.weight": "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"}
    assert [(a.hf, a.layout) for a in local] == [(b.hf, b.layout) for b in te]


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("family,tied", [("qwen3", True), ("llama", False)])
def test_hf_state_round_trips_through_megatron_names(tiny, spec, family, tied):
    from safetensors.torch import load_file

    hf_state = load_file(tiny[family, tied] / "model.safetensors")
    cfg = dataclasses.replace(model_config_from_hf(tiny[family, tied]), layer_spec=spec)
    megatron = {e.megatron: to_megatron(e.layout, [hf_state[n] for n in e.hf], cfg.num_query_groups)
                for e in weight_map(cfg)}
    assert ("decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in megatron) == (spec == "te")
    assert ("output_layer.weight" in megatron) == (not tied)
    assert megatron["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((8 + 2 * 2) * 32, 128)
    back = {name: tensor for e in weight_map(cfg)
            for name, tensor in zip(e.hf, to_hf(e.layout, megatron[e.megatron], 8, 2))}
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[name], hf_state[name]) for name in hf_state)


def test_check_hf_state_refuses_mismatches(tiny):
    from safetensors.torch import load_file

    cfg = model_config_from_hf(tiny["qwen3", False])
    state = load_file(tiny["qwen3", False] / "model.safetensors")
    check_hf_state(cfg, state)  # the matching state passes
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_norm.weight'\]"):
        check_hf_state(cfg, {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_norm.weight"})
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\]"):
        check_hf_state(cfg, state | {"model.layers.2.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \[500, 128\] but the config "
                                         r"describes \[512, 128\]"):
        check_hf_state(cfg, state | {"model.embed_tokens.weight": torch.zeros(500, 128)})
    with pytest.raises(ValueError, match="lm_head.weight but its config says tie_word_embeddings=true"):
        check_hf_state(dataclasses.replace(cfg, tie_word_embeddings=True), state)
    with pytest.raises(ValueError, match="does not match a model with 2 layers \\(qk_layernorm=False"):
        check_hf_state(dataclasses.replace(cfg, qk_layernorm=False), state)


def test_sharded_safetensors_round_trip_lazily(tmp_path):
    from safetensors.torch import load_file

    tensors = {f"t{i}": torch.full((4, 8), float(i)) for i in range(5)}  # 128 bytes each in fp32
    files = write_safetensors(iter(tensors.items()), tmp_path, max_shard_bytes=300)  # 2 tensors per shard
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert list(load_file(files[2])) == ["t4"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 128 and index["weight_map"]["t2"] == files[1].name
    state = read_hf_state(tmp_path)
    assert list(state) == list(tensors) and state.shape("t3") == [4, 8]
    assert all(torch.equal(state[name], tensor) for name, tensor in tensors.items())
    single = write_safetensors(iter(tensors.items()), tmp_path, max_shard_bytes=10**6, dtype=torch.bfloat16)
    assert [f.name for f in single] == ["model.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == \
        ["model.safetensors"]  # the earlier shards and index are replaced
    assert read_hf_state(tmp_path)["t1"].dtype == torch.bfloat16


def test_read_hf_state_refuses_a_directory_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no \\*.safetensors files"):
        read_hf_state(tmp_path)
