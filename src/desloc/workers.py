"""The workers a training run drives: all M in this process (simulator) or this process's one.

Both expose the same small surface to the training loop -- forward/backward on each local
worker's batch, local metrics, their mean over all workers (:meth:`mean_over_workers`, the only
communication here, one all-reduce at a logging step under torch.distributed), evaluation, and
the model state to checkpoint -- so :mod:`desloc.loop` has one loop for every engine, and real workers
are never forced into lockstep between the method's own syncs.

Randomness (dropout) is part of the run, and stateless like the data: worker m's forward and
backward at step t run inside :func:`worker_rng`, which forks the global RNG and seeds it from
(seed, m, t) alone. So the simulator's worker m and torchrun's rank m draw the same dropout
masks, every worker draws its own, and a resumed run draws what the uninterrupted run drew --
with no RNG state to checkpoint. The global RNG outside is left as it was.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from desloc.comm import SimulatedComm
from desloc.comm.base import Communicator
from desloc.sim import StackedReplicas


# Extra entropy word: the dropout stream of (seed, worker, step) is not the data stream's
# (desloc.data draws batches from SeedSequence((seed, worker, step))).
_RNG_STREAM = 0x64726F70  # "drop"


def worker_seed(seed: int, worker: int, step: int) -> int:
    """The seed of worker ``worker``'s random draws at step ``step``: a pure function of
    (seed, worker, step), below 2**63."""
    state = np.random.SeedSequence([int(seed), int(worker), int(step), _RNG_STREAM]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def worker_rng(seed: int, worker: int, step: int, device: torch.device | str) -> Iterator[None]:
    """Run the block with the global RNG of the CPU (and of ``device``, if an accelerator)
    seeded by :func:`worker_seed`; the previous RNG states are restored afterwards."""
    device = torch.device(device)
    s = worker_seed(seed, worker, step)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.default_generator.manual_seed(s)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(s)  # this device only: the others' RNGs are not forked
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(s)
            yield
    else:  # other accelerators: fork and seed everything
        with torch.random.fork_rng(device_type=device.type):
            torch.manual_seed(s)
            yield


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: str, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


@dataclass
class StepStats:
    """One step's local results: each local worker's loss (a tensor, not yet read: reading it
    would wait for the device; NaN for a worker that sat out) and, on measured steps, each local
    worker's gradient norm."""

    losses: torch.Tensor
    grad_norms: list[float] | None = None


