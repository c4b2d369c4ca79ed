"""One process per GPU, on one host or many: launching under torchrun, and the process group.

The entry point relaunches itself under `torch.distributed.run` when a host has several GPUs or the job has
several hosts (SM_HOSTS): node rank = the host's index, master = the first host. DDP uses NCCL on CUDA, gloo on
CPU. UNETSEG_PROCS_PER_HOST overrides the process count (CPU tests, debugging).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .contract.sagemaker_env import MASTER_PORT_ENV, PROCS_PER_HOST_ENV, TrainingEnv

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def procs_per_host(env: TrainingEnv) -> int:
    override = os.environ.get(PROCS_PER_HOST_ENV)
    if override:
        return max(1, int(override))
    gpus = env.num_gpus or torch.cuda.device_count()  # SM_NUM_GPUS reads 0 where nvidia-smi is missing
    return max(1, gpus)


def torchrun_command(env: TrainingEnv, nproc: int, module: str) -> Optional[list[str]]:
    """The torchrun command line for this host, or None when one process does the whole job."""
    if nproc * len(env.hosts) == 1:
        return None
    master = env.master_host if len(env.hosts) > 1 else "127.0.0.1"
    port = os.environ.get(MASTER_PORT_ENV, str(DEFAULT_MASTER_PORT))
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={len(env.hosts)}", f"--node_rank={env.host_rank}", f"--nproc_per_node={nproc}",
        f"--master_addr={master}", f"--master_port={port}", "--module", module,
    ]


def init_process() -> DistContext:
    """Join the process group when started by torchrun; pick the device; size the CPU thread pool."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # several processes on one host share its cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    if world > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistContext(rank, local_rank, world, local_world, device)


def all_reduce(tensor: torch.Tensor, ctx: DistContext, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects: the data check's per-file facts)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP's wrapper does this at the start of each
    forward pass; validation runs the bare model instead, because a rank with no validation image makes no forward
    pass, and the ranks that do would wait in that broadcast until the collective timeout."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
