"""Run M copies of an ``nn.Module`` in one process for the simulator.

:class:`StackedReplicas` keeps, for every parameter, one leaf tensor of shape ``[M, *shape]``
(what the inner optimizer and :class:`~desloc.comm.SimulatedComm` see) and M ordinary modules
whose parameters are *views* of its rows. Each worker runs its own forward/backward on its
replica (a plain loop, which beats ``vmap`` on CPU), and the optimizer's in-place updates are
visible to every replica at once.

The stacked tensors are themselves views of one flat ``[M, numel]`` buffer (the zero-copy
layout of :mod:`desloc.algorithms.flat`), and so are their gradients: replica m's ``p.grad`` is
row m of the stacked gradient, which autograd accumulates into in place (gradients are zeroed,
never set to None), so a worker's backward writes straight into the buffer a DDP sync reduces.
If anything rebinds a stacked tensor (``.data``, ``.grad``), the replicas follow it at the next
:meth:`zero_grad`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from desloc.algorithms.flat import FlatGroup


class StackedReplicas:
    """M replicas of ``module`` with stacked storage.

    Args:
        module: the model; replica m starts as an exact copy of it (identical initialisation,
            as with DDP).
        world_size: M.
    """

    def __init__(self, module: nn.Module, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size (M) must be >= 1, got {world_size}")
        self.world_size = world_size
        self.replicas = [copy.deepcopy(module) for _ in range(world_size)]
        self.names = [name for name, _ in module.named_parameters()]
        base = dict(module.named_parameters())
        stacked = [base[n].detach().unsqueeze(0).expand(world_size, *base[n].shape) for n in self.names]
        params = FlatGroup(stacked, world_size)  # one [M, numel] buffer per dtype, values copied in
        grads = FlatGroup([torch.zeros_like(v) for v in params.views], world_size)
        self.stacked: dict[str, torch.Tensor] = dict(zip(self.names, params.views))
        for name, g in zip(self.names, grads.views):
            self.stacked[name].grad = g
        self._replica_params = [[replica.get_parameter(n) for replica in self.replicas] for n in self.names]
        self._bind_replicas()

    def _bind_replicas(self) -> None:
        """Replica m's parameter and gradient are row m of the stacked tensor and its gradient."""
        for name, replica_params in zip(self.names, self._replica_params):
            stacked = self.stacked[name]
            if stacked.grad is None:
                stacked.grad = torch.zeros_like(stacked)
            for m, p in enumerate(replica_params):
                row, grad_row = stacked[m], stacked.grad[m]
                if p.data_ptr() != row.data_ptr() or p.shape != row.shape:
                    p.data = row  # a view: optimizer updates show through
                if p.grad is None or p.grad.data_ptr() != grad_row.data_ptr():
                    p.grad = grad_row

    def parameters(self) -> list[torch.Tensor]:
        """The stacked ``[M, ...]`` tensors, in ``module.named_parameters()`` order."""
        return [self.stacked[n] for n in self.names]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, self.stacked[n]) for n in self.names)

    def __getitem__(self, m: int) -> nn.Module:
        return self.replicas[m]

    def collect_grads(self) -> None:
        """Make every stacked ``.grad`` hold the replicas' gradients. Backward writes into them
        directly; this only copies a gradient that autograd or a user put elsewhere."""
        for name, replica_params in zip(self.names, self._replica_params):
            stacked_grad = self.stacked[name].grad
            for m, p in enumerate(replica_params):
                row = stacked_grad[m]
                if p.grad is None:
                    row.zero_()
                    p.grad = row
                elif p.grad.data_ptr() != row.data_ptr():
                    row.copy_(p.grad)
                    p.grad = row

    def zero_grad(self) -> None:
        """Zero every gradient in place (they stay views of the flat gradient buffer)."""
        self._bind_replicas()
        for name in self.names:
            self.stacked[name].grad.zero_()

    def train(self, mode: bool = True) -> "StackedReplicas":
        for r in self.replicas:
            r.train(mode)
        return self

    def eval(self) -> "StackedReplicas":
        return self.train(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.stacked.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.names:
            if state[n].shape != self.stacked[n].shape:
                raise ValueError(
                    f"parameter {n!r}: checkpoint shape {tuple(state[n].shape)} != "
                    f"{tuple(self.stacked[n].shape)} (is the number of workers or the model different?)"
                )
            self.stacked[n].copy_(state[n])
