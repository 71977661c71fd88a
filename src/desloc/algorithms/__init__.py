"""The registry of methods. Names here are the CLI's ``--method`` values.

``build_method(cfg, inner, comm)`` turns a validated :class:`MethodConfig` and an inner optimizer
into the wrapping :class:`~desloc.algorithms.base.LocalOptimizer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from desloc.algorithms.base import LocalOptimizer
from desloc.algorithms.ddp import DDP
from desloc.algorithms.desloc import DesLoc
from desloc.comm.base import Communicator
from desloc.errors import ConfigError, check_period


AUTO = "auto"  # a period resolved from period_x by the method


@dataclass
class MethodConfig:
    """Which method and its sync periods.

    name: registry name (see :data:`METHODS`).
    period_x: K_x, steps between parameter averages (the K of local-adam / keep-states /
        reset-states).
    period_u: K_u, first-moment period for desloc: ``"auto"`` (default) = 3 * period_x,
        None = never.
    period_v: K_v, second-moment period for desloc: ``"auto"`` (default) = 6 * period_x,
        None = never.
    clip_rho: coordinate-wise gradient clip bound, None = off.
    outer: outer optimizer on the pseudo-gradient at each parameter sync: "nesterov" (SGD with
        Nesterov momentum), "sgd" (plain momentum) or None (plain averaging). diloco defaults to
        "nesterov"; desloc and local-adam accept it too (the paper's "DES-LOC + Nesterov").
    outer_lr, outer_momentum: the outer SGD's learning rate and momentum (DiLoCo: 0.7, 0.9).
    """

    name: str = "desloc"
    period_x: int = 256
    period_u: int | None | str = "auto"
    period_v: int | None | str = "auto"
    clip_rho: float | None = None
    outer: str | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        check_period("period_x (K_x)", self.period_x)
        for field in ("period_u", "period_v"):
            if getattr(self, field) != AUTO:
                check_period(f"{field} (K_{field[-1]})", getattr(self, field), allow_none=True)
        if self.clip_rho is not None and not self.clip_rho > 0:
            raise ConfigError(f"clip_rho must be > 0 or None (off), got {self.clip_rho}")
        if self.name == "diloco" and self.outer is None:
            self.outer = "nesterov"
        if self.outer not in (None, "nesterov", "sgd"):
            raise ConfigError(f"outer must be 'nesterov', 'sgd' or None, got {self.outer!r}")
        if self.outer is not None and self.name == "ddp":
            raise ConfigError("ddp has no parameter sync to put an outer optimizer on; drop --outer")
        if not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0, got {self.outer_lr}; DiLoCo uses 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}; DiLoCo uses 0.9")
        if self.name == "desloc":
            if self.period_u == AUTO:
                self.period_u = 3 * self.period_x
            if self.period_v == AUTO:
                self.period_v = 6 * self.period_x
        elif self.name == "local-adam":
            for field in ("period_u", "period_v"):
                val = getattr(self, field)
                if val != AUTO and val != self.period_x:
                    raise ConfigError(
                        f"local-adam syncs every state with the parameters, so {field} must equal "
                        f"period_x={self.period_x} (got {val}); use --method desloc for different periods"
                    )
            self.period_u = self.period_v = self.period_x
        else:  # the other methods do not use state periods
            self.period_u = self.period_v = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outer_factory(cfg: MethodConfig) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None:
    """The outer optimizer named by ``cfg.outer`` (SGD on the pseudo-gradient), or None."""
    if cfg.outer is None:
        return None
    nesterov = cfg.outer == "nesterov" and cfg.outer_momentum > 0
    return lambda params: torch.optim.SGD(params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=nesterov)


def _periods(cfg: MethodConfig, roles: dict[str, str], u: int | None, v: int | None) -> dict[str, int | None]:
    return {name: (u if role == "u" else v) for name, role in roles.items()}


def _build_desloc(cfg, inner, comm, roles, **kw):
    kw.setdefault("outer", outer_factory(cfg))
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, cfg.period_u, cfg.period_v),
                  clip_rho=cfg.clip_rho, **kw)


def _build_local_adam(cfg, inner, comm, roles, **kw):
    kw.setdefault("outer", outer_factory(cfg))
    k = cfg.period_x
    return DesLoc(inner, comm, k, _periods(cfg, roles, k, k), clip_rho=cfg.clip_rho, **kw)


def _build_keep(cfg, inner, comm, roles, **kw):
    kw.setdefault("outer", outer_factory(cfg))
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, None, None), clip_rho=cfg.clip_rho, **kw)


def _build_reset(cfg, inner, comm, roles, **kw):
    kw.setdefault("outer", outer_factory(cfg))
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, None, None),
                  reset_states_on_param_sync=True, clip_rho=cfg.clip_rho, **kw)


def _build_diloco(cfg, inner, comm, roles, **kw):
    kw.setdefault("outer", outer_factory(cfg))
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, None, None), clip_rho=cfg.clip_rho, **kw)


def _build_ddp(cfg, inner, comm, roles, **kw):
    return DDP(inner, comm, clip_rho=cfg.clip_rho, **kw)


Builder = Callable[..., LocalOptimizer]
METHODS: dict[str, tuple[Builder, str]] = {
    "ddp": (_build_ddp, "all-reduce the gradient every step"),
    "local-adam": (_build_local_adam, "parameters and all optimizer states every K steps"),
    "desloc": (_build_desloc, "parameters every K_x, first moment every K_u, second every K_v"),
    "keep-states": (_build_keep, "parameters every K_x, optimizer states never (FAVG+OPT)"),
    "reset-states": (_build_reset, "parameters every K_x, states zeroed at each parameter sync"),
    "diloco": (_build_diloco, "every H = K_x steps an outer Nesterov step on the averaged pseudo-gradient"),
}


def build_method(
    cfg: MethodConfig,
    inner: torch.optim.Optimizer,
    comm: Communicator,
    state_roles: dict[str, str],
    **kwargs: Any,
) -> LocalOptimizer:
    """Wrap ``inner`` in the method ``cfg.name``. ``state_roles`` maps state names to u / v."""
    builder, _ = METHODS[cfg.name]
    opt = builder(cfg, inner, comm, state_roles, **kwargs)
    opt.algorithm = cfg.name
    return opt


__all__ = ["DDP", "DesLoc", "LocalOptimizer", "METHODS", "MethodConfig", "build_method"]
