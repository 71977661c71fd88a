"""A Communicator over a torchft ``Manager`` (optional extra: ``pip install -e '.[ft]'``).

One desloc worker = one torchft replica group. The engine of ``desloc train --ft``
(:mod:`desloc.runtime.torchft` opens the rounds and heals); usable on its own too. What it does, checked by
``tests/test_torchft_comm.py`` (replica threads, real Lighthouse) and ``tests/test_ft.py``
(processes, SIGKILL and restart):

* **Rounds.** Membership is decided only where something is sent: a round is a torchft quorum
  (:meth:`start_round`), opened by :mod:`desloc.runtime.torchft` at the start of a step whose schedule has a
  sync (or by the first collective, if nobody opened one), and closed by the commit decision
  after that step's sync. Local steps never wait on the network.
* **The average is over the round's participants**: torchft's AVG all-reduce sums and then
  divides by ``num_participants()``, the arithmetic of the other engines (sum, then divide).
* **All or nothing.** After the all-reduces, ``should_commit()`` says whether this replica group
  saw every collective succeed. If not, every tensor is put back to its value before the call,
  ``failed_syncs`` counts it and the ledger does not. That undoes the tensors only: the method
  acts on the returned tensors within the same ``step()`` (DDP's inner step, an outer step, a
  reset of states), so :mod:`desloc.runtime.torchft` restores the whole step from its snapshot and redoes it
  in a new round. torchft decides commits per replica group: a group whose commit failed while
  its peers' succeeded is one commit behind them and heals from a peer in the redo's round.
* **The closing round** (:meth:`close_round`): a quorum with a one-element all-reduce and a
  commit that is not a sync (no ledger, no ``committed_syncs``); :mod:`desloc.runtime.torchft` runs it after
  the last step, so a peer whose last sync failed can heal before everyone leaves (the
  all-reduce keeps the peers serving their state until the healer has fetched it).
* **Fault hook** (tests only): ``after_reduce(i, n)``, if set, is called after the i-th of the
  call's n per-tensor all-reduces (:mod:`desloc.runtime.torchft` uses it for ``DESLOC_FT_FAULT``).

``world_size`` is the last round's participant count; ``rank`` this worker's fixed index (its
data shard and dropout stream: ``--replica-id``), not its place in the quorum. Overlapped
(``hidden_steps > 0``) flat all-reduces complete at once here: the commit decision needs them
finished, and the numbers are the same. Compressed syncs (``all_gather_flat``) are not
implemented here (``has_all_gather`` is False): the all-or-nothing commit covers all-reduces only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from desloc.comm.base import Communicator, PendingReduce
from desloc.comm.ledger import CommLedger


class TorchftComm(Communicator):
    """Syncs through ``manager`` (a ``torchft.Manager``); ``replica`` is this worker's index."""

    def __init__(self, manager, world_size: int = 1, replica: int = 0):
        self.manager = manager
        self.world_size = int(world_size)
        self.rank = int(replica)
        self.ledger = CommLedger(self.world_size)
        self.failed_syncs = 0
        self.committed_syncs = 0
        self.round_open = False
        self.participating_rank: int | None = None
        self.on_commit = None  # callable(committed: bool, seconds: float), e.g. desloc.runtime.torchft's log
        self.after_reduce = None  # callable(i, n) after the i-th of n per-tensor all-reduces (DESLOC_FT_FAULT)

    @property
    def stacked(self) -> bool:
        return False

    def worker_numel(self, tensor: torch.Tensor) -> int:
        return tensor.numel()

    @property
    def has_all_gather(self) -> bool:
        """False: ``all_gather_flat`` raises NotImplementedError (no all-or-nothing gathers here)."""
        return False

    def start_round(self, timeout=None) -> None:
        """A new quorum (blocking; torchft heals this group here if it is behind its peers)."""
        self.manager.start_quorum(timeout=timeout)
        self.world_size = self.manager.num_participants()
        self.participating_rank = self.manager.participating_rank()
        self.ledger.world_size = self.world_size
        self.round_open = True

    def commit(self) -> bool:
        """Close the round: torchft's commit decision for this replica group."""
        t0 = time.perf_counter()
        ok = bool(self.manager.should_commit())
        self.round_open = False
        if self.on_commit is not None:
            self.on_commit(ok, time.perf_counter() - t0)
        return ok

    def close_round(self, timeout=None) -> bool:
        """The closing round: join a quorum (unless one is open), all-reduce one element, commit.
        Nothing of the method is sent and nothing is counted; returns the commit decision."""
        if not self.round_open:
            self.start_round(timeout=timeout)
        self.manager.allreduce(torch.zeros(1)).wait()  # a healer fetches its peer's state before this completes
        return self.commit()

    def _all_or_nothing(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Average ``tensors`` in place over the round; roll back and return False on failure."""
        if not self.round_open:
            self.start_round()
        before = [t.detach().clone() for t in tensors]
        for i, t in enumerate(tensors):  # one at a time: torchft's process group serves one collective per call
            self.manager.allreduce(t).wait()  # torchft's AVG: SUM, then divided by num_participants()
            if self.after_reduce is not None:
                self.after_reduce(i, len(tensors))
        if self.commit():
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
