"""The processes of a training run: which examples each one takes, and what they exchange.

Training reads a data stream that visits every example once per epoch, in an order fixed by the
seed; global step k takes the next B examples, and each of the W processes (1 without torchrun)
an equal, contiguous slice of them, cut into A micro-batches::

    stream   = perm(seed, epoch 0) ++ perm(seed, epoch 1) ++ ...       (no example dropped)
    step k   = stream[k·B : (k+1)·B]                                   B = batch_size
    rank r   = its contiguous slice of B/W examples                     W = world size
    micro j  = B/(W·A) examples of that slice, j < A                    A = grad_accum

Without torchrun (WORLD_SIZE unset or 1) `Processes` is rank 0 of 1 and its collectives do
nothing, so the training loop has one code path. Under torchrun, DistributedDataParallel averages
the gradients; sums of floats (losses, label counts) and the RNG states written into a checkpoint
travel through `sum` and `gather_to_zero`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .model import ModularModel

__all__ = ["Processes", "Stream"]


class Stream:
    """Example indices of the stream: epoch e visits range(n) in the permutation seeded (seed, e)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, np.ndarray] = {}

    def take(self, start: int, count: int) -> list[int]:
        """Stream positions start .. start+count-1."""
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]


@dataclass
class Processes:
    """This process's place in a torchrun group (rank 0 of 1 without one).

    Attributes:
        rank: this process's rank.
        world: the number of processes.
        device: where collectives put their tensors (the process's GPU under nccl, else the CPU).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # for collectives

    @classmethod
    def setup(cls) -> Processes:
        """Join the process group torchrun describes in the environment (rank 0 of 1 without one).

        The group is nccl when CUDA is available, else gloo; it stays initialised afterwards.

        Raises:
            RuntimeError: WORLD_SIZE > 1 but torch has no torch.distributed.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
        if not dist.is_initialized():
            # Left initialised afterwards: later train() calls and the caller's own collectives use it
            # (re-initialising under one torchrun store does not work).
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def check_split(self, batch_size: int, grad_accum: int) -> None:
        """Refuse a global batch that does not split into equal micro-batches on every process.

        Raises:
            ValueError: batch_size is not divisible by world size × grad_accum.
        """
        if batch_size % (self.world * grad_accum):
            raise ValueError(
                f"batch_size {batch_size} is not divisible by world size {self.world} × grad_accum "
                f"{grad_accum}: every process takes an equal slice of each global batch"
            )

    def micro_batches(self, stream: Stream, step: int, batch_size: int, grad_accum: int) -> list[list[int]]:
        """Example indices of this process's `grad_accum` micro-batches of global step `step` (0-based)."""
        per_rank = batch_size // self.world
        micro = per_rank // grad_accum
        mine = stream.take(step * batch_size + self.rank * per_rank, per_rank)
        return [mine[j * micro : (j + 1) * micro] for j in range(grad_accum)]

    def loss_forward(self, mm: ModularModel, device: torch.device) -> nn.Module:
        """`batch -> output with .loss` for `mm`; wrapped in DistributedDataParallel under torchrun."""
        module = _LossModule(mm)
        if self.world == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for alone)."""
        if self.world > 1:
            dist.barrier()

    def gather_to_zero(self, payload: bytes) -> list[bytes]:
        """Every process's bytes, on rank 0 (other ranks get [])."""
        if self.world == 1:
            return [payload]
        size = torch.tensor([len(payload)], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        data = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        parts = [torch.zeros_like(data) for _ in range(self.world)]
        dist.all_gather(parts, data)  # every process receives all parts; rank 0 keeps them
        if self.rank != 0:
            return []
        return [bytes(p[: int(s.item())].cpu().tolist()) for p, s in zip(parts, sizes, strict=True)]


class _LossModule(nn.Module):
    """The loss-computing forward as one module, so that DDP wraps exactly what runs."""

    def __init__(self, mm: ModularModel) -> None:
        super().__init__()
        self.mm = mm

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        # Head mode when an active module has a head; else the HF model's own head and loss.
        if self.mm.head_name is not None:
            return self.mm(**batch)  # adds the units' regularization itself
        out = self.mm.model(**batch)
        extra = self.mm.regularization() if self.mm.model.training else None
        if extra is not None and out.loss is not None:
            out.loss = out.loss + extra  # e.g. diff pruning's L0 penalty on a language module
        return out
