"""A Communicator over a torchft ``Manager`` (optional extra: ``pip install -e '.[ft]'``).

Groundwork for the fault-tolerant engine of issue 11; ``desloc train`` does not use it yet (no
``--ft`` flag, no launcher, no recovery of a restarted worker through torchft's checkpoint
transport). What it does, and ``tests/test_torchft_comm.py`` checks with replica groups running
as threads against a real Lighthouse:

* Membership is decided only where something is sent: every call starts a torchft quorum
  (``start_quorum``), so local steps never wait on the network.
* The average is over the quorum's live participants: torchft all-reduces with SUM and divides
  by ``num_participants()``, the arithmetic of the other engines (sum, then divide).
* A call is all-or-nothing: after the all-reduces, ``should_commit()`` (itself collective) says
  whether every participant succeeded. If not, every tensor is put back to its value before the
  call -- the sync is skipped, never half applied -- and ``failed_syncs`` counts it; the ledger
  records committed calls only.

``world_size`` is the last quorum's participant count; ``rank`` this replica's participating rank.
Overlapped (``hidden_steps > 0``) flat all-reduces complete at once here: the commit decision
needs them finished, and the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from desloc.comm.base import Communicator, PendingReduce
from desloc.comm.ledger import CommLedger


class TorchftComm(Communicator):
    """One desloc worker = one torchft replica group (here: one process or thread)."""

    def __init__(self, manager, world_size: int = 1):
        self.manager = manager
        self.world_size = int(world_size)
        self.rank = 0
        self.ledger = CommLedger(self.world_size)
        self.failed_syncs = 0
        self.committed_syncs = 0

    @property
    def stacked(self) -> bool:
        return False

    def worker_numel(self, tensor: torch.Tensor) -> int:
        return tensor.numel()

    def _all_or_nothing(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Average ``tensors`` in place over the quorum; roll back and return False on failure."""
        self.manager.start_quorum()
        self.world_size = self.manager.num_participants()
        self.rank = self.manager.participating_rank() or 0
        self.ledger.world_size = self.world_size
        before = [t.detach().clone() for t in tensors]
        for t in tensors:  # one at a time: torchft's process group serves one collective per call
            self.manager.allreduce(t).wait()
        if self.manager.should_commit():
            self.committed_syncs += 1
            return True
        for t, saved in zip(tensors, before):
            t.copy_(saved)
        self.failed_syncs += 1
        return False

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> None:
        self._check_args(tensors, tags)
        if tensors and self._all_or_nothing(list(tensors)):
            self._record_all_reduce(tensors, tags)

    def all_reduce_mean_flat(self, buffers: Sequence[torch.Tensor], tags: Sequence[str],
                             hidden_steps: Sequence[int] | None = None) -> list[PendingReduce]:
        self._check_args(buffers, tags)
        for b in buffers:
            self._check_flat(b)
        if buffers and self._all_or_nothing(list(buffers)):
            self._record_all_reduce(buffers, tags)
        return [PendingReduce(b) for b in buffers]
