r"""DiLoCo (Douillard et al. 2023): H local steps, then an outer Nesterov step on the averaged
pseudo-gradient.

Update::

    xbar_0 = x_0                                    (every worker starts from the same x)
    for t = 0 .. T-1:
        every worker m:  (x^m, s^m) = OPT.step(x^m, s^m, clip(grad F(x^m; xi^m), rho), lr_t)
        if (t+1) % H == 0:
            Delta = xbar - E_m[x^m]                  (one model-sized all-reduce, tag "params")
            xbar  = OUTER.step(xbar, Delta)          (SGD lr eta(H), Nesterov momentum mu(H))
            x^m   = xbar                             for all m

The inner optimizer's states s^m are never communicated (K_u = K_v = infinity). Symbols ->
arguments: H -> ``period``, eta and mu (outer lr and momentum) -> ``outer`` (default
:func:`~desloc.algorithms.outer.nesterov_sgd` with eta =
:func:`~desloc.algorithms.outer.default_outer_lr` (H) and mu =
:func:`~desloc.algorithms.outer.default_outer_momentum` (H): DiLoCo's 0.7 and 0.9 at H >= 500,
lr 1 and momentum 0 -- plain averaging -- for H <= 50), rho -> ``clip_rho``.

Communication per step: 1/H model-sized tensors. It is DES-LOC with no state syncs and an outer
optimizer (:class:`~desloc.algorithms.desloc.DesLoc`, :mod:`desloc.algorithms.outer`), and
reduces to Local SGD / keep-states (plain averaging) with outer SGD lr 1 and no momentum
(``tests/test_outer.py``); GASLoC on the complete graph equals it (``tests/test_gasloc.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from desloc.algorithms.desloc import DesLoc
from desloc.algorithms.outer import OuterFactory, default_outer_lr, default_outer_momentum, nesterov_sgd
from desloc.algorithms.spec import MethodSpec, fast_sync_kwargs, outer_factory
from desloc.comm.base import Communicator


class DiLoCo(DesLoc):
    algorithm = "diloco"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Communicator,
        period: int,
        state_names: Sequence[str],
        outer: OuterFactory | None = None,
        clip_rho: float | None = None,
        assume_elementwise: bool = False,
        **sync_options,
    ):
        """``sync_options``: DesLoc's ``param_delay``, ``overlap``, ``zero_copy``."""
        super().__init__(inner, comm, period, {name: None for name in state_names}, clip_rho=clip_rho,
                         assume_elementwise=assume_elementwise,
                         outer=outer or nesterov_sgd(default_outer_lr(period), default_outer_momentum(period)), **sync_options)


def _build(cfg, inner, comm, roles, kwargs) -> DiLoCo:
    kwargs.setdefault("param_delay", cfg.param_delay)
    kwargs.setdefault("overlap", cfg.overlap)
    fast_sync_kwargs(cfg, kwargs)
    return DiLoCo(inner, comm, cfg.period_x, list(roles), outer=kwargs.pop("outer", outer_factory(cfg)), **kwargs)


SPEC = MethodSpec("every H = K_x steps an outer Nesterov step on the averaged pseudo-gradient", _build,
                  frozenset({"period_x", "clip_rho", "outer", "outer_lr", "outer_momentum", "param_delay", "fragments",
                             "fragment_alpha", "compression", "stream"}),
                  why_fixed="never syncs optimizer states", outer="nesterov")
