"""The converter CLIs end to end, as users run them (subprocesses with timeouts; torchrun for TP=2).

HF -> Megatron -> HF must give back every tensor bit-identical, with a config that transformers reads
as the original's, the tokenizer files and the generation config; the refusals must say what to do.
A vocabulary that TP does not divide (301 ids) is padded in Megatron and must change neither the
log-probs (against HF transformers' log-softmax) nor what comes back out (conversion and refit export).
"""

import filecmp
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_s2l.learner.safetensors_io import read_hf_state
from tests.tiny_models import write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
TO_MEGATRON, TO_HF = ROOT / "tools" / "convert_hf_to_megatron.py", ROOT / "tools" / "convert_megatron_to_hf.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={_free_port()}"] if nproc > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    result = subprocess.run([*launcher, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script.name} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _assert_same_weights(back: Path, src: Path):
    got, expected = read_hf_state(back), read_hf_state(src)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def _assert_same_config(back: Path, src: Path):
    import transformers

    got, expected = transformers.AutoConfig.from_pretrained(back), transformers.AutoConfig.from_pretrained(src)
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "dtype"):
        assert getattr(got, key) == getattr(expected, key), key


@pytest.mark.distributed
def test_sharded_qwen3_to_tp2_and_back(tmp_path):
    import transformers

    src = write_tiny_model(tmp_path / "src", family="qwen3", tie_word_embeddings=False, with_tokenizer=True)
    sharded = tmp_path / "sharded"  # the input as big models come: several safetensors files and an index
    transformers.AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="300KB")
    shutil.copy(src / "generation_config.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()

    out = _run(TO_MEGATRON, "--hf-dir", str(sharded), "--save-dir", str(tmp_path / "ckpt"), "--tp", "2", nproc=2)
    assert "TP=2, PP=1" in out.stdout
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "0"
    _run(TO_HF, "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "back"),
         "--tokenizer-dir", str(src))  # read back at TP=1: the checkpoint reshards on load

    back = tmp_path / "back"
    _assert_same_weights(back, src)
    _assert_same_config(back, src)
    assert json.loads((back / "generation_config.json").read_text()) == \
        json.loads((src / "generation_config.json").read_text())
    assert filecmp.cmp(back / "tokenizer.json", src / "tokenizer.json", shallow=False)


@pytest.mark.distributed
def test_tied_llama_to_tp1_and_back_at_tp2_in_shards(tmp_path):
    import transformers

    # 301 ids padded to 320 rows (a multiple of 32) at TP=1, read back at TP=2 (160 rows per rank)
    src = write_tiny_model(tmp_path / "src", family="llama", tie_word_embeddings=True, init_std=0.1,
                           vocab_size=301)
    _run(TO_MEGATRON, "--hf-dir", str(src), "--save-dir", str(tmp_path / "ckpt"), "--make-vocab-size-divisible-by",
         "32")
    metadata = _embedding_rows(tmp_path / "ckpt")
    assert metadata == 320
    _run(TO_HF, "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "back"), "--tp", "2",
         "--max-shard-size-mb", "0.3", nproc=2)

    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_weights(back, src)
    _assert_same_config(back, src)
    tokens = torch.randint(0, 301, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # transformers loads the sharded output as the same model
        got = transformers.AutoModelForCausalLM.from_pretrained(back).eval()(tokens).logits
        expected = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(tokens).logits
    assert torch.equal(got, expected)


@pytest.mark.distributed
def test_qwen2_with_qkv_biases_to_tp2_and_back(tmp_path):
    import transformers

    src = write_tiny_model(tmp_path / "src", family="qwen2", tie_word_embeddings=False, init_std=0.1)
    _run(TO_MEGATRON, "--hf-dir", str(src), "--save-dir", str(tmp_path / "ckpt"), "--tp", "2", nproc=2)
    _run(TO_HF, "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "back"))

    back = tmp_path / "back"
    assert read_hf_state(back)["model.layers.1.self_attn.k_proj.bias"].abs().sum() > 0  # random biases survive
    _assert_same_weights(back, src)
    _assert_same_config(back, src)
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(back).eval()(tokens).logits
        expected = transformers.AutoModelForCausalLM.from_pretrained(src).eval()(tokens).logits
    assert torch.equal(got, expected)


def _embedding_rows(ckpt: Path) -> int:
    """The embedding's global row count in the latest checkpoint under `ckpt` (its tensor metadata)."""
    from megatron.core import dist_checkpointing

    step = (ckpt / "latest").read_text().strip()
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt / f"iter_{int(step):07d}"))
    return metadata["embedding.word_embeddings.weight"].global_shape[0]


def _tool(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args,message", [
    (["--backend", "bridge"], "--backend bridge needs Megatron-Bridge"),
    (["--tp", "2"], "launch with torchrun --nproc_per_node=2"),
    (["--wrong-arch"], "model_type='mistral'"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by 0: must be >= 1"),
])
def test_cli_refusals_name_the_fix(tmp_path, capsys, args, message):
    src = write_tiny_model(tmp_path / "src", num_layers=1)
    if args == ["--wrong-arch"]:
        config = json.loads((src / "config.json").read_text()) | {"model_type": "mistral"}
        (src / "config.json").write_text(json.dumps(config))
        args = []
    with pytest.raises(SystemExit) as exit_info:
        _tool(TO_MEGATRON).main(["--hf-dir", str(src), "--save-dir", str(tmp_path / "ckpt"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_refusals_of_checkpoint_directories(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool(TO_HF).main(["--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "out")])
    assert "no checkpoint (no 'latest' file)" in capsys.readouterr().err
    (tmp_path / "latest").write_text("3\n")
    src = write_tiny_model(tmp_path / "src", num_layers=1)
    with pytest.raises(SystemExit):
        _tool(TO_MEGATRON).main(["--hf-dir", str(src), "--save-dir", str(tmp_path)])
    assert f"--save-dir {tmp_path} already holds a checkpoint (step 3); choose a new directory" in \
        capsys.readouterr().err


def _learner_checkpoint_to_hf(rank, world_size, root):
    """A training checkpoint (optimizer, reference, state) converted with only --hf-config to describe it."""
    from megatron_s2l.config import FP8Config, LossConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_s2l.learner.checkpoint import save_checkpoint
    from megatron_s2l.learner.convert import megatron_to_hf
    from megatron_s2l.learner.hf_config import hf_config
    from megatron_s2l.learner.hf_weights import export_hf_weights
    from megatron_s2l.learner.step import Learner

    cfg = ModelConfig(num_layers=2, tie_word_embeddings=False)
    learner = Learner(cfg, ParallelConfig(), OptimConfig(), LossConfig(), FP8Config(), seed=3, with_reference=True)
    with torch.no_grad():  # the policy moves away from its initial copy (the reference), as training would
        for param in learner.model_chunks[0].parameters():
            param.add_(0.01 * torch.randn_like(param))
    save_checkpoint(f"{root}/run", 5, learner, state={"data_position": 7})
    (Path(root) / "orig").mkdir()
    (Path(root) / "orig" / "config.json").write_text(json.dumps(hf_config(cfg) | {"eos_token_id": 1}))
    megatron_to_hf(f"{root}/run", f"{root}/hf", ParallelConfig(), hf_config_path=f"{root}/orig")
    got = read_hf_state(f"{root}/hf")
    expected = dict(export_hf_weights(learner.model_chunks, cfg))
    mismatched = sorted(name for name in expected if not torch.equal(got[name], expected[name]))
    return sorted(got) == sorted(expected), mismatched, json.loads(Path(f"{root}/hf/config.json").read_text())


@pytest.mark.distributed
def test_training_checkpoint_converts_with_its_hf_config(tmp_path):
    from tests.multiprocess import run_ranks

    [(same_names, mismatched, config)] = run_ranks(_learner_checkpoint_to_hf, 1, str(tmp_path), timeout=240)
    assert same_names and mismatched == []
    assert (config["model_type"], config["eos_token_id"], config["dtype"]) == ("qwen3", 1, "float32")


# ---------------------------------------------------------------- a vocabulary TP does not divide

ODD_VOCAB, BATCH, SEQ = 301, 2, 12
PADDED = {"qwen3": 1, "llama": 64}  # make_vocab_size_divisible_by: 302 rows (151 per rank); 384 (192 per rank)


def _odd_vocab_at_tp2(rank, world_size, root):
    """Convert each odd-vocabulary model at TP=2, then: its log-probs, its refit export, its way back to HF,
    the padding rows, and the refusals (each raised alike on both ranks, before any collective)."""
    import dataclasses

    from megatron.core import parallel_state

    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
    from megatron_s2l.config import ParallelConfig
    from megatron_s2l.learner.checkpoint import load_checkpoint
    from megatron_s2l.learner.convert import hf_to_megatron, megatron_to_hf
    from megatron_s2l.learner.hf_config import model_config_from_hf
    from megatron_s2l.learner.hf_mapping import padded_vocab_size
    from megatron_s2l.learner.hf_weights import export_hf_weights, load_hf_weights
    from megatron_s2l.learner.model import build_model, transformer_config
    from megatron_s2l.learner.safetensors_io import read_hf_state

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    tokens = torch.load(f"{root}/tokens.pt")  # [B, T+1]
    results = {}
    for family, divisible_by in PADDED.items():
        hf_dir, ckpt = f"{root}/{family}", f"{root}/{family}-ckpt"
        hf_to_megatron(hf_dir, ckpt, parallel, make_vocab_size_divisible_by=divisible_by)
        cfg = model_config_from_hf(hf_dir)
        padded = dataclasses.replace(cfg, vocab_size=padded_vocab_size(cfg.vocab_size, 2, divisible_by))
        model = build_model(padded, transformer_config(padded, parallel))
        load_checkpoint(ckpt, [model])
        inputs = tokens[:, :-1]  # [B, T]
        with torch.no_grad():
            logits = model(inputs, torch.arange(SEQ).expand_as(inputs), None)  # [B, T, V_pad / 2]
            logp, entropy = vocab_parallel_logprobs(
                logits, tokens[:, 1:], group=parallel_state.get_tensor_model_parallel_group(),
                vocab_start=rank * logits.shape[-1], vocab_size=cfg.vocab_size, with_entropy=True)
        embedding = model.embedding.word_embeddings.weight  # [V_pad / 2, H]
        padding = embedding[cfg.vocab_size - rank * embedding.shape[0]:] if rank else embedding[:0]
        exported = {name: tensor.clone() for name, tensor in export_hf_weights([model], cfg)}  # the refit's stream
        megatron_to_hf(ckpt, f"{root}/{family}-back", parallel)
        results[family] = (logp, entropy, exported, logits.shape[-1], padding.abs().sum().item(), padding.shape[0])
    small = dataclasses.replace(cfg, vocab_size=300)  # a model built for fewer ids than the HF vocabulary
    attempts = (lambda: megatron_to_hf(f"{root}/qwen3-ckpt", f"{root}/x", parallel, hf_config_path=f"{root}/big"),
                lambda: megatron_to_hf(f"{root}/qwen3-ckpt", f"{root}/x", ParallelConfig(tensor_model_parallel_size=4)),
                lambda: load_hf_weights([build_model(small, transformer_config(small, parallel))], cfg,
                                        read_hf_state(f"{root}/llama")))
    refusals = []
    for attempt in attempts:
        try:
            attempt()
        except ValueError as err:
            refusals.append(str(err))
    return results, refusals


@pytest.mark.distributed
def test_odd_vocabulary_is_padded_at_tp2_without_changing_logprobs_or_weights(tmp_path):
    import torch.nn.functional as F
    import transformers

    from tests.multiprocess import run_ranks

    tokens = torch.randint(0, ODD_VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tokens[0, 1:4] = torch.tensor([0, 150, ODD_VOCAB - 1])  # both shards' edges among the targets
    torch.save(tokens, tmp_path / "tokens.pt")
    write_tiny_model(tmp_path / "qwen3", family="qwen3", tie_word_embeddings=False, init_std=0.1, vocab_size=ODD_VOCAB)
    write_tiny_model(tmp_path / "llama", family="llama", tie_word_embeddings=True, init_std=0.1, vocab_size=ODD_VOCAB,
                     seed=1)
    write_tiny_model(tmp_path / "big", family="qwen3", tie_word_embeddings=False, num_layers=1)  # vocab 512

    per_rank = run_ranks(_odd_vocab_at_tp2, 2, str(tmp_path), timeout=240)
    for family, divisible_by in PADDED.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.float32).eval()
        with torch.no_grad():
            log_softmax = F.log_softmax(hf(tokens[:, :-1]).logits, dim=-1)  # [B, T, 301]: HF has no padding
        ref_logp = log_softmax.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, T]
        ref_entropy = -(log_softmax.exp() * log_softmax).sum(-1)  # [B, T]
        assert ref_entropy.mean() < 5.6  # peaked: a uniform over 301 (5.71) would hide padding in the normaliser
        hf_state = read_hf_state(tmp_path / family)
        rows_per_rank = 151 if divisible_by == 1 else 192
        for rank, (results, _) in enumerate(per_rank):
            logp, entropy, exported, shard_rows, padding_abs_sum, padding_rows = results[family]
            assert shard_rows == rows_per_rank and padding_rows == (2 * rows_per_rank - ODD_VOCAB) * rank
            assert padding_abs_sum == 0.0  # padded rows are zeros
            torch.testing.assert_close(logp, ref_logp, rtol=0, atol=1e-5, msg=lambda m: f"{family} rank {rank}: {m}")
            torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=1e-5)
            assert exported.keys() == set(hf_state)
            for name in hf_state:  # what the refit sends vLLM: unpadded, bit-identical
                assert torch.equal(exported[name], hf_state[name]), f"{family} rank {rank}: {name}"
        _assert_same_weights(tmp_path / f"{family}-back", tmp_path / family)
        _assert_same_config(tmp_path / f"{family}-back", tmp_path / family)

    for _, refusals in per_rank:
        smaller, indivisible, model_too_small = refusals
        assert "the checkpoint's vocabulary has 302 rows but" in smaller and "says vocab_size=512" in smaller
        assert "pass --hf-config with the config.json of the model this checkpoint came from" in smaller
        assert "302 vocabulary rows cannot be split over --tp 4; read it with a --tp that divides 302" in indivisible
        assert model_too_small.startswith("the Megatron model has 300 vocabulary rows but the HF config has "
                                          "vocab_size=301")
        assert "--make-vocab-size-divisible-by" in model_too_small
