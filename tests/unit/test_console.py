"""The console policy: quiet by default, everything with --verbose, benign upstream messages filtered by
their exact text (each still spelled that way upstream), nothing else filtered."""

from __future__ import annotations

import ast
import logging
import os
import re
import subprocess
import sys
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path

import pytest

from megatron_s2l import console

REPO = Path(__file__).resolve().parents[2]

# Where upstream raises each filtered message (relative to its package).
UPSTREAM_FILES = {
    "megatron": ["core/distributed/fsdp/src/megatron_fsdp/mixed_precision.py", "core/optimizer/__init__.py",
                 "core/optimizer/optimizer.py", "core/optimizer/clip_grads.py", "core/models/backends.py",
                 "core/models/gpt/gpt_layer_specs.py", "core/transformer/transformer_config.py"],
    "torch": ["distributed/distributed_c10d.py", "distributed/checkpoint/state_dict_loader.py",
              "distributed/_shard/_utils.py"],
    "vllm": ["triton_utils/importing.py", "platforms/cpu.py", "config/vllm.py", "engine/arg_utils.py",
             "v1/worker/cpu_worker.py", "platforms/interface.py", "triton_utils/dispatcher.py", "renderers/base.py",
             "model_executor/model_loader/reload/layerwise.py"],
}


def _upstream_strings(package: str) -> set[str]:
    root = Path(find_spec(package).submodule_search_locations[0])
    return {node.value for name in UPSTREAM_FILES[package]
            for node in ast.walk(ast.parse((root / name).read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _spelled_upstream(message: str, strings: set[str]) -> bool:
    """`message` is an upstream string, or an upstream format string filled in."""
    return message in strings or any("%" in s and re.fullmatch(re.sub(r"%[sd]", ".+", re.escape(s).replace(
        r"\%", "%")), message) for s in strings)


def test_every_filtered_message_is_spelled_exactly_so_upstream():
    strings = _upstream_strings("megatron") | _upstream_strings("torch")
    assert [m for _, m in console.BENIGN_WARNINGS if m not in strings] == []
    vllm = _upstream_strings("vllm")
    assert [m for m in console.BENIGN_VLLM_RECORDS if not _spelled_upstream(m, vllm)] == []


def _record(msg: str, *args, level=logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("vllm.x", level, "x.py", 1, msg, args, None)


def test_vllm_records_are_filtered_by_exact_message_only():
    handler = console.vllm_handler()
    assert not handler.filter(_record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not handler.filter(_record("Kernel %s is already registered. Overwriting.", "any.kernel"))
    assert handler.filter(_record("%s: Failed to load weights", "QKVParallelLinear"))  # a real refit problem
    assert handler.filter(_record("Unknown vLLM environment variable detected: %s", "VLLM_CPU_KVCACHE_SPCE"))
    assert handler.filter(_record("Chat template warmup failed!"))


def test_native_lines_are_held_back_and_replayed_without_the_benign_ones(capfd, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    numa = (b"[rank0]:[W1202 19:44:29.000715722 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory "
            b"allocation on the NUMA nodes (0). Memory allocations will be strictly bound to these NUMA nodes. "
            b"(function init_cpu_memory_env)\n")
    with console.native_stderr_filtered():
        os.write(2, numa + b"[W1202 utils.cpp:70] Warning: something else\n")
        assert capfd.readouterr().err == ""  # held back while the block runs
    assert capfd.readouterr().err == "[W1202 utils.cpp:70] Warning: something else\n"
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    with console.native_stderr_filtered():
        os.write(2, numa)
    assert capfd.readouterr().err == numa.decode()


def test_verbose_comes_from_the_flag_before_a_double_dash_or_the_environment(monkeypatch):
    quieted = []
    monkeypatch.setattr(console, "quiet_upstream", lambda: quieted.append(True))
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.setup_from_argv(["local", "--", "--verbose"])  # the training script's flag, not the launcher's
    assert quieted == [True] and not console.verbose()
    console.setup_from_argv(["--config", "x.yaml", "--verbose"])
    assert quieted == [True] and os.environ[console.VERBOSE_ENV] == "1"
    console.setup_from_argv([])
    assert quieted == [True]


def test_say_prints_on_the_first_rank_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    console.say("from rank 1")
    monkeypatch.setenv("RANK", "0")
    console.say("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_a_tools_help_prints_only_its_usage_unless_verbose(verbose):
    env = os.environ | {"PYTHONPATH": str(REPO)}
    env.pop(console.VERBOSE_ENV, None)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--help",
                           *(["--verbose"] if verbose else [])], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: convert_hf_to_megatron.py")
    assert "--verbose" in done.stdout
    if verbose:
        assert "UserWarning: Transformer Engine and Apex are not installed" in done.stderr
    else:
        assert done.stderr == ""


def _entry_point():
    spec = spec_from_file_location("pretrain_s2l", REPO / "examples" / "pretrain_s2l.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_summary_reads_before_and_after_also_for_a_resumed_run(tmp_path):
    from megatron_s2l.config import S2LConfig
    from megatron_s2l.loop import TrainResult

    cfg = S2LConfig.from_dict({"logging": {"tensorboard_dir": "tb"}})
    fresh = TrainResult(last_step=2, history=[{"reward/mean": 0.25}, {"reward/mean": 0.5, "eval/pass@1": 0.4}],
                        initial_eval={"eval/pass@1": 0.125})
    assert _entry_point().summary(cfg, fresh) == [
        "trained steps 1-2: training reward 0.250 at step 1, 0.500 at step 2",
        "held-out pass@1: 0.125 at step 0, 0.400 at step 2",
        "TensorBoard: tensorboard --logdir tb",
        "checkpoints: none saved (checkpoint.save_dir)"]
    resumed = TrainResult(last_step=32, history=[{"reward/mean": 0.5, "eval/pass@1": 0.375}])
    assert _entry_point().summary(cfg, resumed)[:2] == ["trained steps 32-32: training reward 0.500 at step 32",
                                                        "held-out pass@1: 0.375 at step 32"]
