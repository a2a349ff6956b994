"""Config mistakes as a user sees them: the entry point run as a command on a broken YAML prints every
problem at once, without a traceback, and exits with status 2; an internal error keeps its traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2l import console
from megatron_s2l.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "examples" / "pretrain_s2l.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(ENTRY), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_broken_yaml_reports_every_problem_at_once(tmp_path):
    (tmp_path / "run.yaml").write_text("schedul:\n  t_mix: 4\nloss:\n  kl_typ: k3\n  clip_low: 1.5\n"
                                       "explorer:\n  hf_path: models/explorer\n")
    done = _run("--config", "run.yaml", "optim.lr=fast", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "pretrain_s2l.py: error: 6 problems:",
        "  - schedul: unknown section; did you mean 'schedule'?",
        "  - loss.kl_typ: unknown key; did you mean 'kl_type'?",
        "  - optim.lr='fast': expected float",
        "  - loss.clip_low=1.5: must be in [0, 1) (ratio floor is 1 - clip_low)",
        "  - learner.hf_path is empty: set it to the learner's local HF directory (convert a Megatron checkpoint "
        "with tools/convert_megatron_to_hf.py), or run the demo without --config",
        "  - explorer.hf_path='models/explorer': no such directory (expected a local HF model directory with "
        "config.json and *.safetensors)"]


def test_a_missing_config_file_is_one_line(tmp_path):
    done = _run("--config", "absent.yaml", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == ["pretrain_s2l.py: error: config file absent.yaml: no such file (pass an "
                                        "existing YAML to --config, e.g. examples/configs/demo.yaml)"]


def test_model_directories_are_checked_with_their_weights_and_tokenizers(tmp_path):
    """Directories that exist but hold no weights, a learner of a family the mapping lacks, and tokenizers that
    differ: found before any model loads."""
    for name, tokenizer, family in (("learner", b"one", "mistral"), ("explorer", b"two", "qwen3")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": family}))
        (tmp_path / name / "s2l_tokenizer.model").write_bytes(tokenizer)
    (tmp_path / "run.yaml").write_text("learner: {hf_path: learner}\nexplorer: {hf_path: explorer}\n"
                                       "checkpoint: {load_dir: ckpt}\n")
    done = _run("--config", "run.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pretrain_s2l.py: error: 5 problems:",
        "  - learner.hf_path='learner': its config.json has model_type='mistral'; the learner trains llama, qwen2, "
        "qwen3 models (any family vLLM serves can be the explorer)",
        "  - checkpoint.load_dir='ckpt': no such directory (point it at a checkpoint root holding 'latest'; a "
        "load_dir equal to save_dir may be absent on the first run)",
        "  - learner checkpoint learner: no *.safetensors weights",
        "  - explorer checkpoint explorer: no *.safetensors weights",
        "  - explorer tokenizer (explorer/s2l_tokenizer.model) and learner tokenizer (learner/s2l_tokenizer.model) "
        "differ or one is missing: build both models of the family with the same tokenizer"]


def test_the_demo_reports_a_bad_override_before_building_anything(tmp_path):
    done = _run("schedule.t_mx=4", "loss.clip_low=-1", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["pretrain_s2l.py: error: 2 problems:",
                                        "  - schedule.t_mx: unknown key; did you mean 't_mix'?",
                                        "  - loss.clip_low=-1.0: must be in [0, 1) (ratio floor is 1 - clip_low)"]
    assert list(tmp_path.iterdir()) == []  # no family directory was started


@pytest.mark.parametrize("error", [KeyError("internal"), ValueError("internal")])
def test_an_internal_error_keeps_its_traceback(error):
    def broken():
        raise error

    with pytest.raises(type(error), match="internal"):
        console.run_main(broken, "prog")


def test_a_converter_reports_its_refusals_and_keeps_internal_errors(capsys):
    from megatron_s2l.learner.convert import run_cli

    def converting(error):
        def convert():
            raise error
        return convert

    parser = argparse.ArgumentParser(prog="convert.py")
    with pytest.raises(SystemExit) as exited:
        run_cli(parser, converting(ConfigError("--tp 3: must divide 8 heads")))
    assert exited.value.code == 2 and capsys.readouterr().err == "convert.py: error: --tp 3: must divide 8 heads\n"
    with pytest.raises(ValueError, match="a bug"):
        run_cli(parser, converting(ValueError("a bug")))


def test_a_user_error_exits_2_and_other_ranks_report_only_their_own_after_a_wait(monkeypatch, capsys):
    def mistaken():
        raise ConfigError(["a.b: unknown key", "c=1: must be > 1"])

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exited:
        console.run_main(mistaken, "prog")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "prog: error: 2 problems:\n  - a.b: unknown key\n  - c=1: must be > 1\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(console, "OTHER_RANKS_WAIT_S", 0.0)
    with pytest.raises(SystemExit):
        console.run_main(mistaken, "prog")
    assert capsys.readouterr().err.startswith("prog (rank 1): error: 2 problems:")
