"""The one seam between algorithms and the network.

An algorithm sees its workers only through a :class:`Communicator`. Two real implementations:

* :class:`~desloc.comm.torch_dist.TorchDistComm` -- one worker per process, ``torch.distributed``
  (gloo on CPU, NCCL on GPU): flat buffers reduced in place (:meth:`all_reduce_mean_flat`, the
  methods' path: no copies, optionally asynchronous), other tensor lists through buckets.
  Encoded (compressed) payloads are all-gathered (:meth:`Communicator.all_gather_flat`).
* :class:`~desloc.comm.simulated.SimulatedComm` -- all M workers in one process. Every tensor
  the algorithm holds carries the workers on its leading dimension (``[M, *shape]``), so one
  elementwise optimizer step over the stacked tensor *is* M independent worker steps (bitwise:
  ``tests/test_simulator.py``) and averaging is a reduction over dim 0.

Compressed syncs all-gather instead of all-reducing (:meth:`Communicator.all_gather_flat`): every
worker encodes its message into a uint8 payload of the same size, every worker receives every
worker's payload in rank order, and decodes and averages all M itself with the same arithmetic,
so every worker ends with bitwise the same value on both engines (nothing is re-quantized in the
middle of the network). On a ring it costs each worker (M-1) x payload against 2(M-1)/M x full
for an all-reduce: cheaper whenever payload / full < 2 / M
(:meth:`desloc.timing.TimeModel.all_gather_time`).

Algorithms are written once against this interface and never import ``torch.distributed``
(``tests/test_layering.py`` enforces it). Every collective records its payload in
``self.ledger`` from inside the implementation, through the shared helpers
:meth:`Communicator._record_all_reduce`, :meth:`Communicator._record_all_gather` and
:meth:`Communicator._record_mix`.
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


class PendingGather:
    """One all-gather in flight: :meth:`wait` blocks until the network is done and returns the
    ``[M, nbytes]`` uint8 tensor whose row m is worker m's payload (the same on every worker).
    Idempotent: later calls return the same tensor."""

    def __init__(self, gathered: torch.Tensor, works: Sequence[Any] = ()):
        self.gathered = gathered
        self._works = list(works)
        self.done = not self._works

    def wait(self) -> torch.Tensor:
        if not self.done:
            for work in self._works:
                work.wait()
            self._works = []
            self.done = True
        return self.gathered


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
        hidden = self._check_hidden(hidden_steps, len(buffers))
        for b in buffers:
            self._check_flat(b)
        self._record_all_reduce(buffers, tags, hidden)
        return self._reduce_flat(list(buffers), hidden)

    def _check_hidden(self, hidden_steps: Sequence[int] | None, n: int) -> list[int]:
        hidden = [0] * n if hidden_steps is None else [int(k) for k in hidden_steps]
        if len(hidden) != n or any(k < 0 for k in hidden):
            raise ValueError(f"hidden_steps needs one integer >= 0 per buffer or payload ({n}), got {hidden_steps}")
        return hidden

    def all_to_all_flat(self, payloads: Sequence[torch.Tensor], tags: Sequence[str],
                        hidden_steps: Sequence[int] | None = None) -> list[PendingGather]:
        """Chunk j of every worker's payload to worker j: the first half of a compressed all-reduce
        (reduce-scatter of encoded chunks; :mod:`desloc.algorithms.fastsync`).

        ``payloads[i]`` is uint8: ``[M, c]`` contiguous on one worker per process (row j goes to
        worker j), ``[M(src), M(dst), c]`` in the simulator. ``handle.wait()`` returns ``[M, c]``
        (row m came from worker m) on one worker per process, ``[M(dst), M(src), c]`` in the
        simulator. ``hidden_steps`` as in :meth:`all_reduce_mean_flat`.

        Ledger: the tag counts the whole payload (M c bytes per worker), one call, and listeners
        hear ``on_all_reduce(M c, ...)``: with its second half -- an :meth:`all_gather_flat` of each
        worker's reduced c-byte chunk, issued with ``record=False`` -- the pair moves exactly the
        bytes of a ring all-reduce of the payload (2 (M-1)/M x M c per worker), so it is counted as
        one all-reduce of the encoded message, in the ledger's unit."""
        if not self.has_all_gather:
            raise NotImplementedError(f"{type(self).__name__} does not implement all_to_all_flat (compressed syncs)")
        self._check_args(payloads, tags)
        hidden = self._check_hidden(hidden_steps, len(payloads))
        m = self.world_size
        for p in payloads:
            want = (m, m) if self.stacked else (m,)
            if p.dtype != torch.uint8 or tuple(p.shape[:-1]) != want or not p.is_contiguous():
                raise ValueError(f"an all-to-all payload is a contiguous uint8 [{', '.join(map(str, want))}, c] "
                                 f"tensor, got {p.dtype} {tuple(p.shape)}")
        self._record_all_reduce(payloads, tags, hidden)  # M c bytes per worker each (payload_bytes)
        return self._all_to_all(list(payloads), hidden)

    def _all_to_all(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        raise NotImplementedError(f"{type(self).__name__} does not implement all_to_all_flat")

    def all_gather_flat(self, payloads: Sequence[torch.Tensor], tags: Sequence[str],
                        hidden_steps: Sequence[int] | None = None, record: bool = True) -> list[PendingGather]:
        """Every worker's uint8 payload, to every worker, in rank order: the compressed syncs' path
        (each worker decodes all M payloads and averages them itself).

        ``payloads[i]`` is uint8 with the same ``nbytes`` on every worker: 1-D and contiguous on one
        worker per process, ``[M, nbytes]`` contiguous in the simulator (row m = worker m's
        payload). Returns one handle per payload; ``handle.wait()`` returns a ``[M, nbytes]`` uint8
        tensor of every worker's payload in rank order, identical on every worker. The caller must
        not modify a payload before its handle's wait (the simulator returns the payload itself).
        ``hidden_steps`` as in :meth:`all_reduce_mean_flat`: ``0`` (default) is done on return,
        ``k > 0`` may stay in flight; blocking payloads go first, then increasing ``k``.

        Ledger: each payload's tag counts the payload bytes per worker (what each worker sends into
        the collective: its encoded message), one call for the whole list; listeners hear
        ``on_all_gather(nbytes, participants, hidden_steps=k)`` once per distinct ``k``. Raises
        ``NotImplementedError`` where :attr:`has_all_gather` is False. ``record=False``: the second
        half of a compressed all-reduce, already counted by its :meth:`all_to_all_flat`.
        """
        if not self.has_all_gather:
            raise NotImplementedError(
                f"{type(self).__name__} does not implement all_gather_flat (compressed syncs): use an "
                "engine whose has_all_gather is True (the simulator or torch.distributed), or sync uncompressed")
        self._check_args(payloads, tags)
        hidden = self._check_hidden(hidden_steps, len(payloads))
        for p in payloads:
            self._check_payload(p)
        if record:
            self._record_all_gather(payloads, tags, hidden)
        return self._gather_flat(list(payloads), hidden)

    @property
    def has_all_gather(self) -> bool:
        """Whether :meth:`all_gather_flat` works here: the simulator and torch.distributed; not a
        sharded replica group (:class:`desloc.comm.mesh.MeshComm`) nor the torchft communicator."""
        cls = type(self)
        return (cls._gather_flat is not Communicator._gather_flat
                or cls.all_gather_flat is not Communicator.all_gather_flat)

    def _check_payload(self, payload: torch.Tensor) -> None:
        if payload.dtype != torch.uint8:
            raise ValueError(f"an all-gather payload is a uint8 tensor (encoded bytes), got {payload.dtype}")
        self._check_flat(payload)

    def _gather_flat(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        """The engine's all-gather of :meth:`all_gather_flat` (already recorded)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement all_gather_flat")

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
        ``listener.on_all_reduce(nbytes_per_worker, participants)``,
        ``listener.on_all_gather(nbytes_per_worker, participants)`` and
        ``listener.on_mix(nbytes_per_worker, links)`` (e.g. :class:`desloc.timing.VirtualClock`).
        Observer traffic (logged metrics) is not reported. A collective left in flight for k local
        steps (:meth:`all_reduce_mean_flat`, :meth:`all_gather_flat`) is reported as
        ``on_all_reduce(..., hidden_steps=k)`` / ``on_all_gather(..., hidden_steps=k)``. A listener
        needs ``on_all_gather`` only if the run all-gathers (compressed syncs)."""
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

    def _record_all_gather(self, payloads: Sequence[torch.Tensor], tags: Sequence[str],
                           hidden_steps: Sequence[int]) -> None:
        """One ``all_gather_flat`` call: every worker sends each payload (its encoded message) once;
        counted as :meth:`_record_all_reduce` counts a tensor, so ``bytes_by_tag`` holds encoded bytes."""
        if not payloads:
            return
        for payload, tag in zip(payloads, tags):
            self.ledger.record(tag, self.payload_bytes(payload))
        self.ledger.record_call(tags)
        for k in sorted(set(hidden_steps)):
            part = [(p, tag) for p, tag, h in zip(payloads, tags, hidden_steps) if h == k]
            nbytes = self._method_bytes([p for p, _ in part], [tag for _, tag in part])
            if not nbytes:
                continue
            for listener in self.__dict__.get("_listeners", []):
                hear = getattr(listener, "on_all_gather", None)
                if hear is None:
                    raise TypeError(f"listener {type(listener).__name__} has no on_all_gather(nbytes, participants, "
                                    "hidden_steps=0), needed by compressed syncs; add one (as "
                                    "desloc.timing.VirtualClock.on_all_gather)")
                if k:
                    hear(nbytes, list(range(self.world_size)), hidden_steps=k)
                else:
                    hear(nbytes, list(range(self.world_size)))

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
