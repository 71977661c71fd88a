"""torch.distributed communicator: one worker per process, bucketed all-reduce.

Initialise explicitly (never at import): :func:`init_from_env` reads the standard torchrun
variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``) and picks
NCCL when CUDA is available, gloo otherwise; multi-node runs work as torchrun sets them.

The methods' syncs use ``all_reduce_mean_flat``: their parameters, states and gradients are views
of flat buffers (:mod:`desloc.algorithms.flat`), so each buffer is all-reduced in place (in
chunks of at most ``bucket_bytes``, each a view) and divided by M: no copy before or after the
network. With ``hidden_steps > 0`` the collective is issued with ``async_op=True`` and the
division happens in :meth:`PendingReduce.wait`, when the caller needs the result.

``all_reduce_mean`` (any list of tensors: metrics, tests, the copying reference path) groups
tensors by (dtype, device), copies them into flat buckets of at most ``bucket_bytes``, issues one
SUM all-reduce per bucket, divides by the world size and copies back (a reused buffer, the
division fused into the copy back). SUM-then-divide (not ``ReduceOp.AVG``) keeps the numerics
identical to the simulator on both paths.

``all_gather_flat`` (compressed syncs' encoded uint8 payloads): one
``dist.all_gather_into_tensor`` per payload into a fresh ``[M, nbytes]`` tensor (row m = rank m's
payload in ``group``), ``async_op=True`` and waited at once unless ``hidden_steps > 0``; counted in
``gathers_issued``. The same code runs on gloo and NCCL. What each path costs against a raw all-reduce is in
``benchmarks/README.md`` (sync_cost.py).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from desloc.comm.base import Communicator, PendingGather, PendingReduce, mix_rows
from desloc.comm.ledger import CommLedger

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> str:
    """Initialise the default process group from torchrun's environment. Returns the backend."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed backend needs {', '.join(missing)} in the environment; "
            "launch with `torchrun --nproc_per_node M ...` or use the simulator (--backend sim)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return backend


