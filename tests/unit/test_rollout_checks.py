"""Start-up checks: explorer checkpoints with missing or corrupt parts, tokenizers that disagree."""

import json

import pytest

from megatron_s2l.rollout.checks import check_hf_checkpoint, check_tokenizers_agree
from tests.tiny_models import write_tiny_model, write_tiny_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=1, hidden_size=64,
                            intermediate_size=64, vocab_size=64, with_tokenizer=True)


def copy(model, dest, skip=()):
    dest.mkdir()
    for f in model.iterdir():
        if f.name not in skip:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_a_complete_checkpoint_passes(model):
    assert check_hf_checkpoint(model) == model


def test_missing_parts_are_named(model, tmp_path):
    with pytest.raises(ValueError, match=f"explorer checkpoint {tmp_path / 'nope'}: no such directory"):
        check_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json is missing"):
        check_hf_checkpoint(copy(model, tmp_path / "a", skip={"config.json"}))
    with pytest.raises(ValueError, match=r"no \*.safetensors weights"):
        check_hf_checkpoint(copy(model, tmp_path / "b", skip={"model.safetensors"}), role="learner")
    sharded = copy(model, tmp_path / "c")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"\['model-00002-of-00002.safetensors'\] listed .* are missing"):
        check_hf_checkpoint(sharded)


def test_corrupt_files_are_named(model, tmp_path):
    bad_json = copy(model, tmp_path / "a")
    (bad_json / "config.json").write_text("{\"vocab_size\": 64,")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        check_hf_checkpoint(bad_json)
    truncated = copy(model, tmp_path / "b")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{weights}: unreadable weights"):
        check_hf_checkpoint(truncated)


def test_tokenizers_must_agree(model, tmp_path):
    assert check_tokenizers_agree(model, copy(model, tmp_path / "same")) is True
    no_tokenizer = write_tiny_model(tmp_path / "bare", num_layers=1, hidden_size=64, intermediate_size=64,
                                    vocab_size=64)
    assert check_tokenizers_agree(model, no_tokenizer) is False
    bigger = tmp_path / "bigger"
    write_tiny_tokenizer(bigger, 80)
    with pytest.raises(ValueError, match=r"vocabularies differ \(sizes 64 vs 80"):
        check_tokenizers_agree(model, bigger)
    templated = tmp_path / "templated"
    write_tiny_tokenizer(templated, 64, chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match="chat templates differ"):
        check_tokenizers_agree(model, templated)
    other_eos = tmp_path / "other_eos"
    write_tiny_tokenizer(other_eos, 64)
    config = json.loads((other_eos / "tokenizer_config.json").read_text())
    config["eos_token"] = "t5"
    (other_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="special tokens differ: .*eos_token"):
        check_tokenizers_agree(model, other_eos)
