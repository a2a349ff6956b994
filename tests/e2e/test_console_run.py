"""A short run's console as a user sees it: by default megatron-s2l's own lines (evaluations, progress bar,
summary) and no vLLM INFO lines or benign upstream warnings; with --verbose, vLLM's INFO lines are back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, job_env, tiny_config, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def _run(config, *flags: str, cwd) -> subprocess.CompletedProcess:
    env = job_env()
    env.pop("S2L_VERBOSE", None)
    return subprocess.run([sys.executable, str(REPO / "examples" / "pretrain_s2l.py"), "--config", str(config), *flags],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tiny_family, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The same one-step run (evaluated before and after) quiet and with --verbose."""
    done = {}
    for mode, flags in (("quiet", ()), ("verbose", ("--verbose",))):
        out = done[f"{mode}_dir"] = tmp_path_factory.mktemp(mode)
        config = tiny_config(tiny_family, train_steps=1, checkpoint={"save_dir": str(out / "ckpt")},
                             logging={"eval_interval": 1, "eval_samples": 2, "tensorboard_dir": str(out / "tb")})
        done[mode] = _run(write_config(config, out / "run.yaml"), *flags, cwd=out)
    return done


def test_the_default_console_shows_only_megatron_s2l_lines(runs):
    done, out = runs["quiet"], runs["quiet_dir"]
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("evaluation at step 0: held-out pass@1 0.000 (8 problems x 2 samples)")
    assert lines[1:] == [
        "evaluation at step 1: held-out pass@1 0.000 (8 problems x 2 samples)",
        lines[2],  # the training reward of the random models' step, checked below
        "held-out pass@1: 0.000 at step 0, 0.000 at step 1",
        f"TensorBoard: tensorboard --logdir {out / 'tb'}",
        f"checkpoints: {out / 'ckpt'} (resume with --load {out / 'ckpt'})"]
    assert lines[2].startswith("trained steps 1-1: training reward 0.000 at step 1")
    # stderr holds the progress bar and nothing from upstream
    assert "S2L-PO: 100%" in done.stderr
    for upstream in ("INFO", "WARNING", "Warning", "UserWarning", "FutureWarning", "Traceback", "vLLM"):
        assert upstream not in done.stderr, done.stderr[-3000:]


def test_verbose_brings_back_vllm_info_lines_and_upstream_warnings(runs):
    done = runs["verbose"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert " INFO " in done.stdout and "Initializing a V1 LLM engine" in done.stdout  # vLLM logs to stdout
    assert "Transformer Engine and Apex are not installed" in done.stderr
    assert "NUMA binding" in done.stderr
    assert "held-out pass@1: 0.000 at step 0, 0.000 at step 1" in done.stdout.splitlines()  # and the summary
