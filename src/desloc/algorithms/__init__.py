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
    """

    name: str = "desloc"
    period_x: int = 256
    period_u: int | None | str = "auto"
    period_v: int | None | str = "auto"
    clip_rho: float | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        check_period("period_x (K_x)", self.period_x)
        for field in ("period_u", "period_v"):
            if getattr(self, field) != AUTO:
                check_period(f"{field} (K_{field[-1]})", getattr(self, field), allow_none=True)
        if self.clip_rho is not None and not self.clip_rho > 0:
            raise ConfigError(f"clip_rho must be > 0 or None (off), got {self.clip_rho}")
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


def _periods(cfg: MethodConfig, roles: dict[str, str], u: int | None, v: int | None) -> dict[str, int | None]:
    return {name: (u if role == "u" else v) for name, role in roles.items()}


def _build_desloc(cfg, inner, comm, roles, **kw):
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, cfg.period_u, cfg.period_v),
                  clip_rho=cfg.clip_rho, **kw)


def _build_local_adam(cfg, inner, comm, roles, **kw):
    k = cfg.period_x
    return DesLoc(inner, comm, k, _periods(cfg, roles, k, k), clip_rho=cfg.clip_rho, **kw)


def _build_keep(cfg, inner, comm, roles, **kw):
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, None, None), clip_rho=cfg.clip_rho, **kw)


def _build_reset(cfg, inner, comm, roles, **kw):
    return DesLoc(inner, comm, cfg.period_x, _periods(cfg, roles, None, None),
                  reset_states_on_param_sync=True, clip_rho=cfg.clip_rho, **kw)


def _build_ddp(cfg, inner, comm, roles, **kw):
    return DDP(inner, comm, clip_rho=cfg.clip_rho, **kw)


Builder = Callable[..., LocalOptimizer]
METHODS: dict[str, tuple[Builder, str]] = {
    "ddp": (_build_ddp, "all-reduce the gradient every step"),
    "local-adam": (_build_local_adam, "parameters and all optimizer states every K steps"),
    "desloc": (_build_desloc, "parameters every K_x, first moment every K_u, second every K_v"),
    "keep-states": (_build_keep, "parameters every K_x, optimizer states never (FAVG+OPT)"),
    "reset-states": (_build_reset, "parameters every K_x, states zeroed at each parameter sync"),
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
