"""The workers a training run drives: all M in this process (simulator) or this process's one.

Both expose the same small surface to the training loop -- forward/backward on each local
worker's batch, per-worker metrics averaged over all workers, evaluation, and the model state
to checkpoint -- so ``train.py`` has one loop for both engines.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from desloc.comm import SimulatedComm
from desloc.comm.base import Communicator
from desloc.sim import StackedReplicas


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

    def forward_backward(self, batches, device: str, bf16: bool) -> dict[str, float]:
        self.replicas.zero_grad()
        losses = []
        for m, (x, y) in zip(self.local_workers, batches):
            with _autocast(device, bf16):
                _, loss = self.replicas[m](x.to(device), y.to(device))
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

    def forward_backward(self, batches, device: str, bf16: bool) -> dict[str, float]:
        self.net.zero_grad(set_to_none=True)
        (x, y), = batches
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
