"""Process group setup under any launcher (deepspeed, torchrun, or one plain process)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now (the one-process world, launchers, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> torch.device:
    """Join (or, for one plain process, create) the process group; return this rank's device.

    CUDA -> nccl, CPU -> gloo (DeepSpeed's CPU path, measured in DESIGN.md)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `bumblefast train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over ranks in place; no host read (the result stays on the device)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def to_device_f64(values: list[float], device: torch.device) -> torch.Tensor:
    """Host floats as a float64 device tensor (exact token counts), copied without waiting on the device."""
    return torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (collective: every rank must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
