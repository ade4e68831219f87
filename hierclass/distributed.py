"""Training across processes with PyTorch's own machinery: torchrun, a process group, DistributedDataParallel.

``torchrun --nproc_per_node N -m hierclass train-flat ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. :func:`from_env` then joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU) and says which rank this process is; without
those variables it is the one process of a world of one, and nothing else changes. Every rank
builds the same model from the same seed, trains on its own share of each epoch (a
``DistributedSampler``), and DDP averages the gradients, so N processes with batch B take the
same steps as one process with batch N*B. Metrics are summed across ranks; only rank 0 writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hierclass.errors import HierclassError

__all__ = ["Dist", "from_env", "launched"]


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job.

    Attributes:
        rank: this process's rank (0: the one that writes logs and checkpoints).
        world: how many processes train together.
        local_rank: the rank on this machine (picks the GPU).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """Whether several processes train together (a process group is joined)."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the logs, checkpoints and resume state."""
        return self.rank == 0

    def all_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the ranks of ``values`` (float64, on the CPU); the values themselves alone."""
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.active:
            import torch.distributed as tdist

            if tdist.get_backend() == "nccl":
                t = t.cuda()
            tdist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.active:
            import torch.distributed as tdist

            tdist.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def from_env(device: str) -> tuple[Dist, str]:
    """This process's place in the job and its device; joins the process group under torchrun.

    Args:
        device: ``cpu`` or ``cuda`` (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).

    Returns:
        ``(dist, device)``.

    Raises:
        HierclassError: the launcher's variables are inconsistent.
    """
    if not launched():
        return Dist(), device
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise HierclassError(
            "WORLD_SIZE is set but RANK is missing or not a number; start the command with torchrun"
        ) from None
    if not 0 <= rank < world:
        raise HierclassError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1}); start the command with torchrun")
    import torch.distributed as tdist

    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local), device
