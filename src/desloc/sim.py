"""Run M copies of an ``nn.Module`` in one process for the simulator.

:class:`StackedReplicas` keeps, for every parameter, one leaf tensor of shape ``[M, *shape]``
(what the inner optimizer and :class:`~desloc.comm.SimulatedComm` see) and M ordinary modules
whose parameters are *views* of its rows. Each worker runs its own forward/backward on its
replica (a plain loop, which beats ``vmap`` on CPU); :meth:`collect_grads` stacks the replicas'
gradients into the leaf tensors' ``.grad`` before the optimizer step, and the optimizer's
in-place updates are visible to every replica at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


class StackedReplicas:
    """M replicas of ``module`` with stacked storage.

    Args:
        module: the model; replica m starts as an exact copy of it (identical initialisation,
            as with DDP), unless ``init_fn`` re-initialises each replica.
        world_size: M.
    """

    def __init__(self, module: nn.Module, world_size: int):
        if world_size < 1:
            raise ValueError(f"world_size (M) must be >= 1, got {world_size}")
        self.world_size = world_size
        self.replicas = [copy.deepcopy(module) for _ in range(world_size)]
        self.names = [name for name, _ in module.named_parameters()]
        base = dict(module.named_parameters())
        self.stacked: dict[str, torch.Tensor] = {}
        for name in self.names:
            p = base[name].detach()
            self.stacked[name] = p.unsqueeze(0).repeat(world_size, *([1] * p.dim())).contiguous()
        for m, replica in enumerate(self.replicas):
            for name, p in replica.named_parameters():
                p.data = self.stacked[name][m]  # a view: optimizer updates show through

    def parameters(self) -> list[torch.Tensor]:
        """The stacked ``[M, ...]`` tensors, in ``module.named_parameters()`` order."""
        return [self.stacked[n] for n in self.names]

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, self.stacked[n]) for n in self.names)

    def __getitem__(self, m: int) -> nn.Module:
        return self.replicas[m]

    def collect_grads(self) -> None:
        """Stack every replica's ``.grad`` into the stacked tensors' ``.grad`` (zeros if unused)."""
        for name in self.names:
            grads = []
            for replica in self.replicas:
                p = replica.get_parameter(name)
                grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
            stacked = self.stacked[name]
            if stacked.grad is None:
                stacked.grad = torch.empty_like(stacked)
            torch.stack(grads, out=stacked.grad)

    def zero_grad(self) -> None:
        for replica in self.replicas:
            replica.zero_grad(set_to_none=True)
        for t in self.stacked.values():
            t.grad = None

    def train(self, mode: bool = True) -> "StackedReplicas":
        for r in self.replicas:
            r.train(mode)
        return self

    def eval(self) -> "StackedReplicas":
        return self.train(False)

    def worker_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Worker m's parameters as an ordinary module state dict (clones)."""
        return {k: v.detach().clone() for k, v in self.replicas[m].state_dict().items()}

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
