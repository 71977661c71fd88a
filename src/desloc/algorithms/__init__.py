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
from desloc.algorithms.gasloc import GasLoc
from desloc.comm.base import Communicator
from desloc.errors import ConfigError, check_finite, check_period


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
    topology: gasloc's gossip graph: one-peer | two-peer | ring | complete | none.
    local_steps: gasloc's per-worker local-step counts H_i (<= period_x = H); None = all H.
    gossip_seed: seed of gasloc's random matchings (identical on every worker).
    momentum_periods: K_j for each first momentum u^j of an MT-DAO inner optimizer (mtdao,
        desloc); None = every momentum on period_u.
    """

    name: str = "desloc"
    period_x: int = 256
    period_u: int | None | str = "auto"
    period_v: int | None | str = "auto"
    clip_rho: float | None = None
    outer: str | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    topology: str = "one-peer"
    local_steps: list[int] | None = None
    gossip_seed: int = 0
    momentum_periods: list[int | None] | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        check_period("period_x (K_x)", self.period_x)
        for field in ("period_u", "period_v"):
            if getattr(self, field) != AUTO:
                check_period(f"{field} (K_{field[-1]})", getattr(self, field), allow_none=True)
        if self.clip_rho is not None:
            check_finite("clip_rho", self.clip_rho, "clip_rho=1.0, or None (off)")
        check_finite("outer_lr", self.outer_lr, "outer_lr=0.7 (DiLoCo)")
        check_finite("outer_momentum", self.outer_momentum, "outer_momentum=0.9 (DiLoCo)")
        if self.clip_rho is not None and not self.clip_rho > 0:
            raise ConfigError(f"clip_rho must be > 0 or None (off), got {self.clip_rho}")
        if self.name in ("diloco", "gasloc") and self.outer is None:
            self.outer = "nesterov"
        if self.outer not in (None, "nesterov", "sgd"):
            raise ConfigError(f"outer must be 'nesterov', 'sgd' or None, got {self.outer!r}")
        if self.outer is not None and self.name == "ddp":
            raise ConfigError("ddp has no parameter sync to put an outer optimizer on; drop --outer")
        if not self.outer_lr > 0:
            raise ConfigError(f"outer_lr must be > 0, got {self.outer_lr}; DiLoCo uses 0.7")
        if not 0.0 <= self.outer_momentum < 1.0:
            raise ConfigError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}; DiLoCo uses 0.9")
        from desloc.topology import TOPOLOGIES

        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"unknown topology {self.topology!r}; choose one of {TOPOLOGIES}")
        if self.local_steps is not None:
            self.local_steps = list(self.local_steps)
            if any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= self.period_x
                   for h in self.local_steps):
                raise ConfigError(f"local_steps (H_i) must be integers in [1, period_x={self.period_x}], "
                                  f"got {self.local_steps}; e.g. --local-steps {self.period_x},{max(1, self.period_x // 4)}")
        if self.momentum_periods is not None:
            self.momentum_periods = list(self.momentum_periods)
            for j, k in enumerate(self.momentum_periods):
                check_period(f"momentum_periods[{j}] (K_{j})", k, allow_none=True)
            if self.name not in ("desloc", "mtdao"):
                raise ConfigError(f"momentum_periods apply to desloc and mtdao, not {self.name}")
        if self.name == "mtdao":  # MT-DAO: all periods default to K_x (the paper's K = 32 example)
            if self.period_u == AUTO:
                self.period_u = self.period_x
            if self.period_v == AUTO:
                self.period_v = self.period_x
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
        elif self.name != "mtdao":  # the other methods do not use state periods
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
    """State name -> period from its role: u (or u<j>, MT-DAO's j-th momentum) or v."""
    out: dict[str, int | None] = {}
    for name, role in roles.items():
        if role == "v":
            out[name] = v
        elif role.startswith("u") and role[1:].isdigit() and cfg.momentum_periods is not None and u is not None:
            j = int(role[1:])
            if j >= len(cfg.momentum_periods):
                raise ConfigError(f"momentum_periods has {len(cfg.momentum_periods)} entries but the inner "
                                  f"optimizer has momentum u{j}; give one period per momentum")
            out[name] = cfg.momentum_periods[j]
        else:
            out[name] = u
    if cfg.momentum_periods is not None and u is not None:
        n_momenta = sum(1 for r in roles.values() if r.startswith("u") and r[1:].isdigit())
        if len(cfg.momentum_periods) != n_momenta:
            raise ConfigError(f"momentum_periods has {len(cfg.momentum_periods)} entries but the inner "
                              f"optimizer has {n_momenta} MT-DAO momenta (u0, u1, ...); give one period "
                              "per momentum" + ("" if n_momenta else ", or drop momentum_periods"))
    return out


def _build_mtdao(cfg, inner, comm, roles, **kw):
    from desloc.optim import MTDAO

    if not isinstance(inner, MTDAO):
        raise ConfigError(f"method mtdao needs the MT-DAO inner optimizer (--inner mtdao or mtdao-adam), "
                          f"got {type(inner).__name__}")
    return _build_desloc(cfg, inner, comm, roles, **kw)


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


def _build_gasloc(cfg, inner, comm, roles, **kw):
    kw.setdefault("state_names", list(roles))
    return GasLoc(inner, comm, cfg.period_x, topology=cfg.topology, outer_lr=cfg.outer_lr,
                  outer_momentum=cfg.outer_momentum, nesterov=cfg.outer == "nesterov",
                  local_steps=cfg.local_steps, seed=cfg.gossip_seed, clip_rho=cfg.clip_rho, **kw)


def _build_ddp(cfg, inner, comm, roles, **kw):
    return DDP(inner, comm, clip_rho=cfg.clip_rho, **kw)


Builder = Callable[..., LocalOptimizer]
METHODS: dict[str, tuple[Builder, str]] = {
    "ddp": (_build_ddp, "all-reduce the gradient every step"),
    "local-adam": (_build_local_adam, "parameters and all optimizer states every K steps"),
    "desloc": (_build_desloc, "parameters every K_x, first moment every K_u, second every K_v"),
    "keep-states": (_build_keep, "parameters every K_x, optimizer states never (FAVG+OPT)"),
    "reset-states": (_build_reset, "parameters every K_x, states zeroed at each parameter sync"),
    "mtdao": (_build_mtdao, "MT-DAO: N first momenta, each synced every K_j; x every K_x, v every K_v"),
    "gasloc": (_build_gasloc, "gossip with random peers every H steps after a local outer Nesterov step"),
    "diloco": (_build_diloco, "every H = K_x steps an outer Nesterov step on the averaged pseudo-gradient"),
}


def parse_method_spec(spec: str) -> dict[str, Any]:
    """``name[+outer][@topology]`` -> MethodConfig fields, e.g. ``desloc+nesterov``, ``gasloc@two-peer``."""
    out: dict[str, Any] = {}
    name = spec
    if "@" in name:
        name, out["topology"] = name.split("@", 1)
    if "+" in name:
        name, out["outer"] = name.split("+", 1)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} in {spec!r}; choose from {sorted(METHODS)}, "
                          "optionally with +nesterov / +sgd (outer) or @<topology> (gasloc)")
    out["name"] = name
    return out


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


__all__ = ["parse_method_spec", "DDP", "DesLoc", "GasLoc", "LocalOptimizer", "METHODS", "MethodConfig", "build_method"]