def local_store():
    """A TCPStore served by this process on 127.0.0.1 (a free port): a torchft replica group's
    store when it is not launched by torchrun (desloc.runtime.torchft)."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _in_order(launch, hidden: list[int], out: list):
    """Issue ``launch(i)`` for every buffer: the blocking ones (``hidden[i] == 0``) first, all on the
    wire at once, and wait for them; then the overlapped ones, the one needed soonest first. The
    order is the same on every rank (it depends on ``hidden`` only). Returns ``out``."""
    blocking = [launch(i) for i in range(len(hidden)) if hidden[i] == 0]
    for pending in blocking:
        pending.wait()
    for i in sorted((i for i in range(len(hidden)) if hidden[i] > 0), key=lambda i: hidden[i]):
        launch(i)
    return out


class TorchDistComm(Communicator):
    """Communicator over an initialised ``torch.distributed`` process group."""

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistComm needs an initialised process group; call "
                "desloc.comm.torch_dist.init_from_env() (under torchrun) or "
                "torch.distributed.init_process_group(...) first"
            )
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.group = group
        self.bucket_bytes = int(bucket_bytes)
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.global_rank = dist.get_rank()  # in the default group (== rank unless ``group`` is a subgroup)
        self.ledger = CommLedger(self.world_size)
        self.buckets_reduced = 0  # network all-reduces issued (several per call when bucketed)
        self.gathers_issued = 0  # network all-gathers issued (one per payload of all_gather_flat)
        self._flat_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def stacked(self) -> bool:
        return False

    def worker_numel(self, tensor: torch.Tensor) -> int:
        return tensor.numel()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def _locals(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the network moves for ``tensors``: themselves here; a sharded replica group's
        communicator (:class:`desloc.comm.mesh.MeshComm`) moves each DTensor's local shard."""
        return list(tensors)

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], tags: Sequence[str]) -> None:
        self._check_args(tensors, tags)
        self._record_all_reduce(tensors, tags)
        tensors = self._locals(tensors)
        by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
        for tensor in tensors:
            by_kind[(tensor.dtype, tensor.device)].append(tensor)
        for group_tensors in by_kind.values():
            for bucket in self._buckets(group_tensors):
                self._reduce_bucket(bucket)

    def _reduce_flat(self, buffers: list[torch.Tensor], hidden: list[int]) -> list[PendingReduce]:
        out: list[PendingReduce | None] = [None] * len(buffers)

        def launch(i: int) -> PendingReduce:
            works = [dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                     for chunk in self._chunks(buffers[i])]
            self.buckets_reduced += len(works)
            out[i] = PendingReduce(buffers[i], works, self.world_size)
            return out[i]

        return _in_order(launch, hidden, out)

    def _all_to_all(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        return self._move_bytes(payloads, hidden, torch.empty_like, dist.all_to_all_single)

    def _gather_flat(self, payloads: list[torch.Tensor], hidden: list[int]) -> list[PendingGather]:
        shape = lambda p: torch.empty((self.world_size, p.numel()), dtype=p.dtype, device=p.device)  # noqa: E731
        return self._move_bytes(payloads, hidden, shape, dist.all_gather_into_tensor)

    def _move_bytes(self, payloads: list[torch.Tensor], hidden: list[int], receive, collective) -> list[PendingGather]:
        """One ``collective(received.view(-1), payload.view(-1))`` per encoded payload into
        ``receive(payload)``, asynchronous, in :func:`_in_order`. Every worker has the same payload
        sizes, so all of them skip an empty payload alike."""
        out: list[PendingGather | None] = [None] * len(payloads)

        def launch(i: int) -> PendingGather:
            payload = payloads[i]
            received = receive(payload)
            works = []
            if payload.numel():
                works.append(collective(received.view(-1), payload.view(-1), group=self.group, async_op=True))
                self.gathers_issued += 1
            out[i] = PendingGather(received, works)
            return out[i]

        return _in_order(launch, hidden, out)

    def _chunks(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """``buf`` in contiguous views of at most ``bucket_bytes`` (one view when it fits)."""
        per = max(1, self.bucket_bytes // buf.element_size())
        return [buf[i : i + per] for i in range(0, buf.numel(), per)] or [buf]

    def _buckets(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if buckets[-1] and size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += nbytes
        return [b for b in buckets if b]

    def _reduce_bucket(self, bucket: list[torch.Tensor]) -> None:
        if len(bucket) == 1 and bucket[0].is_contiguous():
            flat = bucket[0].view(-1)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            flat.div_(self.world_size)
        else:
            flat = self._flat_buffer(bucket[0], sum(t.numel() for t in bucket))
            torch.cat([t.reshape(-1) for t in bucket], out=flat)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for t in bucket:
                n = t.numel()
                torch.div(flat[offset : offset + n].view_as(t), self.world_size, out=t)  # = copy of sum / M
                offset += n
        self.buckets_reduced += 1

    def _flat_buffer(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A flat tensor of ``numel`` elements of ``like``'s kind, reused across calls."""
        key = (like.dtype, like.device)
        buf = self._flat_buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._flat_buffers[key] = buf
        return buf[:numel]

    def mix(self, tensors: Sequence[torch.Tensor], tags: Sequence[str],
            neighbours: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Gossip point to point: send to every worker that mixes us in, receive from ours.

        One flat buffer per call; ``batch_isend_irecv`` with each peer (never a global
        collective). The weighted sum uses :func:`desloc.comm.base.mix_rows`, the same
        arithmetic as the simulator, so the results agree bit for bit.
        """
        self._check_args(tensors, tags)
        if len(neighbours) != self.world_size:
            raise ValueError(f"mix needs one neighbour list per worker ({self.world_size}), got {len(neighbours)}")
        if not tensors:
            return
        me = self.rank
        row = sorted(neighbours[me])
        recv_from = [j for j, w in row if j != me and w > 0]
        send_to = [i for i, r in enumerate(neighbours) if i != me and any(j == me and w > 0 for j, w in r)]
        self._record_mix(tensors, tags, neighbours)  # every link of the round, as the simulator
        tensors = self._locals(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        received = {j: torch.empty_like(flat) for j in recv_from}
        peer = (lambda r: r) if self.group is None else (lambda r: dist.get_global_rank(self.group, r))
        ops = [dist.P2POp(dist.isend, flat, peer(dst), group=self.group) for dst in send_to]
        ops += [dist.P2POp(dist.irecv, received[j], peer(j), group=self.group) for j in recv_from]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        mixed = mix_rows({me: flat, **received}, row)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(mixed[offset : offset + n].view_as(t))
            offset += n