class SimWorkers:
    """M workers in one process over :class:`StackedReplicas` and :class:`SimulatedComm`."""

    def __init__(self, model: nn.Module, world_size: int):
        self.replicas = StackedReplicas(model, world_size)
        self.comm: Communicator = SimulatedComm(world_size)
        self.world_size = world_size
        self.local_workers = list(range(world_size))

    def parameters(self) -> list[torch.Tensor]:
        return self.replicas.parameters()

    def forward_backward(self, batches, device: str, bf16: bool, seed: int, step: int,
                         measure: bool = False, idle: Collection[int] = ()) -> StepStats:
        """Each worker's forward/backward on its batch; random draws from (seed, worker, step).
        Workers in ``idle`` compute nothing (zero gradients; their loss is NaN, not averaged)."""
        self.replicas.zero_grad()
        losses = []
        for m, (x, y) in zip(self.local_workers, batches):
            if m in idle:
                losses.append(torch.full((), math.nan, device=_model_device(self.replicas[m])))
                continue
            replica = self.replicas[m]
            with worker_rng(seed, m, step, _model_device(replica)):
                with _autocast(device, bf16):
                    _, loss = replica(x.to(device), y.to(device))
                loss.backward()
            losses.append(loss.detach())
        self.replicas.collect_grads()
        norms = None
        if measure:
            stacked = self.replicas.parameters()
            norms = torch.stack([p.grad.float().flatten(1).pow(2).sum(1) for p in stacked]).sum(0).sqrt().tolist()
        return StepStats(torch.stack(losses), norms)

    def param_norms(self) -> list[float]:
        """Each local worker's parameter norm."""
        sq = torch.stack([p.detach().float().flatten(1).pow(2).sum(1) for p in self.parameters()]).sum(0)
        return sq.sqrt().tolist()

    def mean_over_workers(self, columns: dict[str, list[float]]) -> dict[str, float]:
        """Each column's mean over the workers (all of them are here; float64, as ProcessWorkers')."""
        return {k: sum(v) / len(v) for k, v in columns.items()}

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's part of ``tensor``: all of it (every worker's tensors are whole here)."""
        return tensor

    def identical(self) -> bool:
        return all(torch.equal(p[0].expand_as(p), p) for p in self.parameters())

    @torch.no_grad()
    def evaluate(self, val_batches, device: str, bf16: bool) -> list[float]:
        """Each worker's validation loss (just one if all the models are equal)."""
        workers = [0] if self.identical() else self.local_workers
        return [_eval_model(self.replicas[m], val_batches, device, bf16) for m in workers]

    def model_state(self) -> dict[str, Any]:
        return {"stacked": self.replicas.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.replicas.load_state_dict(state["stacked"])


class ProcessWorkers:
    """This process's one worker; peers reached through a torch.distributed communicator."""

    def __init__(self, model: nn.Module, comm: Communicator):
        self.net = model
        self.comm = comm
        (self.rank,) = comm.local_workers
        self.local_workers = [self.rank]

    @property
    def world_size(self) -> int:
        """The workers M (under --ft: the last round's participants)."""
        return self.comm.world_size

    def parameters(self) -> list[torch.Tensor]:
        return list(self.net.parameters())

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's part of ``tensor``: all of it (a worker is one process)."""
        return tensor

    def _mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=next(self.net.parameters()).device)
        self.comm.all_reduce_mean([t], ["metrics"])
        return t.tolist()

    def forward_backward(self, batches, device: str, bf16: bool, seed: int, step: int,
                         measure: bool = False, idle: Collection[int] = ()) -> StepStats:
        """This rank's forward/backward; random draws from (seed, rank, step), as the simulator's.
        Nothing is communicated (metrics are averaged only when logged: :meth:`mean_over_workers`).
        An idle rank (in ``idle``) computes nothing."""
        self.net.zero_grad(set_to_none=False)  # in place: DDP's gradients stay views of its flat buffer
        if self.rank in idle:
            return StepStats(torch.full((1,), math.nan, device=_model_device(self.net)), [math.nan] if measure else None)
        (x, y), = batches
        with worker_rng(seed, self.rank, step, _model_device(self.net)):
            with _autocast(device, bf16):
                _, loss = self.net(x.to(device), y.to(device))
            loss.backward()
        norms = None
        if measure:
            gsq = sum(p.grad.float().pow(2).sum() for p in self.net.parameters() if p.grad is not None)
            norms = [float(gsq) ** 0.5]
        return StepStats(loss.detach().reshape(1), norms)

    def param_norms(self) -> list[float]:
        sq = sum(p.detach().float().pow(2).sum() for p in self.net.parameters())
        return [float(sq) ** 0.5]

    def mean_over_workers(self, columns: dict[str, list[float]]) -> dict[str, float]:
        """One float64 all-reduce (tag "metrics") of this rank's value of every column."""
        return dict(zip(columns, self._mean([v[0] for v in columns.values()])))

    @torch.no_grad()
    def evaluate(self, val_batches, device: str, bf16: bool) -> list[float]:
        return [_eval_model(self.net, val_batches, device, bf16)]

    def per_process(self, value: float) -> list[float]:
        """Every process's ``value``, in rank order (one float64 all-reduce, tag "metrics"; exact
        for integers below 2**53 / M)."""
        onehot = [0.0] * self.world_size
        onehot[self.rank] = float(value) * self.world_size
        return self._mean(onehot)

    def model_state(self) -> dict[str, Any]:
        return {"module": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}

    def load_model_state(self, state: dict[str, Any]) -> None:
        if "module" not in state:
            raise ValueError("checkpoint holds simulator state; resume with --backend sim")
        self.net.load_state_dict(state["module"])


