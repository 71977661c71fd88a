r"""ADOPT (Taniguchi et al., NeurIPS 2024), as used by the DES-LOC and MT-DAO papers.

    step 0:    v <- g^2                                   (no parameter update)
    step t>=1: n = g / max(sqrt(v), eps)                  (v from the previous step)
               n = clamp(n, -t^(1/4), t^(1/4))
               u <- beta1 u + (1 - beta1) n
               x <- x - lr (u + wd x)        (decoupled: x <- x (1 - lr wd) - lr u)
               v <- beta2 v + (1 - beta2) g^2

States: ``exp_avg`` (u), ``exp_avg_sq`` (v), and a scalar ``step`` (t, counts calls). Defaults
betas (0.9, 0.9999), eps 1e-6. Every operation is elementwise, so the simulator may stack
workers. ADOPT is the ADOPT-flavour step of :mod:`desloc.optim.elementwise` with one momentum and
no mixing weights (MT-DAO with N = 1, omega = 1); :func:`adopt_update` is that step on one tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from desloc.optim.elementwise import ElementwiseOptimizer, Rule, adopt_flavour_step, check_decay, check_lr_eps_wd


def adopt_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One ADOPT step in place. ``step`` is the number of earlier calls (0 on the first)."""
    adopt_flavour_step([param], [grad], [[exp_avg]], [exp_avg_sq], step, lr, (beta1,), None, beta2, eps,
                       weight_decay)


class ADOPT(ElementwiseOptimizer):
    """ADOPT; see the module docstring for the update. Invalid arguments raise ConfigError."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.9999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _validate(self, hyper: dict[str, Any]) -> None:
        for i, b in enumerate(hyper["betas"]):
            check_decay("ADOPT", f"betas[{i}]", b)
        check_lr_eps_wd("ADOPT", hyper, eps_hint=1e-6)

    def _rule(self, group: dict[str, Any]) -> Rule:
        beta1, beta2 = group["betas"]
        return Rule("adopt", ("exp_avg",), (beta1,), None, beta2)
