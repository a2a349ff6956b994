"""The CPU shims: megatron-core's CUDA arguments become CPU only while megatron-core runs, and freed tensor
memory stays in the process (no unmapping and faulting it in again each step). Each probe runs in a fresh
process, since the shims are process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are a no-op with CUDA")

SCOPE_PROBE = """
import torch
from megatron_s2l.learner.cpu_shims import megatron_on_cpu
with megatron_on_cpu():
    with megatron_on_cpu():
        nested = torch.zeros(1, device="cuda").device.type
    inside = torch.zeros(1, device="cuda").device.type
try:
    torch.zeros(1, device="cuda")
    outside = "cpu"
except (AssertionError, RuntimeError):
    outside = "refused"
print(nested, inside, outside)
"""

ALLOCATOR_PROBE = """
import os, sys, torch
if sys.argv[1] == "shim":
    from megatron_s2l.learner.cpu_shims import _keep_freed_memory
    _keep_freed_memory()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(64 * 2**20)  # 256 MiB, every page touched
held = rss_mib()
del big
print(held - rss_mib())
"""


def _run(probe: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120,
                          check=True).stdout.split("\n")[-2]


def test_cuda_arguments_become_cpu_only_inside_megatron_code():
    # outside, torch calls (a colocated vLLM engine's) run without the function mode, and CUDA is refused
    assert _run(SCOPE_PROBE).split() == ["cpu", "cpu", "refused"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("mode, released", [("plain", True), ("shim", False)])
def test_freed_tensor_memory_stays_mapped_under_the_shim(mode, released):
    freed_mib = float(_run(ALLOCATOR_PROBE, mode))
    # plain glibc unmaps the 256 MiB at once; with the shim it stays in the heap for the next step
    assert (freed_mib > 200) == released, f"{mode}: {freed_mib:.0f} MiB returned to the system on free"
