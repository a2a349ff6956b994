"""Small patches that let megatron-core run on CPU (gloo) for development and CI.

megatron-core assumes CUDA in a handful of places. `apply_cpu_shims()` patches exactly those, once per
process, and only when CUDA is absent: on a GPU it does nothing, so these can never change GPU runs.
Each shim below says which megatron-core code needs it (measured with megatron-core 0.16.1). One more
setting is for speed: the process keeps freed tensor memory instead of unmapping it (`_keep_freed_memory`).

`device="cuda"` arguments are rewritten by a torch function mode, which sees every torch call made under
it; it is entered only while megatron-core runs (`megatron_on_cpu`, around the learner's entry points), so
that a colocated vLLM engine, whose decoding makes tens of thousands of small torch calls per step, does
not pay for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import multiprocessing
import multiprocessing.queues

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_mode_entered = False  # an outer megatron_on_cpu holds the mode: inner ones leave it be


def apply_cpu_shims() -> None:
    """Patch torch.cuda / megatron-core so megatron runs on CPU; idempotent, a no-op with CUDA."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    _route_cuda_rng_to_cpu()
    _patch_cuda_device_calls()
    _patch_grad_clipping()
    _patch_tensor_type()
    _patch_checkpoint_queue()
    _keep_freed_memory()
    _applied = True


@contextlib.contextmanager
def megatron_on_cpu():
    """Run megatron-core code on CPU: the shims applied, and its `device="cuda"` arguments made CPU (a no-op
    with CUDA; re-entrant)."""
    global _mode_entered
    apply_cpu_shims()
    if not _applied or _mode_entered:
        yield
        return
    _mode_entered = True
    try:
        with _CudaToCpu():
            yield
    finally:
        _mode_entered = False


def on_cpu(function):
    """Decorator form of `megatron_on_cpu` for the functions through which megatron-core is entered."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with megatron_on_cpu():
            return function(*args, **kwargs)

    return wrapper


def _cpu_get_rng_state(device=None) -> torch.Tensor:
    return torch.random.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.random.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # not torch.manual_seed: it calls torch.cuda.manual_seed_all, which would recurse into this shim
    torch.random.default_generator.manual_seed(int(seed))


def _route_cuda_rng_to_cpu() -> None:
    """Megatron's RNG tracker (model_parallel_cuda_manual_seed, and the fork every attention layer does
    even with dropout 0) saves/restores CUDA generator states; on CPU the CPU generator plays that role."""
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = torch.cuda.random.set_rng_state = _cpu_set_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: _cpu_get_rng_state()
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state


def _patch_cuda_device_calls() -> None:
    """`torch.cuda.current_device()` places RoPE buffers, p2p buffers and checkpoint tensors; `Tensor.cuda()`
    moves the embedding grads synced between first and last PP stage (tied embeddings);
    `synchronize` / `empty_cache` are called by p2p and the checkpoint writer."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """Device-agnostic `clip_grad_by_total_norm_fp32`: the original asserts `torch.cuda.FloatTensor`."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)  # same epsilon as megatron-core
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _patch_grad_clipping() -> None:
    """optimizer.py imports the function by name, so both module attributes must point at the replacement."""
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


def _patch_tensor_type() -> None:
    """The distributed optimizer sorts parameters by `param.type()` and only accepts CUDA type names."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _patch_checkpoint_queue() -> None:
    """The checkpoint writer makes its results queue from a spawn-context Manager, whose server process
    re-imports `__main__` (4-10 s per rank) and, as a separate process, outlives a killed rank holding
    its pipes. Writes run in this process or in forked children, so a plain fork-context queue will do."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def fork_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = _ArrivedQueue(ctx=multiprocessing.get_context("fork"))
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_queue


# glibc's mallopt parameter (malloc.h), its environment-variable twin and the value that keeps freed memory
_KEEP_FREED_MEMORY = ((-4, "MALLOC_MMAP_MAX_", 0), (-1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1))
KEEP_FREED_MEMORY_ENV = {name: str(value) for _, name, value in _KEEP_FREED_MEMORY}  # the same, for a new process


def _keep_freed_memory() -> None:
    """glibc maps every allocation above its mmap threshold (32 MiB at most) from fresh pages and unmaps it
    when freed, so each step faults in and zeroes its large activations and gradients again (15-25% of a
    forward at bench/bench_vs_trl.py's size). Serve them from the heap and keep freed memory there: the
    process then holds on to its peak resident memory. Nothing changes outside glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for parameter, _, value in _KEEP_FREED_MEMORY:
        mallopt(parameter, value)


class _ArrivedQueue(multiprocessing.queues.Queue):
    """The writer calls `get_nowait()` right after its own `put()`; a multiprocessing queue hands the item
    to a feeder thread first, so without waiting the item is often not there yet (the save then fails)."""

    def get_nowait(self):
        return self.get(timeout=60)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` (or a CUDA torch.device / index) keyword arguments to CPU: the schedules
    allocate loss and p2p buffers, and the optimizer its step/overflow tensors, with device="cuda"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    if isinstance(device, int):
        return True  # a bare index means a CUDA ordinal
    return torch.device(device).type == "cuda"
