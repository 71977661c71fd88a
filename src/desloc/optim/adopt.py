r"""ADOPT (Taniguchi et al., NeurIPS 2024), as used by the DES-LOC and MT-DAO papers.

    step 0:    v <- g^2                                   (no parameter update)
    step t>=1: n = g / max(sqrt(v), eps)                  (v from the previous step)
               n = clamp(n, -t^(1/4), t^(1/4))
               u <- beta1 u + (1 - beta1) n
               x <- x - lr (u + wd x)        (decoupled: x <- x (1 - lr wd) - lr u)
               v <- beta2 v + (1 - beta2) g^2

States: ``exp_avg`` (u), ``exp_avg_sq`` (v), and a scalar ``step`` (t, counts calls). Defaults
betas (0.9, 0.9999), eps 1e-6. Every operation is elementwise, so the simulator may stack
workers. The math lives in :func:`adopt_update`; the class only holds state.
"""

from __future__ import annotations

import torch


def adopt_normalize(grad: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, eps: float) -> torch.Tensor:
    """n = clamp(g / max(sqrt(v), eps), -t^(1/4), t^(1/4)), a new tensor (v from the previous step)."""
    normed = grad / exp_avg_sq.sqrt().clamp_(min=eps)
    bound = step**0.25
    return normed.clamp_(-bound, bound)


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
    if step == 0:
        exp_avg_sq.copy_(grad * grad)
        return
    normed = adopt_normalize(grad, exp_avg_sq, step, eps)
    exp_avg.mul_(beta1).add_(normed, alpha=1 - beta1)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(exp_avg, alpha=-lr)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


class ADOPT(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.9999), eps: float = 1e-6, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"ADOPT lr must be >= 0, got {lr}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"ADOPT betas[{i}] must be in [0, 1), got {b}")
        if eps <= 0:
            raise ValueError(f"ADOPT eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"ADOPT weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                step = int(state["step"].item())
                adopt_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step,
                             group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                state["step"] += 1
        return loss
