"""Data-parallel training with PyTorch DistributedDataParallel, launched by ``torchrun``.

    torchrun --standalone --nproc_per_node=4 -m captioner.cli train configs/coco_soft_vgg19.yaml

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 the trainer joins the
process group (nccl on GPUs, gloo on the CPU). ``train.batch_size`` stays the GLOBAL batch:
every global batch of the (seed, epoch) order is cut into equal contiguous slices, one per
rank, so a run on W processes sees the same batches as a single process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from captioner.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def words(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The loss normaliser for a data-parallel step: real words of the GLOBAL batch divided
        by the number of processes (None when not distributed: the loss uses its own count)."""
        if not self.enabled:
            return None
        total = mask.sum().to(torch.float32)
        dist.all_reduce(total)
        return total.clamp(min=1) / self.world

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on any rank (so all ranks take the same branch)."""
        return bool(self.max(float(flag), device))

    def max(self, value: float, device: torch.device) -> float:
        """The largest of the ranks' ``value``s, on every rank."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one; ``device`` is the config's train.device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank)


def shard(order: list[int], *, batch_size: int, ddp: Dist) -> list[int]:
    """This rank's samples: its slice of every global batch of ``order``.

    Raises:
        ConfigError: when the global batch does not split evenly over the ranks.
    """
    if not ddp.enabled:
        return order
    if batch_size % ddp.world:
        raise ConfigError(f"train.batch_size={batch_size} (the global batch) must be a multiple of the "
                          f"{ddp.world} processes")
    local = batch_size // ddp.world
    mine: list[int] = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        if len(batch) < batch_size:  # the last, short batch: as even a split as possible, every rank non-empty
            k, extra = divmod(len(batch), ddp.world)
            lo = ddp.rank * k + min(ddp.rank, extra)
            part = batch[lo:lo + k + (ddp.rank < extra)]
            mine += part or batch[-1:]
        else:
            mine += batch[ddp.rank * local:(ddp.rank + 1) * local]
    return mine


def wrap(model: nn.Module, ddp: Dist, device: torch.device) -> nn.Module:
    """The module the training step calls: DDP-wrapped when distributed (gradients averaged)."""
    if not ddp.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@torch.no_grad()
def max_parameter_difference(model: nn.Module, ddp: Dist) -> float:
    """The largest |p_rank - p_rank0| over all parameters and ranks (0.0 when in sync)."""
    if not ddp.enabled:
        return 0.0
    worst = torch.zeros((), device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, 0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def finish(ddp: Dist) -> None:
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()
