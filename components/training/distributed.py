"""Data-parallel training under ``torchrun``: one process per device, gradients averaged every step.

``torchrun --nproc-per-node N -m flows.cli train`` starts N processes with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; :func:`from_environment` joins them (gloo on a CPU, NCCL on GPUs).
Every rank draws the same global P x K batch and the same random views from the same seed, and
embeds only its contiguous share of the batch; each step's gradients are then summed across
ranks (weighted by share) before the optimiser steps, so the ranks stay identical and train as
one process with the global batch would, to float rounding. Only rank 0 validates, logs,
checkpoints and saves.

The gradients are all-reduced here rather than through ``DistributedDataParallel``'s module
wrapper: the frozen stage trains the projection on cached features, which never runs the wrapped
module's ``forward``, and the trainable parameters change between stages.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the training processes; one process alone is ``DataParallel()``."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process validates, logs, checkpoints and saves."""
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of a batch of ``count`` rows (sizes differ by one at most)."""
        bounds = np.linspace(0, count, self.world_size + 1).round().astype(int)
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def loss_weight(self, count: int) -> float:
        """What this rank's mean loss is multiplied by so that the ranks' average is the batch's mean."""
        part = self.share(count)
        return (part.stop - part.start) * self.world_size / count

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (one all-reduce for all of them)."""
        if not self.enabled:
            return
        # Every rank runs the same code on the same parameters, so the same ones have gradients.
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if not grads:
            return
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def mean(self, value: float) -> float:
        """A number's mean over the ranks (the logged loss of a step)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def broadcast_from_main(self, modules: list[torch.nn.Module]) -> None:
        """Give every rank rank 0's parameters and buffers (what DDP does when it wraps a model)."""
        if not self.enabled:
            return
        for module in modules:
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_environment(device: torch.device) -> tuple[DataParallel, torch.device]:
    """Join the process group ``torchrun`` describes in the environment; alone without one.

    Returns the process's place and its device: on CUDA, the GPU of its ``LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DataParallel(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # gloo sends CPU tensors; NCCL is the one for tensors on GPUs.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    parallel = DataParallel(dist.get_rank(), dist.get_world_size())
    LOGGER.info("data-parallel rank %d of %d on %s", parallel.rank, parallel.world_size, device)
    return parallel, device


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
