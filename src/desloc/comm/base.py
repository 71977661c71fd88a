"""The one seam between algorithms and the network.

An algorithm sees its workers only through a :class:`Communicator`. Two real implementations:

* :class:`~desloc.comm.torch_dist.TorchDistComm` -- one worker per process, ``torch.distributed``
  (gloo on CPU, NCCL on GPU): flat buffers reduced in place (:meth:`all_reduce_mean_flat`, the
  methods' path: no copies, optionally asynchronous), other tensor lists through buckets.
* :class:`~desloc.comm.simulated.SimulatedComm` -- all M workers in one process. Every tensor
  the algorithm holds carries the workers on its leading dimension (``[M, *shape]``), so one
  elementwise optimizer step over the stacked tensor *is* M independent worker steps (bitwise:
  ``tests/test_simulator.py``) and averaging is a reduction over dim 0.

Algorithms are written once against this interface and never import ``torch.distributed``
(``tests/test_layering.py`` enforces it). Every collective records its payload in
``self.ledger`` from inside the implementation, through the shared helpers
:meth:`Communicator._record_all_reduce` and :meth:`Communicator._record_mix`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from desloc.comm.ledger import OBSERVER_TAGS, CommLedger


def mix_rows(stacked_or_list, row: Sequence[tuple[int, float]]) -> torch.Tensor:
    """sum_j w_j x_j over ``row`` in ascending j: the one gossip sum both engines compute.

    ``stacked_or_list[j]`` is worker j's tensor (a row of a stacked tensor, or a received buffer).
    """
    (j0, w0), *rest = sorted(row)
    acc = stacked_or_list[j0] * w0
    for j, w in rest:
        acc = acc + stacked_or_list[j] * w
    return acc


class PendingReduce:
    """One flat buffer's average in flight: :meth:`wait` blocks until the network is done and
    divides the sum by M in place (the same arithmetic as a blocking call). Idempotent."""

    def __init__(self, buffer: torch.Tensor, works: Sequence[Any] = (), world_size: int = 1):
        self.buffer = buffer
        self._works = list(works)
        self._world_size = world_size
        self.done = not self._works

    def wait(self) -> torch.Tensor:
        if not self.done:
            for work in self._works:
                work.wait()
            self.buffer.div_(self._world_size)
            self._works = []
            self.done = True
        return self.buffer


class Communicator(ABC):
    """Average tensors over workers, counting every byte.

    Attributes:
        world_size: number of workers M.
        ledger: the byte counter, filled by the implementation.
    """

    world_size: int
    ledger: CommLedger

    @property
    @abstractmethod
    def stacked(self) -> bool:
        """True when tensors carry all workers on dim 0 (the simulator)."""

    rank: int = 0  # this process's worker in a one-worker-per-process engine

    @property
    def local_workers(self) -> list[int]:
        """The workers whose tensors live in this process: this rank's one by default (one worker
        per process); the simulator holds all M. Algorithms address workers through this and
        :meth:`worker_view`, never through a rank or the engine's tensor layout."""
        return [self.rank]

    def worker_view(self, tensor: torch.Tensor, worker: int) -> torch.Tensor:
        """The part of ``tensor`` that belongs to local ``worker`` (a view: writes show through)."""
        if worker not in self.local_workers:
            raise ValueError(f"worker {worker} does not live in this process (it holds {self.local_workers})")
        return tensor

    @abstractmethod
    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> None:
        """Replace every tensor, in place, by its mean over the M workers.

        ``tags[i]`` names what ``tensors[i]`` is (``"params"``, ``"exp_avg"``...) for the ledger.
        """

    def all_reduce_mean_flat(self, buffers: Sequence[torch.Tensor], tags: Sequence[str],
                             hidden_steps: Sequence[int] | None = None) -> list[PendingReduce]:
        """Average flat buffers in place, one collective per buffer, with no copies: the methods'
        sync path (:mod:`desloc.algorithms.flat` lays parameters and states out as views of them).

        ``buffers[i]`` is one flat buffer: 1-D and contiguous on one worker per process,
        ``[M, numel]`` in the simulator. ``hidden_steps[i] = 0`` (default) blocks until buffer i
        is averaged; ``k > 0`` may leave it in flight -- the caller waits on the returned handle
        before anything reads it, ``k`` local steps later (an engine without asynchronous
        collectives finishes it now; the numbers are the same). Blocking buffers go first, then
        the others in increasing ``k`` (the one needed soonest first). One call in the ledger;
        listeners hear the bytes of each ``k`` separately (``hidden_steps=k``).
        """
        self._check_args(buffers, tags)
        hidden = [0] * len(buffers) if hidden_steps is None else [int(k) for k in hidden_steps]
        if len(hidden) != len(buffers) or any(k < 0 for k in hidden):
            raise ValueError(f"hidden_steps needs one integer >= 0 per buffer, got {hidden_steps}")
        for b in buffers:
            self._check_flat(b)
        self._record_all_reduce(buffers, tags, hidden)
        return self._reduce_flat(list(buffers), hidden)

    @property
    def has_flat_all_reduce(self) -> bool:
        """Whether this communicator implements :meth:`all_reduce_mean_flat` (both engines do; a
        user's communicator with ``all_reduce_mean`` only gets the copying sync path)."""
        cls = type(self)
        return (cls._reduce_flat is not Communicator._reduce_flat
                or cls.all_reduce_mean_flat is not Communicator.all_reduce_mean_flat)

    def _check_flat(self, buffer: torch.Tensor) -> None:
        if buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError(f"a flat buffer is 1-D and contiguous, got shape {tuple(buffer.shape)} "
                             f"strides {buffer.stride()}")

    def _reduce_flat(self, buffers: list[torch.Tensor], hidden: list[int]) -> list[PendingReduce]:
        """The engine's in-place reduction of :meth:`all_reduce_mean_flat` (already recorded)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement flat all-reduces")

    def mix(self, tensors: Sequence[torch.Tensor], tags: Sequence[str],
            neighbours: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Gossip: worker i's tensors become ``sum_j W_ij x_j`` over ``neighbours[i] = [(j, W_ij)]``.

        Only pairs with ``W_ij > 0`` exchange data, point to point; every link is counted in
        ``ledger.bytes_by_link``. The weighted sum runs over ascending j in every implementation.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement gossip mixing")

    @abstractmethod
    def worker_numel(self, tensor: torch.Tensor) -> int:
        """Number of elements one worker holds in ``tensor``."""

    def payload_bytes(self, tensor: torch.Tensor) -> int:
        return self.worker_numel(tensor) * tensor.element_size()

    def barrier(self) -> None:  # pragma: no cover - trivial in the simulator
        """Wait for every worker (no-op in the simulator)."""

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` in place over the processes that together hold this process's worker, and
        return it: a sharded replica group's shards (:class:`desloc.comm.mesh.MeshComm`), for the
        group's norms and metrics. Observer traffic: not a method sync, not in the ledger. A worker
        held by one process (every other engine): ``values`` unchanged."""
        return values

    def _check_args(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> None:
        if len(tensors) != len(tags):
            raise ValueError(f"all_reduce_mean got {len(tensors)} tensors but {len(tags)} tags")

    # Ledger bookkeeping, shared by every implementation so that both engines count alike
    # (the definitions are in desloc.comm.ledger).
    def add_listener(self, listener) -> None:
        """Tell ``listener`` about every call that moves method data, as the ledger counts it:
        ``listener.on_all_reduce(nbytes_per_worker, participants)`` and
        ``listener.on_mix(nbytes_per_worker, links)`` (e.g. :class:`desloc.timing.VirtualClock`).
        Observer traffic (logged metrics) is not reported. A collective left in flight for k local
        steps (:meth:`all_reduce_mean_flat`) is reported as ``on_all_reduce(..., hidden_steps=k)``."""
        self.__dict__.setdefault("_listeners", []).append(listener)

    def _method_bytes(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> int:
        return sum(self.payload_bytes(t) for t, tag in zip(tensors, tags) if tag not in OBSERVER_TAGS)

    def _record_all_reduce(self, tensors: Sequence[torch.Tensor], tags: Sequence[str],
                           hidden_steps: Sequence[int] | None = None) -> None:
        """One ``all_reduce_mean`` call: every worker sends each tensor's payload once."""
        if not tensors:
            return
        for tensor, tag in zip(tensors, tags):
            self.ledger.record(tag, self.payload_bytes(tensor))
        self.ledger.record_call(tags)
        hidden = [0] * len(tensors) if hidden_steps is None else list(hidden_steps)
        for k in sorted(set(hidden)):
            part = [(t, tag) for t, tag, h in zip(tensors, tags, hidden) if h == k]
            nbytes = self._method_bytes([t for t, _ in part], [tag for _, tag in part])
            if not nbytes:
                continue
            for listener in self.__dict__.get("_listeners", []):
                if k:
                    listener.on_all_reduce(nbytes, list(range(self.world_size)), hidden_steps=k)
                else:
                    listener.on_all_reduce(nbytes, list(range(self.world_size)))

    def _record_mix(self, tensors: Sequence[torch.Tensor], tags: Sequence[str],
                    neighbours: Sequence[Sequence[tuple[int, float]]]) -> None:
        """One ``mix`` call: every link ``j -> i`` (``W_ij > 0``, ``i != j``) of the round, for
        every worker -- each worker knows W, so every process records the same links."""
        if not tensors:
            return
        links = sorted((j, i) for i, row in enumerate(neighbours) for j, w in row if j != i and w > 0)
        for tensor, tag in zip(tensors, tags):
            self.ledger.record_links(tag, self.payload_bytes(tensor), links)
        self.ledger.record_call(tags)
        nbytes = self._method_bytes(tensors, tags)
        if nbytes and links:
            for listener in self.__dict__.get("_listeners", []):
                listener.on_mix(nbytes, links)
