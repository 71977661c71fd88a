"""The workers a training run drives: all M in this process (simulator) or this process's one.

Both expose the same small surface to the training loop -- forward/backward on each local
worker's batch, per-worker metrics averaged over all workers, evaluation, and the model state
to checkpoint -- so ``train.py`` has one loop for both engines.

Randomness (dropout) is part of the run, and stateless like the data: worker m's forward and
backward at step t run inside :func:`worker_rng`, which forks the global RNG and seeds it from
(seed, m, t) alone. So the simulator's worker m and torchrun's rank m draw the same dropout
masks, every worker draws its own, and a resumed run draws what the uninterrupted run drew --
with no RNG state to checkpoint. The global RNG outside is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


class SimWorkers:
    """M workers in one process over :class:`StackedReplicas` and :class:`SimulatedComm`."""

    def __init__(self, model: nn.Module, world_size: int):
        self.replicas = StackedReplicas(model, world_size)
        self.comm: Communicator = SimulatedComm(world_size)
        self.world_size = world_size
        self.local_workers = list(range(world_size))
        self.is_main = True
        self.engine = "sim"

    def parameters(self) -> list[torch.Tensor]:
        return self.replicas.parameters()

    def model(self, worker: int) -> nn.Module:
        return self.replicas[worker]

    def forward_backward(self, batches, device: str, bf16: bool, seed: int, step: int) -> dict[str, float]:
        """Each worker's forward/backward on its batch; random draws from (seed, worker, step)."""
        self.replicas.zero_grad()
        losses = []
        for m, (x, y) in zip(self.local_workers, batches):
            replica = self.replicas[m]
            with worker_rng(seed, m, step, _model_device(replica)):
                with _autocast(device, bf16):
                    _, loss = replica(x.to(device), y.to(device))
                loss.backward()
            losses.append(loss.item())
        self.replicas.collect_grads()
        stacked = self.replicas.parameters()
        gnorm = torch.stack([p.grad.float().flatten(1).pow(2).sum(1) for p in stacked]).sum(0).sqrt()
        # float64 means over workers, as ProcessWorkers' float64 all-reduce computes them
        return {"loss": sum(losses) / len(losses), "grad_norm": sum(gnorm.tolist()) / len(losses)}

    def param_norm(self) -> float:
        sq = torch.stack([p.detach().float().flatten(1).pow(2).sum(1) for p in self.parameters()]).sum(0)
        return sum(sq.sqrt().tolist()) / self.world_size

    def identical(self) -> bool:
        return all(torch.equal(p[0].expand_as(p), p) for p in self.parameters())

    @torch.no_grad()
    def evaluate(self, val_batches, device: str, bf16: bool) -> float:
        """Mean over workers of each worker's validation loss (one model if all are equal)."""
        workers = [0] if self.identical() else self.local_workers
        per_worker = [_eval_model(self.replicas[m], val_batches, device, bf16) for m in workers]
        return sum(per_worker) / len(per_worker)

    def model_state(self) -> dict[str, Any]:
        return {"stacked": self.replicas.state_dict()}

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.replicas.load_state_dict(state["stacked"])

    def worker_state_dict(self, worker: int) -> dict[str, torch.Tensor]:
        return self.replicas.worker_state_dict(worker)


class ProcessWorkers:
    """This process's one worker; peers reached through a torch.distributed communicator."""

    def __init__(self, model: nn.Module, comm: Communicator):
        self.net = model
        self.comm = comm
        self.world_size = comm.world_size
        self.rank = comm.rank  # type: ignore[attr-defined]
        self.local_workers = [self.rank]
        self.is_main = self.rank == 0
        self.engine = "torch.distributed"

    def parameters(self) -> list[torch.Tensor]:
        return list(self.net.parameters())

    def model(self, worker: int) -> nn.Module:
        return self.net

    def _mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=next(self.net.parameters()).device)
        self.comm.all_reduce_mean([t], ["metrics"])
        return t.tolist()

    def forward_backward(self, batches, device: str, bf16: bool, seed: int, step: int) -> dict[str, float]:
        """This rank's forward/backward; random draws from (seed, rank, step), as the simulator's."""
        self.net.zero_grad(set_to_none=True)
        (x, y), = batches
        with worker_rng(seed, self.rank, step, _model_device(self.net)):
            with _autocast(device, bf16):
                _, loss = self.net(x.to(device), y.to(device))
            loss.backward()
        gsq = sum(p.grad.float().pow(2).sum() for p in self.net.parameters() if p.grad is not None)
        loss_mean, gnorm = self._mean([loss.item(), float(gsq) ** 0.5])
        return {"loss": loss_mean, "grad_norm": gnorm}

    def param_norm(self) -> float:
        sq = sum(p.detach().float().pow(2).sum() for p in self.net.parameters())
        return self._mean([float(sq) ** 0.5])[0]

    @torch.no_grad()
    def evaluate(self, val_batches, device: str, bf16: bool) -> float:
        return self._mean([_eval_model(self.net, val_batches, device, bf16)])[0]

    def model_state(self) -> dict[str, Any]:
        return {"module": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}

    def load_model_state(self, state: dict[str, Any]) -> None:
        if "module" not in state:
            raise ValueError("checkpoint holds simulator state; resume with --backend sim")
        self.net.load_state_dict(state["module"])

    def worker_state_dict(self, worker: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}


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
