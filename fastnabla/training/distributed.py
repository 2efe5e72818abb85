"""Multi-process training under ``torchrun`` (NCCL on GPU, gloo on CPU), without DDP wrappers.

The objective calls each network several times per transition (the policy's forward and a VJP
w.r.t. its *input*, forward-looking terms, ...), which ``DistributedDataParallel``'s one-forward /
one-backward reducer does not model. The trainer instead accumulates gradients locally over all
micro-batches of an update (no communication: what ``no_sync`` does under DDP) and then sums them
across processes once, in one flat buffer per dtype (:meth:`DistContext.all_reduce_gradients`).
Each process samples its own share of the global batch (:mod:`fastnabla.training.plan`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

Tensor = torch.Tensor


@dataclass
class DistContext:
    """Rank, world size and device of this process (``world_size == 1``: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over processes (identity for one process). CPU tensors (bookkeeping: loss sums,
        reward moments, the stop flag) go through this process's device when the backend is NCCL, which
        reduces CUDA tensors only."""
        if not self.enabled:
            return tensor
        if self.device.type == "cuda" and tensor.device.type != "cuda":
            staged = tensor.to(self.device)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged.to(tensor.device))
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over processes, one flat buffer per dtype; missing grads count as zeros."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: object) -> object:
        """``obj`` of rank 0 on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The context of this process: from ``torchrun``'s environment, or a single process.

    ``device``: ``auto`` (CUDA when available, one GPU per local rank), ``cuda`` or ``cpu``. The
    backend is NCCL for CUDA and gloo for CPU.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={device!r} is not one of ('auto', 'cuda', 'cpu')")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    if not launched_by_torchrun():
        return DistContext(device=torch.device("cuda") if use_cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
