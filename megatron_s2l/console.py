"""What a person running megatron-s2l reads on the console: its own progress, the warnings that mean
something, and errors without tracebacks, from one rank.

Entry points (`examples/pretrain_s2l.py`, `tools/*.py`, `python -m megatron_s2l.demo`):
- call `setup_from_argv()` before Megatron and vLLM are imported. By default it filters the upstream
  messages listed below, each by its exact text, each benign for megatron-s2l (the comment says why), and
  shows vLLM's warnings but not its INFO lines. `--verbose` (or S2L_VERBOSE=1, which child processes
  inherit) leaves every upstream message as upstream prints it.
- run their `main` through `run_main`: a `ConfigError` (a mistake in the config or the arguments, every
  problem at once) is printed on the first rank only and the process exits with status 2; any other
  exception is an internal error and keeps its traceback.
- print their own lines with `say` (first rank only, above any progress bar).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from megatron_s2l.config import ConfigError

VERBOSE_ENV = "S2L_VERBOSE"
USAGE_ERROR = 2  # argparse's exit status for a command-line mistake; config mistakes are the same kind
OTHER_RANKS_WAIT_S = 10.0

# Python warnings (category, exact message) that every CPU start raises, none of them actionable here.
BENIGN_WARNINGS = (
    # Megatron-Core at import: without Transformer Engine and Apex it uses its local layers and torch's
    # optimizers, which is what the local layer spec runs on; asking for TE (learner.layer_spec=te, FP8)
    # fails with its own error instead.
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    # Megatron-Core's own default cuda_graph_scope="full" deprecates itself in TransformerConfig; CUDA graphs
    # are off in megatron-s2l.
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    # Megatron-Core's distributed checkpoints load through torch APIs that torch has deprecated; resuming
    # works as tested (tests/e2e/test_resume.py), the replacement is Megatron-Core's to adopt.
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
                    "instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
    # vLLM's kernel dispatcher scans torch.distributed's attributes and touches the deprecated alias.
    (FutureWarning, "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` "
                    "instead"),
)

# vLLM log records that restate megatron-s2l's own engine settings or are known to be harmless for its
# engines, by exact message: the format string where any argument is benign, else the formatted message.
# Every other vLLM warning is shown.
BENIGN_VLLM_RECORDS = {
    # CPU vLLM builds run without triton-cpu, on their native kernels.
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "Triton is not installed. triton-cpu is expected on x86 CPUs.",
    "Model Runner V2 requires Triton; using the V1 model runner instead.",
    # Mamba/GDN settings: megatron-s2l serves transformer models only.
    "Reset SSM cache type to float32 for accelerated GDN mamba backend '%s'.",
    # rollout/vllm_engine.py restores the trainer's RNG state around every engine start.
    "The global random seed is set to %d. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, this may affect "
    "the random state of the Python process that launched vLLM.",
    # Chunked prefill is off on CPU on purpose (rollout/vllm_engine.py: CPU generators cannot rewind).
    "This model does not officially support disabling chunked prefill. Disabling this manually may cause the "
    "engine to crash or produce incorrect outputs.",
    # engine.enforce_eager=true is the config's own choice; these restate it.
    "Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup. This is equivalent to setting "
    "-cc.mode=none -cc.cudagraph_mode=none and --kernel_config.enable_jit_warmup=False",
    "Inductor compilation was disabled by user settings, optimizations settings that are only active during "
    "inductor compilation will be ignored.",
    # Speed hints for production CPU serving (preloaded allocators, thread counts); the engines bind their
    # threads per rank (engine.cpu_omp_threads_bind).
    "%s is not found in LD_PRELOAD. For best performance, please follow the section `set LD_PRELOAD` in "
    "https://docs.vllm.ai/en/latest/getting_started/installation/cpu/ to setup required pre-loaded libraries.",
    "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it.",
    # vLLM's own variable for naming its process groups, which its environment check does not list.
    "Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
    # A second engine in the process registers vLLM's kernel overrides again, with the same kernels.
    "Kernel %s is already registered. Overwriting.",
    # Engines run with skip_tokenizer_init: megatron-s2l renders and tokenizes prompts itself and passes the
    # stop token with every request, so vLLM's chat-template warm-up and EOS lookup have nothing to use.
    "Chat template warmup failed",
    "Using None for EOS token id because tokenizer is not initialized",
    # After a weight refit: the rotary embedding has no weights (its cache is computed), and a tied LM head
    # is the embedding, which the refit carries and the engine re-packs into the head
    # (rollout/vllm_engine.py); train/token_mult_prob_error compares engine and learner after every refit.
    "RotaryEmbedding: Failed to load weights",
    "ParallelLMHead: Failed to load weights",
}

# Native (C++) lines on stderr while an engine starts, matched in full after the log prefix.
BENIGN_NATIVE_LINES = (
    # vLLM's CPU worker binds its memory to the NUMA node of the cores it runs on, as intended.
    re.compile(r"Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes \([0-9, ]+\)\. "
               r"Memory allocations will be strictly bound to these NUMA nodes\. \(function init_cpu_memory_env\)"),
)


def verbose() -> bool:
    """Whether every upstream message is shown (--verbose or S2L_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """The --verbose option every entry point has (read by `setup_from_argv`, listed in --help)."""
    parser.add_argument("--verbose", action="store_true",
                        help=f"show every upstream log line and warning (also {VERBOSE_ENV}=1)")


def setup_from_argv(argv: Sequence[str] | None = None) -> None:
    """Apply the console policy of an entry point whose command line is `argv` (default: sys.argv[1:]),
    before Megatron and vLLM are imported. Arguments after `--` belong to another program."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv[:argv.index("--") if "--" in argv else len(argv)]:
        os.environ[VERBOSE_ENV] = "1"  # child processes (the demo's family build) inherit it
    if not verbose():
        quiet_upstream()


def quiet_upstream() -> None:
    """Filter the benign Python warnings and vLLM records listed above; show vLLM's other warnings (on
    stderr) but not its INFO lines."""
    for category, message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM then leaves the "vllm" logger to this handler
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.handlers = [vllm_handler()]
    vllm_logger.setLevel(logging.WARNING)
    vllm_logger.propagate = False


def vllm_handler() -> logging.Handler:
    """The handler of vLLM's records: one line each on stderr, without the benign ones."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vLLM %(levelname)s: %(message)s"))
    handler.addFilter(lambda record: record.msg not in BENIGN_VLLM_RECORDS
                      and record.getMessage() not in BENIGN_VLLM_RECORDS)
    return handler


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Hold back what native code writes to stderr inside the block and replay it without the benign lines
    (`BENIGN_NATIVE_LINES`); a no-op with --verbose. For short blocks such as an engine start."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not any(pattern.search(line) for pattern in BENIGN_NATIVE_LINES):
                    sys.stderr.write(line)
            sys.stderr.flush()


def is_first_rank() -> bool:
    """Rank 0 of a torchrun/Slurm job (read from the environment: process groups may not exist yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str) -> None:
    """Print one of megatron-s2l's own lines on the first rank, above any progress bar."""
    if is_first_rank():
        from tqdm import tqdm

        tqdm.write(line)


def exit_with_error(prog: str, error: BaseException) -> NoReturn:
    """Print `prog: error: <error>` on the first rank and exit with status 2.

    torchrun stops every rank as soon as one exits, so the other ranks wait before exiting: the first rank
    reports and ends the job. A rank whose error the first rank does not share reports it after the wait.
    """
    if not is_first_rank():
        time.sleep(OTHER_RANKS_WAIT_S)
        prog = f"{prog} (rank {os.environ['RANK']})"
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)


def run_main(main: Callable[[], object], prog: str) -> None:
    """Call `main()`; a ConfigError (a refusal of the user's input) is reported by `exit_with_error`; anything
    else, a ValueError too, is a bug and propagates with its traceback."""
    try:
        main()
    except ConfigError as err:
        exit_with_error(prog, err)
