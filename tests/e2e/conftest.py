"""Shared set-up of the end-to-end tests: a tiny random model family (no pretraining) and small configs.

`tiny_family` writes two random HF Qwen3 directories (the explorer smaller than the learner, head_dim 32
so vLLM serves them) with a sentencepiece tokenizer trained on the demo task's text saved in both, as
the demo family has. Random models never write a \\boxed answer, so `even_token_rollout` builds the real
rollout phase (real engines, mixer, refit) with a reward that varies between samples: the fraction of
even token ids in the response. That gives non-zero advantages, so the learner really updates.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from megatron_s2l.config import S2LConfig, TaskConfig
from megatron_s2l.data.task import task_splits
from megatron_s2l.data.tokenizer import load_tokenizer, train_tokenizer
from megatron_s2l.rollout.colocation import Colocation
from megatron_s2l.rollout.mixer import S2LMixer, Scorer
from megatron_s2l.rollout.phase import RolloutPhase
from megatron_s2l.rollout.vllm_engine import VLLMEngine
from megatron_s2l.types import Prompt, Sample
from tests.tiny_models import write_tiny_model

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parents[2]
NUM_TRAIN, NUM_EVAL = 64, 8  # demo-task problems: tokenizer corpus and training prompts


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """{"learner": dir, "explorer": dir}: random tiny Qwen3 models sharing a demo-task tokenizer."""
    out = tmp_path_factory.mktemp("family")
    train, _ = task_splits(TaskConfig(num_train=NUM_TRAIN, num_eval=NUM_EVAL), seed=0)
    tokenizer = train_tokenizer((p.question + " " + p.solution for p in train), vocab_size=512)
    dirs = {"learner": write_tiny_model(out / "learner", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                        seed=1),
            "explorer": write_tiny_model(out / "explorer", hidden_size=64, intermediate_size=192, num_layers=1,
                                         num_heads=2, num_kv_heads=1, seed=2)}
    for path in dirs.values():
        tokenizer.save(path)
    return dirs


def tiny_config(family: dict[str, Path], **sections) -> dict:
    """A config dict for a few fast steps on the tiny family; `sections` replace or extend top-level keys."""
    engine = {"max_model_len": 128, "kv_cache_memory_bytes": 32 * 2**20, "dtype": "float32"}
    base = {
        "seed": 7, "train_steps": 4, "prompts_per_step": 2,
        "learner": {"hf_path": str(family["learner"])},
        "learner_engine": engine,
        "learner_sampling": {"temperature": 1.0, "max_new_tokens": 8},
        "explorer": {"source": "online", "hf_path": str(family["explorer"]), "engine": engine,
                     "sampling": {"temperature": 1.0, "max_new_tokens": 8}},
        "schedule": {"group_size": 4, "t_mix": 3, "group_mode": "combined"},
        "loss": {"kl_coef": 0.1},
        "optim": {"lr": 1e-3, "mini_batch_prompts": 2, "micro_batch_size": 8},
        "data": {"task": {"num_train": NUM_TRAIN, "num_eval": NUM_EVAL}, "max_prompt_length": 96},
    }
    return base | sections


class EvenTokenScorer:
    """Rewards the fraction of even token ids in each response: a reward that varies between random-model samples."""

    def score(self, prompts: list[Prompt], samples: list[Sample]) -> list[float]:
        return [sum(t % 2 == 0 for t in s.response_ids) / max(1, len(s.response_ids)) for s in samples]


def even_token_rollout(cfg: S2LConfig, scorer: Scorer | None = None) -> RolloutPhase:
    """The real rollout phase of `cfg` (vLLM engines for both sources, mixer, refit) scored by `scorer`
    (default `EvenTokenScorer`)."""
    eos = load_tokenizer(cfg.learner.hf_path).eos_id
    learner = VLLMEngine(cfg.learner.hf_path, cfg.learner_engine, source="learner", model_id="learner",
                         eos_token_id=eos)
    explorer = VLLMEngine(cfg.explorer.hf_path, cfg.explorer.engine, source="explorer",
                          model_id=cfg.explorer.model_id, eos_token_id=eos)
    mixer = S2LMixer(cfg.schedule, explorer=explorer, learner=learner, explorer_sampling=cfg.explorer.sampling,
                     learner_sampling=cfg.learner_sampling, scorer=scorer or EvenTokenScorer(), seed=cfg.seed)
    return RolloutPhase(mixer, Colocation(learner, explorer), engine_tp=cfg.learner_engine.tensor_parallel_size)


def torchrun_command(config_path: Path, *args: str, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """`torchrun --nproc_per_node=nproc examples/pretrain_s2l.py --config config_path args...` on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
            str(REPO / "examples" / "pretrain_s2l.py"), "--config", str(config_path), *args]


def job_env() -> dict[str, str]:
    """The environment of a launched job: one thread per rank, the repository importable, and a free port for
    a single-process run (whose default, 29512, collides with any other single-process run on the machine)."""
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": str(_free_port())}


def write_config(cfg: dict, path: Path) -> Path:
    """Write a config dict as the YAML file the entry script reads."""
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
