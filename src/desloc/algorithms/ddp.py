"""DDP: average the gradient over workers every step, then one inner-optimizer step.

    g^m = grad F(x; xi^m)                  (local)
    g   = E_m[g^m]                         (all-reduce, tag "grads")
    g   = clip(g, rho)                     (optional)
    x   = OPT.step(x, g)                   (identical on every worker)

Communication: one model-sized tensor (the gradient) per step (schedule ``{"grads": 1}``) -- the reference that every
``ratio_vs_ddp`` divides. Parameters stay identical on all workers if they start identical.
This is the quality upper bound of the DES-LOC paper. Reduces to: single-worker OPT at M = 1.
"""

from __future__ import annotations

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.schedule import SyncSchedule


class DDP(SyncedOptimizer):
    algorithm = "ddp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = SyncSchedule({"grads": 1})

    def _before_local_step(self) -> None:
        grads = []
        for p in self.params:
            if p.grad is None:  # every worker must contribute the same tensors
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.comm.all_reduce_mean(grads, ["grads"] * len(grads))
        self._clip()
