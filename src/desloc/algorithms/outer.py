r"""The outer step on the pseudo-gradient, shared by DiLoCo, DES-LOC + Nesterov and GASLoC.

Each worker keeps an anchor xbar (the parameters at the start of the round; xbar_0 = x_0) and an
outer optimizer over it (``torch.optim.SGD`` with Nesterov momentum; by default lr and momentum
follow the round length H: :func:`default_outer_lr` and :func:`default_outer_momentum`, plain
averaging for H <= 50 and DiLoCo's lr 0.7, momentum 0.9 from H = 500). At the end of a round, given the parameters x the round produced::

    Delta = xbar - x                 (the pseudo-gradient; DiLoCo and DES-LOC pass x = E_m[x^m],
                                      GASLoC each worker's own x_i)
    xbar  = OUTER.step(xbar, Delta)  (SGD: m <- mu m + Delta; xbar <- xbar - eta (Delta + mu m))
    x     = xbar                     (copy back)

The math is torch's SGD on ``xbar.grad = Delta``; this class holds the anchor and the outer
optimizer, adds parameters (``add_param_group``) and saves / restores both in ``state_dict``.
Outer SGD with lr 1 and no momentum gives xbar - (xbar - x) = x: plain averaging
(``tests/test_outer.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from desloc.errors import CheckpointMismatchError

OuterFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def default_outer_momentum(period: int) -> float:
    """The outer Nesterov momentum for rounds of H = ``period`` inner steps.

    The momentum's memory in rounds, 1 / (1 - mu), grows with H: 1 / (1 - mu) = H / 50, floored at
    mu = 0 and capped at DiLoCo's 0.9 -- so mu = 0 for H <= 50, 0.5 at H = 100, 0.9 from H = 500
    (DiLoCo's published setting, Douillard et al. 2023, arXiv 2311.08105, is mu = 0.9 at H ~ 500).
    Source for the small-H end: benchmarks/outer_sweep.py (record results/outer_sweep.json): on the
    tiny GPT at H = 8 and 32, mu = 0.9 was 6.5-19.4% worse than local-adam in every same-seed
    comparison and mu = 0 at least as good as 0.5 -- when successive rounds point the same way the
    outer step multiplies their progress by up to lr / (1 - mu) = 7. Between H = 32 and 500 the rule
    interpolates; that range was not measured.
    """
    return min(0.9, max(0.0, 1.0 - 50.0 / period))


def default_outer_lr(period: int) -> float:
    """The outer learning rate for rounds of H = ``period`` inner steps: 1 - mu(H) / 3.

    It moves with the momentum of :func:`default_outer_momentum`: lr 1 while mu = 0 (H <= 50: the
    outer step is plain averaging, x <- E_m[x]), DiLoCo's 0.7 once mu = 0.9 (H >= 500), and in
    between the gain once the momentum buffer is full, lr / (1 - mu), grows smoothly from 1
    (0.93 / 0.78 = 1.19 at H = 64, 0.83 / 0.5 = 1.67 at H = 100, 7 at H = 500).
    Source: benchmarks/outer_sweep.py, record results/outer_defaults.json (tiny GPT, M = 4,
    H in {4, 8, 16, 32, 64}, outer lr {0.7, 1.0, 1.4} with momentum 0 and lr {0.7, 1.0} with 0.5,
    two seeds, 384 steps): lr 0.7 with mu = 0 (the previous default for H <= 50, a 30% pull back
    to the old anchor every round) was worse than lr 1 in 7 of 8 same-seed pairs at H <= 32 (by
    0.1-4.2%; better by 1.3% in one), and lr 1.4 was worse than lr 1 in all 10 pairs. The rule is
    within 1% of the best setting of the same seed in 8 of 10 (H, seed) pairs; it misses at H = 16
    (+2.1%) and H = 32 (+1.2%), seed 1, where lr 0.7 with mu 0.5 was best. Measured only up to
    H = 64; between 64 and 500 it is an interpolation to DiLoCo's published point.
    """
    return round(1.0 - default_outer_momentum(period) / 3.0, 6)


def nesterov_sgd(lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> OuterFactory:
    """The outer optimizer the papers use: SGD with (Nesterov) momentum on the pseudo-gradient."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


class OuterStep:
    """Anchor copies of ``params`` and the outer optimizer ``factory(anchor)`` over them."""

    def __init__(self, params: list[torch.Tensor], factory: OuterFactory):
        self.anchor = [p.detach().clone() for p in params]
        self.optimizer = factory(self.anchor)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"outer must build a torch.optim.Optimizer, got {type(self.optimizer).__name__}")

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], indices: list[int] | None = None) -> None:
        """xbar <- OUTER.step(xbar, Delta = xbar - x). The caller then copies back (after GASLoC's
        gossip of the anchors, directly for DiLoCo). ``indices``: step only those anchors (one
        fragment of a streamed sync; ``params[i]`` goes with ``anchor[indices[i]]``) -- the outer
        optimizer skips the anchors without a gradient, momentum included."""
        anchors = self.anchor if indices is None else [self.anchor[i] for i in indices]
        for xbar, x in zip(anchors, params):
            xbar.grad = xbar - x
        self.optimizer.step()

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        """x <- xbar."""
        for xbar, x in zip(self.anchor, params):
            x.copy_(xbar)
            xbar.grad = None

    def add(self, params: list[torch.Tensor]) -> None:
        """New parameters (``add_param_group``): their anchor starts at their current value."""
        new = [p.detach().clone() for p in params]
        self.anchor += new
        self.optimizer.add_param_group({"params": new})

    def hyperparameters(self, keys: tuple[str, ...] = ("lr", "momentum", "nesterov", "dampening")) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.defaults.items() if k in keys}

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.detach().clone() for a in self.anchor], "outer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["anchor"]) != len(self.anchor):
            raise CheckpointMismatchError(f"checkpoint has {len(state['anchor'])} outer anchors but this "
                                          f"optimizer has {len(self.anchor)} parameters")
        for a, saved in zip(self.anchor, state["anchor"]):
            a.copy_(saved)
        self.optimizer.load_state_dict(state["outer"])
