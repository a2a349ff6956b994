"""vLLM-CPU shim for engines sharded over a torchrun job: shared-memory names that a killed job cannot block.

vLLM's CPU tensor-parallel collectives map one POSIX shared-memory segment per rank, named
`<VLLM_DIST_IDENT>-<group>-[<ranks>]-cpushm_<rank>`, created with O_EXCL and unlinked only when the process
exits normally. Under the external launcher VLLM_DIST_IDENT comes from the init method "env://", so every job
uses the same names. A job that is killed (preemption, SIGKILL, a crashed rank) leaves its segments behind,
and the next TP>1 job on the machine, its own torchrun restart or Slurm requeue included, fails with
"create shm in SHMManager failed. errno: 17"; two such jobs on one machine would share segments.

`unique_cpu_shm_names()` gives each engine start a name prefix of its own, agreed over the job's process
group, and unlinks each rank's segment as soon as every rank has mapped them all (the mappings stay valid),
so not even a SIGKILL leaves one behind. `VLLMEngine` applies it on CPU only; GPU engines do not use it.
"""

from __future__ import annotations

import os
import secrets

import torch.distributed as dist

_PREFIX_ENV = "S2L_VLLM_CPU_SHM_PREFIX"


def unique_cpu_shm_names() -> None:
    """Collective over the default process group: call on every rank before the engine starts."""
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    token = [f"s2l{secrets.token_hex(6)}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    os.environ[_PREFIX_ENV] = token[0]
    if getattr(_CPUSHMDistributed, "_s2l_unique_names", False):
        return
    vllm_group_name = _CPUSHMDistributed.make_group_name
    vllm_init_shm = _CPUSHMDistributed._init_cpu_shm

    def make_group_name(communicator) -> str:
        return os.environ[_PREFIX_ENV] + vllm_group_name(communicator).removeprefix(os.environ["VLLM_DIST_IDENT"])

    def init_cpu_shm(self) -> int:
        handle = vllm_init_shm(self)  # returns once every rank has joined (mapped) every segment
        os.unlink(f"/dev/shm/{self.group_name}_{self.communicator.rank}")  # vLLM's name for this rank's segment
        return handle

    _CPUSHMDistributed.make_group_name = staticmethod(make_group_name)
    _CPUSHMDistributed._init_cpu_shm = init_cpu_shm
    _CPUSHMDistributed._s2l_unique_names = True
