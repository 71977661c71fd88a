"""M workers in one process: every tensor carries the workers on dim 0.

Averaging is ``t.sum(0) / M`` broadcast back to every worker. The reduction runs over workers in
a fixed order, so results are deterministic; for M = 2 the sum is order-free and equals what a
2-process gloo all-reduce produces, bit for bit.

All-gather (:meth:`Communicator.all_gather_flat`): the ``[M, nbytes]`` payload already holds every
worker's row in rank order, so it *is* the gathered tensor: no copy, returned as is (the caller
must not modify it before the handle's wait, as on a real engine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from desloc.comm.base import Communicator, PendingGather, PendingReduce, mix_rows
from desloc.comm.ledger import CommLedger


class SimulatedComm(Communicator):
    """In-process communicator for ``world_size`` stacked workers."""

    def __init__(self, world_size: int):
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(
                f"world_size (number of workers M) must be an integer >= 1, got {world_size!r}; "
                "use 1 for a single worker"
            )
        self.world_size = world_size
        self.ledger = CommLedger(world_size)

    @property
    def stacked(self) -> bool:
        return True

    @property
    def local_workers(self) -> list[int]:
        return list(range(self.world_size))

    def worker_view(self, tensor: torch.Tensor, worker: int) -> torch.Tensor:
        self._check_stacked(tensor)
        return tensor[worker]

    def worker_numel(self, tensor: torch.Tensor) -> int:
        self._check_stacked(tensor)
        return tensor.numel() // self.world_size

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> None:
        self._check_args(tensors, tags)
        if not tensors:
            return
        for tensor in tensors:
            self._check_stacked(tensor)
        self._record_all_reduce(tensors, tags)
        self._average(tensors)

    def _average(self, tensors: Sequence[torch.Tensor]) -> None:
        for tensor in tensors:
            mean = tensor.sum(dim=0, keepdim=True).div_(self.world_size)
            tensor.copy_(mean.expand_as(tensor))

    def _check_flat(self, buffer: torch.Tensor) -> None:
        # rows contiguous: a whole flat buffer, or a fragment of one (columns [a, b) of every row)
        if buffer.dim() != 2 or buffer.shape[0] != self.world_size or (buffer.shape[1] > 1 and buffer.stride(1) != 1):
            raise ValueError(f"a flat buffer in the simulator is an [M={self.world_size}, numel] tensor with "
                             f"contiguous rows, got shape {tuple(buffer.shape)} strides {buffer.stride()}")

    def _reduce_flat(self, buffers: list[torch.Tensor], hidden: list[int]) -> list[PendingReduce]:
        """Everything now: nothing reads a buffer before its wait, so the numbers are those of a
        collective finished later (one reduction over dim 0 per buffer, as ``all_reduce_mean``)."""
        self._average(buffers)
        return [PendingReduce(b) for b in buffers]

    def _all_to_all(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        """[M(src), M(dst), c] -> what each destination receives: [M(dst), M(src), c]."""
        return [PendingGather(p.transpose(0, 1).contiguous()) for p in payloads]

    def _gather_flat(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        """Nothing to move: row m of each ``[M, nbytes]`` payload is worker m's payload."""
        return [PendingGather(p) for p in payloads]

    def mix(self, tensors: Sequence[torch.Tensor], tags: Sequence[str],
            neighbours: Sequence[Sequence[tuple[int, float]]]) -> None:
        self._check_args(tensors, tags)
        if len(neighbours) != self.world_size:
            raise ValueError(f"mix needs one neighbour list per worker ({self.world_size}), got {len(neighbours)}")
        if not tensors:
            return
        for tensor in tensors:
            self._check_stacked(tensor)
        self._record_mix(tensors, tags, neighbours)
        for tensor in tensors:
            mixed = torch.stack([mix_rows(tensor, row) for row in neighbours])
            tensor.copy_(mixed)

    def _check_stacked(self, tensor: torch.Tensor) -> None:
        if tensor.dim() == 0 or tensor.shape[0] != self.world_size:
            raise ValueError(
                f"SimulatedComm expects tensors of shape [M={self.world_size}, ...], got "
                f"{tuple(tensor.shape)}; build the model with desloc.sim.StackedReplicas"
            )
