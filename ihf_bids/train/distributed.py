"""Data-parallel training over several processes (torchrun, DistributedDataParallel).

``torchrun`` starts one process per GPU (or per CPU worker) and tells each its place through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`~ihf_bids.train.loop.train_model` reads it with :func:`init_distributed`. Without those
variables (or with ``WORLD_SIZE=1``) nothing changes: one process, no process group.

How a step stays the single-process step: every rank draws the *same* global batch from the
same seeded generator and keeps its own contiguous shard (:meth:`DistributedContext.shard`);
the loss's random query positions come from a generator in the same state on every rank and
are shared by all samples; the loss is a mean over samples, and DDP averages the gradients of
equal shards, which is the gradient of the global batch's mean. Results therefore match a
single process on the same global batch up to the order of floating-point sums
(tests/test_distributed.py measures it). Rank 0 alone writes profiles, checkpoints and the
model; the other ranks read what it wrote (the output directory must be on a file system all
nodes share).

Examples
--------
>>> ctx = DistributedContext()          # what a plain (non-torchrun) process gets
>>> ctx.enabled, ctx.is_main, ctx.shard(8)
(False, True, slice(0, 8, None))
>>> DistributedContext(rank=1, world_size=2).shard(8)
slice(4, 8, None)
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DistributedContext", "context_from_env", "init_distributed"]

LOGGER = logging.getLogger("ihf_bids.train")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place among the training processes.

    Attributes
    ----------
    rank, world_size, local_rank : int
        Global rank, number of processes, rank on this node (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs progress."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's part of a global batch of ``batch_size`` samples.

        Raises
        ------
        ValueError
            If the batch does not split evenly (unequal shards would weight samples unequally).
        """
        if batch_size % self.world_size:
            raise ValueError(
                f"the batch size {batch_size} does not split evenly over {self.world_size} training processes; "
                f"use a multiple of {self.world_size} (--train-preset) or another number of processes"
            )
        part = batch_size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def device(self, device: str) -> str:
        """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) when distributed."""
        if self.enabled and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (the logged loss parts); unchanged in one process."""
        if not self.enabled:
            return dict(values)
        import torch
        import torch.distributed as dist

        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.to(self.device("cuda"))
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.cpu().tolist())}

    def wrap(self, model, device: str):
        """``model`` inside DistributedDataParallel when distributed; ``model`` itself otherwise."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda"):
            return DistributedDataParallel(model, device_ids=[int(device.split(":")[1])])
        return DistributedDataParallel(model)


def context_from_env(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them).

    >>> context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    DistributedContext(rank=3, world_size=4, local_rank=1)
    >>> context_from_env({})
    DistributedContext(rank=0, world_size=1, local_rank=0)
    """
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return DistributedContext(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: str) -> DistributedContext:
    """Join the process group that torchrun set up (once per process); see the module docstring.

    ``device`` is the resolved device (``cpu`` or ``cuda``): NCCL on GPUs, gloo on CPUs.
    The group is destroyed when the process exits.
    """
    ctx = context_from_env()
    if not ctx.enabled:
        return ctx
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        LOGGER.info("training process %d of %d (%s backend, local rank %d)", ctx.rank, ctx.world_size, backend,
                    ctx.local_rank)
    elif dist.get_world_size() != ctx.world_size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says {ctx.world_size}")
    return ctx


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