class FtWorkers(ProcessWorkers):
    """This process's one worker of a ``--ft`` job (a torchft replica group): it writes its own run
    directory and logs its own metrics -- a logging step sends nothing, so a worker never waits
    for a peer outside the method's syncs. ``world_size`` is the last round's participants."""

    def mean_over_workers(self, columns: dict[str, list[float]]) -> dict[str, float]:
        return {k: float(v[0]) for k, v in columns.items()}


class ShardedWorkers(ProcessWorkers):
    """This process's shard ``shard`` of its worker, a replica group of ``shards`` processes
    (``--shard N``, :mod:`desloc.comm.fsdp`): the model is FSDP2-sharded over the group, the
    communicator (:class:`desloc.comm.mesh.MeshComm`) averages over the replica groups. The group's
    batch (worker r's, as unsharded) is split by rows: shard s computes on rows
    [s B/N, (s+1) B/N), and FSDP's gradient reduce-scatter averages the shards, so
    the group's gradient is the one of the whole batch. Logged values are the group's: losses and
    norms are reduced over the shards first (observer traffic inside the group), then over groups."""

    def __init__(self, model: nn.Module, comm: Communicator, shard: int, shards: int):
        super().__init__(model, comm)
        self.sharded_params = list(model.parameters())  # DTensors (FSDP swaps in gathered ones while unsharded)
        self.shard, self.shards = shard, shards

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's shard of ``tensor`` (a view: writes show through)."""
        from desloc.comm.fsdp import local

        return local(tensor)

    def _group_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=_model_device(self.net))
        return self.comm.group_sum(t).tolist()

    def _mean(self, values: list[float]) -> list[float]:
        group_mean = [v / self.shards for v in self._group_sum(values)]
        return super()._mean(group_mean)

    def forward_backward(self, batches, device: str, bf16: bool, seed: int, step: int,
                         measure: bool = False, idle: Collection[int] = ()) -> StepStats:
        self.net.zero_grad(set_to_none=True)
        if self.rank in idle:  # the whole group sits out (gasloc): no collective is started
            return StepStats(torch.full((1,), math.nan, device=_model_device(self.net)), [math.nan] if measure else None)
        (x, y), = batches
        rows = x.shape[0] // self.shards
        part = slice(self.shard * rows, (self.shard + 1) * rows)
        # dropout: shard 0 draws worker r's stream; every other shard a stream of its own
        with worker_rng(seed, self.rank + self.world_size * self.shard, step, _model_device(self.net)):
            with _autocast(device, bf16):
                _, loss = self.net(x[part].to(device), y[part].to(device))
            loss.backward()
        norms = None
        if measure:
            gsq = sum(float(self.local_part(p.grad).float().pow(2).sum()) for p in self.sharded_params
                      if p.grad is not None)
            norms = [self._group_sum([gsq])[0] ** 0.5]
        return StepStats(loss.detach().reshape(1), norms)

    def param_norms(self) -> list[float]:
        sq = sum(float(self.local_part(p).detach().float().pow(2).sum()) for p in self.sharded_params)
        return [self._group_sum([sq])[0] ** 0.5]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.sharded_params)

    @torch.no_grad()
    def evaluate(self, val_batches, device: str, bf16: bool) -> list[float]:
        """Every shard runs the whole validation set (FSDP's forward is collective in the group);
        they compute the same numbers. FSDP keeps the root's parameters gathered after a forward
        that no backward follows: they are resharded here, so that training and the optimizer see
        the sharded parameters again."""
        loss = _eval_model(self.net, val_batches, device, bf16)
        self.net.reshard()
        return [loss]


Workers = SimWorkers | ProcessWorkers  # FtWorkers and ShardedWorkers are ProcessWorkers


def _eval_model(model: nn.Module, val_batches, device: str, bf16: bool) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in val_batches:
        with _autocast(device, bf16):
            _, loss = model(x.to(device), y.to(device))
        total += loss.item()
    model.train(was_training)
    return total / max(len(val_batches), 1)
