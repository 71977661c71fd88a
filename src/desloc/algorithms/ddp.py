"""DDP: average the gradient over workers every step, then one inner-optimizer step.

    g^m = grad F(x; xi^m)                  (local)
    g   = E_m[g^m]                         (all-reduce, tag "grads")
    g   = clip(g, rho)                     (optional)
    x   = OPT.step(x, g)                   (identical on every worker)

Zero-copy: the gradients are views of a flat buffer (``p.grad`` bound to it after the first
backward; the training loop zeroes gradients in place -- ``zero_grad(set_to_none=False)`` --
as with DDP's ``gradient_as_bucket_view``), so the all-reduce runs on that buffer in place.
Gradients set to None are re-created by backward and copied into the buffer at the next sync.

Communication: one model-sized tensor (the gradient) per step (schedule ``{"grads": 1}``) -- the reference that every
``ratio_vs_ddp`` divides. Parameters stay identical on all workers if they start identical.
This is the quality upper bound of the DES-LOC paper. Reduces to: single-worker OPT at M = 1.
"""

from __future__ import annotations

import torch

from desloc.algorithms.base import SyncedOptimizer
from desloc.algorithms.schedule import SyncSchedule
from desloc.algorithms.spec import MethodSpec


class DDP(SyncedOptimizer):
    algorithm = "ddp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = SyncSchedule({"grads": 1})

    def _flat_tags(self) -> list[str]:
        return ["grads"]

    def _before_local_step(self) -> None:
        for p in self.params:
            if p.grad is None:  # every worker must contribute the same tensors
                p.grad = torch.zeros_like(p)
        self._sync(["grads"])
        self._clip()


def _build(cfg, inner, comm, roles, kwargs) -> DDP:
    return DDP(inner, comm, **kwargs)


SPEC = MethodSpec("all-reduce the gradient every step", _build, frozenset({"clip_rho"}),
                  why_fixed="syncs every step", syncs_params=False)
